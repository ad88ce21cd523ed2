"""llama.cpp's RPC backend: two `mullama rpc-server` processes on loopback hold the layers of a
model loaded with Model.load(path, rpc=[...]); its greedy output equals the local run."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

import mullama
from conftest import free_port

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at", "Once upon a time"]


def start_rpc_server(port: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mullama", "rpc-server", "--port", str(port), "--threads", "1",
                             *extra], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_listening(proc: subprocess.Popen, port: int, timeout: float = 120.0) -> None:
    """Until the port accepts a connection (the server then serves it, and the next, in turn)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"mullama rpc-server exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"mullama rpc-server did not listen on {port} within {timeout} s") from None
            time.sleep(0.1)


@contextlib.contextmanager
def running_servers(*extras: tuple[str, ...]) -> Iterator[tuple[list[str], list[subprocess.Popen]]]:
    """One `mullama rpc-server` per entry of extras (its extra arguments) on a free loopback
    port, listening: their endpoints and processes; stopped at the end (if still running)."""
    ports = [free_port() for _ in extras]
    procs = [start_rpc_server(p, *extra) for p, extra in zip(ports, extras)]
    try:
        for proc, port in zip(procs, ports):
            wait_listening(proc, port)
        yield [f"127.0.0.1:{p}" for p in ports], procs
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def rpc_servers():
    with running_servers((), ()) as (endpoints, _):
        yield endpoints


@pytest.fixture(scope="module")
def split_model(rpc_servers, smollm_path):
    # Closed before the servers stop: freeing its remote buffers needs them.
    model = mullama.Model.load(smollm_path, rpc=rpc_servers)
    yield model
    model.close()


def test_greedy_output_split_over_two_servers_equals_the_local_run(split_model, smollm_path, greedy):
    # rpc-server multiplies with ggml's plain CPU kernels; so does a local model without repacking
    # (with it, ggml's AMX kernels round differently on CPUs that have AMX).
    plain = mullama.Model.load(smollm_path, repack=False)
    with mullama.Context(plain, n_ctx=256) as local, mullama.Context(split_model, n_ctx=256) as remote:
        for prompt in PROMPTS:
            assert remote.generate(prompt, 24, greedy) == local.generate(prompt, 24, greedy), prompt


def test_the_layers_are_spread_over_both_servers(rpc_servers, smollm_path, caplog):
    caplog.set_level(logging.DEBUG, logger="mullama")
    model = mullama.Model.load(smollm_path, rpc=rpc_servers)
    model.close()
    buffers = [r.getMessage() for r in caplog.records if "model buffer size" in r.getMessage()]
    for endpoint in rpc_servers:
        assert any(endpoint in line for line in buffers), (endpoint, buffers)


def _buffer_mib(records, endpoint: str) -> float:
    """The model buffer llama.cpp reports for an RPC endpoint ("RPC0[host:port] model buffer
    size = 12.34 MiB")."""
    lines = [r.getMessage() for r in records if "model buffer size" in r.getMessage() and endpoint in r.getMessage()]
    assert len(lines) == 1, lines
    return float(re.search(r"=\s*([0-9.]+) MiB", lines[0]).group(1))


def test_mem_sets_each_servers_share_of_the_layers(smollm_path, caplog):
    with running_servers(("--mem", "100"), ("--mem", "1000")) as (endpoints, _):
        caplog.set_level(logging.DEBUG, logger="mullama")
        model = mullama.Model.load(smollm_path, rpc=endpoints)
        model.close()
        small, big = (_buffer_mib(caplog.records, e) for e in endpoints)
        # 1:10 memory: the first server gets 3 of SmolLM2's 30 layers, the second the other 27
        # and the output layer (about 6 and 86 MiB); an even split is about 31 and 61 MiB.
        assert 0 < small and 5 * small < big, (small, big)


def test_rpc_serve_checks_mem():
    with pytest.raises(mullama.InvalidArgumentError, match="mem"):
        mullama.rpc_serve("127.0.0.1", free_port(), mem=0)


def test_an_unreachable_endpoint_raises_model_load_error_naming_it(smollm_path):
    port = free_port()            # nothing listens there
    with pytest.raises(mullama.ModelLoadError, match=f"127.0.0.1:{port}.*unreachable"):
        mullama.Model.load(smollm_path, rpc=[f"127.0.0.1:{port}"])


@pytest.mark.parametrize("rpc", [[], ["localhost"], ["host:0"], ["host:99999"], [42], ["a:1", "a:1"]])
def test_bad_endpoints_are_named(smollm_path, rpc):
    with pytest.raises(mullama.InvalidArgumentError, match="rpc|RPC"):
        mullama.Model.load(smollm_path, rpc=rpc)


