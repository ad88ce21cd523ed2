"""The shipped type stubs agree with the public API and the examples (mypy)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_passes_on_public_api_and_examples():
    pytest.importorskip("mypy")
    files = ["mullama/__init__.py", "mullama/aio.py", "mullama/_batching.py", "mullama/_params.py",
             "mullama/_errors.py", "mullama/models.py", "mullama/_llama.pyi", "mullama/server.py", "mullama/__main__.py",
             "mullama/_cli.py", "mullama/_chat.py", "mullama/_tools.py", "examples/"]
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary", *files], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]


def test_package_ships_stubs_and_marker():
    assert (ROOT / "mullama" / "py.typed").is_file()
    assert (ROOT / "mullama" / "_llama.pyi").is_file()


def test_stubs_match_the_compiled_module():
    # mypy.stubtest imports mullama._llama and compares every name and signature with _llama.pyi.
    pytest.importorskip("mypy")
    proc = subprocess.run([sys.executable, "-m", "mypy.stubtest", "mullama._llama",
                           "--allowlist", str(ROOT / "tests" / "stubtest_allowlist.txt")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
