"""Reliability sweep (issue 20): what a run records and reuses is what it claims to be.

* provenance's `git_dirty` is the tracked content after git's clean filters (a notebook that
  JupyterLab only re-saved is not a change, though `git status` lists it); unknown is None;
* a resume checkpoint (last.pt) that records another run's config (another seed) is refused in
  one line and left untouched, while a speed knob may change and old metrics rows still resume;
* NaN/inf weights in a checkpoint are damage: `evaluate` and `submit` end in one `error:` line;
* the strategy cache (strategies.csv/.json, strategy_probs.pt) is keyed by the checkpoints and
  whether the run finished, and a kill between its files never leaves a stale entry valid.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

import samlib.infer
import samlib.report.runs
import samlib.report.submit
import samlib.rundir
from samlib import data as D
from samlib.config import resolve
from samlib.errors import CheckpointError
from samlib.io import load_checkpoint, read_json, save_checkpoint
from samlib.report.runs import evaluate_run, load_run, run_probs, saved_test_probs
from samlib.rundir import RunDir, git_dirty, load_model, load_run_models, provenance
from samlib.run import train
from helpers_loop import resume
from test_adversarial_writes import _kaggle, _submit, assert_one_clear_error, run_main, temporaries

TINY = dict(widths="4,8,8", blocks="1,1,1", epochs="2", batch_size="64", val_size="64",
            train_eval_size="64", train_subset="none", test_subset="none")
CFG = resolve("final", "smoke", **TINY)

pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


# ================================================================ 1. git_dirty after the clean filter

def _git(repo, *args):
    env = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def repo(tmp_path):
    """A repository with one committed file under a clean filter that drops lines with OUTPUT
    (as samlib-strip drops a notebook's outputs)."""
    if shutil.which("git") is None:
        pytest.skip("no git")
    strip = tmp_path / "strip.py"
    strip.write_text('import sys\nsys.stdout.write("".join(l for l in sys.stdin if "OUTPUT" not in l))\n')
    root = tmp_path / "repo"
    root.mkdir()
    _git(root, "init", "-q")
    _git(root, "config", "filter.strip.clean", f'"{sys.executable}" "{strip}"')
    (root / ".gitattributes").write_text("*.txt filter=strip\n")
    (root / "notebook.txt").write_text("a = 1\nprint(a)\n")
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "stored")
    return root


def test_git_dirty_is_the_content_after_the_clean_filter(repo):
    """Outputs added (a JupyterLab autosave): `git status` lists the file - what provenance
    read before, so every report run after opening a notebook said "uncommitted changes" - but
    the content git would store is the commit's: clean.  A real edit is dirty, so is a staged one."""
    assert git_dirty(repo) is False
    path = repo / "notebook.txt"
    path.write_text("a = 1\nOUTPUT: 1\nprint(a)\nOUTPUT: done\n")
    assert _git(repo, "status", "--porcelain", "--untracked-files=no").strip() == "M notebook.txt"
    assert git_dirty(repo) is False
    (repo / "untracked.txt").write_text("not tracked: no change to the commit\n")
    assert git_dirty(repo) is False
    path.write_text("a = 2\nOUTPUT: 2\nprint(a)\n")
    assert git_dirty(repo) is True
    _git(repo, "add", "notebook.txt")                  # staged, not committed: still dirty
    assert git_dirty(repo) is True
    _git(repo, "commit", "-q", "-m", "edit")
    assert git_dirty(repo) is False


def test_git_dirty_leaves_out_the_committed_reports(repo):
    """A publish rewrites results/ while it runs: that alone must not mark its report dirty."""
    (repo / "results").mkdir()
    (repo / "results" / "summary.json").write_text("{}\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "a report")
    (repo / "results" / "summary.json").write_text('{"accuracy": 1}\n')
    assert git_dirty(repo) is False
    (repo / "notebook.txt").write_text("a = 3\n")      # code beside it still counts
    assert git_dirty(repo) is True


def test_git_dirty_is_unknown_where_git_cannot_tell(tmp_path, monkeypatch):
    assert git_dirty(tmp_path) is None                 # not a repository
    _git(tmp_path, "init", "-q")
    assert git_dirty(tmp_path) is None                 # no commit to compare with
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))
    assert git_dirty(tmp_path) is None                 # no git at all


def test_provenance_records_git_dirty_of_the_samlib_checkout(monkeypatch):
    seen = []
    monkeypatch.setattr(samlib.rundir, "git_dirty", lambda repo: seen.append(Path(repo)) or "checked")
    prov = provenance(torch.device("cpu"), "synthetic")
    assert prov["git_dirty"] == "checked"
    assert seen == [Path(samlib.rundir.__file__).resolve().parent.parent]


