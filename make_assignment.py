"""Turn functions of this repository into a course assignment, graded by the tests.

Copy the project, replace the bodies of the chosen functions with `raise NotImplementedError`, and keep their
signatures and docstrings (which state the equation and the shapes), so that a student writes the body and
the matching tests grade it: they fail on the stub and pass once the code is right.

    python make_assignment.py kernels/losses.py:dpo_loss kernels/advantages.py:gae_advantages --out ../hw1
    cd ../hw1 && python -m pytest -q tests/test_kernels_losses.py tests/test_kernels_advantages.py

FILE:NAME blanks one function (NAME may be a method, Class.method; several: FILE:A,B); FILE alone blanks every
public top-level function of FILE. The copy holds the files git tracks (as they are in the working tree), or
without git everything but out/ and caches; nothing is overwritten.
"""

import argparse
import ast
import io
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
LEFT_OUT = shutil.ignore_patterns(".git", "out", "__pycache__", ".pytest_cache", "*.pyc")


# ---- blanking a function ------------------------------------------------------------------------

def find_functions(tree, names):
    """{name: function node} for the requested names ("f" or "Class.f"), or every public top-level function."""
    found = {}
    for node in tree.body:
        if isinstance(node, FUNCTIONS):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            found.update({f"{node.name}.{item.name}": item for item in node.body if isinstance(item, FUNCTIONS)})
    if names is None:
        public = {name: node for name, node in found.items() if "." not in name and not name.startswith("_")}
        if not public:
            raise ValueError("no public top-level function to blank")
        return public
    missing = [name for name in names if name not in found]
    if missing:
        raise ValueError(f"no function {', '.join(missing)} (there are: {', '.join(sorted(found)) or 'none'})")
    return {name: found[name] for name in names}


def has_docstring(node):
    first = node.body[0]
    return isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)


def lines_to_replace(name, node, lines):
    """(start, end), the 0-based slice of source lines to replace: from just after the docstring (comments that
    would give the answer away go too), or from the first statement or its decorators, to the function's end."""
    statements = node.body[1:] if has_docstring(node) else node.body
    if not statements:
        raise ValueError(f"{name} has a docstring and nothing else to write")
    first = statements[0]
    decorators = [(d.lineno, d.col_offset - 1) for d in getattr(first, "decorator_list", [])]  # -1: the "@"
    line, column = min([(first.lineno, first.col_offset)] + decorators)
    if lines[line - 1][:column].strip():  # e.g. `def f(x): return x`, or `"""doc"""; return 1`
        raise ValueError(f"{name}: its body shares a line with its `def` or docstring; put it on lines of its own")
    start = node.body[0].end_lineno if has_docstring(node) else line - 1  # end_lineno counts from 1: the next line
    return start, node.end_lineno


def blank_bodies(source, names=None):
    """The source with each chosen function's body, everything after its docstring, replaced by one line that
    raises NotImplementedError. Returns (new source, names blanked, in file order)."""
    functions = find_functions(ast.parse(source), names)
    lines = io.StringIO(source, newline="").readlines()  # Python's line ends only (splitlines also cuts at \f, U+2028...)
    for name, node in sorted(functions.items(), key=lambda item: -item[1].lineno):  # bottom up: line numbers hold
        start, end = lines_to_replace(name, node, lines)
        indent = " " * node.body[-1].col_offset
        lines[start:end] = [f'{indent}raise NotImplementedError("assignment: write {name}")\n']
    blanked = "".join(lines)
    ast.parse(blanked)  # never hand out a file that does not parse
    return blanked, sorted(functions, key=lambda name: functions[name].lineno)


# ---- the assignment folder ----------------------------------------------------------------------

def grading_tests(names, tests_dir):
    """The test files that name any of the functions (whole words; a method by its class and its name): the
    ones that grade them. This tool's own tests name functions only as examples."""
    def names_it(text, name):
        return all(re.search(rf"\b{re.escape(part)}\b", text) for part in name.split("."))
    return sorted(str(path.relative_to(tests_dir.parent)) for path in tests_dir.glob("test_*.py")
                  if path.name != "test_make_assignment.py" and any(names_it(path.read_text(), n) for n in names))


def copy_project(out):
    """Copy the files git tracks (the working tree's versions), or without git everything but out/ and caches."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
        tracked = [relative for relative in listed.stdout.split("\0") if relative] if listed.returncode == 0 else []
    except OSError:  # git is not installed
        tracked = []
    if not tracked:  # not a git checkout, or inside a repository that does not track this project
        target = out.resolve()

        def left_out(folder, names):  # and the assignment folder itself, when it is made inside the repository
            return set(LEFT_OUT(folder, names)) | {n for n in names if (Path(folder) / n).resolve() == target}

        shutil.copytree(ROOT, out, ignore=left_out, dirs_exist_ok=True)
        return
    for relative in tracked:
        if (ROOT / relative).is_file():  # a tracked file deleted in the working tree stays deleted
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / relative, out / relative)


def parse_target(text):
    """FILE[:NAME,...] -> (path inside the repository, [names] or None for every public function)."""
    path, _, names = text.partition(":")
    try:
        relative = (ROOT / path).resolve().relative_to(ROOT)
    except ValueError:
        relative = None
    if relative is None or relative.suffix != ".py" or not (ROOT / relative).is_file():
        raise argparse.ArgumentTypeError(f"{path} is not a Python file of this repository (e.g. kernels/losses.py)")
    return relative, names.split(",") if names else None


def merge_targets(targets):
    """{path: [names] or None}: a file named twice gets both lists of names (None, the whole file, wins)."""
    merged = {}
    for path, names in targets:
        if names is None or (path in merged and merged[path] is None):
            merged[path] = None
        else:
            merged[path] = list(dict.fromkeys(merged.get(path, []) + names))
    return merged


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="+", type=parse_target, metavar="FILE[:NAME[,NAME...]]")
    parser.add_argument("--out", required=True, type=Path,
                        help="folder for the assignment (must not exist or be empty)")
    args = parser.parse_args()
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        parser.error(f"{args.out} is not empty; choose a new folder")
    blanked = {}
    for path, names in merge_targets(args.targets).items():  # check every target before copying anything
        try:
            blanked[path] = blank_bodies((ROOT / path).read_text(), names)
        except (ValueError, SyntaxError) as error:
            parser.error(f"{path}: {error}")
    copy_project(args.out)
    for path, (source, names) in blanked.items():
        (args.out / path).write_text(source)
        print(f"{path}: blanked {', '.join(names)}")
    graders = grading_tests([name for _, names in blanked.values() for name in names], ROOT / "tests")
    if not graders:
        print("no test file names these functions (they are tested through their callers): grade with the whole suite")
    grade = f"cd {args.out} && python -m pytest -q {' '.join(graders)}".rstrip()
    print(f"assignment written to {args.out}; grade with:\n  {grade}")


if __name__ == "__main__":
    main()
