"""Command line: ``mullama generate "Once upon a time"``, ``mullama chat``, ``mullama embed FILE``,
``mullama info [MODEL]``, ``mullama models list``, ``mullama convert FOLDER``, ``mullama serve``,
``mullama rpc-server``.

Exit codes: 0 success, 1 a mullama error (one line on stderr, no traceback), 2 bad usage
(argparse), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

MODEL_HELP = "a GGUF file or a known model name (default: SmolLM2-135M-Instruct, fetched once)"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit 2) that points at --help instead of printing usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see: {self.prog} --help)\n")


def _int_in(lo: int, hi: int | None = None):
    """An argparse type: an int from lo (to hi), refused at once with the range named."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be from {lo} to {hi}, got {value}" if hi is not None
                                             else f"must be {lo} or more, got {value}")
        return value
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, got {text}")
    return value


def _key(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty (leave --api-key out for a server without a key)")
    return text


PORT = _int_in(0, 65535)
THREADS = _int_in(0, 1024)


def _parser() -> argparse.ArgumentParser:
    from mullama._convert import DEFAULT_OUTTYPE, OUTTYPES

    parser = _Parser(prog="mullama", description="Run GGUF models with llama.cpp.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream a completion of PROMPT to stdout")
    gen.add_argument("prompt")
    gen.add_argument("-m", "--model", help=MODEL_HELP)
    gen.add_argument("-n", "--max-tokens", type=int, default=128)
    gen.add_argument("-c", "--ctx-size", type=int, default=2048)
    gen.add_argument("-t", "--threads", type=int, default=0)
    gen.add_argument("--temp", type=float, default=None, help="temperature (0 = greedy)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--chat", action="store_true", help="wrap PROMPT in the model's chat template")
    chat = sub.add_parser("chat", help="chat with a model (one turn per line when stdin is not a terminal)")
    chat.add_argument("-m", "--model", help=MODEL_HELP)
    chat.add_argument("--system", default=None, help="the system message")
    chat.add_argument("-n", "--max-tokens", type=int, default=256, help="most tokens per reply (default 256)")
    chat.add_argument("-c", "--ctx-size", type=int, default=4096, help="context tokens for the whole chat")
    chat.add_argument("-t", "--threads", type=int, default=0)
    chat.add_argument("--temp", type=float, default=None, help="temperature (0 = greedy)")
    chat.add_argument("--seed", type=int, default=0)
    emb = sub.add_parser("embed", help="embed each line of FILE (or stdin); one vector per line out")
    emb.add_argument("file", nargs="?", default="-", help="a text file, one text per line ('-': stdin)")
    emb.add_argument("-m", "--model", help="a GGUF embedding model or a known name (default: all-MiniLM-L6-v2)")
    emb.add_argument("--format", choices=["jsonl", "npy"], default="jsonl",
                     help="jsonl: one JSON array per line; npy: one 2-D float32 array")
    emb.add_argument("-o", "--out", default="-", help="where to write the vectors ('-': stdout)")
    emb.add_argument("-b", "--batch-size", type=int, default=32, help="texts per batch (default 32)")
    emb.add_argument("-t", "--threads", type=int, default=0)
    info = sub.add_parser("info", help="describe MODEL, or without it the llama.cpp build")
    info.add_argument("model", nargs="?", help="a GGUF file or a known model name")
    info.add_argument("--json", action="store_true", help="print JSON, with all the GGUF metadata")
    models = sub.add_parser("models", help="the known models and the local cache")
    msub = models.add_subparsers(dest="action", required=True)
    msub.add_parser("list", help="the known models: cached or not, where, how big")
    for action, what in (("fetch", "download NAME into the cache"), ("path", "print the cached file of NAME"),
                         ("rm", "delete NAME from the cache")):
        msub.add_parser(action, help=what).add_argument("name")
    conv = sub.add_parser("convert", help="convert a BERT sentence-transformers FOLDER to GGUF (no PyTorch); print its path")
    conv.add_argument("folder")
    conv.add_argument("-o", "--out", help="where to write the GGUF file (default: the model cache)")
    conv.add_argument("--outtype", choices=OUTTYPES, default=DEFAULT_OUTTYPE,
                      help=f"the weights' type (default {DEFAULT_OUTTYPE})")
    srv = sub.add_parser("serve", help="serve OpenAI's API (chat, completions, embeddings) over HTTP")
    srv.add_argument("-m", "--model", help=MODEL_HELP)
    srv.add_argument("--embedding-model", help="GGUF file for /v1/embeddings (default: the model)")
    srv.add_argument("--parallel", "-np", type=_int_in(1), default=8, help="requests decoded together (default 8)")
    srv.add_argument("--ctx-size", "-c", type=_int_in(1), default=None,
                     help="context tokens in all, split between the parallel requests (default: 2048 each)")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=PORT, default=8080)
    srv.add_argument("--api-key", type=_key, default=None, help="require 'Authorization: Bearer KEY' (default: none)")
    srv.add_argument("--max-waiting", type=_int_in(0), default=None,
                     help="requests allowed to wait for a slot; beyond them 503 + Retry-After (default: no limit)")
    srv.add_argument("--alias", default=None, help="the model's name in the API (default: its file name)")
    srv.add_argument("-t", "--threads", type=THREADS, default=0)
    srv.add_argument("--drain", type=_seconds, default=10.0,
                     help="seconds Ctrl-C or SIGTERM waits for running requests before exiting (default 10)")
    srv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    srv.add_argument("--prompt-cache", type=_int_in(0), default=256, metavar="MIB",
                     help="MiB of recent requests' caches kept, so a conversation's next request decodes only "
                          "its new turn (default 256; 0: off)")
    srv.add_argument("--rpc", default=None, metavar="HOST:PORT,...",
                     help="mullama rpc-server processes to spread the model's layers over")
    srv.add_argument("--flash-attn", "-fa", choices=["auto", "on", "off"], default="auto",
                     help="flash attention (default auto: llama.cpp's choice, on for the CPU; there, off makes a "
                          "long chat's next turns faster, and long prompts and many streams slower)")
    srv.add_argument("--chat-template", default=None, metavar="FILE_OR_TEXT",
                     help="a Jinja chat template (a file, or the template itself) replacing the model's own; "
                          "tool calling needs one that can express tools")
    rpc = sub.add_parser("rpc-server", help="offer this machine's compute to llama.cpp RPC clients "
                                            "(no authentication: private networks only)")
    rpc.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    rpc.add_argument("--port", "-p", type=PORT, default=50052)
    rpc.add_argument("--threads", "-t", type=THREADS, default=0, help="CPU threads (default: the cores available)")
    rpc.add_argument("--mem", type=_int_in(1), default=None, metavar="MiB",
                     help="memory to report to clients (default: the device's own); they give each "
                          "server layers in proportion to it")
    rpc.add_argument("--cache", default=None, metavar="DIR",
                     help="keep large tensors in DIR between runs, so clients send them once")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)   # bad usage: argparse prints one usage line and exits 2

    import mullama

    from . import _cli

    commands = {"generate": _generate, "chat": _cli.chat, "embed": _cli.embed, "info": _cli.info,
                "models": _cli.models, "convert": _convert, "serve": _serve, "rpc-server": _rpc_server}
    # The one place that turns errors into exit codes; a mullama error is one line, no traceback.
    try:
        return commands[args.command](args)
    except mullama.MullamaError as exc:
        print(f"mullama: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:   # an input or output file of the command (bad path, permissions)
        print(f"mullama: {exc.strerror or exc}: {exc.filename!r}" if exc.filename else f"mullama: {exc}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _convert(args: argparse.Namespace) -> int:
    import mullama

    print(mullama.models.convert(args.folder, outtype=args.outtype, out=args.out))
    return 0


def _generate(args: argparse.Namespace) -> int:
    import mullama

    from ._cli import load_model, sampler_params

    params = sampler_params(args)
    with load_model(args.model) as model, \
            mullama.Context(model, n_ctx=args.ctx_size, n_threads=args.threads) as ctx:
        prompt = args.prompt
        if args.chat:
            prompt = model.apply_chat_template([("user", prompt)])
        with ctx.generate_stream(prompt, max_tokens=args.max_tokens, params=params) as stream:
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
        sys.stdout.write("\n")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import logging

    import mullama

    from ._cli import resolve_model

    try:
        import uvicorn

        from mullama.server import create_app
    except ImportError as exc:
        print(f"mullama serve needs the server extra: pip install 'mullama[server]' ({exc})", file=sys.stderr)
        return 1
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("mullama").setLevel(logging.WARNING)   # llama.cpp's own log stays quiet
    logging.getLogger("mullama.server").setLevel(args.log_level.upper())
    # Loaded before the port opens: a bad file stops here (exit 1), with llama.cpp's reason.
    model = mullama.Model.load(resolve_model(args.model), rpc=args.rpc)
    embedding = mullama.Model.load(resolve_model(args.embedding_model)) if args.embedding_model else None
    failed: list[str] = []

    def stop(reason: str) -> None:   # the engine could not start: exit instead of answering 503
        failed.append(reason)
        server.should_exit = True

    app = create_app(model, embedding_model=embedding, parallel=args.parallel, ctx_size=args.ctx_size,
                     api_key=args.api_key, max_waiting=args.max_waiting, model_name=args.alias,
                     n_threads=args.threads, prompt_cache_mb=args.prompt_cache, chat_template=args.chat_template,
                     on_start_error=stop, flash_attn={"auto": None, "on": True, "off": False}[args.flash_attn])
    # uvloop and httptools where installed ("auto"); uvicorn's SIGINT/SIGTERM handling stops
    # accepting, waits up to --drain seconds for running requests, then closes the engine.
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           access_log=False, timeout_graceful_shutdown=args.drain,
                                           loop="auto", http="auto"))
    server.run()
    if failed:
        print(f"mullama: the server could not start: {failed[0]}", file=sys.stderr)
        return 1
    return 0


def _rpc_server(args: argparse.Namespace) -> int:
    import signal

    import mullama

    if args.host not in ("127.0.0.1", "::1", "localhost"):
        print(f"mullama rpc-server: listening on {args.host}: the RPC protocol has no authentication; "
              "keep this port on a private network", file=sys.stderr)
    # The server loop runs in C and never returns to Python: Ctrl-C and SIGTERM end the process.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    mullama.rpc_serve(args.host, args.port, n_threads=args.threads, cache_dir=args.cache, mem=args.mem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
