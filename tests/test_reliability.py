"""Reliability (issue 5): nothing is lost when a run is killed, corrupt checkpoints are never
loaded silently, a NaN loss stops the run clearly, and CPU runs are bit-for-bit reproducible.

The kill tests run `python -m samlib train` as a subprocess and SIGKILL it, either mid-epoch
(after a seeded random delay) or mid-save (tests/fault_train.py's SAMLIB_FAULT wrapper kills the
process half-way through writing a named file, before the rename).  The resumed run must end
with the same metrics (minus wall-clock seconds), final.json and weights as a run that was
never interrupted.
"""
import csv
import math
import os
import random
import signal
import subprocess
import sys
import time

from pathlib import Path

import pytest
import torch

import samlib.io
import samlib.train
from samlib import cli
from samlib.config import resolve
from samlib.data import synthetic_cifar10, write_cifar10
from samlib.errors import CheckpointError
from samlib.io import load_checkpoint, read_json, save_checkpoint
from samlib.run import train
from samlib.rundir import RunDir
from samlib.train import NonFiniteLossError

# A run of seconds: 448 training images = 7 steps of 64 per epoch, 3 epochs, EMA + MixUp.
TINY = dict(widths="4,8,8", blocks="1,1,1", epochs="3", train_subset="none", test_subset="none",
            val_size="64", train_eval_size="64")
TINY_ARGS = ["--config", "final", "--profile", "smoke", "--device", "cpu", "--no-progress",
             *[a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]]
STEPS = 7
CFG = resolve("final", "smoke", **TINY)


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def _dataset():
    return synthetic_cifar10(n_train=512, n_test=128, seed=0)


@pytest.fixture(scope="module")
def dataset():
    return _dataset()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root, _dataset())
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory, dataset):
    """An uninterrupted in-process run of CFG."""
    return train(CFG, dataset=dataset, out=tmp_path_factory.mktemp("ref"), device="cpu", progress=False)


# ---------------------------------------------------------------- comparing runs

def metrics(run_dir):
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]


def assert_same_run(got, want):
    """Same metrics (minus seconds), final.json and weights (last.pt model + EMA, best_*.pt)."""
    assert (got / "final.json").exists(), f"{got} did not finish"
    assert metrics(got) == metrics(want)
    assert read_json(got / "final.json") == read_json(want / "final.json")
    for name, keys in (("last.pt", ("model", "ema")), ("best_regular.pt", ("model",)),
                       ("best_ema.pt", ("model",))):
        a, b = load_checkpoint(got / name), load_checkpoint(want / name)
        assert a["epoch"] == b["epoch"], name
        for key in keys:
            assert a[key].keys() == b[key].keys()
            for param, tensor in a[key].items():
                assert torch.equal(tensor, b[key][param]), (name, key, param)


# ---------------------------------------------------------------- subprocess runs

def _env(fault=None):
    env = {k: v for k, v in os.environ.items() if k != "SAMLIB_FAULT"}
    env["PYTHONUNBUFFERED"] = "1"          # the "run directory:" line arrives as printed
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"   # as in-process (one_thread)
    if fault:
        env["SAMLIB_FAULT"] = fault
    return env


def train_cmd(data_dir, out, fault=False):
    """`python -m samlib train ...`, or the same through tests/fault_train.py (SAMLIB_FAULT)."""
    entry = [str(Path(__file__).with_name("fault_train.py"))] if fault else ["-m", "samlib"]
    return [sys.executable, *entry, "train", "--data-dir", str(data_dir), "--out", str(out), *TINY_ARGS]


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory, data_dir):
    """An uninterrupted run through the command line, in its own process."""
    out = tmp_path_factory.mktemp("cli_ref")
    done = subprocess.run(train_cmd(data_dir, out), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return RunDir.for_config(CFG, out).path


def assert_checkpoints_loadable(run_dir):
    """The state a kill leaves: every checkpoint written so far still loads (perhaps its .prev)."""
    for name in ("last", "best_regular", "best_ema"):
        if (run_dir / f"{name}.pt").exists() or (run_dir / f"{name}.prev.pt").exists():
            load_checkpoint(run_dir / f"{name}.pt")          # raises CheckpointError if lost
    if (run_dir / "metrics.csv").exists():
        rows = metrics(run_dir)
        assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))


def rewritten_best(run_dir):
    """(file, n, epoch): a best_*.pt that the run replaces in place, for the n-th time at
    `epoch` >= 2 (read off its metrics: each save is a new best validation accuracy)."""
    rows = metrics(run_dir)
    for name, column in (("best_regular.pt", "val_acc"), ("best_ema.pt", "val_acc_ema")):
        best, saves = -1.0, []
        for row in rows:
            if float(row[column]) > best:
                best = float(row[column])
                saves.append(int(row["epoch"]))
        if len(saves) > 1:
            return name, 2, saves[1]
    pytest.fail("the tiny run never improves after epoch 1: give TINY more epochs or data")


