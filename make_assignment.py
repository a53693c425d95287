"""Turn functions of this repository into a course assignment, graded by the tests.

Copy the project, replace the bodies of the chosen functions with `raise NotImplementedError`, and keep their
signatures and docstrings (which state the equation and the shapes), so that a student writes the body and
the matching tests grade it: they fail on the stub and pass once the code is right.

    python make_assignment.py kernels/losses.py:dpo_loss kernels/advantages.py:gae_advantages --out hw1
    cd hw1 && python -m pytest -q tests/test_kernels_losses.py tests/test_kernels_advantages.py

FILE:NAME blanks one function (NAME may be a method, Class.method); FILE alone blanks every public top-level
function of FILE. The copy leaves out .git, out/ and caches; nothing is overwritten.
"""

import argparse
import ast
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent
LEFT_OUT = shutil.ignore_patterns(".git", "out", "__pycache__", ".pytest_cache", "*.pyc")


def find_functions(tree, names):
    """{name: FunctionDef} for the requested names ("f" or "Class.f"), or every public top-level function."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            found.update({f"{node.name}.{item.name}": item for item in node.body if isinstance(item, ast.FunctionDef)})
    if names is None:
        return {name: node for name, node in found.items() if "." not in name and not name.startswith("_")}
    missing = [name for name in names if name not in found]
    if missing:
        raise ValueError(f"no function {', '.join(missing)} (there are: {', '.join(sorted(found))})")
    return {name: found[name] for name in names}


def has_docstring(node):
    first = node.body[0]
    return isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)


def blank_bodies(source, names=None):
    """The source with each chosen function's body, everything after its docstring, replaced by one line that
    raises NotImplementedError. Returns (new source, names blanked)."""
    tree = ast.parse(source)
    functions = find_functions(tree, names)
    lines, blanked = source.splitlines(keepends=True), []
    for name, node in sorted(functions.items(), key=lambda item: -item[1].lineno):  # bottom up: line numbers hold
        if has_docstring(node):
            if len(node.body) == 1:
                continue  # a docstring and nothing else: nothing to write
            start = node.body[0].end_lineno  # 0-based index of the first line after the docstring
        else:
            start = min([node.body[0].lineno] + [d.lineno for d in getattr(node.body[0], "decorator_list", [])]) - 1
        if start < node.lineno:
            raise ValueError(f"{name}: its body starts on the line of its `def`; put it on lines of its own")
        indent = " " * node.body[-1].col_offset
        lines[start:node.end_lineno] = [f'{indent}raise NotImplementedError("assignment: write {name}")\n']
        blanked.insert(0, name)
    return "".join(lines), blanked


def tests_naming(names, tests_dir):
    """The test files that mention any of the names: the ones that grade them."""
    bare = {name.split(".")[-1] for name in names}
    return sorted(str(path.relative_to(tests_dir.parent)) for path in tests_dir.glob("test_*.py")
                  if any(name in path.read_text() for name in bare))


def parse_target(text):
    path, _, names = text.partition(":")
    if not path.endswith(".py") or not (ROOT / path).is_file():
        raise argparse.ArgumentTypeError(f"{path} is not a Python file of this repository (e.g. kernels/losses.py)")
    return path, names.split(",") if names else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="+", type=parse_target, metavar="FILE[:NAME[,NAME...]]")
    parser.add_argument("--out", required=True, type=Path, help="folder for the assignment (must not exist or be empty)")
    args = parser.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} is not empty; choose a new folder")
    blanked = {}
    for path, names in args.targets:  # check every target before copying anything
        try:
            blanked[path] = blank_bodies((ROOT / path).read_text(), names)
        except ValueError as error:
            parser.error(f"{path}: {error}")
    out = args.out.resolve()

    def left_out(folder, names):  # also the assignment folder itself, when it is made inside the repository
        return set(LEFT_OUT(folder, names)) | {name for name in names if (Path(folder) / name).resolve() == out}

    shutil.copytree(ROOT, out, ignore=left_out, dirs_exist_ok=True)
    for path, (source, names) in blanked.items():
        (args.out / path).write_text(source)
        print(f"{path}: blanked {', '.join(names)}")
    graders = tests_naming([name for _, names in blanked.values() for name in names], ROOT / "tests")
    if not graders:
        print("no test file names these functions (they are tested through their callers): grade with the whole suite")
    print(f"assignment written to {args.out}; grade with:\n  cd {args.out} && python -m pytest -q {' '.join(graders)}".rstrip())


if __name__ == "__main__":
    main()
