"""RPC: generation with the model's layers on two loopback RPC servers, against the same model
run locally, for mullama (`mullama rpc-server` + Model.load(rpc=...)) and for llama.cpp's own
tools (ggml-rpc-server + llama-bench --rpc), built from the same tree. On loopback the figure is
the protocol's own overhead: a real network adds its round trips to every token."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import build_llama
import mullama

from .run import STORY, THREADS, Table, _free_port, llama_bench


def _start(cmd: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{' '.join(cmd)} did not listen within 120 s") from None
            time.sleep(0.1)


def _servers(make_cmd) -> tuple[list[subprocess.Popen], list[str]]:
    ports = [_free_port(), _free_port()]
    return [_start(make_cmd(p), p) for p in ports], [f"127.0.0.1:{p}" for p in ports]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
        p.wait(timeout=30)


_TG_CHILD = r"""
import json, sys, time
import mullama
cfg = json.loads(sys.argv[1])
model = mullama.Model.load(cfg["model"], rpc=cfg["rpc"] or None)
ctx = mullama.Context(model, n_ctx=1024, n_batch=512, n_threads=cfg["threads"])
g = mullama.sampler_params_greedy()
ctx.generate("Hello", 1, g)   # the same warm-up every system gets
ctx.generate(cfg["prompt"], 0)
res = []
for _ in range(cfg["reps"]):
    t = time.perf_counter()
    c = ctx.complete(cfg["prompt"], cfg["n"], g)   # the prompt is cached: generation only
    res.append(c.usage.completion_tokens / (time.perf_counter() - t))
ctx.close(); model.close()   # before the servers stop: freeing remote buffers needs them
print(json.dumps(res))
"""


def _mullama_tg(model_path, rpc: list[str], reps: int, n: int) -> list[float]:
    # A child process: llama.cpp's RPC client keeps its connections for the life of a process.
    import json

    cfg = {"model": str(model_path), "rpc": rpc, "threads": THREADS, "prompt": STORY, "reps": reps, "n": n}
    out = subprocess.run([sys.executable, "-c", _TG_CHILD, json.dumps(cfg)], capture_output=True, text=True,
                         check=True, timeout=900).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench_rpc(t: Table, model_path, tools, reps: int, n: int = 128) -> None:
    """Each repetition takes the four systems in turn, both pairs of servers idling between
    their turns, so that the host's drift reaches them all alike."""
    server = build_llama.build_tool("ggml-rpc-server")["ggml-rpc-server"]
    rates: dict = {key: [] for key in ("mullama local", "mullama rpc", "peer local", "peer rpc")}
    mine, mine_at = _servers(lambda p: [sys.executable, "-m", "mullama", "rpc-server", "--port", str(p),
                                        "--threads", str(THREADS)])
    try:
        peer, peer_at = _servers(lambda p: [str(server), "-p", str(p), "-t", str(THREADS)])
        try:
            for _ in range(reps):
                rates["mullama local"] += _mullama_tg(model_path, [], 1, n)
                rates["peer local"].append(llama_bench(tools, model_path, ["-p", "0", "-n", str(n)])[0]["avg_ts"])
                rates["mullama rpc"] += _mullama_tg(model_path, mine_at, 1, n)
                args = ["-p", "0", "-n", str(n), "-ngl", "99", "--rpc", ",".join(peer_at)]
                rates["peer rpc"].append(llama_bench(tools, model_path, args)[0]["avg_ts"])
        finally:
            _stop(peer)
    finally:
        _stop(mine)
    t.add(f"tg{n} local", "mullama", rates["mullama local"], "tok/s")
    t.add(f"tg{n} over 2 RPC servers (loopback)", "mullama", rates["mullama rpc"], "tok/s")
    t.add(f"tg{n} local", "llama.cpp llama-bench", rates["peer local"], "tok/s")
    t.add(f"tg{n} over 2 RPC servers (loopback)", "llama.cpp llama-bench", rates["peer rpc"], "tok/s")