# ================================================================ runs shared by the tests below

@pytest.fixture(scope="module")
def dataset():
    return D.synthetic_cifar10(n_train=256, n_test=64, seed=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, dataset):
    root = tmp_path_factory.mktemp("data")
    D.write_cifar10(root, dataset)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """CFG (seed 84) stopped after epoch 1 and finished; seed 85 stopped after epoch 1."""
    base = tmp_path_factory.mktemp("runs")
    partial = train(CFG, data_dir=data_dir, out=base / "out", device="cpu", progress=False, stop_after=1)
    shutil.copytree(partial, base / "partial")
    finished = train(CFG, data_dir=data_dir, out=base / "out", device="cpu", progress=False)
    other = train(resolve("final", "smoke", **TINY, seed=85), data_dir=data_dir, out=base / "other",
                  device="cpu", progress=False, stop_after=1)
    return {"partial": base / "partial", "finished": finished, "seed85": other}


def copy_run(runs, which, dest: Path) -> Path:
    """A copy of a run under the name its config gives it (so `train` finds it)."""
    cfg = resolve("final", "smoke", **TINY, seed=85) if which == "seed85" else CFG
    target = RunDir.for_config(cfg, dest).path
    shutil.copytree(runs[which], target)
    return target


def raw(path: Path) -> dict:
    obj = load_checkpoint(path, fallback=False)
    obj.pop("_path")
    return obj


# ================================================================ 2. a resume state is this run's

def test_a_last_pt_of_another_seed_is_refused_and_left_untouched(runs, tmp_path, dataset):
    """seed 85's last.pt in seed 84's folder (a copy gone wrong): the old code resumed seed 84
    from it (same architecture, so every check passed) and trained a run that is neither."""
    run_dir = copy_run(runs, "partial", tmp_path)
    for name in ("last.pt", "last.pt.sha256"):
        shutil.copy(runs["seed85"] / name, run_dir / name)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name.startswith("last")}
    with pytest.raises(CheckpointError) as e:
        train(CFG, dataset=dataset, out=tmp_path, device="cpu", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and str(run_dir / "last.pt") in msg, msg
    assert "records seed 85 but this run has seed 84" in msg and "another run" in msg, msg
    assert "move that folder away" in msg, msg
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name.startswith("last")} == before
    assert not (run_dir / "final.json").exists()
    with pytest.raises(CheckpointError, match="records seed 85"):      # config.json names the run
        resume(run_dir)


def test_every_differing_setting_is_named(runs, tmp_path):
    run_dir = copy_run(runs, "partial", tmp_path)
    ckpt = raw(run_dir / "last.pt")
    save_checkpoint(dict(ckpt, config=dict(ckpt["config"], lr=0.2, widths=[8, 8, 8])), run_dir / "last.pt",
                    keep_previous=False)
    with pytest.raises(CheckpointError) as e:
        resume(run_dir, CFG)
    assert "records widths 8,8,8, lr 0.2 but this run has widths 4,8,8, lr 0.1" in str(e.value), str(e.value)


def test_a_changed_speed_knob_still_resumes(runs, tmp_path, dataset):
    """eval_batch_size (like compile, channels_last) is not part of the run: same folder, resumes."""
    run_dir = copy_run(runs, "partial", tmp_path)
    faster = resolve("final", "smoke", **TINY, eval_batch_size="32")
    assert RunDir.for_config(faster, tmp_path).path == run_dir
    assert train(faster, dataset=dataset, out=tmp_path, device="cpu", progress=False) == run_dir
    assert read_json(run_dir / "final.json")["epochs"] == 2


def test_metrics_rows_without_the_newer_columns_resume(runs, tmp_path, dataset):
    """A last.pt from before skipped_steps (and nonfinite_steps) were counted resumes, and its
    metrics.csv reads back with those cells empty."""
    run_dir = copy_run(runs, "partial", tmp_path)
    ckpt = raw(run_dir / "last.pt")
    rows = [{k: v for k, v in row.items() if k not in ("skipped_steps", "nonfinite_steps")} for row in ckpt["metrics"]]
    save_checkpoint(dict(ckpt, metrics=rows), run_dir / "last.pt", keep_previous=False)
    train(CFG, dataset=dataset, out=tmp_path, device="cpu", progress=False)
    metrics = load_run(run_dir)["metrics"]
    assert len(metrics) == 2 and metrics["skipped_steps"].isna().tolist() == [True, False]
    assert metrics["skipped_steps"].iloc[1] == 0


# ================================================================ 3. non-finite weights are damage

