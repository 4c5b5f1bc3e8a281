"""The training step's GPU behaviour, checked without a GPU.

Host synchronisation, on the simulated GPU (tests/simgpu): a TorchDispatchMode sees every
aten op of the real step - batched crop/flip/Cutout, MixUp, forward under autocast,
backward, clipping, (GradScaler,) SGD + Lookahead, the LR scheduler, the EMA - and counts
the ops that make a GPU wait for the host to read a value (``.item()``, ``bool(t)``,
``nonzero``).  bf16: none per step; fp16: GradScaler's one (its skip decision).

Device mixing, on the simulated GPU with device tracking: every tensor placed on the GPU is
a SimulatedCudaTensor (a CPU tensor that reports cuda:0 and keeps doing so through every op,
gradients included), and an op mixing one with a non-scalar CPU tensor fails with CUDA's
own error.  A whole run (training, per-epoch evaluation, checkpoints, the final test) and
its Figure 1 evaluation (TTA, ensembles, temperature) go through it.  FakeTensorMode on a
fake cuda device was tried first: without a CUDA driver, batch norm, channels_last copies,
CUDA random draws and the autograd engine each reach the driver, so no step runs fake.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import simgpu
import samlib.train
from samlib.config import resolve
from samlib.data import split_data, synthetic_cifar10
from samlib.model import build_model
from samlib.optim import EMA, Lookahead
from samlib.train import Trainer

aten = torch.ops.aten
SYNC_OPS = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.nonzero.default}
TINY = dict(widths=(4, 8, 8), blocks=(1, 1, 1), epochs=2, batch_size=32, val_size=32, train_subset=None,
            test_subset=None, train_eval_size=32)
STEPS = 4


class OpRecorder(TorchDispatchMode):
    """Every aten op run inside; `syncs` the ones that read a device value on the host.

    On the simulated GPU every tensor is a CPU tensor, so values drawn from a host generator
    (a CPU torch.Generator, e.g. MixUp's lambda: on a real GPU they never leave the host) are
    told apart by the generator that made them and not counted."""

    def __init__(self, simulation=None):
        super().__init__()
        self.simulation = simulation
        self.ops, self.syncs, self._host = [], [], {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append(func)
        if func in SYNC_OPS and not (args and args[0].data_ptr() in self._host):
            self.syncs.append(func)
        out = func(*args, **kwargs)
        generator = kwargs.get("generator")
        if (generator is not None and self.simulation is not None and torch.is_tensor(out)
                and not self.simulation.is_cuda_generator(generator)):
            self._host[out.data_ptr()] = out           # kept alive: its memory stays its own
        return out


@pytest.fixture(scope="module")
def dataset():
    return synthetic_cifar10(STEPS * 32 + 32, 32, seed=1)


def step_syncs(dataset, capability, **overrides) -> list:
    """Host reads of each of STEPS training steps of `final` on a simulated GPU."""
    cfg = resolve("final", "smoke", **dict(TINY, **overrides))
    per_step = []
    with simgpu.simulated_gpu(1, capability) as simulation:
        trainer = Trainer(cfg, split_data(cfg, dataset), torch.device("cuda:0"))
        trainer.net.train()
        batches = trainer.epoch_batches(alpha=0.3)
        for _ in range(STEPS):
            with OpRecorder(simulation) as recorder:
                x, y = next(batches)                                  # MixUp of this step
                trainer.train_step(x, y)
            per_step.append([str(op) for op in recorder.syncs])
    return per_step


def assert_syncs_at_most(per_step: list, allowed: int) -> None:
    for step, syncs in enumerate(per_step, start=1):
        assert len(syncs) <= allowed, f"step {step} reads the device {len(syncs)} time(s): {syncs}"


def test_a_bf16_step_never_waits_for_the_host(dataset):
    per_step = step_syncs(dataset, (9, 0))
    assert_syncs_at_most(per_step, 0)


def test_an_fp16_step_waits_only_for_the_loss_scalers_skip_decision(dataset):
    per_step = step_syncs(dataset, (7, 5))
    assert_syncs_at_most(per_step, 1)
    assert all(len(s) == 1 for s in per_step)          # GradScaler.step reads found_inf once


def test_a_planted_item_in_the_step_is_caught(dataset, monkeypatch):
    real = samlib.train.F.cross_entropy

    def cross_entropy_and_item(*args, **kwargs):
        loss = real(*args, **kwargs)
        loss.item()                                     # what a careless log line would do
        return loss

    monkeypatch.setattr(samlib.train.F, "cross_entropy", cross_entropy_and_item)
    with pytest.raises(AssertionError, match="step 1 reads the device [1-9]"):
        assert_syncs_at_most(step_syncs(dataset, (9, 0)), 0)


# ---------------------------------------------------------------- launches per update

def _ops_of(fn) -> int:
    """Ops that launch work on a device (detach and views launch none)."""
    with OpRecorder() as recorder:
        fn()
    return len([op for op in recorder.ops if not any(w in str(op) for w in ("detach", "view", "split", "alias"))])


@pytest.mark.parametrize("blocks", [(1, 1, 1), (4, 4, 3)])
def test_lookahead_sync_and_ema_update_are_a_fixed_number_of_foreach_ops(blocks):
    """One foreach op covers every parameter: the op count of a Lookahead sync and of an EMA
    update does not grow with depth (at paper depth the per-tensor loops were ~360 and ~100
    kernel launches)."""
    model = build_model(widths=(4, 8, 8), blocks=blocks)
    params = list(model.parameters())
    look = Lookahead(torch.optim.SGD(params, lr=0.1), k=1, alpha=0.5)
    ema = EMA(model, 0.9)
    ema.update_parameters(model)                        # the first update copies
    assert _ops_of(look._sync) <= 3
    assert _ops_of(lambda: ema.update_parameters(model)) <= 12
    assert len(params) > 12 or blocks == (1, 1, 1)


def test_lookahead_sync_is_the_per_tensor_formula():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    look = Lookahead(torch.optim.SGD([p], lr=0.1), k=1, alpha=0.5)
    slow = p.detach().clone()
    with torch.no_grad():
        p.add_(torch.randn(5))
    fast = p.detach().clone()
    look._sync()
    expected = slow.add(fast - slow, alpha=0.5)
    assert torch.equal(p.detach(), expected) and torch.equal(look.slow[0], expected)


# ---------------------------------------------------------------- TTA constants

def test_tta_views_make_their_constants_once_per_device():
    """A view's index and per-channel tensors are made on its first call on a device, then
    reused: no host-to-device copy per batch."""
    from samlib.views import as_run_tta

    views = as_run_tta()
    x = torch.rand(2, 3, 32, 32)
    for v in views:
        v.fn(x)                                         # first call: constants made
    with OpRecorder() as recorder:
        for v in views:
            v.fn(x)
    made = [str(op) for op in recorder.ops if op in (aten.arange.start_step, aten.arange.default,
                                                     aten.lift_fresh.default, aten._to_copy.default)]
    assert made == []


# ---------------------------------------------------------------- device mixing

@pytest.mark.parametrize("capability", [(9, 0), (7, 5)])
def test_a_whole_run_and_its_evaluation_mix_no_devices(tmp_path, capability):
    from samlib.report.runs import evaluate_run, run_probs
    from samlib.run import train

    cfg = resolve("final", "smoke", **TINY)
    ds = synthetic_cifar10(160, 64, seed=2)
    with simgpu.simulated_gpu(1, capability, track_devices=True):
        run = train(cfg, dataset=ds, out=tmp_path, progress=False)
        table = evaluate_run(run, dataset=ds)
        probs = run_probs(run, "ensemble+tta (as run)", ds.test_images[:10])
    assert (run / "final.json").exists() and len(table) >= 7 and probs.shape == (10, 10)


def test_the_tracking_sees_gpu_tensors_and_refuses_a_cpu_one_in_the_step(monkeypatch):
    cfg = resolve("final", "smoke", **TINY)
    ds = synthetic_cifar10(160, 32, seed=2)
    with simgpu.simulated_gpu(1, (9, 0), track_devices=True):
        trainer = Trainer(cfg, split_data(cfg, ds), torch.device("cuda:0"))
        assert all(isinstance(p, simgpu.SimulatedCudaTensor) for p in trainer.model.parameters())
        assert trainer.train_x.device == torch.device("cuda:0")
        real = samlib.train.one_hot
        monkeypatch.setattr(samlib.train, "one_hot", lambda labels, n: real(labels, n).cpu())   # planted
        with pytest.raises(RuntimeError, match="found at least two devices, cuda:0 and cpu"):
            trainer.train_epoch()
