"""Chat templates: a multi-turn conversation formatted with the model's own template.

Each turn resends the whole history; the Context keeps the tokens it already holds (the earlier
turns) and decodes only the new text, as `reused` shows.

Run:  python examples/chat_template.py
"""

from __future__ import annotations

import mullama

QUESTIONS = ["What is the capital of France?", "And what is its most famous tower?"]


def main() -> None:
    model = mullama.Model.load(mullama.models.fetch())
    messages = [{"role": "system", "content": "You are a concise assistant. Answer in one sentence."}]
    with mullama.Context(model, n_ctx=1024) as ctx:
        for question in QUESTIONS:
            messages.append({"role": "user", "content": question})
            prompt = model.apply_chat_template(messages)   # ends with the assistant's turn opened
            answer = ctx.complete(prompt, max_tokens=40, params=mullama.sampler_params_greedy())
            messages.append({"role": "assistant", "content": answer.text.strip()})
            print(f"user: {question}")
            print(f"assistant: {answer.text.strip()}")
            print(f"  (prompt {answer.usage.prompt_tokens} tokens, reused {answer.usage.reused_tokens})")


if __name__ == "__main__":
    main()
