"""make_assignment.py: blanked bodies keep signatures and docstrings, and the copied tests fail on the stubs."""

import re
import shutil
import subprocess
import sys

import pytest

import make_assignment
from conftest import ROOT
from make_assignment import blank_bodies, grading_tests

SOURCE = '''import functools


def helper(x):
    return x + 1


def documented(a, b=2):
    """Add and square.

    (a + b)^2
    """
    # a comment that would give the answer away
    total = a + b
    return total * total


class Model:
    def step(self, x):
        @functools.lru_cache
        def inner(y):
            return y * 2
        return inner(x)

    def _private(self):
        return 0
'''


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_blanked_functions_keep_signature_and_docstring_and_raise():
    source, names = blank_bodies(SOURCE, ["documented", "Model.step"])
    assert names == ["documented", "Model.step"]
    namespace = {}
    exec(compile(source, "blanked", "exec"), namespace)
    assert namespace["helper"](1) == 2  # untouched
    assert namespace["documented"].__doc__.strip().endswith("(a + b)^2")
    for call in (lambda: namespace["documented"](1), lambda: namespace["Model"]().step(1)):
        with pytest.raises(NotImplementedError, match="assignment: write"):
            call()
    assert "a comment that would give the answer away" not in source and "inner" not in source
    assert namespace["Model"]()._private() == 0


def test_a_file_alone_blanks_its_public_top_level_functions():
    source, names = blank_bodies(SOURCE)
    assert names == ["helper", "documented"]  # not methods, not private ones
    assert "return x + 1" not in source and "return 0" in source


@pytest.mark.parametrize("source, message", [
    ("def f(x): return x\n", "shares a line"),
    ("def f(a,\n      b): return a\n", "shares a line"),
    ('def f():\n    """doc"""; return 1\n', "shares a line"),
    ('def f():\n    """only a docstring"""\n', "nothing else to write"),
    ("x = 1\n", "no function f (there are: none)"),
])
def test_bodies_that_cannot_be_blanked_cleanly_are_refused(source, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        blank_bodies(source, ["f"])


def test_unknown_names_and_files_without_public_functions_are_refused():
    with pytest.raises(ValueError, match="no function nope"):
        blank_bodies(SOURCE, ["nope"])
    with pytest.raises(ValueError, match="no public top-level function"):
        blank_bodies("def _private():\n    return 1\n")


def test_async_functions_are_blanked_too():
    source, names = blank_bodies('async def fetch(x):\n    """Wait for x."""\n    return await x\n')
    assert names == ["fetch"] and "await" not in source and '"""Wait for x."""' in source


def test_a_file_named_twice_gets_both_functions_blanked(tmp_path):
    out = tmp_path / "hw"
    result = run("make_assignment.py", "kernels/losses.py:dpo_loss", "./kernels/losses.py:kl_penalty",
                 "--out", str(out))
    assert result.returncode == 0, result.stderr
    stubbed = (out / "kernels" / "losses.py").read_text()
    assert 'write dpo_loss"' in stubbed and 'write kl_penalty"' in stubbed


def test_graders_are_the_test_files_naming_the_function_as_a_word():
    graders = grading_tests(["gae_advantages"], ROOT / "tests")
    assert "tests/test_kernels_advantages.py" in graders
    assert "tests/test_make_assignment.py" not in graders  # names functions only as examples
    assert grading_tests(["gae_adv"], ROOT / "tests") == []  # a prefix is not the name


def test_the_copied_tests_fail_on_the_stub_and_the_rest_still_pass(tmp_path):
    out = tmp_path / "hw"
    result = run("make_assignment.py", "kernels/losses.py:dpo_loss", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "tests/test_kernels_losses.py" in result.stdout  # the grader is named
    assert not (out / ".git").exists() and (out / "tests" / "conftest.py").is_file()
    graded = run("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels_losses.py", "-k", "dpo", cwd=out)
    assert graded.returncode == 1 and "NotImplementedError" in graded.stdout
    others = run("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels_losses.py", "-k", "not dpo",
                 cwd=out)
    assert others.returncode == 0, others.stdout[-2000:]


def test_an_assignment_folder_inside_the_repository_is_not_copied_into_itself(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", "out", "__pycache__", ".pytest_cache"))
    (repo / "hw1").mkdir()  # empty, so allowed; were it not left out, the copy would go into itself
    result = run("make_assignment.py", "kernels/advantages.py:gae_advantages", "--out", "hw1", cwd=repo)
    assert result.returncode == 0, result.stderr
    assert not (repo / "hw1" / "hw1").exists() and (repo / "hw1" / "kernels" / "advantages.py").is_file()


def test_in_a_git_checkout_the_copy_holds_the_tracked_files(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".git", "out", "__pycache__", ".pytest_cache"))
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "kernels", "tests", "make_assignment.py"], cwd=repo, check=True)
    (repo / "scratch.txt").write_text("not tracked")
    result = run("make_assignment.py", "kernels/losses.py:dpo_loss", "--out", str(tmp_path / "hw"), cwd=repo)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "hw" / "kernels" / "chunked.py").is_file() and not (tmp_path / "hw" / "scratch.txt").exists()


