"""`mullama serve` against `llama-server -np 8` over HTTP, each driven by the same streaming
OpenAI-style client: aggregate tokens/s and time to first token at 1-8 concurrent clients, a
chat's second turn, and eight chats sharing one system prompt."""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import sys
import threading
import time
from statistics import median

from .run import ROOT, THREADS, Table, _free_port, _quiet, _wait_http, llama_bench, quantile

SLOTS, CTX = 8, 4096          # 512 tokens per request on both servers
FILLER = ("The river runs through the valley past the old mill, where the miller keeps bees and "
          "grows apples beside the stone bridge. ")


def _stream(client, url: str, body: dict, arrivals: list | None = None,
            usage: dict | None = None) -> tuple[float, int]:
    """(seconds to the first text, tokens generated) of one streamed request; the arrival time
    of each chunk with text goes to `arrivals`, the request's usage to `usage`."""
    t0 = time.perf_counter()
    first, tokens, chunks = None, 0, 0
    with client.stream("POST", url, json=dict(body, stream=True, stream_options={"include_usage": True})) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            js = json.loads(line[6:])
            choice = (js.get("choices") or [{}])[0]
            if choice.get("text") or (choice.get("delta") or {}).get("content"):
                chunks += 1
                if arrivals is not None:
                    arrivals.append(time.perf_counter())
                if first is None:
                    first = time.perf_counter() - t0
            if js.get("usage"):
                tokens = js["usage"]["completion_tokens"]
                if usage is not None:
                    usage.update(js["usage"])
    return (first if first is not None else float("nan")), tokens or chunks


def _together(base: str, bodies: list[dict], path="/v1/completions",
              arrivals: list | None = None) -> tuple[float, list[float]]:
    """All bodies at once, one thread each: (aggregate tokens/s, each request's TTFT in ms).
    `arrivals`, for one body: the times its chunks with text arrived."""
    import httpx

    out: list[tuple[float, int]] = []
    lock = threading.Lock()
    start = threading.Barrier(len(bodies))

    def one(body):
        with httpx.Client(timeout=600) as client:
            start.wait()
            res = _stream(client, base + path, body, arrivals)
            with lock:
                out.append(res)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(b,)) for b in bodies]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(n for _, n in out) / (time.perf_counter() - t0), [ttft * 1000 for ttft, _ in out]


def _chunk_gaps(t: Table, servers, gaps: dict) -> None:
    """What each server's stack costs per token, apart from the host's drift in throughput: the
    time between one client's chunks, its median and 99th percentile in each repetition."""
    for label, q in (("median", 0.5), ("99th percentile", 0.99)):
        for name in servers:
            t.add(f"HTTP streaming, 1 client: ms between chunks, {label}", name,
                  [quantile(g, q) for g in gaps[name]], "ms")


