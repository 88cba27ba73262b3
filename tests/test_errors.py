"""An error told in one line: the first line of its message, its type where the message says nothing."""

from __future__ import annotations

import pytest

from pruning.errors import did_you_mean, error_line, name_hint, path_hint, typed_error_line


class Quiet(Exception):
    pass


@pytest.mark.parametrize(("error", "line", "typed"), [
    (ValueError("bad value"), "bad value", "ValueError: bad value"),
    (OSError("no such file\n  File 'x', line 3\nTraceback"), "no such file", "OSError: no such file"),
    # A message that starts with a blank line (a library's report of several lines) is told by its first words.
    (RuntimeError("\n\n  Error(s) in loading state_dict  \nsize mismatch"), "Error(s) in loading state_dict",
     "RuntimeError: Error(s) in loading state_dict"),
    # A message that says nothing: the type, never an empty pair of parentheses or an IndexError of its own.
    (Quiet(), "Quiet", "Quiet"),
    (AssertionError("  \n "), "AssertionError", "AssertionError"),
    (KeyError("weight"), "'weight'", "KeyError: 'weight'"),
])
def test_an_error_in_one_line(error, line, typed):
    assert error_line(error) == line
    assert typed_error_line(error) == typed


def test_a_message_that_says_nothing_is_told_by_the_callers_default():
    assert error_line(Quiet(), "not found") == "not found"
    assert error_line(ValueError(" \n"), "not found") == "not found"
    assert error_line(ValueError("no such alias\ndetails"), "not found") == "no such alias"


def test_did_you_mean_names_the_closest_other_name_or_none():
    names = ["Default", "minilm_squad_cpu", "smoke", "smoke2"]
    assert did_you_mean("minilm_squad_cp", names) == "did you mean 'minilm_squad_cpu'?"
    assert did_you_mean("minilm-squad-cpu", names) == "did you mean 'minilm_squad_cpu'?"
    assert did_you_mean("nope", names) == ""  # nothing close: no guess
    assert did_you_mean("smoke", names) == "did you mean 'smoke2'?"  # never the name itself, which is there
    assert did_you_mean(2, ["2", "22"]) == "did you mean '22'?"  # a YAML key read as a number is its text
    assert did_you_mean("x", []) == ""
    assert name_hint("smok", names) == "; did you mean 'smoke'?" and name_hint("nope", names) == ""  # as a tail


def test_a_path_that_is_not_there_is_told_the_closest_entry_beside_it(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "dense_minilm.yaml").write_text("{}")
    (tmp_path / "runs" / "prune50" / "final").mkdir(parents=True)
    assert path_hint(tmp_path / "configs" / "dense_minilm.yml") == (
        f"; did you mean {str(tmp_path / 'configs' / 'dense_minilm.yaml')!r}?")
    final = tmp_path / "runs" / "prune50" / "final"
    assert path_hint(final.with_name("fnal")) == f"; did you mean {str(final)!r}?"
    assert path_hint(tmp_path / "configs" / "other.json") == ""  # nothing close beside it
    assert path_hint(tmp_path / "nowhere" / "dense_minilm.yml") == ""  # its directory is not there either
