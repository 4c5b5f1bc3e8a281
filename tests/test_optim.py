"""samlib.optim against hand computations (Lookahead, both LR schedules, EMA)."""
import copy
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from samlib.config import resolve
from samlib.errors import ConfigError
from helpers_method import lr_curve
from samlib.optim import EMA, Lookahead, build_optimizer, build_scheduler, schedule_curves


# ---------------------------------------------------------------- Lookahead

def one_param(w0=1.0, k=3, alpha=0.5):
    w = nn.Parameter(torch.tensor([w0], dtype=torch.float64))
    opt = Lookahead(torch.optim.SGD([w], lr=1.0, momentum=0.0), k=k, alpha=alpha)
    return w, opt


def sgd_step(w, opt, g):
    opt.zero_grad()
    w.grad = torch.tensor([g], dtype=torch.float64)
    opt.step()


def test_lookahead_hand_computed_first_cycle():
    w0, g, k, alpha = 1.0, 0.25, 3, 0.5
    w, opt = one_param(w0, k, alpha)
    for t in range(1, k):                            # fast moves, slow stays at w0
        sgd_step(w, opt, g)
        assert w.item() == pytest.approx(w0 - t * g, abs=1e-12)
        assert opt.slow[0].item() == w0
    sgd_step(w, opt, g)                              # step k: fast = w0 - k*g, then sync
    fast = w0 - k * g
    synced = w0 + alpha * (fast - w0)                # = 0.625
    assert opt.slow[0].item() == pytest.approx(synced, abs=1e-12)
    assert w.item() == pytest.approx(synced, abs=1e-12)
    sgd_step(w, opt, g)                              # step k+1 continues from the synced value
    assert w.item() == pytest.approx(synced - g, abs=1e-12)
    assert opt.slow[0].item() == pytest.approx(synced, abs=1e-12)
    for _ in range(k - 1):                           # second sync at step 2k
        sgd_step(w, opt, g)
    assert w.item() == pytest.approx(synced + alpha * ((synced - k * g) - synced), abs=1e-12)


def test_lookahead_alpha_one_is_plain_sgd():
    w, opt = one_param(2.0, k=2, alpha=1.0)
    for _ in range(5):
        sgd_step(w, opt, 0.5)
    assert w.item() == pytest.approx(2.0 - 5 * 0.5, abs=1e-12)


def test_lookahead_state_dict_round_trip():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randn(8, 2)

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()

    opt = build_optimizer(net, lr=0.1, lookahead_k=5, lookahead_alpha=0.5)
    train(net, opt, 7)                               # mid-cycle: counter 7, slow != fast
    # deepcopy = what a checkpoint file does; torch's state_dict holds references to the
    # momentum buffers, which the two optimizers would otherwise share.
    saved = copy.deepcopy(opt.state_dict())
    assert saved["step_count"] == 7 and saved["k"] == 5 and saved["alpha"] == 0.5
    assert len(saved["slow"]) == 2
    twin = nn.Linear(3, 2)
    twin.load_state_dict(net.state_dict())
    opt2 = build_optimizer(twin, lr=0.1, lookahead_k=3, lookahead_alpha=0.9)   # overwritten
    opt2.load_state_dict(saved)
    assert (opt2.k, opt2.alpha, opt2.step_count) == (5, 0.5, 7)
    for a, b in zip(opt.slow, opt2.slow):
        assert torch.equal(a, b)
    train(net, opt, 6)                               # crosses the sync at step 10
    train(twin, opt2, 6)
    for a, b in zip(net.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_lookahead_rejects_bad_settings():
    base = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    for kwargs in (dict(k=0), dict(k=1.5), dict(alpha=0.0), dict(alpha=1.5)):
        with pytest.raises(ValueError, match="Lookahead"):
            Lookahead(base, **kwargs)
    with pytest.raises(ConfigError):
        Lookahead(base, k=0)


def test_build_optimizer_plain_sgd_and_settings():
    net = nn.Linear(2, 2)
    opt = build_optimizer(net, lookahead_k=0)
    assert type(opt) is torch.optim.SGD
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (0.1, 0.9, True, 5e-4)
    wrapped = build_optimizer(net)
    assert isinstance(wrapped, Lookahead) and (wrapped.k, wrapped.alpha) == (5, 0.5)
    assert wrapped.param_groups is wrapped.base.param_groups
    with pytest.raises(ValueError):
        build_optimizer(net, lookahead_k=-1)


# ---------------------------------------------------------------- schedules

def run_schedule(opt, sched, total):
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return np.array(lrs)


def cos_anneal(start, end, pct):                     # torch's OneCycle "cos" by its formula
    return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)


