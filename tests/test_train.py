"""The training loop: learning happens, resume is exact, runs are reused, selection rules."""
import csv
import dataclasses

import pytest
import torch

from samlib.config import resolve
from samlib.data import synthetic_cifar10
from samlib.errors import CheckpointError
from samlib.io import load_checkpoint
from samlib.run import train
from samlib.rundir import RunDir, load_model
from samlib.selection import BestCheckpoints
from samlib.train import mix_alpha_at

SMALL = dict(widths="4,8,8", blocks="1,1,1", epochs="3", batch_size="64", val_size="64",
             train_eval_size="64", train_subset="none", test_subset="none")


@pytest.fixture(scope="module")
def dataset():
    return synthetic_cifar10(n_train=512, n_test=128, seed=1)


def _metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def test_a_smoke_run_learns(tmp_path, dataset):
    cfg = resolve("baseline", "smoke", **dict(SMALL, epochs="6", lr="0.05"))
    run_dir = train(cfg, dataset=dataset, out=tmp_path, device="cpu", progress=False)
    rows = _metrics(run_dir)
    assert len(rows) == 6
    assert float(rows[-1]["train_loss"]) < 0.85 * float(rows[0]["train_loss"])
    assert float(rows[-1]["val_acc"]) > 0.3          # chance is 0.1
    for name in ("config.json", "provenance.json", "final.json", "best_regular.pt", "last.pt"):
        assert (run_dir / name).exists(), name


def test_resume_continues_exactly(tmp_path, dataset):
    """Stop after one epoch, resume: metrics and weights equal an uninterrupted run, bit for bit."""
    cfg = resolve("final", "smoke", **SMALL)
    whole = train(cfg, dataset=dataset, out=tmp_path / "a", device="cpu", progress=False)
    part = train(cfg, dataset=dataset, out=tmp_path / "b", device="cpu", progress=False, stop_after=1)
    assert not (part / "final.json").exists() and len(_metrics(part)) == 1
    part = train(cfg, dataset=dataset, out=tmp_path / "b", device="cpu", progress=False)
    assert _metrics(part) == _metrics(whole)
    for name in ("last.pt", "best_ema.pt", "best_regular.pt"):
        a, b = load_checkpoint(whole / name), load_checkpoint(part / name)
        for key, tensor in a["model"].items():
            assert torch.equal(tensor, b["model"][key]), (name, key)


def test_finished_runs_are_reused(tmp_path, dataset):
    cfg = resolve("baseline", "smoke", **dict(SMALL, epochs="1"))
    first = train(cfg, dataset=dataset, out=tmp_path, device="cpu", progress=False)
    stamp = (first / "final.json").stat().st_mtime_ns
    assert train(cfg, dataset=dataset, out=tmp_path, device="cpu", progress=False) == first
    assert (first / "final.json").stat().st_mtime_ns == stamp
    assert first == RunDir.for_config(cfg, tmp_path).path and cfg.hash() in first.name


def test_checkpoint_of_another_architecture_is_refused(tmp_path, dataset):
    cfg = resolve("baseline", "smoke", **dict(SMALL, epochs="1"))
    run_dir = train(cfg, dataset=dataset, out=tmp_path, device="cpu", progress=False)
    other = dict(load_model(run_dir / "best_regular.pt").arch, widths=[8, 8, 8])
    with pytest.raises(CheckpointError, match="another config"):
        load_model(run_dir / "best_regular.pt", expect_arch=other)


def test_mixup_alpha_ramp_matches_the_reference_code():
    cfg = resolve("final", "paper")                   # 200 epochs
    assert [mix_alpha_at(cfg, e) for e in (0, 49, 50, 99, 100, 199)] == pytest.approx(
        [0.15, 0.15, 0.225, 0.225, 0.3, 0.3])
    assert mix_alpha_at(dataclasses.replace(cfg, alpha_ramp=False), 0) == 0.3
    assert mix_alpha_at(resolve("se", "paper"), 150) == 0.0


def test_selection_on_validation_keeps_each_models_best():
    best = BestCheckpoints("val", ema=True)
    assert best.update({"val_acc": 0.5, "val_acc_ema": 0.4, "test_acc": 0.9, "test_acc_ema": 0.9}, 1) == (True, True)
    assert best.update({"val_acc": 0.4, "val_acc_ema": 0.6, "test_acc": 0.99, "test_acc_ema": 0.1}, 2) == (False, True)
    assert (best.state["regular_epoch"], best.state["ema_epoch"]) == (1, 2)
    assert (best.state["regular"], best.state["ema"]) == (0.5, 0.6)
    # without EMA the EMA columns are never read and never saved
    plain = BestCheckpoints("val", ema=False)
    assert plain.update({"val_acc": 0.3, "test_acc": 0.9}, 1) == (True, False)


def test_selection_as_run_uses_test_and_the_half_point_rule():
    best = BestCheckpoints("test", ema=True)
    # EMA best so far 0.900; regular saved when within 0.5 points of it.
    assert best.update({"val_acc": 0, "val_acc_ema": 0, "test_acc": 0.896, "test_acc_ema": 0.900}, 1) == (True, True)
    assert best.update({"val_acc": 0, "val_acc_ema": 0, "test_acc": 0.894, "test_acc_ema": 0.899}, 2) == (False, False)
    assert best.state["ema_epoch"] == 1


def test_a_cached_run_is_never_reused_for_other_data(tmp_path, dataset):
    from samlib.errors import SamlibError

    cfg = resolve("baseline", "smoke", **dict(SMALL, epochs="1"))
    train(cfg, dataset=dataset, out=tmp_path, device="cpu", progress=False)
    other = synthetic_cifar10(n_train=512, n_test=128, seed=2)
    with pytest.raises(SamlibError, match="trained on other data"):
        train(cfg, dataset=other, out=tmp_path, device="cpu", progress=False)


def test_a_second_trainer_of_the_same_run_is_refused_while_the_first_holds_it(tmp_path, dataset):
    """One writer per run directory: the lock is held by another process (a child here)."""
    import subprocess
    import sys

    from samlib.errors import SamlibError

    cfg = resolve("baseline", "smoke", **dict(SMALL, epochs="1"))
    run = RunDir.for_config(cfg, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom samlib.rundir import RunDir\n"
         f"with RunDir({str(run.path)!r}).lock():\n    print('locked', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SamlibError, match=f"being trained by process {holder.pid}"):
            train(cfg, dataset=dataset, out=tmp_path, device="cpu", progress=False)
        assert not (run / "final.json").exists() and not (run / "metrics.csv").exists()
    finally:
        holder.kill()
        holder.wait()
    # the operating system released the killed holder's lock: training goes ahead now
    assert (train(cfg, dataset=dataset, out=tmp_path, device="cpu", progress=False) / "final.json").exists()
