"""The package's layering: the core (the method) never needs the report layer's libraries."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

SAMLIB = Path(__file__).resolve().parent.parent / "samlib"
CORE = sorted(p for p in SAMLIB.glob("*.py") if p.stem not in ("cli", "sweep", "plan", "__main__"))
REPORT_ONLY = ("matplotlib", "pandas", "nbformat", "papermill", "nbconvert", "jinja2", "tabulate", "PIL")
MAX_MODULE_LINES = 400


def _imports(path: Path) -> set:
    """Top-level names of every module `path` imports (absolute and package-relative)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            names.add(("samlib." if node.level else "") + base if base else "samlib")
    return names


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_core_module_imports_no_report_library_and_not_the_report(path):
    for name in _imports(path):
        assert name.split(".")[0] not in REPORT_ONLY, f"{path.name} imports {name}"
        assert not name.startswith("samlib.report"), f"{path.name} imports the report layer ({name})"


@pytest.mark.parametrize("path", CORE + sorted((SAMLIB / "report").glob("*.py")), ids=lambda p: p.name)
def test_no_module_is_longer_than_one_sitting(path):
    assert len(path.read_text().splitlines()) <= MAX_MODULE_LINES, path.name


def test_importing_the_whole_core_loads_no_report_library():
    """What a training script pulls in at run time, in a fresh interpreter (PIL aside:
    torchvision's transforms import it themselves)."""
    libraries = tuple(m for m in REPORT_ONLY if m != "PIL")
    modules = ", ".join(f"samlib.{p.stem}" for p in CORE if p.stem != "__init__")
    code = (f"import sys, {modules}\n"
            f"print(','.join(sorted(m for m in {libraries!r} if m in sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == ""


# Issue 21: a thin library.  The whole package, and what a training or inference script pulls in.
MAX_PACKAGE_LINES = 4500
MAX_TRAIN_INFER_CLOSURE_LINES = 2500


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines())


def _module_file(name: str):
    """samlib.x.y -> its file (a module or a package's __init__), or None."""
    base = SAMLIB.parent.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _samlib_imports(path: Path) -> set:
    """Every samlib module `path` imports anywhere in it (function-level imports too)."""
    package = ".".join(path.relative_to(SAMLIB.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}      # `from samlib import data`
    return {n for n in names if n.split(".")[0] == "samlib" and _module_file(n)}


def import_closure(*modules: str) -> dict:
    """{file: lines} of `modules` and every samlib module they import, directly or not."""
    todo, seen = list(modules), {}
    while todo:
        path = _module_file(todo.pop())
        if path in seen:
            continue
        seen[path] = _lines(path)
        todo += sorted(_samlib_imports(path))
        parts = path.relative_to(SAMLIB.parent).with_suffix("").parts
        for i in range(1, len(parts)):                      # importing samlib.x runs samlib/__init__
            todo.append(".".join(parts[:i]))
    return seen


def test_the_closure_counter_follows_relative_and_absolute_imports():
    closure = {p.relative_to(SAMLIB).as_posix() for p in import_closure("samlib.report.runs")}
    assert {"report/runs.py", "report/__init__.py", "__init__.py", "infer.py", "device.py"} <= closure


def test_the_package_is_thin():
    total = sum(_lines(p) for p in SAMLIB.rglob("*.py"))
    assert total <= MAX_PACKAGE_LINES, f"samlib has {total} lines"


def test_training_and_inference_import_a_small_core():
    closure = import_closure("samlib.train", "samlib.infer")
    total = sum(closure.values())
    listing = ", ".join(f"{p.name} {n}" for p, n in sorted(closure.items(), key=lambda kv: -kv[1]))
    assert total <= MAX_TRAIN_INFER_CLOSURE_LINES, f"{total} lines: {listing}"


def test_benchmark_code_lives_in_benchmarks():
    assert not (SAMLIB / "report" / "bench.py").exists()
    assert (SAMLIB.parent / "benchmarks" / "bench.py").is_file()
