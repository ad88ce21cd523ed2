"""GPU offload (a build with GGML_CUDA=1 on a machine with a GPU): the layers land on the GPU,
its logits agree with the CPU's, and the features built on the native layer (the Engine, saved
states, adapters) work there. Skipped, with the allow-listed reason "no GPU", elsewhere."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

import mullama

pytestmark = pytest.mark.skipif(not any(d["type"] == "gpu" for d in mullama.devices()),
                                reason="no GPU device (a CUDA build on a machine with a GPU runs these)")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]


@pytest.fixture(scope="module")
def model_path() -> Path:
    # A GPU machine may have no registry access: the device check passes the same model file.
    env = os.environ.get("MULLAMA_GPU_MODEL")
    return Path(env) if env else mullama.models.fetch()


@pytest.fixture(scope="module")
def gpu_model(model_path):
    with mullama.Model.load(model_path, n_gpu_layers=-1) as m:
        yield m


@pytest.fixture(scope="module")
def cpu_model(model_path):
    with mullama.Model.load(model_path) as m:
        yield m


def test_the_gpu_is_listed_with_its_memory():
    gpus = [d for d in mullama.devices() if d["type"] == "gpu"]
    assert gpus[0]["name"].startswith("CUDA") and gpus[0]["memory_total"] > 1 << 30
    assert mullama.supports_gpu_offload()


def test_all_layers_land_on_the_gpu(model_path, caplog):
    caplog.set_level(logging.DEBUG, logger="mullama")
    mullama.Model.load(model_path, n_gpu_layers=-1).close()
    lines = [r.getMessage() for r in caplog.records]
    assert any("offloaded" in line and "layers to GPU" in line for line in lines), lines[-20:]
    assert any("CUDA0 model buffer size" in line for line in lines), lines[-20:]


def test_gpu_logits_agree_with_the_cpu(gpu_model, cpu_model):
    for prompt in PROMPTS:
        rows = []
        for model in (gpu_model, cpu_model):
            with mullama.Context(model, n_ctx=256) as ctx:
                ctx.generate(prompt, 0)
                rows.append(ctx.get_logits())
        gpu, cpu = rows
        # The GPU's top token is the CPU's, or ties with it within rounding.
        assert cpu[int(np.argmax(gpu))] >= cpu.max() - 0.05 * (cpu.max() - cpu.mean()), prompt
        assert np.corrcoef(gpu, cpu)[0, 1] > 0.999, prompt


def test_gpu_state_continues_like_the_uninterrupted_run(gpu_model, greedy):
    with mullama.Context(gpu_model, n_ctx=256) as ctx:
        ctx.generate(PROMPTS[0], 0)   # as after a restore: the last prompt token is decoded again, alone
        expected = ctx.generate(PROMPTS[0], 16, greedy)
    with mullama.Context(gpu_model, n_ctx=256) as ctx:
        ctx.generate(PROMPTS[0], 0)
        state = ctx.get_state()
    with mullama.Context(gpu_model, n_ctx=256) as ctx:
        ctx.set_state(state)
        assert ctx.generate(PROMPTS[0], 16, greedy) == expected
        assert ctx.last_evaluated_tokens <= 1


def test_gpu_engine_serves_concurrent_requests(gpu_model, greedy):
    import threading

    with mullama.Engine(gpu_model, n_parallel=4, n_ctx=1024) as engine:
        solo = [engine.complete(p, 12, greedy) for p in PROMPTS]
        results = [None] * len(PROMPTS)

        def run(i):
            results[i] = engine.complete(PROMPTS[i], 12, greedy)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    # Batch shapes differ between the two runs, so GPU kernels (and the last bits) may too.
    for alone, together in zip(solo, results):
        assert alone.usage.completion_tokens > 0 and together.usage.completion_tokens > 0
        assert together.usage.prompt_tokens == alone.usage.prompt_tokens


def test_gpu_lora_scale_zero_is_the_base_model(gpu_model, model_path, greedy, tmp_path):
    from test_lora import write_adapter

    adapter = gpu_model.load_adapter(write_adapter(model_path, tmp_path / "lora.gguf"))
    with mullama.Context(gpu_model, n_ctx=256) as base, \
            mullama.Context(gpu_model, n_ctx=256, adapters=[(adapter, 0.0)]) as zero, \
            mullama.Context(gpu_model, n_ctx=256, adapters=[(adapter, 1.0)]) as one:
        b = base.generate(PROMPTS[0], 12, greedy)
        assert zero.generate(PROMPTS[0], 12, greedy) == b
        assert one.generate(PROMPTS[0], 12, greedy) != b
    adapter.close()