@pytest.mark.slow
def test_killed_mid_save_then_resumed_equals_uninterrupted(tmp_path, data_dir, cli_reference):
    """SIGKILL half-way through writing each kind of file, resume each time, compare."""
    best_file, n, epoch = rewritten_best(cli_reference)
    run_dir = RunDir.for_config(CFG, tmp_path).path
    plan = [  # (fault, the epoch the last checkpoint on disk holds afterwards)
        (f"kill-during-save:{n}:{best_file}", epoch - 1),  # a new best over the good old one
        ("kill-during-save:1:last.pt", epoch - 1),         # last.pt, after last -> last.prev
        ("kill-during-save:1:final.json", 3),              # all epochs done, finalising
    ]
    for fault, last_epoch in plan:
        done = subprocess.run(train_cmd(data_dir, tmp_path, fault=True), env=_env(fault), capture_output=True,
                              text=True, timeout=300)
        name = fault.split(":")[2]
        assert done.returncode == -signal.SIGKILL, (fault, done.returncode, done.stderr)
        assert f"SAMLIB_FAULT: killed while writing {run_dir / name}" in done.stderr
        half_written = list(run_dir.glob(f".{name}.*.tmp"))
        assert half_written, f"{fault}: the temporary file should be left behind, never renamed"
        assert not (run_dir / "final.json").exists()
        assert_checkpoints_loadable(run_dir)
        assert load_checkpoint(run_dir / "last.pt")["epoch"] == last_epoch, fault
    done = subprocess.run(train_cmd(data_dir, tmp_path), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stdout and "Traceback" not in done.stderr
    assert_same_run(run_dir, cli_reference)


@pytest.mark.slow
def test_killed_mid_epoch_at_random_points_then_resumed_equals_uninterrupted(tmp_path, data_dir,
                                                                              cli_reference):
    """SIGKILLs at seeded random instants 0.1 to 2.5 epochs into the training loop (epoch
    length taken from the reference run), then an unfaulted run: equal to the uninterrupted one."""
    rng = random.Random(5)
    with open(cli_reference / "metrics.csv", newline="") as f:
        epoch_s = sum(float(r["seconds"]) for r in csv.DictReader(f)) / CFG.epochs
    run_dir = RunDir.for_config(CFG, tmp_path).path
    history = []
    for attempt in range(2):
        delay = rng.uniform(0.1, 2.5) * epoch_s
        proc = subprocess.Popen(train_cmd(data_dir, tmp_path), env=_env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for line in proc.stdout:                 # the loop starts right after this line
            if line.startswith("run directory:"):
                break
        time.sleep(delay)
        alive = proc.poll() is None
        if alive:
            proc.kill()
        _, err = proc.communicate(timeout=120)
        epochs = load_checkpoint(run_dir / "last.pt")["epoch"] if (
            run_dir / "last.pt").exists() or (run_dir / "last.prev.pt").exists() else 0
        history.append((round(delay, 3), "killed" if alive else f"rc={proc.returncode}", epochs))
        assert "Traceback" not in err, err
        assert_checkpoints_loadable(run_dir)
    assert any(h[1] == "killed" for h in history), history
    done = subprocess.run(train_cmd(data_dir, tmp_path), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, (history, done.stderr)
    assert_same_run(run_dir, cli_reference)


@pytest.mark.slow
def test_command_line_run_equals_library_run(cli_reference, reference):
    """Another process, the CLI path and the pickled data folder: still bit for bit."""
    assert_same_run(cli_reference, reference)


# ---------------------------------------------------------------- corrupt checkpoints

@pytest.mark.parametrize("keep_previous", [False, True])
def test_crashes_while_replacing_a_checkpoint_never_lose_the_good_one(tmp_path, monkeypatch,
                                                                       keep_previous):
    """Killed after the sidecar is written but before the new file is renamed into place (twice
    in a row): the old file still loads - in place (best_*.pt) or as .prev (last.pt)."""
    path = tmp_path / "best.pt"
    save_checkpoint({"epoch": 1}, path, keep_previous=keep_previous)
    real = samlib.io.atomic_write_bytes

    def crash(target, data):
        if Path(target).name == path.name:
            raise KeyboardInterrupt("killed")
        return real(target, data)

    monkeypatch.setattr(samlib.io, "atomic_write_bytes", crash)
    for epoch in (2, 3):
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint({"epoch": epoch}, path, keep_previous=keep_previous)
        assert load_checkpoint(path)["epoch"] == 1
    monkeypatch.undo()
    save_checkpoint({"epoch": 4}, path, keep_previous=keep_previous)
    assert load_checkpoint(path, fallback=False)["epoch"] == 4
    assert len((tmp_path / "best.pt.sha256").read_text().split()) == 1



@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_last_checkpoint_resumes_from_previous(tmp_path, dataset, reference, capsys, damage):
    run_dir = train(CFG, dataset=dataset, out=tmp_path, device="cpu", progress=False, stop_after=2)
    last = run_dir / "last.pt"
    data = bytearray(last.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 3]
    else:
        data[len(data) // 2] ^= 0x01
    last.write_bytes(bytes(data))
    capsys.readouterr()
    train(CFG, dataset=dataset, out=tmp_path, device="cpu", progress=False)
    out = capsys.readouterr().out
    assert f"warning: {last} is corrupt or truncated" in out
    assert f"using the previous good checkpoint {run_dir / 'last.prev.pt'}" in out
    assert f"resuming {run_dir} after epoch 1" in out
    assert_same_run(run_dir, reference)


def test_no_good_checkpoint_left_is_a_clear_error(tmp_path, dataset, capsys):
    cfg = resolve("final", "smoke", **dict(TINY, epochs="2"))
    run_dir = train(cfg, dataset=dataset, out=tmp_path, device="cpu", progress=False, stop_after=1)
    train(cfg, dataset=dataset, out=tmp_path, device="cpu", progress=False)   # finishes
    (run_dir / "final.json").unlink()
    for name in ("last.pt", "last.prev.pt"):
        (run_dir / name).write_bytes((run_dir / name).read_bytes()[:200])
    with pytest.raises(CheckpointError) as e:
        train(cfg, dataset=dataset, out=tmp_path, device="cpu", progress=False)
    msg = str(e.value)
    assert "corrupt or truncated" in msg and "no earlier good checkpoint" in msg
    assert str(run_dir) in msg and "start" in msg        # says how to start over


# ---------------------------------------------------------------- numerical faults

class NaNLossAt:
    """Wraps F.cross_entropy: the `call`-th training loss (1-based) becomes NaN (with NaN grads)."""

    def __init__(self, call, real=torch.nn.functional.cross_entropy):
        self.call, self.real, self.calls = call, real, 0

    def __call__(self, logits, *args, **kwargs):
        loss = self.real(logits, *args, **kwargs)
        if not logits.requires_grad:
            return loss
        self.calls += 1
        return loss * float("nan") if self.calls == self.call else loss


def test_nan_loss_stops_with_epoch_step_and_last_checkpoint(tmp_path, dataset, reference, monkeypatch):
    monkeypatch.setattr(samlib.train.F, "cross_entropy", NaNLossAt(STEPS + 3))   # epoch 2, step 3
    with pytest.raises(NonFiniteLossError) as e:
        train(CFG, dataset=dataset, out=tmp_path, device="cpu", progress=False)
    run_dir = RunDir.for_config(CFG, tmp_path).path
    msg = str(e.value)
    assert "epoch 2, step 3" in msg and f"Last good checkpoint: {run_dir / 'last.pt'}" in msg
    assert "(5 of 7 steps)" in msg   # NaN weights after step 3 and "--set lr=" in msg
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1 and len(metrics(run_dir)) == 1
    monkeypatch.undo()                 # the fault is gone: rerunning resumes from that checkpoint
    train(CFG, dataset=dataset, out=tmp_path, device="cpu", progress=False)
    assert_same_run(run_dir, reference)


def test_nan_loss_through_the_command_line(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setattr(samlib.train.F, "cross_entropy", NaNLossAt(STEPS + 5))   # epoch 2, step 5
    code = cli.main(["train", "--data-dir", str(data_dir), "--out", str(tmp_path), *TINY_ARGS])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: loss became non-finite at epoch 2, step 5")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(RunDir.for_config(CFG, tmp_path).path / "last.pt") in err


def test_nonfinite_steps_skipped_by_the_amp_scaler_are_counted(tmp_path, dataset, monkeypatch):
    """With a GradScaler in charge (as for fp16 on a GPU; here a real CPU one), an overflowing
    step is skipped and counted in metrics.csv, and the run goes on."""
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: real("cpu", enabled=True))
    monkeypatch.setattr(samlib.train.F, "cross_entropy", NaNLossAt(STEPS + 3))
    run_dir = train(CFG, dataset=dataset, out=tmp_path, device="cpu", progress=False)
    assert (run_dir / "final.json").exists()
    assert [int(r["nonfinite_steps"]) for r in metrics(run_dir)] == [0, 1, 0]
    assert [int(r["skipped_steps"]) for r in metrics(run_dir)] == [0, 1, 0]
    last = load_checkpoint(run_dir / "last.pt")
    assert last["scaler"]["scale"] == 65536.0 / 2             # the scaler backed off once
    assert all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())
    assert all(math.isfinite(float(r["train_loss"])) for r in metrics(run_dir))


# ---------------------------------------------------------------- reproducibility

def test_same_seed_same_device_is_bitwise_reproducible(tmp_path, dataset, reference):
    again = train(CFG, dataset=dataset, out=tmp_path / "again", device="cpu", progress=False)
    assert again != reference
    assert_same_run(again, reference)
    other = train(resolve("final", "smoke", seed=85, **TINY), dataset=dataset, out=tmp_path / "other",
                  device="cpu", progress=False)
    assert metrics(other) != metrics(reference)          # the comparison can tell runs apart
