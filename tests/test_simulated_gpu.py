"""The user's commands on a simulated GPU (tests/simgpu): torch sees CUDA GPUs of a chosen
compute capability, tensors stay on the CPU, torch's own argument checks stay real.

Verified on a simulated GPU: device selection and indexing, the precision picked and kept
(bf16 on an H100, fp16 + loss scaling on a T4), that evaluation and submission run on the
GPU by default, one sweep job per GPU, the report's notebooks on the GPU.  Not shown: speed,
memory, real CUDA kernels (tests/test_gpu_step.py checks device mixing and host syncs of the
training step with fake CUDA tensors).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import simgpu
from conftest import simulated_gpu_env, simulated_gpu_logs
from samlib import cli
from samlib.config import resolve
from samlib.data import synthetic_cifar10, write_cifar10
from samlib.errors import SamlibError
from samlib.io import load_checkpoint
from samlib.run import train
from samlib.train import NonFiniteLossError

TINY = ["--set", "widths=4,8,8", "--set", "blocks=1,1,1", "--set", "epochs=2", "--set", "batch_size=32",
        "--set", "val_size=32", "--set", "train_subset=none", "--set", "test_subset=none",
        "--set", "train_eval_size=32"]
TINY_CFG = dict(widths=(4, 8, 8), blocks=(1, 1, 1), epochs=2, batch_size=32, val_size=32, train_subset=None,
                test_subset=None, train_eval_size=32)
H100_NAME, T4_NAME = "NVIDIA H100 80GB HBM3 (simulated)", "Tesla T4 (simulated)"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    write_cifar10(folder, synthetic_cifar10(192, 64, seed=5))
    return folder


def samlib_cmd(env, *args, check=True, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "samlib", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def only_log(tmp_path, command: str) -> dict:
    (log,) = [log for log in simulated_gpu_logs(tmp_path) if command in log["argv"]]
    return log


# ---------------------------------------------------------------- the simulation itself

def test_the_simulation_keeps_torchs_own_checks():
    with simgpu.simulated_gpu(2, (9, 0), H100_NAME) as state:
        assert torch.cuda.is_available() and torch.cuda.device_count() == 2
        assert torch.cuda.get_device_name(1) == H100_NAME and torch.cuda.get_device_capability(0) == (9, 0)
        with pytest.raises(ValueError, match="Expected a torch.device with a specified index"):
            torch.cuda.set_device(torch.device("cuda"))          # torch's own check, kept
        torch.cuda.set_device(torch.device("cuda:1"))
        assert torch.cuda.current_device() == 1
        with pytest.raises(RuntimeError, match="invalid device ordinal"):
            torch.zeros(1, device="cuda:2")
        with pytest.raises(AssertionError):
            torch.cuda.get_device_properties(2)
        x = torch.ones(2, device="cuda")                           # the current GPU: 1
        assert x.device.type == "cpu" and state.placed == {1}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert torch.nn.Linear(2, 2)(x).dtype == torch.bfloat16   # autocast really casts
        assert torch.amp.GradScaler("cuda").is_enabled()
        g = torch.Generator("cuda")
        assert isinstance(g, torch.Generator) and g.device.type == "cpu"
    assert not torch.cuda.is_available() or torch.cuda.device_count() != 2   # restored


# ---------------------------------------------------------------- train

@pytest.mark.slow
@pytest.mark.parametrize("device_args, gpus, index", [((), 1, 0), (("--device", "cuda"), 1, 0),
                                                      (("--device", "cuda:1"), 2, 1)])
def test_train_on_a_simulated_h100(tmp_path, data_dir, device_args, gpus, index):
    """No --device and --device cuda crashed before the first step (torch.cuda.set_device
    refuses an unindexed device); cuda:1 must train on GPU 1 and only there."""
    env = simulated_gpu_env(tmp_path, gpus, (9, 0), H100_NAME)
    proc = samlib_cmd(env, "train", "--profile", "smoke", "--data-dir", data_dir, "--out", tmp_path / "runs",
                      "--no-progress", *TINY, *device_args)
    run = Path(proc.stdout.strip().splitlines()[-1])
    provenance = json.loads((run / "provenance.json").read_text())
    assert provenance["device"] == H100_NAME and provenance["precision"] == "bf16"
    assert load_checkpoint(run / "last.pt")["precision"] == "bf16"
    log = only_log(tmp_path, "train")
    assert log["placed"] == [index] and log["set_devices"] == [index] and log["current"] == index
    assert log["autocast"] == ["bfloat16"]


@pytest.mark.slow
def test_a_t4_trains_in_fp16_with_loss_scaling_and_resumes_in_fp16(tmp_path, data_dir, one_thread):
    """Capability 7.5: fp16 autocast and a GradScaler (its state in the checkpoint, skipped
    steps counted in metrics.csv); an interrupted run resumed from the command line goes on in
    fp16 and ends exactly as the uninterrupted one."""
    from samlib.data import load_cifar10

    cfg = resolve("final", "smoke", **TINY_CFG)
    dataset = load_cifar10(data_dir)
    with simgpu.simulated_gpu(1, (7, 5), T4_NAME, track_devices=True):     # as the subprocess
        whole = train(cfg, dataset=dataset, out=tmp_path / "whole", progress=False)
        half = train(cfg, dataset=dataset, out=tmp_path / "split", progress=False, stop_after=1)
    assert load_checkpoint(half / "last.pt")["epoch"] == 1
    env = simulated_gpu_env(tmp_path, 1, (7, 5), T4_NAME)
    proc = samlib_cmd(env, "train", "--profile", "smoke", "--data-dir", data_dir, "--out", tmp_path / "split",
                      "--no-progress", *TINY)
    assert "after epoch 1 (in fp16)" in proc.stdout
    assert only_log(tmp_path, "train")["autocast"] == ["float16"]
    a, b = load_checkpoint(whole / "last.pt"), load_checkpoint(half / "last.pt")
    assert a["precision"] == b["precision"] == "fp16" and b["epoch"] == 2
    assert b["scaler"]["scale"] > 0 and set(b["scaler"]) >= {"scale", "_growth_tracker"}
    untimed = lambda ckpt: [{k: v for k, v in r.items() if k != "seconds"} for r in ckpt["metrics"]]
    assert untimed(a) == untimed(b) and all(r["skipped_steps"] == 0 for r in b["metrics"])
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    header = (half / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "skipped_steps" in header


def test_an_fp16_epoch_whose_every_step_the_scaler_skipped_is_one_error_line(tmp_path, data_dir, monkeypatch,
                                                                            capsys):
    """Every step overflows (finite loss, inf gradients): GradScaler skips them all, so the
    weights never move.  That used to finish with exit 0 and the initial weights."""
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: real(*a, **dict(k, init_scale=1e38)))
    with simgpu.simulated_gpu(1, (7, 5), T4_NAME):
        code = cli.main(["train", "--profile", "smoke", "--data-dir", str(data_dir), "--out", str(tmp_path),
                         "--no-progress", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: every step of epoch 1 overflowed in fp16: the loss scaler skipped all")
    assert not list(tmp_path.glob("*/last.pt"))                  # nothing of that epoch was saved


def test_a_scaler_skipping_some_steps_counts_them_and_goes_on(tmp_path, data_dir, monkeypatch):
    """An initial scale just too large overflows the first steps only (each skip halves the
    scale): counted per epoch in metrics.csv, and the run finishes.  Independent check: the
    scale never grows in so few steps, so it ends at init * 0.5 ** (steps skipped)."""
    from samlib.data import load_cifar10

    real, init = torch.amp.GradScaler, 2.0 ** INIT_EXPONENT
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *a, **k: real(*a, **dict(k, init_scale=init)))
    cfg = resolve("final", "smoke", **TINY_CFG)
    with simgpu.simulated_gpu(1, (7, 5), T4_NAME):
        run = train(cfg, dataset=load_cifar10(data_dir), out=tmp_path, progress=False)
    last = load_checkpoint(run / "last.pt")
    skipped = [r["skipped_steps"] for r in last["metrics"]]
    assert 1 <= skipped[0] < 5                       # 5 steps per epoch: (192 - 32) // 32
    assert last["scaler"]["scale"] == init * 0.5 ** sum(skipped)
    assert (run / "final.json").exists()


INIT_EXPONENT = 20     # between 2**16 (no step overflows here) and 2**24 (every step of epoch 1 does)


# ---------------------------------------------------------------- evaluate, submit

@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory, data_dir):
    """A finished run trained on a simulated H100 (bf16)."""
    from samlib.data import load_cifar10

    out = tmp_path_factory.mktemp("gpu_run")
    with simgpu.simulated_gpu(1, (9, 0), H100_NAME):
        return train(resolve("final", "smoke", **TINY_CFG), dataset=load_cifar10(data_dir), data_dir=data_dir,
                     out=out, progress=False)


@pytest.mark.slow
def test_evaluate_and_submit_without_device_predict_on_the_gpu_in_the_runs_precision(tmp_path, data_dir, gpu_run):
    env = simulated_gpu_env(tmp_path, 1, (9, 0), H100_NAME)
    samlib_cmd(env, "evaluate", gpu_run, "--data-dir", data_dir)
    log = only_log(tmp_path, "evaluate")
    assert log["placed"] == [0] and log["autocast"] == ["bfloat16"]
    kaggle = tmp_path / "kaggle.pkl"
    nbfilter = Path(__file__).parents[1] / "tools" / "nbfilter.py"
    subprocess.run([sys.executable, nbfilter, "kaggle-sample", str(data_dir), str(kaggle), "--n", "40"],
                   check=True, capture_output=True)
    samlib_cmd(env, "submit", gpu_run, "--input", kaggle, "--output", tmp_path / "submission.csv")
    log = only_log(tmp_path, "submit")
    assert log["placed"] == [0] and log["autocast"] == ["bfloat16"]
    assert len((tmp_path / "submission.csv").read_text().splitlines()) == 41


# ---------------------------------------------------------------- sweep

@pytest.mark.slow
def test_sweep_runs_one_job_per_simulated_gpu_and_probes_in_a_child(tmp_path, data_dir):
    """--devices cuda:0,cuda:1: each job trains on its own GPU; the timing probe runs in a
    process of its own, so the sweep's process never holds a CUDA context."""
    env = simulated_gpu_env(tmp_path, 2, (8, 0), "NVIDIA A100 (simulated)")
    samlib_cmd(env, "sweep", "--configs", "baseline,se", "--seeds", "1", "--profile", "smoke",
               "--data-dir", data_dir, "--out", tmp_path / "runs", "--devices", "cuda:0,cuda:1", *TINY)
    logs = simulated_gpu_logs(tmp_path)
    parent = [log for log in logs if "sweep" in log["argv"] and "--plan" not in log["argv"]]
    probe = [log for log in logs if "--plan" in log["argv"]]
    jobs = {log["argv"][log["argv"].index("--config") + 1]: log for log in logs if "train" in log["argv"]}
    assert len(parent) == 1 and parent[0]["placed"] == [] and parent[0]["set_devices"] == []
    assert len(probe) == 1 and probe[0]["placed"] == [0]
    assert sorted(jobs) == ["baseline", "se"]
    assert sorted(tuple(j["placed"]) for j in jobs.values()) == [(0,), (1,)]
    for job in jobs.values():
        assert job["set_devices"] == job["placed"] and job["autocast"] == ["bfloat16"]
    assert len(list((tmp_path / "runs").glob("*/final.json"))) == 2


