"""Workloads of the generation controls: grammar-constrained generation against llama-server
with the same grammar, and plain generation against the previous release of mullama (the
controls must cost nothing when they are not set)."""

from __future__ import annotations

import json
import os
import subprocess
import time

import mullama

from . import peers
from .run import STORY, THREADS, Table, _free_port, _quiet, _wait_http

# Its greedy JSON fills all 128 tokens (nested objects, arrays, indentation). A short object
# (nine tokens, say) would measure the call around the tokens more than the grammar per token.
CATS = "Here is a detailed JSON object describing three cats, each with a name, an age and a list of toys:\n"

TG_SCRIPT = r"""
import json, sys, time
import mullama
cfg = json.loads(sys.argv[1])
model = mullama.Model.load(cfg["model"])
g = mullama.sampler_params_greedy()
res = []
with mullama.Context(model, n_ctx=2048, n_threads=cfg["threads"]) as ctx:
    ctx.generate(cfg["prompt"], max_tokens=1, params=g)     # the same warm-up for both releases
    for _ in range(cfg["reps"]):
        ctx.generate(cfg["prompt"], max_tokens=0)
        t = time.perf_counter()
        ctx.generate(cfg["prompt"], max_tokens=cfg["n"], params=g)
        dt = time.perf_counter() - t
        res.append((ctx.n_past - len(model.tokenize(cfg["prompt"])) + 1) / dt)
print(json.dumps(res))
"""


def _tg(py, model_path, n, reps):
    cfg = {"model": str(model_path), "threads": THREADS, "prompt": STORY, "n": n, "reps": reps}
    out = subprocess.run([str(py), "-c", TG_SCRIPT, json.dumps(cfg)], capture_output=True, text=True,
                         cwd=peers.PEERS_DIR, timeout=1200)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-1500:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_previous(t: Table, model_path, reps, n=128):
    """Plain greedy generation, this tree against the previous release, each in its own process,
    alternated, same warm-up and threads."""
    import sys

    old = peers.mullama_release()
    mine, prev = [], []
    for _ in range(reps):
        mine += _tg(sys.executable, model_path, n, 1)
        prev += _tg(old, model_path, n, 1)
    w = f"generation {n} greedy, no controls (tok/s)"
    t.add(w, "mullama", mine, "tok/s")
    t.add(w, f"previous release ({peers.PREVIOUS})", prev, "tok/s")


def bench_grammar(t: Table, model_path, tools, reps, n=128):
    """JSON-constrained greedy generation (the grammar llama.cpp makes of {"type": "object"}),
    prompt cached, against llama-server with the same grammar. Both figures cover the same
    span: the prompt's last token decoded again (both servers and mullama re-decode it for its
    logits) and every generated token; llama-server's own timings exclude its HTTP handling,
    mullama's wall clock includes its Python call."""
    grammar = mullama.SamplerParams(json=True).grammar_text()
    params = mullama.SamplerParams(temperature=0.0, top_k=1, top_p=1.0, min_p=0.0, penalty_repeat=1.0, grammar=grammar)
    model = mullama.Model.load(model_path)
    port = _free_port()
    srv = subprocess.Popen([str(tools["llama-server"]), "-m", str(model_path), "-np", "1", "-c", "2048",
                            "-t", str(THREADS), "--host", "127.0.0.1", "--port", str(port), "--no-webui"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    mine, peer = [], []
    try:
        import httpx

        _wait_http(f"http://127.0.0.1:{port}/health", srv)
        body = {"prompt": CATS, "n_predict": n, "grammar": grammar, "temperature": 0.0, "top_k": 1,
                "repeat_penalty": 1.0, "cache_prompt": True}
        with httpx.Client(timeout=600) as client, mullama.Context(model, n_ctx=2048, n_threads=THREADS) as ctx:
            client.post(f"http://127.0.0.1:{port}/completion", json=dict(body, n_predict=1))   # warm-up
            ctx.complete(CATS, 1, params)                                                     # the same
            for _ in range(reps):
                ctx.generate(CATS, max_tokens=0)
                _quiet(srv)
                t0 = time.perf_counter()
                c = ctx.complete(CATS, n, params)
                mine.append(c.usage.completion_tokens / (time.perf_counter() - t0))
                _quiet(srv)
                js = client.post(f"http://127.0.0.1:{port}/completion", json=body).json()
                tm = js["timings"]
                peer.append(tm["predicted_n"] / ((tm["prompt_ms"] + tm["predicted_ms"]) / 1000))
                assert js["content"] == c.text, "llama-server generated other text under the same grammar"
    finally:
        srv.terminate()
        srv.wait(10)
    w = f"JSON-grammar generation {n} greedy (tok/s)"
    t.add(w, "mullama", mine, "tok/s")
    t.add(w, "llama-server (same grammar)", peer, "tok/s")
