"""torchrun data parallelism on CPU (gloo, 2 processes) against the single-process run.

Both see the same augmented global batches (same generators on every rank); DDP averages
the gradients of the two halves.  They are not bitwise equal because BatchNorm normalises
each half with its own statistics, so the stated tolerance is: per-epoch training loss
within 5% (relative) and final validation accuracy within 0.1.
"""
import csv
import os
import subprocess
import sys

import pytest

ARGS = ["train", "--config", "final", "--profile", "smoke", "--no-progress", "--set", "blocks=1,1,1",
        "--set", "train_subset=none", "--set", "test_subset=none", "--set", "epochs=2"]


def _rows(out):
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f)), run


@pytest.mark.slow
def test_two_process_gloo_run_matches_single_process(tmp_path):
    data = tmp_path / "data"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = lambda *a, **k: subprocess.run([sys.executable, *a], env=env, check=True, capture_output=True,
                                         text=True, timeout=300, **k)
    run("-m", "samlib", "synthetic", str(data), "--n-train", "1024", "--n-test", "256")
    run("-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "-m", "samlib",
        *ARGS, "--data-dir", str(data), "--out", str(tmp_path / "ddp"))
    run("-m", "samlib", *ARGS, "--data-dir", str(data), "--out", str(tmp_path / "single"))
    ddp, ddp_dir = _rows(tmp_path / "ddp")
    single, single_dir = _rows(tmp_path / "single")
    assert ddp_dir.name == single_dir.name               # same config hash: same run
    assert len(ddp) == len(single) == 2
    for a, b in zip(ddp, single):
        assert a["lr"] == b["lr"]                        # same schedule, step for step
        assert abs(float(a["train_loss"]) - float(b["train_loss"])) < 0.05 * float(b["train_loss"])
    assert abs(float(ddp[-1]["val_acc"]) - float(single[-1]["val_acc"])) < 0.1
    assert (ddp_dir / "final.json").exists() and (ddp_dir / "best_ema.pt").exists()


@pytest.mark.slow
def test_sweep_runs_configs_side_by_side(tmp_path):
    from samlib.data import synthetic_cifar10, write_cifar10
    from samlib.sweep import sweep

    write_cifar10(tmp_path / "data", synthetic_cifar10(256, 64))
    results = sweep(["baseline", "se"], [1], "smoke", tmp_path / "data", tmp_path / "runs",
                    devices=["cpu", "cpu"], extra=["--set", "blocks=1,1,1", "--set", "epochs=1",
                                                   "--set", "val_size=32", "--set", "train_subset=none"])
    assert sorted((r[0], r[3]) for r in results) == [("baseline", 0), ("se", 0)]
    assert sorted(p.parent.name.split("-")[0] for p in (tmp_path / "runs").glob("*/final.json")) == ["baseline", "se"]


def test_cpu_jobs_of_a_sweep_share_the_cores(monkeypatch):
    """Two jobs on a 2-core CPU get one OpenMP thread each; one job, GPU jobs or a value the
    user set leave OMP_NUM_THREADS alone."""
    from samlib.sweep import job_env

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert job_env(["cpu", "cpu"], {})["OMP_NUM_THREADS"] == "1"
    assert "OMP_NUM_THREADS" not in job_env(["cpu"], {})
    assert "OMP_NUM_THREADS" not in job_env(["cuda:0", "cuda:1"], {})
    assert job_env(["cpu", "cpu"], {"OMP_NUM_THREADS": "2"})["OMP_NUM_THREADS"] == "2"
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert job_env(["cpu"] * 3, {"PATH": "/bin"}) == {"PATH": "/bin", "OMP_NUM_THREADS": "5"}


@pytest.mark.parametrize("fails", [False, True])
def test_the_process_group_train_joined_is_destroyed_at_the_end(tmp_path, monkeypatch, fails):
    """torchrun's group (here recorded, not joined) is left when train returns or raises; a
    group the caller made is not train's to destroy."""
    import torch.distributed as td

    import samlib.dist
    from samlib.config import resolve
    from samlib.data import synthetic_cifar10
    from samlib.errors import SamlibError
    from samlib.run import train

    calls, joined = [], []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(td, "init_process_group", lambda backend: calls.append("init") or joined.append(1))
    monkeypatch.setattr(td, "is_initialized", lambda: bool(joined))
    monkeypatch.setattr(td, "destroy_process_group", lambda: calls.append("destroy") or joined.clear())
    monkeypatch.setattr(td, "get_world_size", lambda: 1)
    monkeypatch.setattr(td, "get_rank", lambda: 0)
    cfg = resolve("final", "smoke", widths=(4, 8, 8), blocks=(1, 1, 1), epochs=1, batch_size=32, val_size=32,
                  train_subset=None, test_subset=None, train_eval_size=32)
    if fails:
        with pytest.raises(SamlibError):
            train(cfg, data_dir=None, out=tmp_path, device="cpu", progress=False)
    else:
        train(cfg, dataset=synthetic_cifar10(96, 32), out=tmp_path, device="cpu", progress=False)
    assert calls == ["init", "destroy"]
    joined.append(1)                                   # the caller's own group: left alone
    train(cfg, dataset=synthetic_cifar10(96, 32), out=tmp_path / "again", device="cpu", progress=False)
    assert calls == ["init", "destroy"] and joined
