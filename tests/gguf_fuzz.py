"""Structure-aware fuzzing of mullama's GGUF loading path, on mutated copies of real models.

Each case changes a real file in one place that the loader reads: a header count, a key's
length or type, a hyperparameter value, a string or array length, a vocabulary entry, a
tensor's rank, dimension, type or offset, a few random header bytes, or a cut at a field
boundary. A worker process loads the result with mullama and, if that works, tokenizes and
decodes a little with it. A mullama exception is the expected answer; the driver counts any
other exception, a dead worker (a crash) and a case that hangs, and saves what caused it.

    python -m tests.gguf_fuzz MODEL.gguf [MODEL.gguf ...] --minutes 30 --out fuzz-findings

The test suite runs a few dozen cases (tests/test_robustness.py); longer runs are by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# GGUF value types (gguf.h)
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_SCALAR = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<B",
           U64: "<Q", I64: "<q", F64: "<d"}


@dataclass
class Field:
    offset: int
    fmt: str        # struct format of the value stored there
    kind: str       # what the loader does with it (the mutation category)
    name: str       # the key or tensor it belongs to


def parse(data: bytes) -> tuple[list[Field], int]:
    """Every field of the header, key/value and tensor-info sections; and where they end."""
    fields: list[Field] = []
    pos = 0

    def take(fmt: str, kind: str, name: str) -> int:
        nonlocal pos
        fields.append(Field(pos, fmt, kind, name))
        (value,) = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return value

    def string(kind: str, name: str, content: str | None = None) -> str:
        nonlocal pos
        n = take("<Q", kind, name)
        if content and n:
            fields.append(Field(pos, f"{n}s", content, name))
        s = data[pos:pos + n].decode("utf-8", "replace")
        pos += n
        return s

    pos = 4
    take("<I", "version", "header")
    n_tensors = take("<Q", "count", "n_tensors")
    n_kv = take("<Q", "count", "n_kv")
    for _ in range(n_kv):
        key = string("key_length", "key")
        vtype = take("<I", "value_type", key)
        if vtype == STR:
            string("string_length", key, "string_bytes")
        elif vtype == ARR:
            etype = take("<I", "array_type", key)
            count = take("<Q", "array_count", key)
            for _ in range(count):
                if etype == STR:
                    string("array_string_length", key)
                else:
                    take(_SCALAR[etype], "array_item", key)
        else:
            take(_SCALAR[vtype], "value", key)
    for _ in range(n_tensors):
        name = string("tensor_name_length", "tensor")
        n_dims = take("<I", "tensor_n_dims", name)
        for _ in range(n_dims):
            take("<Q", "tensor_dim", name)
        take("<I", "tensor_type", name)
        take("<Q", "tensor_offset", name)
    return fields, pos


_INT_EDGES = [0, 1, 2, 3, 7, 8, 255, 256, 2**15, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1]


def _mutated_value(field: Field, old: object, rnd: random.Random) -> bytes:
    fmt = field.fmt
    if fmt.endswith("s"):   # a string's bytes: other text of the same length
        raw = bytearray(old)
        for _ in range(rnd.randint(1, len(raw))):
            raw[rnd.randrange(len(raw))] = rnd.choice([rnd.randrange(256), rnd.randrange(32, 127)])
        return bytes(raw)
    if fmt in ("<f", "<d"):
        value = rnd.choice([float("nan"), float("inf"), float("-inf"), 0.0, -1.0, 1e30, -1e-30,
                            float(old) * rnd.choice([-1, 0.5, 2, 1000])])
        return struct.pack(fmt, value)
    bits = struct.calcsize(fmt) * 8
    signed = fmt[1].islower()
    choice = rnd.random()
    if choice < 0.4:
        value = rnd.choice(_INT_EDGES)
    elif choice < 0.7:
        value = int(old) + rnd.choice([-2, -1, 1, 2, 64])
    elif choice < 0.85:
        value = int(old) * rnd.choice([2, 16, 1024]) or 1
    else:
        value = rnd.getrandbits(bits)
    value &= (1 << bits) - 1
    if signed and value >= 1 << (bits - 1):
        value -= 1 << bits
    return struct.pack(fmt, value)


# category -> weight; "bytes" and "cut" are not tied to one field
CATEGORIES = {
    "count": 3, "version": 1, "key_length": 3, "value_type": 4, "value": 12, "string_length": 3,
    "string_bytes": 4, "array_type": 3, "array_count": 4, "array_item": 3, "array_string_length": 3,
    "tensor_name_length": 2, "tensor_n_dims": 5, "tensor_dim": 10, "tensor_type": 8, "tensor_offset": 8,
    "bytes": 8, "cut": 4,
}


def make_case(data: bytes, fields: list[Field], header_end: int, rnd: random.Random) -> dict:
    """One mutation: {"what": description, "patch": [(offset, hex bytes)], "cut": length or None}."""
    by_kind: dict[str, list[Field]] = {}
    for f in fields:
        by_kind.setdefault(f.kind, []).append(f)
    kinds = [k for k in CATEGORIES if k in by_kind or k in ("bytes", "cut")]
    kind = rnd.choices(kinds, weights=[CATEGORIES[k] for k in kinds])[0]
    if kind == "cut":
        f = rnd.choice(fields)
        cut = f.offset + rnd.choice([0, 1, struct.calcsize(f.fmt) - 1])
        return {"what": f"cut at {cut} (inside {f.kind} of {f.name!r})", "patch": [], "cut": cut}
    if kind == "bytes":
        patch = []
        for _ in range(rnd.randint(1, 8)):
            pos = rnd.randrange(4, header_end)
            patch.append((pos, bytes([rnd.randrange(256)]).hex()))
        return {"what": f"{len(patch)} random byte(s) in the header", "patch": patch, "cut": None}
    f = rnd.choice(by_kind[kind])
    (old,) = struct.unpack_from(f.fmt, data, f.offset)
    new = _mutated_value(f, old, rnd)
    (shown,) = struct.unpack(f.fmt, new)
    return {"what": f"{f.kind} of {f.name!r}: {old!r} -> {shown!r}", "patch": [(f.offset, new.hex())], "cut": None}


@contextlib.contextmanager
def patched(path: str, data: bytes, patch: list[tuple[int, bytes]]):
    """Write each (offset, bytes) of patch into path, a copy of data, for the with-block; then
    put data's bytes back, so one copy of a large model serves every case."""
    with open(path, "r+b") as f:
        for off, new in patch:
            f.seek(off)
            f.write(new)
    try:
        yield path
    finally:
        with open(path, "r+b") as f:
            for off, new in patch:
                f.seek(off)
                f.write(data[off:off + len(new)])