def test_as_run_is_plain_one_cycle():
    epochs, spe = 5, 20                              # total 100, pct 0.4 -> peak at step 39
    lrs = lr_curve("as_run", epochs, spe)
    assert len(lrs) == epochs * spe
    assert lrs[0] == pytest.approx(0.1 / 25, rel=1e-12)
    assert np.argmax(lrs) == round(0.4 * 100) - 1 and lrs[39] == pytest.approx(0.1, rel=1e-12)
    assert lrs[-1] == pytest.approx(0.1 / 25 / 1e4, rel=1e-9)
    # rising phase by hand: step s of 39 steps, cos from 0.004 to 0.1
    assert lrs[10] == pytest.approx(cos_anneal(0.004, 0.1, 10 / 39), rel=1e-12)
    assert lrs[70] == pytest.approx(cos_anneal(0.1, 4e-7, (70 - 39) / (99 - 39)), rel=1e-12)
    _, moms = schedule_curves("as_run", epochs, spe)
    assert moms[0] == pytest.approx(0.95) and moms[39] == pytest.approx(0.85)
    assert moms[-1] == pytest.approx(0.95)


def test_as_written_warmup_then_one_cycle_by_hand():
    epochs, spe, warm = 10, 10, 2                    # warm-up 20 steps, OneCycle 80 steps
    lrs, moms = schedule_curves("as_written", epochs, spe, warmup_epochs=warm)
    assert len(lrs) == 100
    assert lrs[0] == pytest.approx(0.001, rel=1e-9)
    for s in (1, 7, 19):                             # linear: 0.001 + s/20 * (0.1 - 0.001)
        assert lrs[s] == pytest.approx(0.001 + s / 20 * 0.099, rel=1e-9)
    assert lrs[19] < 0.1
    # LinearLR's end (factor 1.0) is reached at step 20 = the milestone, where OneCycle starts.
    one = lrs[20:]
    assert one[0] == pytest.approx(0.004, rel=1e-12)     # OneCycle's own start, max_lr/25
    assert np.argmax(one) == round(0.4 * 80) - 1 and one[31] == pytest.approx(0.1, rel=1e-12)
    assert one[-1] == pytest.approx(4e-7, rel=1e-9)
    assert one[5] == pytest.approx(cos_anneal(0.004, 0.1, 5 / 31), rel=1e-12)
    assert np.allclose(moms[:20], 0.9)                   # the optimizer's momentum in warm-up
    assert moms[20] == pytest.approx(0.95) and moms[51] == pytest.approx(0.85)


def test_warmup_end_reaches_max_lr_when_linear_runs_past_milestone():
    # Independent check of the warm-up slope: LinearLR alone on a fresh optimizer.
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=20)
    lrs = run_schedule(opt, sched, 21)
    assert lrs[20] == pytest.approx(0.1, rel=1e-12)
    assert np.allclose(lr_curve("as_written", 10, 10, warmup_epochs=2)[:20], lrs[:20], rtol=1e-9)


def test_schedulers_accept_lookahead_and_drive_the_base_lr():
    net = nn.Linear(2, 1)
    for kind in ("as_run", "as_written"):
        opt = build_optimizer(net)
        with warnings.catch_warnings():
            warnings.simplefilter("error")           # no "step order" or deprecation warnings
            sched = build_scheduler(opt, kind, 3, 4, warmup_epochs=1)
            lrs = run_schedule(opt, sched, 12)
        assert opt.base.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        assert np.allclose(lrs, lr_curve(kind, 3, 4, warmup_epochs=1), rtol=1e-12)


