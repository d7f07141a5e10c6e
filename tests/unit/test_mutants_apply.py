"""Every mutant of tests/mutants.py still finds its snippet, exactly once: a refactor that
moved the code must move the mutant with it, or the mutation check would silently test nothing."""

import pytest

from tests.mutants import MUTANTS, ROOT


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_the_mutant_s_snippet_occurs_once_in_its_file(mutant):
    text = (ROOT / mutant.file).read_text()
    assert text.count(mutant.old) == 1, f"{mutant.file}: {mutant.old!r} found {text.count(mutant.old)} times"
    for test in mutant.tests:
        path = test.split("::")[0]
        assert (ROOT / path).is_file(), f"{mutant.name}: no test file {path}"
