"""The command line, driven as a subprocess: chat, embed, info, models, and the exit codes."""

from __future__ import annotations

import fcntl
import json
import os
import platform
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import numpy as np
import pytest

import mullama

SUMMARY = re.compile(r"^\[(\d+) tokens, [\d.]+ tokens/s; prompt (\d+) tokens: (\d+) reused, (\d+) decoded(, interrupted)?\]$",
                     re.M)


def cli(*args: str, input: str | None = None, env: dict[str, str] | None = None,
        timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mullama", *args], input=input, capture_output=True,
                          text=True, timeout=timeout, env=env)


# -- chat -----------------------------------------------------------------------------------------

def test_chat_answers_each_line_and_the_second_turn_reuses_the_first(smollm):
    proc = cli("chat", "--temp", "0", "-n", "24", "-c", "1024",
               input="Name a French city.\nAnd one in Italy?\n")
    assert proc.returncode == 0, proc.stderr
    stats = SUMMARY.findall(proc.stderr)
    assert len(stats) == 2, proc.stderr
    (_, prompt1, reused1, _, _), (_, prompt2, reused2, decoded2, _) = stats
    assert int(reused1) == 0
    # Turn 2's prompt starts with all of turn 1's: the cache held it, only the new text was decoded.
    assert int(reused2) >= int(prompt1) and int(decoded2) == int(prompt2) - int(reused2)
    # The first reply is what the API gives for the same prompt, greedily.
    with mullama.Context(smollm, n_ctx=1024) as ctx:
        first = ctx.generate(smollm.apply_chat_template([("user", "Name a French city.")]), 24,
                             mullama.sampler_params_greedy())
    assert first.strip() and proc.stdout.startswith(first + "\n")
    second = proc.stdout[len(first) + 1:]
    assert second.strip() and second.endswith("\n")


def test_chat_commands_save_load_and_stats(smollm_path, tmp_path):
    saved = tmp_path / "chat.json"
    # A line that ends in a backslash goes on on the next one: "Name a " and "color." are one turn.
    script = f"/system Answer briefly.\nName a \\\ncolor.\n/save {saved}\n/reset\n/load {saved}\n/stats\n"
    proc = cli("chat", "-m", str(smollm_path), "--temp", "0", "-n", "8", "-c", "1024", input=script)
    assert proc.returncode == 0, proc.stderr
    history = json.loads(saved.read_text())
    assert [m["role"] for m in history] == ["system", "user", "assistant"]
    assert history[0]["content"] == "Answer briefly." and history[1]["content"] == "Name a \ncolor."
    assert "(loaded 3 messages" in proc.stdout and "replies: 1" in proc.stdout


def test_chat_ctrl_c_before_a_reply_streams_drops_that_turn_and_goes_on(smollm):
    import io

    from mullama import _chat

    with mullama.Context(smollm, n_ctx=512) as ctx:
        chat = _chat.Chat(ctx, system=None, max_tokens=4, params=mullama.sampler_params_greedy())
        history = chat.history
        calls = []

        def interrupted_once():   # Ctrl-C while the first turn's prompt is being built
            calls.append(1)
            if len(calls) == 1:
                raise KeyboardInterrupt
            return history()

        chat.history = interrupted_once
        out, err = io.StringIO(), io.StringIO()
        try:
            rc = _chat.run(chat, io.StringIO("Hi\nName a color.\n"), out, err)
        except KeyboardInterrupt:   # caught here: pytest would stop the whole session on it
            pytest.fail("a Ctrl-C before the reply streamed ended the chat")
        assert rc == 0
    assert "turn dropped" in err.getvalue()
    assert chat.replies == 1 and chat.messages[0]["content"] == "Name a color."


def test_chat_continues_after_a_turn_that_overflows_the_context(smollm_path):
    proc = cli("chat", "-m", str(smollm_path), "--temp", "0", "-n", "4", "-c", "64",
               input="word " * 400 + "\nHi\n")
    assert proc.returncode == 0, proc.stderr
    assert "mullama: prompt is" in proc.stderr and len(SUMMARY.findall(proc.stderr)) == 1


# The system calls a line editor sleeps in while it waits for a key, by machine.
_READ_CALLS = {"x86_64": {0, 7, 23, 270, 271}, "aarch64": {63, 72, 73}}


