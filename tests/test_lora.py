"""LoRA adapters: Model.load_adapter, per-context scales, lifetimes, and adapters that do not
belong. The adapter is written here with llama.cpp's gguf package: random low-rank A and B of
the test model's own shapes (no LoRA for SmolLM2 is on the package registry)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

import mullama

PROMPT = "The best thing about the sea is"
RANK = 8


def write_adapter(model_path, out, arch="llama", seed=0, targets=("attn_q", "attn_v", "ffn_down"), swap=False):
    """A LoRA GGUF with random A (rank x n_in) and B (n_out x rank) for each target tensor
    (with swap, A and B trade shapes, as an adapter for another model would have them)."""
    reader = gguf.GGUFReader(model_path)
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(RANK))
    for t in reader.tensors:
        parts = t.name.split(".")   # blk.N.attn_q.weight
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in targets:
            continue
        n_in, n_out = int(t.shape[0]), int(t.shape[1])   # ggml order: ne[0] = inputs
        if swap:
            n_in, n_out = n_out + 64, n_in
        writer.add_tensor(t.name + ".lora_a", rng.normal(0, 0.08, (RANK, n_in)).astype(np.float32))
        writer.add_tensor(t.name + ".lora_b", rng.normal(0, 0.08, (n_out, RANK)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def adapter_path(smollm_path, tmp_path_factory):
    return write_adapter(smollm_path, tmp_path_factory.mktemp("lora") / "smollm-lora.gguf")


@pytest.fixture
def adapter(smollm, adapter_path):
    a = smollm.load_adapter(adapter_path)
    yield a
    a.close()


def run(model, greedy, adapters=None, prompt=PROMPT):
    with mullama.Context(model, n_ctx=256, adapters=adapters) as ctx:
        return ctx.generate(prompt, 16, greedy)


def test_scale_zero_is_the_base_model_and_a_scale_changes_it(smollm, adapter, greedy):
    base = run(smollm, greedy)
    assert run(smollm, greedy, [(adapter, 0.0)]) == base
    assert run(smollm, greedy, [(adapter, 1.0)]) != base
    assert adapter.alpha == RANK


def test_contexts_with_different_scales_are_independent(smollm, adapter, greedy):
    alone = {s: run(smollm, greedy, [(adapter, s)]) for s in (0.0, 1.0)}
    with mullama.Context(smollm, n_ctx=256, adapters=[(adapter, 1.0)]) as a, \
            mullama.Context(smollm, n_ctx=256) as b:
        sa = a.generate_stream(PROMPT, 16, greedy)
        first_a = next(sa)
        out_b = b.generate(PROMPT, 16, greedy)   # decodes while a's stream is open
        out_a = first_a + "".join(sa)
    assert out_a == alone[1.0]
    assert out_b == alone[0.0]


def test_set_adapters_changes_the_scale_and_drops_the_stale_cache(smollm, adapter, greedy):
    with mullama.Context(smollm, n_ctx=256) as ctx:
        base = ctx.generate(PROMPT, 16, greedy)
        ctx.set_adapters([(adapter, 1.0)])
        assert ctx.n_past == 0
        assert ctx.adapters == ((adapter, 1.0),)
        assert ctx.generate(PROMPT, 16, greedy) == run(smollm, greedy, [(adapter, 1.0)])
        ctx.set_adapters([])
        assert ctx.generate(PROMPT, 16, greedy) == base


def test_the_engine_applies_its_adapters_to_every_sequence(smollm, adapter, greedy):
    with mullama.Engine(smollm, n_parallel=2, n_ctx=512, adapters=[(adapter, 1.0)]) as engine:
        outs = [engine.generate(PROMPT, 16, greedy) for _ in range(2)]
        assert engine.adapters == ((adapter, 1.0),)
    with mullama.Engine(smollm, n_parallel=2, n_ctx=512) as plain:
        base = plain.generate(PROMPT, 16, greedy)
    assert outs[0] == outs[1] != base


def test_an_adapter_for_another_architecture_is_refused(gemma, adapter_path):
    with pytest.raises(mullama.AdapterError, match="arch"):
        gemma.load_adapter(adapter_path)


def test_an_adapter_of_another_model_object_is_refused(gemma, adapter):
    with pytest.raises(mullama.AdapterError, match="load_adapter"):
        mullama.Context(gemma, n_ctx=128, adapters=[(adapter, 1.0)])


def test_files_that_are_not_adapters_are_refused(smollm, smollm_path, tmp_path):
    with pytest.raises(mullama.AdapterError, match="general.type"):
        smollm.load_adapter(smollm_path)
    with pytest.raises(mullama.AdapterError, match="not found"):
        smollm.load_adapter(tmp_path / "missing.gguf")
    wrong_shape = write_adapter(smollm_path, tmp_path / "bad.gguf", swap=True)
    with pytest.raises(mullama.AdapterError, match="shape"):
        smollm.load_adapter(wrong_shape)


def test_bad_adapter_arguments_are_named(smollm, adapter):
    with pytest.raises(mullama.InvalidArgumentError, match="pairs"):
        mullama.Context(smollm, n_ctx=128, adapters=adapter)
    with pytest.raises(mullama.InvalidArgumentError, match="finite"):
        mullama.Context(smollm, n_ctx=128, adapters=[(adapter, float("nan"))])
    with pytest.raises(mullama.InvalidArgumentError, match="twice"):
        mullama.Context(smollm, n_ctx=128, adapters=[(adapter, 1.0), (adapter, 0.5)])


def test_adapter_lifetime_follows_its_users(smollm_path, adapter_path, greedy):
    model = mullama.Model.load(smollm_path)
    adapter = model.load_adapter(adapter_path)
    ctx = mullama.Context(model, n_ctx=128, adapters=[(adapter, 1.0)])
    with pytest.raises(mullama.ContextBusyError, match="applied"):
        adapter.close()
    model.close()                 # deferred: the context and the adapter still use it
    assert ctx.generate(PROMPT, 4, greedy)
    ctx.close()
    adapter.close()
    assert adapter.closed
    with pytest.raises(mullama.ClosedError):
        mullama.Context(model, n_ctx=128)