def test_rpc_server_on_a_taken_port_exits_1_with_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "mullama", "rpc-server", "--port", str(port)],
                             capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], out.stderr


# A process whose model loses one of its two RPC servers mid-generation: the generation raises
# RPCServerLostError, later use of the model raises it too, a local model still works, and the
# process ends normally (llama.cpp's own client would abort it). It runs in a child process
# because the loss is for good: this process's RPC tests could not load a model after it.
LOSS_SCRIPT = r"""
import json, subprocess, sys, threading, time
sys.path.insert(0, sys.argv[3])
import mullama
from test_rpc import start_rpc_server, wait_listening
from conftest import free_port

path, kind = sys.argv[1], sys.argv[2]
ports = [free_port(), free_port()]
servers = [start_rpc_server(p) for p in ports]
for s, p in zip(servers, ports):
    wait_listening(s, p)
model = mullama.Model.load(path, rpc=[f"127.0.0.1:{p}" for p in ports])
greedy = mullama.sampler_params_greedy()
out = {}

def read(stream, kill_after=None):
    n = 0
    try:
        for _ in stream:
            n += 1
            if n == kill_after:
                servers[1].kill()
                servers[1].wait()
        return f"finished after {n}"
    except mullama.MullamaError as exc:
        return f"{type(exc).__name__} after {n}"

if kind == "context":
    ctx = mullama.Context(model, n_ctx=512)
    out["stream"] = [read(ctx.generate_stream("Once upon a time", 200, greedy), kill_after=3)]
    later = [lambda: ctx.generate("Hi", 4, greedy), lambda: mullama.Context(model, n_ctx=256)]
    close = ctx.close
else:
    engine = mullama.Engine(model, n_ctx=1024, n_parallel=2)
    other = engine.stream("The weather today", 200, greedy)
    results = []
    t = threading.Thread(target=lambda: results.append(read(other)))
    t.start()
    first = read(engine.stream("Once upon a time", 200, greedy), kill_after=3)
    t.join(60)
    out["stream"] = [first] + results
    later = [lambda: engine.submit("Hi", 4, greedy)]
    close = engine.close
out["later"] = []
for call in later:
    try:
        call()
        out["later"].append("no error")
    except mullama.MullamaError as exc:
        out["later"].append(type(exc).__name__)
try:
    mullama.Model.load(path, rpc=[f"127.0.0.1:{ports[0]}"])
except mullama.ModelLoadError as exc:
    out["reload"] = str(exc)
close()
model.close()
with mullama.Context(mullama.Model.load(path), n_ctx=256) as local:
    out["local"] = local.generate("The capital of France is", 8, greedy)
servers[0].terminate()
servers[0].wait()
print(json.dumps(out))
"""


@pytest.mark.parametrize("kind", ["context", "engine"])
def test_a_server_killed_mid_generation_ends_it_with_an_error(smollm_path, smollm, greedy, kind):
    tests = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", LOSS_SCRIPT, str(smollm_path), kind, tests],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["stream"] and all(s.startswith("RPCServerLostError after") for s in out["stream"]), out
    if kind == "context":   # its stream decodes as it is read: nothing was made ahead
        assert out["stream"][0] == "RPCServerLostError after 3", out
    assert out["later"] and all(x == "RPCServerLostError" for x in out["later"]), out
    assert "stopped answering earlier in this process" in out["reload"], out
    with mullama.Context(smollm, n_ctx=256) as local:
        assert out["local"] == local.generate("The capital of France is", 8, greedy)
    assert "ended the process" not in proc.stderr


def test_serve_answers_503_once_an_rpc_server_is_lost(smollm_path):
    import httpx
    from test_serve import KEY, served

    with running_servers((), ()) as (endpoints, procs):
        rpc = ",".join(endpoints)
        with served(["-m", str(smollm_path), "--rpc", rpc, "--parallel", "2", "--ctx-size", "1024",
                     "--threads", "1"]) as base, \
                httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as http:
            body = {"prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": True}
            pieces, error = 0, None
            with http.stream("POST", "/v1/completions", json=body) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"]
                        break
                    pieces += 1
                    if pieces == 3:
                        procs[1].kill()
                        procs[1].wait()
            assert error is not None and "RPC server" in error["message"], (pieces, error)
            r = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
            assert r.status_code == 503 and r.json()["error"]["code"] == "rpc_server_lost", r.text
            h = http.get("/health")
            assert h.status_code == 503 and "RPC server" in h.json()["error"], h.text
