"""Command line: ``mullama generate "Once upon a time"``, ``mullama convert FOLDER``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mullama", description="Run GGUF models with llama.cpp.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream a completion of PROMPT to stdout")
    gen.add_argument("prompt")
    gen.add_argument("-m", "--model", help="path of a GGUF file (default: SmolLM2-135M-Instruct, fetched once)")
    gen.add_argument("-n", "--max-tokens", type=int, default=128)
    gen.add_argument("-c", "--ctx-size", type=int, default=2048)
    gen.add_argument("-t", "--threads", type=int, default=0)
    gen.add_argument("--temp", type=float, default=None, help="temperature (0 = greedy)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--chat", action="store_true", help="wrap PROMPT in the model's chat template")
    sub.add_parser("info", help="print the llama.cpp build information")
    conv = sub.add_parser("convert", help="convert a BERT sentence-transformers FOLDER to GGUF (no PyTorch); print its path")
    conv.add_argument("folder")
    conv.add_argument("-o", "--out", help="where to write the GGUF file (default: the model cache)")
    conv.add_argument("--outtype", choices=["f16", "f32", "q8_0"], default="f16")
    srv = sub.add_parser("serve", help="serve OpenAI's API (chat, completions, embeddings) over HTTP")
    srv.add_argument("-m", "--model", help="path of a GGUF file (default: SmolLM2-135M-Instruct, fetched once)")
    srv.add_argument("--embedding-model", help="GGUF file for /v1/embeddings (default: the model)")
    srv.add_argument("--parallel", "-np", type=int, default=8, help="requests decoded together (default 8)")
    srv.add_argument("--ctx-size", "-c", type=int, default=None,
                     help="context tokens in all, split between the parallel requests (default: 2048 each)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8080)
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (default: none)")
    srv.add_argument("--max-waiting", type=int, default=None,
                     help="requests allowed to wait for a slot; beyond them 503 + Retry-After (default: no limit)")
    srv.add_argument("--alias", default=None, help="the model's name in the API (default: its file name)")
    srv.add_argument("-t", "--threads", type=int, default=0)
    srv.add_argument("--drain", type=float, default=10.0,
                     help="seconds Ctrl-C or SIGTERM waits for running requests before exiting (default 10)")
    srv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    srv.add_argument("--rpc", default=None,
                     help="comma-separated host:port of mullama rpc-server processes to spread the layers over")
    rpc = sub.add_parser("rpc-server", help="offer this machine's compute to llama.cpp RPC clients (no authentication: "
                                            "private networks only)")
    rpc.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    rpc.add_argument("--port", "-p", type=int, default=50052)
    rpc.add_argument("--threads", "-t", type=int, default=0, help="CPU threads (default: the cores available)")
    rpc.add_argument("--cache", default=None, metavar="DIR",
                     help="keep large tensors in DIR between runs, so clients send them once")
    args = parser.parse_args(argv)

    import mullama

    if args.command == "convert":
        try:
            print(mullama.models.convert(args.folder, outtype=args.outtype, out=args.out))
        except mullama.MullamaError as exc:
            print(f"mullama: {exc}", file=sys.stderr)
            return 1
        return 0
    if args.command == "serve":
        return _serve(args)
    if args.command == "rpc-server":
        return _rpc_server(args)

    if args.command == "info":
        print(f"mullama {mullama.__version__}, llama.cpp {mullama.version()}")
        print(mullama.system_info())
        return 0

    path = args.model or mullama.models.fetch()
    params = mullama.SamplerParams(seed=args.seed)
    if args.temp is not None:
        params.temperature = args.temp
    try:
        with mullama.Model.load(path) as model, mullama.Context(model, n_ctx=args.ctx_size, n_threads=args.threads) as ctx:
            prompt = args.prompt
            if args.chat:
                prompt = model.apply_chat_template([("user", prompt)])
            with ctx.generate_stream(prompt, max_tokens=args.max_tokens, params=params) as stream:
                for piece in stream:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            sys.stdout.write("\n")
    except mullama.MullamaError as exc:
        print(f"mullama: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _serve(args: argparse.Namespace) -> int:
    import logging

    import mullama

    try:
        import uvicorn

        from mullama.server import create_app
    except ImportError as exc:
        print(f"mullama serve needs the server extra: pip install 'mullama[server]' ({exc})", file=sys.stderr)
        return 1
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("mullama").setLevel(logging.WARNING)   # llama.cpp's own log stays quiet
    logging.getLogger("mullama.server").setLevel(args.log_level.upper())
    try:   # loaded before the port opens: a bad file stops here, with llama.cpp's reason
        model = mullama.Model.load(args.model or mullama.models.fetch(), rpc=args.rpc)
        embedding = mullama.Model.load(args.embedding_model) if args.embedding_model else None
    except mullama.MullamaError as exc:
        print(f"mullama: {exc}", file=sys.stderr)
        return 1
    app = create_app(model, embedding_model=embedding, parallel=args.parallel, ctx_size=args.ctx_size,
                     api_key=args.api_key, max_waiting=args.max_waiting, model_name=args.alias,
                     n_threads=args.threads)
    # uvloop and httptools where installed ("auto"); uvicorn's SIGINT/SIGTERM handling stops
    # accepting, waits up to --drain seconds for running requests, then closes the engine.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                timeout_graceful_shutdown=args.drain, loop="auto", http="auto")
    return 0


def _rpc_server(args: argparse.Namespace) -> int:
    import signal

    import mullama

    if args.host not in ("127.0.0.1", "::1", "localhost"):
        print(f"mullama rpc-server: listening on {args.host}: the RPC protocol has no authentication; "
              "keep this port on a private network", file=sys.stderr)
    # The server loop runs in C and never returns to Python: let Ctrl-C and SIGTERM end the process.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        mullama.rpc_serve(args.host, args.port, n_threads=args.threads, cache_dir=args.cache)
    except mullama.MullamaError as exc:
        print(f"mullama: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