def _poison(path: Path, keys, value=float("nan")):
    ckpt = raw(path)
    model = dict(ckpt["model"])
    for key in keys:
        model[key] = model[key].clone()
        model[key].view(-1)[0] = value
    save_checkpoint(dict(ckpt, model=model), path, keep_previous=False)


def test_load_model_names_the_file_and_the_first_non_finite_tensor(runs, tmp_path):
    run_dir = copy_run(runs, "finished", tmp_path)
    path = run_dir / "best_regular.pt"
    keys = list(raw(path)["model"])
    _poison(path, [keys[-1], keys[3]], float("inf"))
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    msg = str(e.value)
    assert str(path) in msg and repr(keys[3]) in msg and repr(keys[-1]) not in msg, msg
    assert "NaN or infinite" in msg and "train its run again" in msg, msg
    with pytest.raises(CheckpointError, match="NaN or infinite"):
        load_run_models(run_dir)


@pytest.mark.parametrize("name", ["best_regular.pt", "best_ema.pt"])
def test_evaluate_refuses_non_finite_weights_in_one_line(runs, tmp_path, data_dir, name, capsys):
    """The run was evaluated (and cached) before its checkpoint went bad: the old code served
    the cached table, or on a fresh run printed a table of NaN losses and chance accuracy."""
    run_dir = copy_run(runs, "finished", tmp_path)
    argv = ["evaluate", run_dir, "--data-dir", data_dir, "--device", "cpu"]
    assert run_main(capsys, argv)[0] == 0
    _poison(run_dir / name, ["head.weight"])
    line = assert_one_clear_error(*run_main(capsys, argv), str(run_dir / name), "'head.weight'",
                                  "NaN or infinite", "train its run again")
    assert "nan" not in line.replace("NaN", "")


def test_submit_refuses_non_finite_weights_and_writes_nothing(runs, tmp_path, capsys):
    """The old code wrote a valid-looking CSV: argmax of NaN probabilities, class 0 everywhere."""
    run_dir = copy_run(runs, "finished", tmp_path)
    _poison(run_dir / "best_ema.pt", ["stem.conv.weight"])
    out = tmp_path / "sub"
    out.mkdir()
    code, err = run_main(capsys, _submit(run_dir, _kaggle(tmp_path), out / "submission.csv"))
    assert_one_clear_error(code, err, str(run_dir / "best_ema.pt"), "'stem.conv.weight'", "NaN or infinite")
    assert list(out.iterdir()) == [] and temporaries(tmp_path) == []


def test_submit_refuses_non_finite_predictions_and_writes_nothing(runs, tmp_path, capsys, monkeypatch):
    """Finite weights can still predict NaN (an overflow in low precision): no CSV of guesses."""
    monkeypatch.setattr(samlib.report.submit, "strategy_probs",
                        lambda regular, ema, images, strategy, device: torch.full((len(images), 10), float("nan")))
    run_dir = copy_run(runs, "finished", tmp_path)
    output = tmp_path / "submission.csv"
    code, err = run_main(capsys, _submit(run_dir, _kaggle(tmp_path), output))
    assert_one_clear_error(code, err, "not all finite", str(output), "nothing was written")
    assert not output.exists() and temporaries(tmp_path) == []


# ================================================================ 4. the strategy cache

