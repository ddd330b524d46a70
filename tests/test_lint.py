"""The repository is clean under ruff: its default rules for the version setup.py pins, less
the two that ruff.toml turns off and says why. A finding fails the suite, so it is fixed (or
its line says why not, with a ``noqa``) when it is written, not in a later sweep."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pinned_version() -> str:
    m = re.search(r'^RUFF_VERSION = "([^"]+)"', (ROOT / "setup.py").read_text(), re.MULTILINE)
    assert m, "setup.py no longer pins RUFF_VERSION"
    return m.group(1)


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)


def test_ruff_finds_nothing():
    version = _ruff("--version")
    if version.returncode != 0:
        pytest.skip("ruff is not installed in this interpreter (pip install -e '.[test]')")
    pinned = _pinned_version()
    if version.stdout.split()[-1] != pinned:
        # Another release has another default rule set: its findings are not this repo's.
        pytest.skip(f"{version.stdout.strip()} here; the rule set is ruff {pinned}'s")
    r = _ruff("check", ".", "--no-cache", "--output-format", "concise")
    assert r.returncode == 0, f"ruff check found:\n{r.stdout[-4000:]}{r.stderr[-2000:]}"


def test_the_lint_check_sees_a_finding(tmp_path):
    """The check above can fail: the same configuration flags a blind loop-variable closure."""
    if _ruff("--version").returncode != 0:
        pytest.skip("ruff is not installed in this interpreter (pip install -e '.[test]')")
    bad = tmp_path / "bad.py"
    bad.write_text("fs = []\nfor i in range(3):\n    fs.append(lambda: i)\n")
    r = _ruff("check", str(bad), "--no-cache", "--config", str(ROOT / "ruff.toml"),
              "--output-format", "concise")
    assert r.returncode == 1 and "B023" in r.stdout, r.stdout + r.stderr
