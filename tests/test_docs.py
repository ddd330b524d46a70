"""The examples in the docs run: every module's ``Examples::`` doctests, and the README's Python
code blocks, as a user would paste them."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

import fused_rnn

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["fused_rnn"] + sorted(
    m.name for m in pkgutil.walk_packages(fused_rnn.__path__, "fused_rnn.")
    if not m.name.endswith("__main__")  # importing it runs the CLI
)
# Modules whose docstrings promise runnable examples (a doctest count of 0 there means they
# were lost, e.g. by a formatting change that doctest no longer recognises).
DOCUMENTED = {"fused_rnn", "fused_rnn.modules", "fused_rnn.functional", "fused_rnn.tbptt",
              "fused_rnn.charlm", "fused_rnn.backends", "fused_rnn.fx",
              "fused_rnn.convert"}


@pytest.mark.parametrize("name", MODULES)
def test_module_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             verbose=False, report=True)
    assert result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
    if name in DOCUMENTED:
        assert result.attempted > 0, f"{name} lost its examples"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert blocks, "the README has no Python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})  # noqa: S102 (our own README)
