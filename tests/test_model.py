"""Model: loading, properties, vocabulary, metadata, chat templates, and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import mullama


def test_properties_describe_smollm2(smollm):
    assert smollm.architecture == "llama"
    assert smollm.n_vocab == 49152
    assert smollm.n_ctx_train == 8192
    assert smollm.n_embd == 576
    assert smollm.n_layer == 30
    assert smollm.n_head == 9
    assert smollm.n_params == 134515008
    assert 90_000_000 < smollm.size < 110_000_000
    assert smollm.token_bos == 1 and smollm.token_eos == 2
    assert "SmolLM2" in smollm.name or "Smollm2" in smollm.name
    assert "Q4_1" in smollm.description


def test_metadata_holds_gguf_keys(smollm):
    meta = smollm.metadata()
    assert meta["general.architecture"] == "llama"
    assert meta["llama.context_length"] == "8192"
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())


@pytest.mark.parametrize("text", ["Hello world, naïve café — 東京 🙂", "  two leading spaces\n\ttab", "ℌℑℜ 👩🏽‍💻 ﬁ"])
def test_tokenize_round_trip(generator, text):
    tokens = generator.tokenize(text)
    assert all(isinstance(t, int) for t in tokens)
    assert generator.detokenize(tokens) == text


def test_tokenize_special_parses_control_tokens(smollm):
    plain = smollm.tokenize("<|im_start|>", special=False)
    parsed = smollm.tokenize("<|im_start|>", special=True)
    assert len(parsed) == 1 and len(plain) > 1
    assert smollm.detokenize(parsed, unparse_special=True) == "<|im_start|>"
    assert smollm.detokenize(parsed, unparse_special=False) == ""


def test_token_is_eog(smollm):
    assert smollm.token_is_eog(smollm.token_eos)
    assert not smollm.token_is_eog(smollm.tokenize("Hello")[0])


def test_apply_chat_template_accepts_tuples_and_dicts(smollm):
    a = smollm.apply_chat_template([("system", "Be brief."), ("user", "Hi")])
    b = smollm.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert a == b
    assert a.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nHi<|im_end|>" in a
    assert not smollm.apply_chat_template([("user", "Hi")], add_generation_prompt=False).endswith("assistant\n")


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "empty"),
        ("hello", "list"),
        ([("user",)], "tuple"),
        ([{"role": "user"}], "content"),
        ([("user", 5)], "str"),
        ([("", "x")], "empty role"),
    ],
)
def test_apply_chat_template_rejects_bad_messages(smollm, messages, match):
    with pytest.raises(mullama.ChatTemplateError, match=match):
        smollm.apply_chat_template(messages)


# Gemma's turns (its registry GGUF carries no template of its own).
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
HERMES = (Path(__file__).parent / "data" / "hermes-tools.jinja").read_text()
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather now",
                                                 "parameters": {"type": "object", "properties": {
                                                     "city": {"type": "string"}}, "required": ["city"]}}}


def test_apply_chat_template_renders_a_jinja_template(gemma):
    text = gemma.apply_chat_template([("user", "Hi "), ("assistant", "Hello!"), ("user", "Bye")],
                                     chat_template=GEMMA_TEMPLATE)
    assert text.endswith("<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
                         "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    # A template llama.cpp's built-in formats could not imitate: it runs Jinja.
    assert gemma.apply_chat_template([("user", "hi")], chat_template="{{ messages[0].content | upper }}!") == "HI!"


def test_plain_chats_keep_the_builtin_format(smollm):
    # The built-in ChatML format leaves out the default system message SmolLM2's Jinja adds.
    assert smollm.apply_chat_template([("user", "Hi")]) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    jinja = smollm.apply_chat_template([("user", "Hi")], chat_template=smollm.chat_template)
    assert jinja.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


@pytest.mark.parametrize("template", ["{% for m in messages %}", "{{ raise_exception('no system role') }}",
                                      "{{ undefined_fn() }}", "{% if %}", "   "])
def test_a_broken_chat_template_raises(smollm, template):
    with pytest.raises(mullama.ChatTemplateError):
        smollm.apply_chat_template([("user", "Hi")], chat_template=template)


def test_apply_chat_template_shows_tools_and_calls(smollm):
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "id": "c1", "function": {
                   "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "21 C"}]
    text = smollm.apply_chat_template(history, chat_template=HERMES, tools=[WEATHER_TOOL])
    assert '"name": "get_weather"' in text.split("<tools>\n")[1].split("</tools>")[0]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n21 C\n</tool_response>" in text and text.endswith("<|im_start|>assistant\n")


def test_tools_on_a_template_that_cannot_show_them_raise(smollm):
    with pytest.raises(mullama.ChatTemplateError, match="chat_template"):
        smollm.apply_chat_template([("user", "Hi")], tools=[WEATHER_TOOL])
    with pytest.raises(mullama.ChatTemplateError, match="tools"):
        smollm.apply_chat_template([("user", "Hi")], chat_template=HERMES, tools=[{"type": "function"}])


def test_model_without_template_says_so(minilm):
    with pytest.raises(mullama.ChatTemplateError, match="no chat template"):
        minilm.apply_chat_template([("user", "hi")])


@pytest.mark.parametrize("bad", [[-1], [49152], [10**12], ["a"], [1.5], "text", 5])
def test_detokenize_rejects_bad_token_ids(smollm, bad):
    with pytest.raises(mullama.InvalidArgumentError):
        smollm.detokenize(bad)


def test_tokenize_rejects_lone_surrogates_and_non_str(smollm):
    with pytest.raises(mullama.InvalidArgumentError, match="surrogate"):
        smollm.tokenize("bad \udc80 text")
    with pytest.raises(mullama.InvalidArgumentError):
        smollm.tokenize(b"bytes")


def test_tokenize_keeps_nul_bytes(smollm):
    assert smollm.detokenize(smollm.tokenize("a\0b")) == "a\0b"


def test_missing_file(tmp_path):
    with pytest.raises(mullama.ModelNotFoundError, match="not found") as info:
        mullama.Model.load(tmp_path / "nope.gguf")
    assert isinstance(info.value, FileNotFoundError)


def test_directory(tmp_path):
    with pytest.raises(mullama.ModelNotFoundError, match="directory"):
        mullama.Model.load(tmp_path)


def test_not_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04 definitely not a model")
    with pytest.raises(mullama.InvalidModelError, match="not a GGUF"):
        mullama.Model.load(p)
    p.write_bytes(b"")
    with pytest.raises(mullama.InvalidModelError, match="not a GGUF"):
        mullama.Model.load(p)


@pytest.mark.parametrize("fraction", [0.0001, 0.01, 0.5, 0.999])
def test_truncated_gguf_raises_with_reason(tmp_path, smollm_path, fraction):
    data = smollm_path.read_bytes()
    p = tmp_path / "truncated.gguf"
    p.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(mullama.InvalidModelError, match="could not load") as info:
        mullama.Model.load(p)
    assert "no reason was logged" not in str(info.value)


def test_bad_path_types():
    with pytest.raises(mullama.InvalidArgumentError):
        mullama.Model.load(123)


def test_vocab_only_load_tokenizes_but_cannot_generate(smollm_path):
    model = mullama.Model.load(smollm_path, vocab_only=True)
    assert model.tokenize("Hello world") == [19556, 905]
    with pytest.raises(mullama.InvalidArgumentError, match="vocab_only"):
        mullama.Context(model).generate("Hello world", 4)
    model.close()


def test_use_mmap_false_loads(smollm_path):
    with mullama.Model.load(smollm_path, use_mmap=False) as model:
        assert model.n_vocab == 49152


def test_closed_model_raises(smollm_path):
    model = mullama.Model.load(smollm_path, vocab_only=True)
    model.close()
    model.close()  # idempotent
    assert model.closed
    with pytest.raises(mullama.ClosedError):
        model.tokenize("x")
    with pytest.raises(mullama.ClosedError):
        model.n_vocab


def test_model_cannot_be_constructed_directly():
    with pytest.raises(TypeError, match="Model.load"):
        mullama.Model()


def test_failed_load_reason_reaches_logging(tmp_path, smollm_path, caplog):
    p = tmp_path / "t.gguf"
    p.write_bytes(smollm_path.read_bytes()[:100_000])
    with caplog.at_level("DEBUG", logger="mullama"):
        with pytest.raises(mullama.InvalidModelError):
            mullama.Model.load(p)
    assert any(r.name == "mullama" for r in caplog.records)


def _weight_buffers(path, caplog, **load) -> list[str]:
    """llama.cpp's log lines naming the buffers a load put the weights in ("AMX model buffer size = ...")."""
    caplog.clear()
    with caplog.at_level("INFO", logger="mullama"):
        mullama.Model.load(path, **load).close()
    return [r.getMessage() for r in caplog.records if "model buffer size" in r.getMessage()]


