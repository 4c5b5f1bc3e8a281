"""Defects of the GPU path, each caught on the CPU: how a run resumes (RNG states, precision),
how data-parallel slices split a batch, when an fp16 run that diverged stops."""
import types

import pytest
import torch

import samlib.dist
import samlib.rundir
from samlib.config import resolve
from samlib.data import split_data, synthetic_cifar10
from samlib.errors import SamlibError
from samlib.io import load_checkpoint, save_checkpoint
from samlib.rundir import RunDir
from samlib.train import NonFiniteLossError, Trainer, train

TINY = dict(widths=(4, 8, 8), blocks=(1, 1, 1), epochs=2, batch_size=32, val_size=32, train_subset=None,
            test_subset=None, train_eval_size=32)


@pytest.fixture(scope="module")
def dataset():
    return synthetic_cifar10(n_train=160, n_test=32, seed=3)


def _half_run(tmp_path, dataset):
    cfg = resolve("final", "smoke", **TINY)
    run = train(cfg, dataset=dataset, out=tmp_path, device="cpu", progress=False, stop_after=1)
    return cfg, RunDir(run)


def test_a_resume_reads_the_checkpoint_on_the_cpu_whatever_device_trains(tmp_path, dataset, monkeypatch):
    """torch.Generator.set_state takes CPU ByteTensors only: map_location=<the GPU> broke every
    resume after a Colab disconnect.  The state is read on the CPU; each part moves itself."""
    cfg, run = _half_run(tmp_path, dataset)
    seen = []
    real = samlib.rundir.RunDir.resume_state
    monkeypatch.setattr(samlib.rundir.RunDir, "resume_state", lambda self, device: seen.append(device) or real(self, device))
    train(cfg, dataset=dataset, out=tmp_path, device="cpu", progress=False)
    assert [str(d) for d in seen] == ["cpu"]
    state = load_checkpoint(run / "last.pt")
    assert state["rng"]["aug"].device.type == "cpu" and state["rng"]["aug"].dtype == torch.uint8


def test_a_run_never_switches_precision_when_resumed(tmp_path, dataset):
    cfg, run = _half_run(tmp_path, dataset)
    state = load_checkpoint(run / "last.pt")
    assert state["precision"] == "fp32"                        # CPU trains in fp32
    state.pop("_path")
    save_checkpoint(dict(state, precision="bf16"), run / "last.pt", keep_previous=False)
    with pytest.raises(SamlibError, match="was trained in bf16, but this device would continue in fp32"):
        train(cfg, dataset=dataset, out=tmp_path, device="cpu", progress=False)
    old = {k: v for k, v in state.items() if k not in ("precision", "format")}   # before it was kept
    save_checkpoint(old, run / "last.pt", keep_previous=False)
    assert (train(cfg, dataset=dataset, out=tmp_path, device="cpu", progress=False) / "final.json").exists()


@pytest.mark.parametrize("world, ok", [(2, True), (4, True), (3, False), (64, True), (128, False)])
def test_data_parallel_batches_split_evenly_or_the_setting_is_refused(dataset, monkeypatch, world, ok):
    monkeypatch.setattr(samlib.dist, "world_size", lambda: world)
    monkeypatch.setattr(samlib.dist, "wrap", lambda model, device: model)   # no process group here
    cfg = resolve("final", "smoke", **dict(TINY, batch_size=64))
    if ok:
        Trainer(cfg, split_data(cfg, dataset), torch.device("cpu"))
    else:
        with pytest.raises(SamlibError, match=f"batch_size 64 does not split evenly over {world} processes"):
            Trainer(cfg, split_data(cfg, dataset), torch.device("cpu"))


def test_an_fp16_run_whose_every_step_overflowed_stops(dataset):
    cfg = resolve("final", "smoke", **TINY)
    trainer = Trainer(cfg, split_data(cfg, dataset), torch.device("cpu"))
    trainer.scaler = types.SimpleNamespace(is_enabled=lambda: True)     # as on an fp16 GPU
    steps = trainer.steps_per_epoch
    trainer.check_finite({"epoch": 3, "nonfinite_steps": steps - 1, "first_nonfinite_step": 1}, None)
    with pytest.raises(NonFiniteLossError, match=f"epoch 3, step 1 \\({steps} of {steps} steps\\)"):
        trainer.check_finite({"epoch": 3, "nonfinite_steps": steps, "first_nonfinite_step": 1}, None)


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_precision_follows_the_chosen_gpus_native_support(monkeypatch, capability, expected):
    """T4 (7.5) and V100 (7.0) train in fp16 + GradScaler even though torch reports bf16 as
    supported there (emulated); A100/L4 (8.x) and H100 (9.0) in bf16.  The chosen GPU is asked,
    not the current one; the CPU stays fp32 and amp="off" is fp32 everywhere."""
    import samlib.device as dev

    asked = []
    capabilities = {0: (6, 1), 1: capability}                    # GPU 0 is another, older card
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: asked.append(i) or capabilities[i])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)   # as on a T4
    assert dev.amp_dtype_for("auto", torch.device("cuda:1")) == expected and asked == [1]
    assert dev.amp_dtype_for("off", torch.device("cuda:1")) is None
    assert dev.amp_dtype_for("auto", torch.device("cpu")) is None