@pytest.fixture
def counted(monkeypatch):
    """How many times evaluate_run really computed the strategies."""
    calls = []
    real = samlib.report.runs.evaluate_strategies
    monkeypatch.setattr(samlib.report.runs, "evaluate_strategies", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _replace_checkpoint(path: Path):
    """best_*.pt replaced by other weights (a copy from elsewhere, a re-selection)."""
    ckpt = raw(path)
    model = dict(ckpt["model"], **{"head.bias": ckpt["model"]["head.bias"] + torch.arange(10.0) * 3})
    save_checkpoint(dict(ckpt, model=model), path, keep_previous=False)


def test_cache_is_recomputed_when_a_checkpoint_is_replaced(runs, tmp_path, dataset, counted):
    run_dir = copy_run(runs, "finished", tmp_path)
    first = evaluate_run(run_dir, dataset=dataset, device="cpu")
    evaluate_run(run_dir, dataset=dataset, device="cpu")
    old_probs = saved_test_probs(run_dir)[0]
    assert len(counted) == 1 and old_probs is not None
    _replace_checkpoint(run_dir / "best_regular.pt")
    assert saved_test_probs(run_dir) == (None, None)        # the old code served the old model's
    probs = run_probs(run_dir, "standard", dataset.test_images, dataset.test_labels, device="cpu")
    regular, ema = load_run_models(run_dir, "cpu")
    precision = samlib.report.runs.inference_precision(load_run(run_dir), "cpu")
    assert torch.equal(probs, samlib.infer.strategy_probs(regular, ema, dataset.test_images, "standard",
                                                          device="cpu", precision=precision))
    assert not torch.allclose(probs, old_probs["standard"])
    second = evaluate_run(run_dir, dataset=dataset, device="cpu")
    assert len(counted) == 2
    assert not second.equals(first)
    pd.testing.assert_frame_equal(second, evaluate_run(run_dir, dataset=dataset, device="cpu", reuse=False),
                                  check_dtype=False)
    saved, labels = saved_test_probs(run_dir)
    assert saved is not None and (labels == dataset.test_labels).all()


def test_cache_of_an_unfinished_run_is_not_served_once_it_finishes(runs, tmp_path, dataset, counted):
    run_dir = copy_run(runs, "partial", tmp_path)
    evaluate_run(run_dir, dataset=dataset, device="cpu")
    assert read_json(run_dir / "strategies.json")["run"]["finished"] is False
    shutil.copy(runs["finished"] / "final.json", run_dir / "final.json")   # finished, same checkpoints
    assert saved_test_probs(run_dir) == (None, None)
    evaluate_run(run_dir, dataset=dataset, device="cpu")
    assert len(counted) == 2 and read_json(run_dir / "strategies.json")["run"]["finished"] is True


def test_a_table_its_key_was_not_written_with_is_recomputed(runs, tmp_path, dataset, counted):
    """A strategies.csv edited or copied from another run, next to an intact strategies.json."""
    run_dir = copy_run(runs, "finished", tmp_path)
    first = evaluate_run(run_dir, dataset=dataset, device="cpu")
    table = pd.read_csv(run_dir / "strategies.csv")
    table["test_accuracy"] = 0.99
    table.to_csv(run_dir / "strategies.csv", index=False)
    pd.testing.assert_frame_equal(evaluate_run(run_dir, dataset=dataset, device="cpu"), first, check_dtype=False)
    assert len(counted) == 2


class Killed(BaseException):
    """The process killed at that instant (nothing after it runs)."""


def _kill_at(monkeypatch, name: str):
    def die(*args, **kwargs):
        raise Killed(name)
    monkeypatch.setattr(samlib.report.runs, name, die)


@pytest.mark.parametrize("killed_in", ["atomic_write_text", "write_json"])   # before / after the table
def test_a_kill_between_the_cache_files_never_leaves_a_stale_entry_valid(runs, tmp_path, dataset, counted,
                                                                         monkeypatch, killed_in):
    """Cached for the original checkpoint; re-evaluated after it was replaced, killed half-way
    through writing the cache; then the original checkpoint restored.  The table and the
    probabilities on disk are now a mix of two evaluations: neither is served, it is recomputed."""
    run_dir = copy_run(runs, "finished", tmp_path)
    first = evaluate_run(run_dir, dataset=dataset, device="cpu")
    original = {n: (run_dir / n).read_bytes() for n in ("best_regular.pt", "best_regular.pt.sha256")}
    _replace_checkpoint(run_dir / "best_regular.pt")
    with monkeypatch.context() as m:
        _kill_at(m, killed_in)
        with pytest.raises(Killed):
            evaluate_run(run_dir, dataset=dataset, device="cpu")
    assert saved_test_probs(run_dir) == (None, None)
    for name, data in original.items():
        (run_dir / name).write_bytes(data)
    assert saved_test_probs(run_dir) == (None, None)        # the replaced model's, or no key at all
    again = evaluate_run(run_dir, dataset=dataset, device="cpu")
    assert len(counted) == 3
    pd.testing.assert_frame_equal(again, first, check_dtype=False)
    probs, _ = saved_test_probs(run_dir)
    key = json.loads((run_dir / "strategies.json").read_text())
    assert probs is not None and key["run"]["best_regular.pt"] == hashlib.sha256(original["best_regular.pt"]).hexdigest()


def test_a_kill_while_recomputing_the_same_key_recomputes(runs, tmp_path, dataset, counted, monkeypatch):
    """reuse=False killed after the table: the key file went first, so nothing is served."""
    run_dir = copy_run(runs, "finished", tmp_path)
    first = evaluate_run(run_dir, dataset=dataset, device="cpu")
    with monkeypatch.context() as m:
        _kill_at(m, "write_json")
        with pytest.raises(Killed):
            evaluate_run(run_dir, dataset=dataset, device="cpu", reuse=False)
    assert not (run_dir / "strategies.json").exists() and saved_test_probs(run_dir) == (None, None)
    pd.testing.assert_frame_equal(evaluate_run(run_dir, dataset=dataset, device="cpu"), first, check_dtype=False)
    assert len(counted) == 3