# -- the worker: runs cases in one interpreter, prints a line per case --------------------------

def worker(models: list[str], seed: int, start: int, count: int, workdir: str) -> None:
    import mullama

    greedy = mullama.sampler_params_greedy()
    originals = {m: Path(m).read_bytes() for m in models}
    parsed = {m: parse(d) for m, d in originals.items()}
    copies = {}
    for k, m in enumerate(models):
        copies[m] = os.path.join(workdir, f"fuzz{k}.gguf")
        shutil.copyfile(m, copies[m])
    cut_path = os.path.join(workdir, "cut.gguf")
    for i in range(start, start + count):
        model_path = models[i % len(models)]
        data = originals[model_path]
        fields, header_end = parsed[model_path]
        case = make_case(data, fields, header_end, random.Random(seed * 1_000_003 + i))
        print(f"case {i} {json.dumps(case['what'])}", flush=True)
        if case["cut"] is not None:
            with open(cut_path, "wb") as f:
                f.write(data[:case["cut"]])
            mutated = contextlib.nullcontext(cut_path)
        else:
            mutated = patched(copies[model_path], data, [(off, bytes.fromhex(hx)) for off, hx in case["patch"]])
        with mutated as path:
            try:
                outcome = _exercise(mullama, path, greedy, n_ctx=0 if i % 8 in (2, 3) else 64)
            except mullama.MullamaError as exc:
                outcome = "refused " + type(exc).__name__
            except Exception as exc:   # not a mullama error: a finding
                outcome = f"OTHER {type(exc).__name__}: {str(exc)[:200]}"
        print(f"done {i} {outcome}", flush=True)


