"""mutation_sweep.py's list against the kernels as they are: a change to csrc/ that moves a
mutant's text must move the mutant (or drop it with the code it mutated), so that the sweep
keeps testing the tests. The sweep itself runs by hand (its docstring)."""

from __future__ import annotations

import re

import pytest
from mutation_sweep import BINDING, MUTANTS, ROOT, Mutant, apply


@pytest.mark.parametrize("m", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_text_stands_once_in_its_file(m):
    text = (ROOT / "csrc" / m.file).read_text()
    assert text.count(m.old) == 1, f"{m.name}: its text stands {text.count(m.old)} times"
    assert m.old != m.new
    assert m.caught_by in (("binding", "asan") if m.file == "binding.cpp" else ("sweep", "suite"))


def test_mutant_names_are_unique():
    names = [m.name for m in MUTANTS]
    assert len(set(names)) == len(names)


def test_apply_changes_the_one_place_or_refuses(tmp_path):
    (tmp_path / "k.cu").write_text("a < b; c < d;")
    apply(Mutant("m", "k.cu", "what", "c < d", "c <= d"), tmp_path)
    assert (tmp_path / "k.cu").read_text() == "a < b; c <= d;"
    with pytest.raises(ValueError, match="stands 0 times"):
        apply(Mutant("m", "k.cu", "what", "c < d", "c <= d"), tmp_path)
    (tmp_path / "k.cu").write_text("x; x;")
    with pytest.raises(ValueError, match="stands 2 times"):
        apply(Mutant("m", "k.cu", "what", "x;", "y;"), tmp_path)


def test_the_readme_counts_the_mutants_as_they_are():
    """README's testing section gives the counts; they went stale by 7, 4 and 1."""
    text = " ".join((ROOT / "README.md").read_text().split())
    words = {"seven": 7, "eight": 8, "nine": 9, "ten": 10}
    m = re.search(r"applies (\d+) one-line mutants to the kernels.*? and (\d+) to `binding.cpp`"
                  r".*? but for (\w+) listed as equivalent", text)
    assert m, "the README's mutation-sweep sentence changed: update this test"
    kernel = sum(mu.file != BINDING for mu in MUTANTS)
    binding = sum(mu.file == BINDING for mu in MUTANTS)
    equivalent = sum(bool(mu.equivalent) for mu in MUTANTS)
    assert (int(m.group(1)), int(m.group(2)), words.get(m.group(3))) == (kernel, binding,
                                                                         equivalent)
