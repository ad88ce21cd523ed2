"""Each example script of examples/ runs with the default models and does what its docstring says.
(The FastAPI and aiohttp servers are driven in tests/test_servers.py.)"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import mullama

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def prompts_of(name: str) -> list[str]:
    """The PROMPTS list of an example, read from its module without running it."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.PROMPTS)


def greedy_answers(model: mullama.Model, prompts: list[str], max_tokens: int, n_ctx: int = 256) -> list[str]:
    with mullama.Context(model, n_ctx=n_ctx) as ctx:
        out = []
        for p in prompts:
            ctx.clear_cache()
            out.append(ctx.generate(p, max_tokens, mullama.sampler_params_greedy()))
        return out


def test_streaming_prints_the_greedy_completion(smollm):
    proc = run_example("streaming.py", "The capital of France is")
    [expected] = greedy_answers(smollm, ["The capital of France is"], 32, n_ctx=512)
    assert proc.stdout == expected + "\n"
    assert re.search(r"\[\d+ tokens, finish: (stop|length)\]", proc.stderr)


def test_chat_template_second_turn_reuses_the_first(smollm):
    proc = run_example("chat_template.py")
    assert proc.stdout.count("assistant: ") == 2
    assert "Paris" in proc.stdout.split("user: ")[1]
    reused = [int(n) for n in re.findall(r"reused (\d+)\)", proc.stdout)]
    prompts = [int(n) for n in re.findall(r"prompt (\d+) tokens", proc.stdout)]
    assert reused[0] == 0 and reused[1] > prompts[0] // 2


def test_rag_retrieves_the_paragraph_that_answers(minilm, smollm):
    proc = run_example("rag.py")
    retrieved = re.findall(r"^retrieved: (.*)$", proc.stdout, re.M)
    assert len(retrieved) == 2 and "Great Red Spot" in retrieved[0]
    answer = re.search(r"^answer: (.+)$", proc.stdout, re.M)
    assert answer and "Jupiter" in answer.group(1)


def test_threads_share_one_model_and_match_sequential_answers(smollm):
    proc = run_example("threads.py")
    prompts = prompts_of("threads")
    expected = greedy_answers(smollm, prompts, 8)
    assert proc.stdout == "".join(p + e + "\n" for p, e in zip(prompts, expected))


def test_async_workers_answer_every_prompt_like_sequential(smollm):
    proc = run_example("async_workers.py")
    prompts = prompts_of("async_workers")
    expected = greedy_answers(smollm, prompts, 8)
    assert proc.stdout == "".join(p + e + "\n" for p, e in zip(prompts, expected))
