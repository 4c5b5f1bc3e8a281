"""samlib.report.colab off Colab: a fake google.colab (drive.mount records its call) and a fake
subprocess.run (pip, git clone) stand in for the runtime."""
from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from samlib.report import colab

DRIVE = "/content/drive/MyDrive/samresnets"
TORCH = sys.modules.get("torch")       # imported by conftest; torch cannot be imported twice


@pytest.fixture
def env(monkeypatch):
    """No Colab, no SAMLIB_*_DIR, no OMP_WAIT_POLICY, torch not yet imported (as in a fresh
    kernel); sys.modules and sys.path restored afterwards."""
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    for name in [k for k in os.environ if k.startswith("COLAB_")] + list(colab.ENV.values()):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return monkeypatch


@pytest.fixture
def commands(env):
    """subprocess.run recorded, never run."""
    calls = []
    env.setattr(subprocess, "run", lambda cmd, **kw: calls.append(list(cmd)))
    return calls


@pytest.fixture
def mounts(env):
    """A Colab runtime: a fake google.colab whose drive.mount records its mount point."""
    calls = []
    fake = types.ModuleType("google.colab")
    fake.drive = types.SimpleNamespace(mount=calls.append)
    if "google" not in sys.modules:
        env.setitem(sys.modules, "google", types.ModuleType("google"))
    env.setitem(sys.modules, "google.colab", fake)
    env.setitem(sys.modules, "google.colab.drive", fake.drive)
    return calls


def test_detection(env):
    assert not colab.on_colab()
    env.setenv("COLAB_RELEASE_TAG", "release-colab_20250101")
    assert colab.on_colab()
    env.delenv("COLAB_RELEASE_TAG")
    env.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    assert colab.on_colab()


def test_off_colab_nothing_but_the_thread_setting(env, commands):
    env.setattr(colab, "mount_drive", lambda: pytest.fail("mounted Drive off Colab"))
    path_before = list(sys.path)
    assert colab.setup(drive=True) == ("../data", "../runs", "../local/results")  # yours, git-ignored
    assert commands == [] and sys.path == path_before
    assert not any(v in os.environ for v in colab.ENV.values())
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_off_colab_returns_given_folders_then_the_parameters_cell_defaults(env, commands):
    env.setenv("SAMLIB_RUNS_DIR", "/elsewhere/runs")           # what make nbval exports
    folders = colab.setup(data_dir=Path("/d"))
    assert folders == ("/d", "/elsewhere/runs", "../local/results") and commands == []


def test_user_wait_policy_is_kept(env):
    env.setenv("OMP_WAIT_POLICY", "ACTIVE")
    colab.quiet_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_too_late_after_torch_warns(env):
    env.setitem(sys.modules, "torch", sys.modules.get("torch", types.ModuleType("torch")))
    with pytest.warns(UserWarning, match="restart"):
        assert not colab.quiet_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_module_does_not_import_torch():
    code = "import sys, samlib.report.colab; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_colab_with_drive_installs_the_clone_mounts_and_points_at_drive(env, commands, mounts):
    env.setattr(colab, "installed", lambda: False)
    root = colab.repo_root()
    assert root == Path(__file__).resolve().parent.parent         # the clone samlib came from
    env.setattr(sys, "path", [p for p in sys.path if Path(p or ".").resolve() != root])
    folders = colab.setup(drive=True)
    assert commands == [[sys.executable, "-m", "pip", "install", "-q", "-e", str(root)]]
    assert sys.path[0] == str(root)
    assert mounts == ["/content/drive"]
    assert folders == (f"{DRIVE}/data", f"{DRIVE}/runs", f"{DRIVE}/results")
    assert [os.environ[v] for v in ("SAMLIB_DATA_DIR", "SAMLIB_RUNS_DIR", "SAMLIB_RESULTS_DIR")] == list(folders)
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"


def test_colab_without_drive_keeps_folders_in_the_clone_and_skips_pip_when_installed(env, commands, mounts):
    env.setattr(colab, "installed", lambda: True)
    root = colab.repo_root()
    folders = colab.setup(runs_dir="/content/my_runs")
    assert commands == [] and mounts == []
    assert folders == (str(root / "data"), "/content/my_runs", str(root / "local" / "results"))   # never the clone's published results/


def test_colab_outside_a_clone_clones_first(env, commands, mounts, tmp_path):
    env.setattr(colab, "repo_root", lambda **kw: None)
    env.setattr(colab, "installed", lambda: False)
    clone = tmp_path / "samresnets"
    colab.setup(repo_url="https://example.org/r.git", clone_dir=clone)
    assert commands == [["git", "clone", "-q", "https://example.org/r.git", str(clone)],
                        [sys.executable, "-m", "pip", "install", "-q", "-e", str(clone)]]
    assert sys.path[0] == str(clone)


def test_repo_root_without_a_clone_next_to_samlib(env, tmp_path):
    """samlib pip-installed into site-packages: the clone is found from the notebook's folder,
    else at clone_dir, else there is none."""
    env.setattr(colab, "__file__", str(tmp_path / "site-packages" / "samlib" / "report" / "colab.py"))
    clone = tmp_path / "clone"
    (clone / "samlib").mkdir(parents=True)
    (clone / "samlib" / "__init__.py").write_text("")
    (clone / "pyproject.toml").write_text("")
    (clone / "notebooks").mkdir()
    assert colab.repo_root(start=clone / "notebooks", clone_dir=tmp_path / "none") == clone
    assert colab.repo_root(start=tmp_path, clone_dir=clone) == clone
    assert colab.repo_root(start=tmp_path, clone_dir=tmp_path / "none") is None


def test_colab_with_a_gpu_runtime_the_notebooks_pick_the_gpu(env, commands, mounts, tmp_path):
    """A Colab T4 runtime (a simulated GPU): after setup, the parameters cell's defaults
    resolve to the GPU and the paper profile, with the folders setup exported."""
    env.setitem(sys.modules, "torch", TORCH)          # (the env fixture forgets it, as a fresh kernel)
    import simgpu
    import torch

    from samlib.device import resolve_device
    from samlib.report.params import check_params

    env.setattr(colab, "installed", lambda: True)
    with simgpu.simulated_gpu(1, (7, 5), "Tesla T4 (simulated)"):
        folders = colab.setup(data_dir=tmp_path / "data", runs_dir=tmp_path / "runs", results_dir=tmp_path / "results")
        p = check_params("auto", os.environ["SAMLIB_DATA_DIR"], None, os.environ["SAMLIB_RESULTS_DIR"],
                         os.environ["SAMLIB_RUNS_DIR"], "auto")
        assert p.profile == "paper" and resolve_device(p.device) == torch.device("cuda:0")
        assert str(p.results) == str(Path(folders.results_dir) / "paper")