def _exercise(mullama, path: str, greedy, n_ctx: int) -> str:
    """Load the file (vocabulary only, then whole) and use it; n_ctx=0 takes the (perhaps
    mutated) training context length."""
    with mullama.Model.load(path, vocab_only=True) as model:
        model.tokenize("Hello world")
    with mullama.Model.load(path) as model:
        text = "Hello world, the capital of France is"
        model.detokenize(model.tokenize(text))
        _ = (model.n_embd, model.n_vocab, model.n_layer, model.description, model.metadata())
        if model.n_vocab:
            try:
                with mullama.Context(model, n_ctx=n_ctx, n_batch=64) as ctx:
                    ctx.generate(text, 2, greedy)
                return "loaded, generated"
            except mullama.InvalidArgumentError as exc:
                if "computed no logits" not in str(exc):
                    raise
            with mullama.EmbeddingGenerator(model, n_ctx=n_ctx or 64) as gen:
                gen.embed(text)
            return "loaded, embedded"
    return "loaded"


# -- the driver -----------------------------------------------------------------------------

def run(models: list[str], *, cases: int | None = None, minutes: float | None = None, seed: int = 1,
        case_timeout: float = 60.0, out: str | None = None, log=print) -> dict:
    """Run cases until `cases` are done or `minutes` have passed. Returns the tallies and the
    findings (crashes, hangs, non-mullama exceptions), each with its mutation."""
    deadline = time.monotonic() + minutes * 60 if minutes else float("inf")
    total = cases if cases is not None else 1 << 62
    tally: dict[str, int] = {}
    findings: list[dict] = []
    next_case = 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mullama-fuzz-") as workdir:
        while next_case < total and time.monotonic() < deadline:
            batch = min(total - next_case, 500)
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.gguf_fuzz", "--worker", "--seed", str(seed), "--start", str(next_case),
                 "--count", str(batch), "--workdir", workdir, *models],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
            current = None
            last_line = time.monotonic()
            import selectors
            sel = selectors.DefaultSelector()
            sel.register(proc.stdout, selectors.EVENT_READ)
            hung = False
            while True:
                if not sel.select(timeout=1.0):
                    if current is not None and time.monotonic() - last_line > case_timeout:
                        hung = True
                        proc.kill()
                        proc.wait()
                        break
                    if proc.poll() is not None:
                        break
                    continue
                line = proc.stdout.readline()
                if not line:
                    break
                last_line = time.monotonic()
                word, idx, rest = (line.rstrip("\n").split(" ", 2) + ["", ""])[:3]
                if word == "case":
                    current = (int(idx), json.loads(rest))
                elif word == "done":
                    outcome = rest
                    key = outcome.split(":")[0]
                    tally[key] = tally.get(key, 0) + 1
                    if outcome.startswith("OTHER"):
                        findings.append({"case": int(idx), "what": current[1], "result": outcome})
                    current = None
                    next_case = int(idx) + 1
                if time.monotonic() > deadline:
                    proc.kill()
                    break
            sel.close()
            rc = proc.wait()
            err = proc.stderr.read()
            if current is not None:   # the worker died (or hung) inside a case
                kind = "hang" if hung else f"crash (exit {rc})"
                tally[kind.split(" ")[0]] = tally.get(kind.split(" ")[0], 0) + 1
                findings.append({"case": current[0], "what": current[1], "result": kind,
                                 "stderr": err[-1500:]})
                log(f"  case {current[0]}: {kind}: {current[1]}")
                next_case = current[0] + 1
            elif rc != 0 and time.monotonic() < deadline:
                raise RuntimeError(f"fuzz worker failed outside a case (exit {rc}):\n{err[-3000:]}")
    done = sum(tally.values())
    report = {"cases": done, "seconds": round(time.monotonic() - started, 1), "tally": tally, "findings": findings}
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--cases", type=int)
    ap.add_argument("--minutes", type=float)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a.models, a.seed, a.start, a.count, a.workdir)
        return
    if a.cases is None and a.minutes is None:
        ap.error("give --cases or --minutes")
    report = run(a.models, cases=a.cases, minutes=a.minutes, seed=a.seed, out=a.out)
    print(json.dumps({k: v for k, v in report.items() if k != "findings"}, indent=1))
    for f in report["findings"]:
        print(f"case {f['case']}: {f['result']}: {f['what']}")


if __name__ == "__main__":
    main()