def _sleeps_reading(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        state = f.read().rpartition(")")[2].split()[0]
    with open(f"/proc/{pid}/syscall") as f:
        call = f.read().split()[0]
    return state == "S" and call.isdigit() and int(call) in _READ_CALLS[platform.machine()]


class Pty:
    """A child on a pseudo-terminal, read until the output shows what we wait for (no sleeps)."""

    def __init__(self, args: list[str]) -> None:
        master, slave = pty.openpty()
        # A new pty is 0 columns wide, where tqdm would cut its bar to nothing: make it 24 x 100.
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self.fd = master
        self.out = ""

    def expect(self, pattern: str, timeout: float = 120) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            if m := re.search(pattern, self.out):
                self.out = self.out[m.end():]
                return m
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError(f"no {pattern!r} in {self.out[-2000:]!r}")
            try:
                data = os.read(self.fd, 4096)
            except OSError:   # the child has exited and closed the terminal
                data = b""
            if not data:
                raise AssertionError(f"child ended before {pattern!r}: {self.out[-2000:]!r}")
            self.out += data.decode(errors="replace").replace("\r\n", "\n")

    def send(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def interrupt_when_reading(self, timeout: float = 120) -> None:
        """Send SIGINT once the child sleeps in readline's select. CPython's readline only
        sees a signal that interrupts that select: one that lands between its last check and
        the select (the prompt is already written then) is held until the next key."""
        deadline = time.monotonic() + timeout
        while not _sleeps_reading(self.proc.pid):
            if time.monotonic() > deadline:
                raise AssertionError(f"the child never waited for input: {self.out[-2000:]!r}")
            time.sleep(0.005)
        self.proc.send_signal(signal.SIGINT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        os.close(self.fd)


def test_ctrl_c_stops_the_reply_and_a_later_turn_still_works(smollm_path):
    child = Pty([sys.executable, "-m", "mullama", "chat", "-m", str(smollm_path), "--temp", "0",
                 "-n", "400", "-c", "1024"])
    try:
        child.expect(r"> ")
        child.send("Write a long story about a dragon.\n")   # 400 tokens, greedily: seconds of reply
        child.expect(r"about a dragon\.[^\n]*\n")        # the echo of our line
        child.expect(r"Once upon a time")                  # the reply has begun
        child.proc.send_signal(signal.SIGINT)
        child.expect(r"interrupted\]")
        child.expect(r"> ")
        child.send("Name a French city.\n")
        child.expect(r"French city\.[^\n]*\n")
        m = child.expect(r"\[(\d+) tokens[^\]]*\]")
        assert int(m.group(1)) > 0 and "interrupted" not in m.group(0)
        child.expect(r"> ")
        # At the prompt, Ctrl-C once only warns; a second in a row leaves with 130.
        child.interrupt_when_reading()
        child.expect(r"Ctrl-C again")
        child.interrupt_when_reading()
        assert child.proc.wait(timeout=60) == 130
    finally:
        child.close()


def test_chat_ends_at_ctrl_d(smollm_path):
    child = Pty([sys.executable, "-m", "mullama", "chat", "-m", str(smollm_path), "-c", "256"])
    try:
        child.expect(r"> ")
        child.send("\x04")
        assert child.proc.wait(timeout=60) == 0
    finally:
        child.close()


# -- embed ----------------------------------------------------------------------------------------

LINES = ["A cat sits on the mat.", "Stock markets fell sharply today.", "The kitten is sleeping."]


def test_embed_gives_one_vector_per_line_equal_to_embed_batch(minilm, tmp_path):
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(LINES) + "\n")
    proc = cli("embed", str(src))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    with mullama.EmbeddingGenerator(minilm) as gen:
        expected = gen.embed_batch(LINES)
    assert len(rows) == 3
    np.testing.assert_allclose(np.array(rows, dtype=np.float32), expected, atol=1e-5)

    out = tmp_path / "v.npy"
    proc = cli("embed", "-", "--format", "npy", "-o", str(out), "-b", "2", input="\n".join(LINES))
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_allclose(np.load(out), expected, atol=1e-5)


def test_embed_refuses_an_empty_line(tmp_path):
    proc = cli("embed", "-", input="one\n\nthree\n")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "line 2" in proc.stderr


# -- info -----------------------------------------------------------------------------------------

def test_info_json_names_the_architecture_and_all_metadata(smollm):
    proc = cli("info", "smollm2-135m-instruct", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["architecture"] == "llama" and data["metadata"]["general.architecture"] == "llama"
    assert data["metadata"] == smollm.metadata()
    assert data["context_length"] == smollm.n_ctx_train and data["vocabulary"] == smollm.n_vocab
    assert data["parameters"] == smollm.n_params and data["quantization"] == "Q4_1"
    assert data["chat_template"] == smollm.chat_template
    assert data["special_tokens"]["eos"]["id"] == smollm.token_eos


def test_info_text_and_build(smollm_path):
    proc = cli("info", str(smollm_path))
    assert proc.returncode == 0 and proc.stderr == ""    # stderr is a pipe: no progress bar
    assert re.search(r"^architecture:\s+llama$", proc.stdout, re.M)
    assert re.search(r"^quantization:\s+Q4_1$", proc.stdout, re.M)
    build = cli("info", "--json")
    assert build.returncode == 0, build.stderr
    assert json.loads(build.stdout)["llama_cpp"] == mullama.version()


def test_a_terminal_gets_a_load_progress_bar(smollm_path):
    child = Pty([sys.executable, "-m", "mullama", "info", str(smollm_path)])
    try:
        child.expect(r"load SmolLM2-135M-Instruct\.Q4_1\.gguf: +\d+%\|")
        child.expect(r"architecture: +llama")
        assert child.proc.wait(timeout=60) == 0
    finally:
        child.close()


# -- models ---------------------------------------------------------------------------------------

def test_models_list_and_path_show_the_cache(smollm_path):
    proc = cli("models", "list")
    assert proc.returncode == 0, proc.stderr
    for name in mullama.models.KNOWN_MODELS:
        assert name in proc.stdout
    assert str(smollm_path) in proc.stdout
    path = cli("models", "path", "smollm2-135m-instruct")
    assert path.returncode == 0 and path.stdout.strip() == str(smollm_path)
    fetched = cli("models", "fetch", "smollm2-135m-instruct")   # cached: no download, same path
    assert fetched.returncode == 0 and fetched.stdout.strip() == str(smollm_path) and fetched.stderr == ""


def test_models_rm_deletes_only_that_entry(tmp_path):
    env = dict(os.environ, MULLAMA_CACHE=str(tmp_path))
    spec = mullama.models.KNOWN_MODELS["smollm2-135m-instruct"]
    fake = tmp_path / spec.sha256[:12] / spec.filename    # type: ignore[union-attr]
    fake.parent.mkdir()
    fake.write_bytes(b"GGUF placeholder")
    keep = tmp_path / "other" / "keep.gguf"
    keep.parent.mkdir()
    keep.write_bytes(b"x")
    assert cli("models", "path", "smollm2-135m-instruct", env=env).stdout.strip() == str(fake)
    proc = cli("models", "rm", "smollm2-135m-instruct", env=env)
    assert proc.returncode == 0 and str(fake) in proc.stdout
    assert not fake.parent.exists() and keep.exists()
    gone = cli("models", "path", "smollm2-135m-instruct", env=env)
    assert gone.returncode == 1 and "not cached" in gone.stderr and gone.stderr.count("\n") == 1


# -- exit codes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["chat", "-m", "/nonexistent/model.gguf"],
    ["embed", "-m", "/nonexistent/model.gguf", "-"],
    ["embed", "/nonexistent/texts.txt"],
    ["info", "/nonexistent/model.gguf"],
    ["generate", "hi", "-m", "/nonexistent/model.gguf"],
    ["models", "fetch", "no-such-model"],
])
def test_a_bad_path_exits_1_with_one_line(args):
    proc = cli(*args, input="")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("mullama: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "/nonexistent/" in proc.stderr or "no-such-model" in proc.stderr


@pytest.mark.parametrize("args", [["chat", "--no-such-flag"], ["embed", "--format", "csv"], ["models"],
                                  ["info", "--json", "a", "b"], ["frobnicate"]])
def test_bad_usage_exits_2_with_one_line(args):
    proc = cli(*args)
    assert proc.returncode == 2
    assert proc.stderr.startswith("mullama") and proc.stderr.count("\n") == 1, proc.stderr
