"""mutation_sweep.py's list against the kernels as they are: a change to csrc/ that moves a
mutant's text must move the mutant (or drop it with the code it mutated), so that the sweep
keeps testing the tests. The sweep itself runs by hand (its docstring)."""

from __future__ import annotations

import pytest
from mutation_sweep import MUTANTS, ROOT, Mutant, apply


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