def _servers(model_path, tools, flash_attn="auto"):
    """Both servers, with the same slots, context, threads and flash attention setting."""
    mport, sport = _free_port(), _free_port()
    mine = subprocess.Popen([sys.executable, "-m", "mullama", "serve", "-m", str(model_path), "-np", str(SLOTS),
                             "-c", str(CTX), "-t", str(THREADS), "--port", str(mport), "--log-level", "warning",
                             "--flash-attn", flash_attn],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peer = subprocess.Popen([str(tools["llama-server"]), "-m", str(model_path), "-np", str(SLOTS), "-c", str(CTX),
                             "-t", str(THREADS), "--host", "127.0.0.1", "--port", str(sport), "--no-webui",
                             "-fa", flash_attn],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    return {"mullama serve": (mine, f"http://127.0.0.1:{mport}"),
            "llama-server -np 8": (peer, f"http://127.0.0.1:{sport}")}


def _turns(servers: dict, rep: int) -> list:
    """The servers in the order they take their turns in repetition rep: each goes first
    in every other one."""
    order = list(servers.items())
    return order if rep % 2 == 0 else order[::-1]


def _widths(t: Table, servers, reps, widths, n):
    """Throughput and TTFT; the systems take turns within each repetition."""
    procs = [proc for proc, _ in servers.values()]
    numbers = itertools.count(1)
    for width in widths:
        rates: dict = {s: [] for s in servers}
        ttfts: dict = {s: [] for s in servers}
        gaps: dict = {s: [] for s in servers}   # per repetition: ms between one client's chunks
        for rep in range(reps):
            # The same prompts for both servers (greedy: the same texts, and the same early ends of
            # generation), none of them sent twice to a server in the run, and two share at most
            # their first digits: no server reuses more than a token or two of an earlier prompt.
            bodies = [{"prompt": f"{next(numbers)}. Once upon a time, in a city called Town,", "max_tokens": n,
                       "temperature": 0.0, "repeat_penalty": 1.0} for _ in range(width)]
            for name, (_, base) in _turns(servers, rep):
                _quiet(*procs)
                arrivals: list[float] = []
                rate, firsts = _together(base, bodies, arrivals=arrivals if width == 1 else None)
                rates[name].append(rate)
                ttfts[name].append(median(firsts))
                if width == 1:
                    gaps[name].append(sorted((b - a) * 1000 for a, b in zip(arrivals, arrivals[1:])))
        for name in servers:
            t.add(f"HTTP streaming, {width} clients x {n} tokens (tok/s)", name, rates[name], "tok/s")
        if width == 1:
            _chunk_gaps(t, servers, gaps)
        if width == max(widths):
            for name in servers:
                t.add(f"HTTP time to first token, {width} clients (ms)", name, ttfts[name], "ms")


def _chat(base: str, opening: str, procs) -> tuple[float, float, dict, dict]:
    """A chat of about 400 tokens, then its next turn: (TTFT of each in ms, usage of each)."""
    import httpx

    msgs = [{"role": "user", "content": opening + FILLER * 14 + "What grows by the bridge?"}]
    body = {"max_tokens": 16, "temperature": 0.0}
    url = base + "/v1/chat/completions"
    usage1: dict = {}
    usage2: dict = {}
    # A connection per request: reusing one after a stream once met a closed connection (which
    # server closed it was not recorded); both pay the same loopback connect.
    _quiet(*procs)
    with httpx.Client(timeout=600) as client:
        ttft1, _ = _stream(client, url, dict(body, messages=msgs), usage=usage1)
    reply = httpx.post(url, json=dict(body, messages=msgs), timeout=600).json()
    msgs = msgs + [reply["choices"][0]["message"], {"role": "user", "content": "And who keeps the bees?"}]
    _quiet(*procs)
    with httpx.Client(timeout=600) as client:
        ttft2, _ = _stream(client, url, dict(body, messages=msgs), usage=usage2)
    return ttft1 * 1000, ttft2 * 1000, usage1, usage2


def _second_turn(t: Table, servers, tools, model_path, reps, flash_attn="auto"):
    """A chat's first and second turn on each server, and the ratio of their TTFTs beside the
    ratio llama.cpp's own decode of the same tokens allows."""
    setting = "" if flash_attn == "auto" else f", flash attention {flash_attn}"
    turns: dict = {s: [] for s in servers}
    procs = [proc for proc, _ in servers.values()]
    for rep in range(reps):
        for name, (_, base) in _turns(servers, rep):
            turns[name].append(_chat(base, f"Story {rep} {name}. ", procs))
    for name in servers:
        t.add(f"HTTP chat, first turn of ~400 tokens, TTFT (ms){setting}", name, [c[0] for c in turns[name]], "ms")
    for name in servers:
        t.add(f"HTTP chat, its second turn, TTFT (ms){setting}", name, [c[1] for c in turns[name]], "ms")
    label = f"HTTP chat, first turn / second turn{setting}"
    for name in servers:
        t.add(label, name, [c[0] / c[1] for c in turns[name]], "x")
    _, _, first, second = turns["mullama serve"][-1]
    cached = second["prompt_tokens_details"]["cached_tokens"]
    _quiet(*procs)
    t.add(label, "llama-bench, decode of the same tokens",
          _decode_ratio(tools, model_path, first["prompt_tokens"], second["prompt_tokens"] - cached, cached,
                        flash_attn, reps), "x")


def _decode_ratio(tools, model_path, first, new, depth, flash_attn, reps) -> list[float]:
    """What no server can beat: llama-bench's time to decode the first turn's prompt over its
    time to decode the second turn's new tokens on the first turn's cache."""
    fa = {"auto": "1", "on": "1", "off": "0"}[flash_attn]
    ratios = []
    for _ in range(reps):
        whole = llama_bench(tools, model_path, ["-p", str(first), "-n", "0", "-fa", fa])[0]["avg_ns"]
        rest = llama_bench(tools, model_path, ["-p", str(new), "-n", "0", "-d", str(depth), "-fa", fa])[0]["avg_ns"]
        ratios.append(whole / rest)
    return ratios


def _prompt_decoded(base: str, replies: list[dict]) -> float:
    import httpx

    if "timings" in replies[0]:   # llama-server says per request
        return float(sum(r["timings"]["prompt_n"] for r in replies))
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith("mullama_prompt_tokens_decoded_total "):
            return float(line.split()[1])
    raise RuntimeError("no prompt token count")


def _shared_system(t: Table, servers, reps):
    """Eight chats at once with one ~400-token system prompt: prompt tokens each server decodes."""
    import httpx

    decoded: dict = {s: [] for s in servers}
    one: list[float] = []
    for rep in range(reps):
        system = f"Session {rep}. " + FILLER * 14
        for name, (_, base) in servers.items():
            before = _prompt_decoded(base, [{}]) if name == "mullama serve" else 0.0
            replies: list = [None] * 8

            def ask(i, base=base, replies=replies, system=system):
                body = {"max_tokens": 4, "temperature": 0.0,
                        "messages": [{"role": "system", "content": system},
                                     {"role": "user", "content": f"Tell me about river {i}."}]}
                replies[i] = httpx.post(base + "/v1/chat/completions", json=body, timeout=600).json()

            threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            decoded[name].append(_prompt_decoded(base, replies) - before)
            one.append(replies[0]["usage"]["prompt_tokens"])
    t.add("8 chats sharing a system prompt: prompt tokens decoded", "one chat's prompt", one, "tokens")
    for name in servers:
        t.add("8 chats sharing a system prompt: prompt tokens decoded", name, decoded[name], "tokens")


def bench_servers(t: Table, model_path, tools, reps, widths=(1, 2, 4, 8), n=128):
    with _running(model_path, tools) as servers:
        # Each width's repetition is short (2-9 s) and both servers' rates move by 10-25% between
        # repetitions on a shared 2-core host: twice the repetitions narrow the paired ratio.
        _widths(t, servers, 2 * reps, widths, n)
        _second_turn(t, servers, tools, model_path, reps)
        _shared_system(t, servers, reps)
    # On a CPU, flash attention's kernel for a few new tokens over a long cache is what a next
    # turn mostly costs; the same chats with it off on both servers show the other side.
    with _running(model_path, tools, "off") as servers:
        _second_turn(t, servers, tools, model_path, reps, "off")


@contextlib.contextmanager
def _running(model_path, tools, flash_attn="auto"):
    """Both servers started, warmed up the same way, and stopped at the end."""
    import httpx

    servers = _servers(model_path, tools, flash_attn)
    try:
        for name, (proc, base) in servers.items():
            _wait_http(base + "/health", proc)
        for _, base in servers.values():   # the same warm-up for both
            httpx.post(base + "/v1/completions", json={"prompt": "Hello", "max_tokens": 8, "temperature": 0.0},
                       timeout=600).raise_for_status()
        yield servers
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