def test_a_path_outside_the_repository_is_refused_and_an_absolute_one_inside_is_not(tmp_path):
    outside = tmp_path / "losses.py"
    outside.write_text("def dpo_loss():\n    return 1\n")
    result = run("make_assignment.py", f"{outside}:dpo_loss", "--out", str(tmp_path / "hw"))
    assert result.returncode == 2 and "not a Python file of this repository" in result.stderr
    assert outside.read_text() == "def dpo_loss():\n    return 1\n"
    original = (ROOT / "kernels" / "losses.py").read_text()
    result = run("make_assignment.py", f"{ROOT / 'kernels' / 'losses.py'}:dpo_loss", "--out", str(tmp_path / "hw2"))
    assert result.returncode == 0, result.stderr
    assert (ROOT / "kernels" / "losses.py").read_text() == original  # the repository's own file is untouched
    assert 'write dpo_loss"' in (tmp_path / "hw2" / "kernels" / "losses.py").read_text()


@pytest.mark.parametrize("args, message", [
    (["kernels/losses.py:nope"], "no function nope"),
    (["kernels/missing.py"], "not a Python file of this repository"),
])
def test_bad_targets_are_one_line_errors_and_write_nothing(tmp_path, args, message):
    out = tmp_path / "hw"
    result = run("make_assignment.py", *args, "--out", str(out))
    assert result.returncode == 2 and message in result.stderr and not out.exists()


def test_a_non_empty_out_folder_is_not_overwritten(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = run("make_assignment.py", "kernels/losses.py:dpo_loss", "--out", str(tmp_path))
    assert result.returncode == 2 and "not empty" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_an_out_path_that_is_a_file_is_a_one_line_error(tmp_path):
    target = tmp_path / "afile"
    target.write_text("mine")
    result = run("make_assignment.py", "kernels/losses.py:dpo_loss", "--out", str(target))
    assert result.returncode == 2 and "Traceback" not in result.stderr and target.read_text() == "mine"


def test_without_git_the_copy_holds_the_working_tree(tmp_path, monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", "git")
    monkeypatch.setattr(make_assignment.subprocess, "run", no_git)
    make_assignment.copy_project(tmp_path / "hw")
    assert (tmp_path / "hw" / "kernels" / "losses.py").is_file()


def test_inside_a_repository_that_tracks_none_of_it_the_copy_holds_the_working_tree(tmp_path, monkeypatch):
    # git ls-files succeeds there and lists nothing: copying "the tracked files" would copy nothing
    monkeypatch.setattr(make_assignment.subprocess, "run",
                        lambda *args, **kwargs: subprocess.CompletedProcess(args, 0, stdout="", stderr=""))
    make_assignment.copy_project(tmp_path / "hw")
    assert (tmp_path / "hw" / "kernels" / "losses.py").is_file()


def test_a_form_feed_between_functions_does_not_shift_the_blanked_lines():
    # str.splitlines also cuts at a form feed (and U+2028 ...), ast's line numbers do not
    source = 'def a():\n    return 1\n\x0c\n\ndef f(x):\n    """Double x."""\n    return 2 * x\n\n\ndef g():\n    return 3\n'
    blanked, _ = blank_bodies(source, ["f"])
    assert '"""Double x."""' in blanked and "return 2 * x" not in blanked
    namespace = {}
    exec(blanked, namespace)
    assert namespace["a"]() == 1 and namespace["g"]() == 3


def test_every_kernel_has_a_test_file_that_grades_it():
    """An assignment on any kernel must have a grader: each name kernels exports is named by a test file, except
    the helpers tested through their callers, for which make_assignment says to grade with the whole suite."""
    import kernels
    tested_through_callers = {"masked_sum", "aggregate_token_loss", "default_chunk_size"}
    ungraded = {name for name in kernels.__all__ if not grading_tests([name], ROOT / "tests")}
    assert ungraded == tested_through_callers
