"""The documentation: a short README front page, links that resolve, no machine-specific paths."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_MAX_CHARS = 12_000
SKIPPED_DIRS = (".git/", ".venv/", "data/", "results/")   # generated or not ours to scan
MACHINE_PATH = "/".join(("", "work", ""))   # one machine's checkout path (spelt so: this file must not name it)

CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)            # links inside code are not links
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.M)


def github_anchor(heading: str) -> str:
    """The id GitHub gives a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {github_anchor(h) for h in HEADING.findall(text)}


def relative_links(path: Path):
    for target in LINK.findall(CODE.sub("", path.read_text(encoding="utf-8"))):
        if not re.match(r"[a-z][a-z0-9+.-]*:", target):     # http:, https:, mailto: ...
            yield target


def test_readme_is_a_front_page():
    chars = len(README.read_text(encoding="utf-8"))        # characters, as `wc -m` counts them
    assert chars <= README_MAX_CHARS, f"README.md has {chars} characters (at most {README_MAX_CHARS})"


def test_readme_names_the_test_command():
    assert "make test" in README.read_text(encoding="utf-8")   # .ci/run runs the README's command


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    broken = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        linked = (doc.parent / file_part).resolve() if file_part else doc
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(target)
    assert not broken, f"{doc.name}: links to nothing: {broken}"


def test_no_tracked_file_names_a_machine_path():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                             check=True).stdout.decode().split("\0")
    offenders = []
    for name in tracked:
        path = ROOT / name
        if not name or name.startswith(SKIPPED_DIRS) or not path.is_file():
            continue
        content = path.read_bytes()
        if b"\0" in content:                               # binary: weights, images
            continue
        if MACHINE_PATH.encode() in content:
            offenders.append(name)
    assert not offenders, f"files naming the machine path {MACHINE_PATH!r}: {offenders}"


# Names of code the docs cite (`infer.ensemble`, `report.runs.load_run`, `samlib.device.precision_for`):
# each must still exist, so a refactor that renames or removes one fails here, not in a reader's hands.
CITED = re.compile(r"`(?:samlib\.)?((?:report\.)?[a-z_]+)\.([A-Za-z_]\w*)(?:\.([A-Za-z_]\w*))?(?:\([^`]*\))?`")


def cited_names():
    import importlib
    for path in [README, *DOCS]:
        for module, name, member in CITED.findall(path.read_text(encoding="utf-8")):
            if name != "py" and (ROOT / "samlib" / (module.replace(".", "/") + ".py")).is_file():
                yield path.name, importlib.import_module(f"samlib.{module}"), name, member


def test_the_docs_cite_code_by_names_that_exist():
    missing = [f"{doc}: {mod.__name__}.{name}{'.' + member if member else ''}"
               for doc, mod, name, member in cited_names()
               if not hasattr(mod, name) or (member and not hasattr(getattr(mod, name), member))]
    assert not missing, "docs cite code that no longer exists: " + "; ".join(sorted(set(missing)))


def test_the_citation_check_finds_citations():
    assert len(list(cited_names())) >= 10


# The README's headline reads each claim; the committed cpu report computes the same readings
# (notebook 01: table1_claims, notebook 02: figure1_by_seed).  README row label -> (table, claim).
HEADLINE_CLAIMS = {
    "+ SE blocks: gain over the baseline": ("table1_claims", "+ SE blocks gain: se - baseline"),
    "+ MixUp α = 0.3: gain over + SE": ("table1_claims", "+ MixUp (a=0.3) gain: se_mixup - se"),
    "+ EMA (final): gain over + MixUp": ("table1_claims", "+ EMA (final) gain: final - se_mixup"),
    "TTA − standard": ("figure1_by_seed", "TTA gain: tta - standard"),
    "ensemble 0.4/0.6 + TTA − TTA": ("figure1_by_seed", "ensemble gain: ensemble+tta - tta"),
    "EMA + TTA beats TTA": ("figure1_by_seed", "EMA beats regular under TTA: ema+tta - tta"),
    "final accuracy, ensemble + TTA, %": ("figure1_by_seed", "final accuracy: ensemble+tta (%)"),
}


def test_the_readme_reads_each_claim_as_the_committed_report_does():
    import pandas as pd

    rows = {}
    for line in README.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 4:
            rows[cells[0]] = cells[3]
    wrong = []
    for label, (table, claim) in HEADLINE_CLAIMS.items():
        frame = pd.read_csv(ROOT / "results" / "cpu" / f"{table}.csv").set_index("claim")
        reading = frame.loc[claim, "reading"]
        if label not in rows or not rows[label].startswith(f"**{reading}**"):
            wrong.append(f"{label!r}: README {rows.get(label)!r}, {table}.csv {reading!r}")
    assert not wrong, "README headline readings differ from results/cpu: " + "; ".join(wrong)
