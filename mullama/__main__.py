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
    args = parser.parse_args(argv)

    import mullama

    if args.command == "convert":
        try:
            print(mullama.models.convert(args.folder, outtype=args.outtype, out=args.out))
        except mullama.MullamaError as exc:
            print(f"mullama: {exc}", file=sys.stderr)
            return 1
        return 0

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


if __name__ == "__main__":
    sys.exit(main())