def test_scheduler_resume_continues_the_curve():
    net = nn.Linear(2, 1)
    opt = build_optimizer(net)
    sched = build_scheduler(opt, "as_written", 6, 5, warmup_epochs=2)
    first = run_schedule(opt, sched, 13)
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    opt2 = build_optimizer(net)
    sched2 = build_scheduler(opt2, "as_written", 6, 5, warmup_epochs=2)   # build, then load
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    rest = run_schedule(opt2, sched2, 30 - 13)
    assert np.allclose(np.concatenate([first, rest]), lr_curve("as_written", 6, 5, warmup_epochs=2),
                       rtol=1e-9)


def test_schedule_validation():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    # samlib.config is the one validation of the schedule settings.
    with pytest.raises(ConfigError, match="as_run', 'as_written"):
        resolve("final", "smoke", schedule="cosine")
    with pytest.raises(ConfigError, match="warmup_epochs"):
        resolve("final", "smoke", schedule="as_written", epochs=10, warmup_epochs=10)
    with pytest.raises(ConfigError):
        resolve("final", "paper", schedule="as_written", epochs=3)    # default 10-epoch warm-up > 3 epochs
    with pytest.raises(ValueError):
        build_scheduler(opt, "as_run", 0, 10)
    lrs = lr_curve("as_written", 5, 4, warmup_epochs=0)  # no warm-up: plain OneCycle
    assert np.allclose(lrs, lr_curve("as_run", 5, 4), rtol=1e-12)


# ---------------------------------------------------------------- EMA

def test_ema_closed_form_for_params_and_bn_buffers():
    d = 0.9
    model = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    ema = EMA(model, decay=d)
    values = [0.5, -1.0, 2.0, 3.5, 0.25]             # p_t, set by hand at steps t = 0..4
    e = None
    for t, v in enumerate(values):
        with torch.no_grad():
            model[0].weight.fill_(v)
            model[1].running_mean.fill_(2 * v)
        ema.update_parameters(model)
        e = v if e is None else d * e + (1 - d) * v      # float64 closed form
        assert ema.module[0].weight[0, 0].item() == pytest.approx(e, abs=1e-6)
        assert ema.module[1].running_mean.item() == pytest.approx(2 * e, abs=1e-6)


def test_ema_integer_buffer_is_truncated_not_tracked():
    model = nn.BatchNorm1d(1)
    ema = EMA(model, decay=0.999)
    for t in range(1, 11):
        model.num_batches_tracked.fill_(t)
        ema.update_parameters(model)
    # first update copies 1; then int64(0.999*1 + 0.001*t) = 1 for t < ~1000
    assert ema.module.num_batches_tracked.item() == 1
    assert ema.module.num_batches_tracked.dtype == torch.long


def test_ema_decay_validation():
    for bad in (0.0, 1.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="decay"):
            EMA(nn.Linear(1, 1), bad)


def test_ema_equals_torchs_averaged_model_bit_for_bit_and_loads_its_state():
    """samlib's EMA keeps AveragedModel's numbers and state_dict (old checkpoints load)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 2))
    ours = EMA(model, decay=0.9)
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(6):
        model(torch.randn(8, 3, 6, 6)).square().mean().backward()   # train mode: BN stats move too
        opt.step()
        opt.zero_grad()
        ours.update_parameters(model)
        reference.update_parameters(model)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    for key, value in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    fresh = EMA(model, decay=0.9)
    fresh.load_state_dict(reference.state_dict())                 # a checkpoint written before
    assert fresh.updates == 6


def test_ema_update_copies_nothing_from_host_to_device():
    """The step counter stays on the host: no host-to-device copy per update (on a GPU each
    one would block the queue).  Checked by recording every copy the update dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.to_other_devices = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
                src = args[1] if func is torch.ops.aten.copy_.default else args[0]
                dst_device = kwargs.get("device") or (args[0].device if func is torch.ops.aten.copy_.default else src.device)
                if torch.device(dst_device) != src.device:
                    self.to_other_devices.append(func)
            return func(*args, **kwargs)

    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = EMA(model, decay=0.9)
    with Copies() as copies:
        for _ in range(3):
            ema.update_parameters(model)
    assert copies.to_other_devices == []
    # the same probe sees AveragedModel's copy of its counter to the parameters' device
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    reference = AveragedModel(model.to("meta"), multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    with Copies() as copies:
        for _ in range(2):
            reference.update_parameters(model)
    assert copies.to_other_devices                        # cpu -> meta: what a GPU would wait on
