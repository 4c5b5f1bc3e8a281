"""The committed cpu runs (results/runs/cpu) are the ones `make publish PROFILE=cpu` reuses: the
code must still name them as it named them when they trained, or a publish would train again."""
import json
from pathlib import Path

import pytest

from samlib.config import resolve
from samlib.rundir import RunDir

RUNS = Path(__file__).resolve().parent.parent / "results" / "runs" / "cpu"
COMMITTED = sorted(p for p in RUNS.glob("*-s*-*") if (p / "config.json").is_file())


def test_there_are_committed_runs():
    assert len(COMMITTED) >= 6


@pytest.mark.parametrize("run", COMMITTED, ids=lambda p: p.name)
def test_a_committed_run_is_found_under_the_name_its_config_resolves_to(run):
    recorded = json.loads((run / "config.json").read_text())
    cfg = resolve(recorded["name"], "cpu", seed=recorded["seed"])
    assert RunDir.for_config(cfg, RUNS).path == run