# ---------------------------------------------------------------- the environment

@pytest.mark.parametrize("value", ["off", "auto", "fp32", ""])
@pytest.mark.parametrize("native_bf16", [False, True])
def test_samlib_cpu_amp_is_one_clear_error_on_every_cpu(monkeypatch, capsys, tmp_path, value, native_bf16):
    """The config's amp alone decides the precision; the old variable is refused on every CPU
    (it was read only where the CPU had bf16, so a wrong value passed silently elsewhere)."""
    import samlib.device as dev

    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setenv("SAMLIB_CPU_AMP", value)
    with pytest.raises(SamlibError, match="SAMLIB_CPU_AMP is no longer read.*--set amp=off"):
        dev.resolve_device("cpu")
    code = cli.main(["train", "--profile", "smoke", "--data-dir", str(tmp_path), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: SAMLIB_CPU_AMP is no longer read") and len(err.splitlines()) == 1


# ---------------------------------------------------------------- make report, Colab

@pytest.mark.slow
def test_make_report_with_device_auto_runs_the_notebooks_on_the_simulated_gpu(tmp_path):
    """`make report PROFILE=smoke` with DEVICE=auto on a machine with a GPU: every notebook's
    kernel trains and evaluates there, in bf16."""
    repo = Path(__file__).resolve().parent.parent
    write_cifar10(tmp_path / "data", synthetic_cifar10(1200, 600, seed=0))
    env = simulated_gpu_env(tmp_path, 1, (9, 0), H100_NAME)
    proc = subprocess.run(["make", "--no-print-directory", "-C", str(repo), "report", "PROFILE=smoke", "DEVICE=auto",
                           f"DATA_DIR={tmp_path / 'data'}", f"RESULTS={tmp_path / 'results'}",
                           f"RUNS={tmp_path / 'runs'}", f"PY={sys.executable}"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    kernels = [log for log in simulated_gpu_logs(tmp_path) if any("ipykernel" in a for a in log["argv"])]
    assert len(kernels) == 4                                     # one kernel per notebook
    trained = [k for k in kernels if k["autocast"]]
    assert trained and all(k["placed"] == [0] and k["autocast"] == ["bfloat16"] for k in trained)
    provenance = [json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("provenance.json")]
    assert provenance and all(p["device"] == H100_NAME and p["precision"] == "bf16" for p in provenance)


def test_the_notebook_parameters_pick_the_gpu_as_in_colab(monkeypatch, tmp_path):
    """A notebook opened on a GPU runtime (Colab's T4): device="auto" and profile="auto"
    resolve to the GPU and the paper profile."""
    from samlib.report.params import check_params

    with simgpu.simulated_gpu(1, (7, 5), T4_NAME):
        p = check_params("auto", tmp_path, None, tmp_path / "results", tmp_path / "runs", "auto")
        assert p.device == "cuda:0" and p.profile == "paper"      # the GPU, with its index
        from samlib.device import resolve_device
        assert resolve_device(p.device) == torch.device("cuda:0")


@pytest.mark.slow
def test_gpu_check_dry_mode_on_a_simulated_h100(tmp_path):
    """benchmarks/gpu_check.sh's dry mode (smoke profile, one epoch) as on a GPU machine: its
    estimate comes first, and the benchmark, the run and its evaluation all compute on the GPU."""
    repo = Path(__file__).resolve().parent.parent
    write_cifar10(tmp_path / "data", synthetic_cifar10(600, 300, seed=0))
    env = dict(simulated_gpu_env(tmp_path, 1, (9, 0), H100_NAME), GPU_CHECK_EPOCHS="1", GPU_CHECK_PROFILE="smoke",
               DATA_DIR=str(tmp_path / "data"), GPU_CHECK_RUNS=str(tmp_path / "runs"),
               GPU_CHECK_RESULTS=str(tmp_path / "results"), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True,
                          text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    first = [line for line in out.splitlines() if "] " in line][:3]
    assert any("estimate" in line for line in first), first
    for command in ("benchmarks/bench.py", "train", "evaluate"):
        log = only_log(tmp_path, command)
        assert log["placed"] == [0], (command, log)
    assert only_log(tmp_path, "evaluate")["autocast"] == ["bfloat16"]
    assert json.loads((tmp_path / "results" / "provenance.json").read_text())["device"] == H100_NAME
