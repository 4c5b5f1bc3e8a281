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
