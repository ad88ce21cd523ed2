"""``mullama chat``: a conversation on one Context, so each turn decodes only its new text.

The whole history is formatted with the model's chat template every turn; the Context keeps
the longest token prefix it already holds (the earlier turns) and decodes the rest.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, TextIO

import mullama

HELP = """commands:
  /reset          forget the conversation (the system message stays)
  /system TEXT    set the system message (an empty TEXT removes it)
  /save FILE      write the conversation to FILE as JSON
  /load FILE      continue the conversation saved in FILE
  /stats          tokens so far, and what the last reply reused
  /exit           leave (as Ctrl-D does)
a line ending in \\ continues on the next line; Ctrl-C stops a reply, a second Ctrl-C exits"""


@dataclass(frozen=True)
class ReplyStats:
    """What one reply cost: its tokens and speed, and how much of the prompt the cache held."""

    completion_tokens: int
    seconds: float
    prompt_tokens: int
    reused_tokens: int
    evaluated_tokens: int
    interrupted: bool

    def summary(self) -> str:
        rate = self.completion_tokens / self.seconds if self.seconds > 0 else 0.0
        end = ", interrupted" if self.interrupted else ""
        return (f"[{self.completion_tokens} tokens, {rate:.1f} tokens/s; prompt {self.prompt_tokens} tokens: "
                f"{self.reused_tokens} reused, {self.evaluated_tokens} decoded{end}]")


class Chat:
    """The conversation and the context it lives on."""

    def __init__(self, ctx: mullama.Context, *, system: str | None, max_tokens: int,
                 params: mullama.SamplerParams) -> None:
        if max_tokens < 1:
            raise mullama.InvalidArgumentError(f"-n must be at least 1, got {max_tokens}")
        self.ctx = ctx
        self.max_tokens = max_tokens
        self.params = params
        self.system = system or None
        self.messages: list[dict[str, str]] = []
        self.replies = 0
        self.reply_tokens = 0
        self.last: ReplyStats | None = None
        ctx.model.apply_chat_template([("user", "hi")])   # no template: ChatTemplateError now, not at turn 1

    def history(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def reply(self, text: str, out: TextIO) -> ReplyStats:
        """Answer text, streaming the reply to out. Ctrl-C ends the reply early; what was said
        so far stays in the history (and in the cache)."""
        prompt = self.ctx.model.apply_chat_template(self.history() + [{"role": "user", "content": text}])
        stream = self.ctx.generate_stream(prompt, max_tokens=self.max_tokens, params=self.params)
        pieces: list[str] = []
        interrupted = False
        start = time.perf_counter()
        try:
            with stream:
                for piece in stream:
                    pieces.append(piece)
                    out.write(piece)
                    out.flush()
        except KeyboardInterrupt:
            interrupted = True
        seconds = time.perf_counter() - start
        self.messages += [{"role": "user", "content": text}, {"role": "assistant", "content": "".join(pieces)}]
        usage = stream.usage
        self.replies += 1
        self.reply_tokens += usage.completion_tokens
        self.last = ReplyStats(usage.completion_tokens, seconds, usage.prompt_tokens, usage.reused_tokens,
                               usage.evaluated_tokens, interrupted)
        return self.last

    def stats(self) -> str:
        lines = [f"replies: {self.replies}, reply tokens: {self.reply_tokens}",
                 f"context: {self.ctx.n_past} of {self.ctx.n_ctx} tokens in use, "
                 f"{self.ctx.total_evaluated_tokens} prompt tokens decoded in all"]
        if self.last is not None:
            lines.append(f"last reply: {self.last.summary()}")
        return "\n".join(lines)

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.history(), f, indent=2, ensure_ascii=False)

    def load(self, path: str) -> None:
        with open(path, encoding="utf-8") as f:
            try:
                data: Any = json.load(f)
            except json.JSONDecodeError as exc:
                raise mullama.InvalidArgumentError(f"{path} is not JSON: {exc}") from None
        if not isinstance(data, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in data):
            raise mullama.InvalidArgumentError(f"{path} must hold a JSON list of {{\"role\", \"content\"}} messages")
        messages = [{"role": m["role"], "content": m["content"]} for m in data]
        if messages and messages[0]["role"] == "system":
            self.system = messages.pop(0)["content"] or None
        self.messages = messages

    def command(self, line: str, out: TextIO) -> bool:
        """Run a /command; False when it asks to leave."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.messages = []
            print("(conversation cleared)", file=out)
        elif name == "/system":
            self.system = arg or None
            print(f"(system message {'set' if arg else 'removed'})", file=out)
        elif name in ("/save", "/load") and not arg:
            print(f"usage: {name} FILE", file=out)
        elif name == "/save":
            self.save(arg)
            print(f"(saved {len(self.history())} messages to {arg})", file=out)
        elif name == "/load":
            self.load(arg)
            print(f"(loaded {len(self.history())} messages from {arg})", file=out)
        elif name == "/stats":
            print(self.stats(), file=out)
        else:
            print(HELP, file=out)
        return True


def _read_turn(stdin: TextIO, interactive: bool) -> str | None:
    """One user turn (lines ending in a backslash continue it), or None at end of input."""
    lines: list[str] = []
    while True:
        if interactive:
            try:
                line = input("... " if lines else "> ")
            except EOFError:
                return None
        else:
            line = stdin.readline()
            if not line:
                return "\n".join(lines) if lines else None
            line = line.rstrip("\n")
        if line.endswith("\\"):
            lines.append(line[:-1])
            continue
        lines.append(line)
        return "\n".join(lines)


def run(chat: Chat, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """The chat loop: 0 at end of input or /exit, 130 after a second Ctrl-C in a row."""
    interactive = stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (input() then edits lines and keeps a history)
        except ImportError:
            pass
        print(f"chatting with {chat.ctx.model.name or chat.ctx.model.path}; /help for commands, "
              "Ctrl-C stops a reply, Ctrl-D exits", file=stderr)
    interrupted = False   # the last thing that happened was a Ctrl-C
    while True:
        try:
            text = _read_turn(stdin, interactive)
        except KeyboardInterrupt:
            if interrupted:
                return 130
            interrupted = True
            print("\n(Ctrl-C again or Ctrl-D to exit)", file=stderr, flush=True)
            continue
        if text is None:
            if interactive:
                print(file=stdout)
            return 0
        interrupted = False
        if not text.strip():
            continue
        try:
            if text.startswith("/"):
                if not chat.command(text.strip(), stdout):
                    return 0
                stdout.flush()
                continue
            stats = chat.reply(text, stdout)
        except KeyboardInterrupt:
            # Ctrl-C before the reply streamed (while its prompt was built): the turn is dropped
            # and the chat goes on, as a Ctrl-C during the reply stops only the reply.
            print("\n(turn dropped; Ctrl-C again or Ctrl-D to exit)", file=stderr, flush=True)
            interrupted = True
            continue
        except (mullama.InvalidArgumentError, mullama.ChatTemplateError, OSError) as exc:
            # A turn that cannot be answered, or a file /save or /load cannot use: say so, go on.
            print(f"mullama: {exc}", file=stderr, flush=True)
            continue
        print(file=stdout, flush=True)
        interrupted = stats.interrupted
        print(stats.summary(), file=stderr, flush=True)