def test_amx_takes_quantized_weights_and_leaves_f16_ones_to_the_cpu(tmp_path, smollm_path, minilm_folder, caplog):
    # ggml's AMX buffer multiplies F16 weights at about half the speed of the CPU's own f16
    # GEMM, so a model of mostly F16 weights loads without it; quantized ones gain from it.
    amx = "AMX_INT8 = 1" in mullama.system_info()
    assert any("AMX model buffer" in line for line in _weight_buffers(smollm_path, caplog)) == amx
    f16 = mullama.models.convert(minilm_folder, outtype="f16", out=tmp_path / "m-f16.gguf")
    lines = _weight_buffers(f16, caplog)
    assert lines and not any("AMX model buffer" in line for line in lines), lines
    # repack= overrides the choice both ways.
    assert not any("AMX model buffer" in line for line in _weight_buffers(smollm_path, caplog, repack=False))
    assert any("AMX model buffer" in line for line in _weight_buffers(f16, caplog, repack=True)) == amx


def test_hostile_files_never_crash_the_interpreter(tmp_path, smollm_path):
    # Random bytes after a GGUF magic, and absurd header counts: each must be an exception.
    import random

    rnd = random.Random(1234)
    header = smollm_path.read_bytes()[:4096]
    cases = [b"GGUF" + bytes(rnd.randrange(256) for _ in range(2048)) for _ in range(5)]
    cases.append(b"GGUF" + (3).to_bytes(4, "little") + (2**62).to_bytes(8, "little") + (2**62).to_bytes(8, "little"))
    cases.append(header[:24] + b"\xff" * 64)
    paths = []
    for i, blob in enumerate(cases):
        p = tmp_path / f"case{i}.gguf"
        p.write_bytes(blob)
        paths.append(str(p))
    code = (
        "import sys, mullama\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        mullama.Model.load(p)\n"
        "        print('loaded', p)\n"
        "    except mullama.MullamaError as e:\n"
        "        print('error', type(e).__name__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("error InvalidModelError") == len(cases), proc.stdout


def test_gemma_is_a_second_architecture(gemma):
    # What the cross-architecture tests exercise beyond SmolLM2 (llama, BPE).
    meta = gemma.metadata()
    assert gemma.architecture == "gemma3"
    assert meta["tokenizer.ggml.model"] == "llama"   # SentencePiece
    assert int(meta["gemma3.attention.sliding_window"]) == 512
    assert gemma.tokenize("Hi")[0] == int(meta["tokenizer.ggml.bos_token_id"])
    # The registry's GGUF carries no chat template (test_context formats Gemma's turns by hand).
    assert gemma.chat_template is None
