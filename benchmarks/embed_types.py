"""Which weight type to convert the embedding model to: f32, f16 and q8_0 side by side.

    python -m benchmarks.embed_types [--reps 3] [--n 1000] [--threads 2]

For each type: the file size, the least and mean cosine to sentence-transformers' vectors of the
eight reference sentences (tests/data), and embed_batch throughput over the same mixed-length
texts as ``python -m benchmarks`` (median of --reps runs, flash attention on as there unless --flash-attn off).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import mullama
from benchmarks.run import _sentences

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--flash-attn", choices=("on", "off"), default="on")
    args = ap.parse_args()
    ref = json.loads((ROOT / "tests" / "data" / "all-MiniLM-L6-v2.reference.json").read_text())
    texts = _sentences(args.n)
    spec = mullama.models.KNOWN_MODELS["all-minilm-l6-v2"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = mullama.models._download_folder(spec, Path(tmp))
        gens, rows = {}, {}
        for outtype in mullama.models.OUTTYPES:
            path = mullama.models.convert(folder, outtype=outtype, out=Path(tmp) / f"{outtype}.gguf")
            gen = mullama.EmbeddingGenerator(mullama.Model.load(path), n_threads=args.threads, flash_attn=args.flash_attn == "on")
            vecs = gen.embed_batch(ref["sentences"])
            cos = [mullama.cosine_similarity(v, r) for v, r in zip(vecs, ref["embeddings"], strict=True)]
            gen.embed_batch(texts[:16])
            gens[outtype], rows[outtype] = gen, (path.stat().st_size / 1e6, cos, [])
        # The types take turns within each rep, so a slower moment of the machine hits all of them.
        for _ in range(args.reps):
            for outtype, gen in gens.items():
                t0 = time.perf_counter()
                gen.embed_batch(texts)
                rows[outtype][2].append(len(texts) / (time.perf_counter() - t0))
        print(f"| type | file MB | min cosine | mean cosine | embed_batch {args.n} texts/s (median of {args.reps}) |")
        print("|---|---|---|---|---|")
        for outtype, (size, cos, rates) in rows.items():
            gens[outtype].close()
            print(f"| {outtype} | {size:.1f} | {min(cos):.6f} | {statistics.mean(cos):.6f} "
                  f"| {statistics.median(rates):.1f} ({min(rates):.1f}-{max(rates):.1f}) |")

if __name__ == "__main__":
    main()
