"""Optimisation (paper, "Optimisation"): SGD + Lookahead, the two LR schedules, EMA.

Paper: SGD (momentum 0.9, Nesterov, weight decay 5e-4) wrapped in Lookahead (k=5, alpha=0.5);
a 10-epoch linear warm-up 0.001 -> 0.1, then OneCycleLR (max 0.1, 40% rising); EMA decay 0.999.
Reference code: LinearLR and OneCycleLR are both stepped on the same optimizer and OneCycleLR
sets the LR outright, so what ran is plain OneCycle (0.004 -> 0.1 -> ~4e-7).  Both schedules
are here: ``kind="as_run"`` and ``kind="as_written"``.
"""

import copy
import itertools

import numpy as np
import torch
from torch.optim.lr_scheduler import LinearLR, OneCycleLR, SequentialLR

from samlib.errors import ConfigError

SCHEDULES = ("as_run", "as_written")
EMA_RESETS = ("never", "epoch")   # "epoch": the authors' code (see EMA.copy_to)


class InvalidSetting(ConfigError, ValueError):
    """A bad optimisation hyperparameter (a ConfigError that is also a ValueError)."""


# ---------------------------------------------------------------- Lookahead

class Lookahead(torch.optim.Optimizer):
    """Lookahead (Zhang et al. 2019) around any base optimizer.

    The base optimizer moves the fast weights every step; every ``k`` steps the slow weights
    move ``alpha`` of the way to the fast ones, ``slow += alpha * (fast - slow)``, and the fast
    weights restart from there.  Slow weights start as a copy of the parameters at
    construction.  ``param_groups`` (and ``state``) are the base optimizer's own objects, so
    torch LR schedulers and GradScaler drive the base optimizer through this wrapper.
    """

    def __init__(self, base_optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidSetting(f"Lookahead k must be an integer >= 1 (steps between syncs), got {k!r}")
        if not 0.0 < float(alpha) <= 1.0:
            raise InvalidSetting(f"Lookahead alpha must satisfy 0 < alpha <= 1, got {alpha!r}")
        # Optimizer.__init__ installs the step hooks that torch schedulers expect.
        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)
        self.base = base_optimizer
        self.param_groups = base_optimizer.param_groups   # shared: schedulers set lr here
        self.state = base_optimizer.state
        self.k, self.alpha = k, float(alpha)
        self.step_count = 0
        self.slow = [p.detach().clone() for p in self._params()]

    def _params(self) -> list:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def _sync(self) -> None:
        params = self._params()
        for p in params[len(self.slow):]:          # groups added to the base after construction
            self.slow.append(p.detach().clone())
        # Three foreach calls for all parameters (one kernel launch each on a GPU, not three per
        # parameter); the same arithmetic as slow.add_(fast - slow, alpha=alpha) per tensor.
        torch._foreach_add_(self.slow, torch._foreach_sub(params, self.slow), alpha=self.alpha)
        torch._foreach_copy_(params, self.slow)     # fast restarts from the slow weights

    def step(self, closure=None):
        loss = self.base.step(closure)
        self.step_count += 1
        if self.step_count % self.k == 0:
            self._sync()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"base": self.base.state_dict(), "slow": [s.detach().clone() for s in self.slow],
                "step_count": self.step_count, "k": self.k, "alpha": self.alpha}

    def load_state_dict(self, state_dict: dict) -> None:
        params = self._params()
        slow = state_dict["slow"]
        if len(slow) != len(params) or any(s.shape != p.shape for s, p in zip(slow, params)):
            raise ValueError("Lookahead state_dict does not match this optimizer's parameters "
                             f"({len(slow)} slow tensors for {len(params)} parameters)")
        self.base.load_state_dict(state_dict["base"])
        self.param_groups = self.base.param_groups   # Optimizer.load_state_dict rebinds them
        self.state = self.base.state
        self.slow = [s.detach().to(device=p.device, dtype=p.dtype).clone() for s, p in zip(slow, params)]
        self.step_count = int(state_dict["step_count"])
        self.k, self.alpha = int(state_dict["k"]), float(state_dict["alpha"])

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, base={self.base!r})"


def build_optimizer(model: torch.nn.Module, lr: float = 0.1, momentum: float = 0.9,
                    nesterov: bool = True, weight_decay: float = 5e-4,
                    lookahead_k: int = 5, lookahead_alpha: float = 0.5) -> torch.optim.Optimizer:
    """The paper's optimizer: Nesterov SGD (decay on every parameter, as the reference) in
    Lookahead.  ``lookahead_k=0`` gives plain SGD."""
    if isinstance(lookahead_k, bool) or not isinstance(lookahead_k, int) or lookahead_k < 0:
        raise InvalidSetting(f"lookahead_k must be an integer >= 0 (0 = no Lookahead), got {lookahead_k!r}")
    sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=nesterov,
                          weight_decay=weight_decay)
    return sgd if lookahead_k == 0 else Lookahead(sgd, k=lookahead_k, alpha=lookahead_alpha)


# ---------------------------------------------------------------- LR schedules

def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidSetting(f"{name} must be a positive integer, got {value!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, epochs: int, steps_per_epoch: int,
                    max_lr: float = 0.1, warmup_epochs: int = 10, warmup_start_lr: float = 0.001,
                    pct_start: float = 0.4):
    """The per-step LR schedule (call ``scheduler.step()`` after every optimizer step).

    ``"as_run"``: what the reference code's LinearLR + OneCycleLR produced together, i.e. plain
    OneCycleLR(max_lr, epochs * steps_per_epoch, pct_start) with torch defaults: starts at
    max_lr/25 (0.004), peaks at max_lr at step pct_start*total - 1, cos-anneals to
    max_lr/25/1e4 (4e-7); momentum cycles 0.95 -> 0.85 -> 0.95 (the configured 0.9 never
    runs - also true of the reference run).

    ``"as_written"``: the paper's text: linear warm-up warmup_start_lr -> max_lr over
    ``warmup_epochs``, then OneCycleLR(max_lr, pct_start) over the remaining epochs, which
    starts again at max_lr/25 (the paper's literal recipe drops 0.1 -> 0.004 at the seam).
    Momentum: the optimizer's own (0.9) during the warm-up; OneCycle's cycling afterwards.
    Chained with torch's SequentialLR; see the fix-up below.  Smoke runs must scale
    ``warmup_epochs`` themselves (it must be < epochs).

    Build the scheduler before loading an optimizer state_dict when resuming (it writes lr).
    """
    if kind not in SCHEDULES:
        raise InvalidSetting(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
    _check_positive_int("epochs", epochs)
    _check_positive_int("steps_per_epoch", steps_per_epoch)
    if not 0.0 < float(pct_start) < 1.0:
        raise InvalidSetting(f"pct_start must be in (0, 1), got {pct_start!r}")
    if not max_lr > 0:
        raise InvalidSetting(f"max_lr must be > 0, got {max_lr!r}")
    for group in optimizer.param_groups:          # a fresh schedule: base lr = max_lr
        group["lr"] = max_lr
        group.pop("initial_lr", None)
    if kind == "as_run":
        return OneCycleLR(optimizer, max_lr=max_lr, total_steps=epochs * steps_per_epoch,
                          pct_start=float(pct_start))

    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or not 0 <= warmup_epochs < epochs:
        raise InvalidSetting(f"warmup_epochs must be an integer in [0, epochs) = [0, {epochs}), got "
                             f"{warmup_epochs!r}; scale it down for short runs")
    if not 0.0 < warmup_start_lr <= max_lr:
        raise InvalidSetting(f"warmup_start_lr must be in (0, max_lr={max_lr}], got {warmup_start_lr!r}")
    warmup_steps = warmup_epochs * steps_per_epoch
    one_cycle_steps = (epochs - warmup_epochs) * steps_per_epoch
    if warmup_steps == 0:
        return OneCycleLR(optimizer, max_lr=max_lr, total_steps=one_cycle_steps, pct_start=float(pct_start))

    momenta = [group.get("momentum") for group in optimizer.param_groups]
    warmup = LinearLR(optimizer, start_factor=warmup_start_lr / max_lr, end_factor=1.0,
                      total_iters=warmup_steps)
    one_cycle = OneCycleLR(optimizer, max_lr=max_lr, total_steps=one_cycle_steps, pct_start=float(pct_start))
    schedule = SequentialLR(optimizer, [warmup, one_cycle], milestones=[warmup_steps])
    # Fix-up: OneCycleLR overwrites group["initial_lr"] with max_lr/25 (it reads it as its own
    # start value), and SequentialLR resets lr to initial_lr before LinearLR's first step, so
    # unpatched the warm-up would run 4e-5 -> 0.004 instead of 0.001 -> 0.1.  LinearLR is
    # chainable (multiplies the current lr), so restoring its first value fixes every step.
    for group, momentum in zip(optimizer.param_groups, momenta):
        group["lr"] = warmup_start_lr
        if momentum is not None:                  # OneCycleLR set 0.95 at construction
            group["momentum"] = momentum
    warmup._last_lr = schedule._last_lr = [group["lr"] for group in optimizer.param_groups]
    return schedule


def schedule_curves(kind: str, epochs: int, steps_per_epoch: int, **kwargs):
    """(lr, momentum) numpy arrays, one value per optimizer step, for plotting a schedule.

    Runs ``build_scheduler`` on a throwaway SGD over one dummy parameter."""
    dummy = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([dummy], lr=kwargs.get("max_lr", 0.1), momentum=0.9, nesterov=True)
    sched = build_scheduler(opt, kind, epochs, steps_per_epoch, **kwargs)
    total = epochs * steps_per_epoch
    lrs, moms = np.empty(total), np.empty(total)
    for i in range(total):
        lrs[i], moms[i] = opt.param_groups[0]["lr"], opt.param_groups[0]["momentum"]
        opt.step()        # no gradient: a no-op, but keeps the scheduler's order check quiet
        if i < total - 1:
            sched.step()
    return lrs, moms


def lr_curve(kind: str, epochs: int, steps_per_epoch: int, **kwargs) -> np.ndarray:
    """The LR used at each of the epochs * steps_per_epoch optimizer steps."""
    return schedule_curves(kind, epochs, steps_per_epoch, **kwargs)[0]


# ---------------------------------------------------------------- EMA

class EMA(torch.nn.Module):
    """EMA of the weights *and* buffers (paper: decay 0.999, updated every step).

    The same numbers as torch's ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d),
    use_buffers=True)`` (tests/test_optim.py checks it bit for bit) and the same state_dict
    (``module.*`` and ``n_averaged``), without its per-step host-to-device copy of the step
    counter: the count lives on the host, so a GPU step never waits on it.
    - the first update copies the model (e_1 = w_1); later ones e = d*e + (1-d)*w, as one
      ``_foreach_lerp_`` over every floating-point parameter and buffer (BN statistics
      included, like the reference's EMA over every floating-point state_dict entry).  The
      reference code starts from the initial weights instead (e_1 = d*w_0 + (1-d)*w_1); the
      difference decays as d**t.
    - integer buffers (BN num_batches_tracked) get d*e + (1-d)*w cast back to int64, i.e.
      truncated, as AveragedModel does; it only matters for BatchNorm(momentum=None).
    """

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        super().__init__()
        if not 0.0 < float(decay) < 1.0:
            raise InvalidSetting(f"EMA decay must satisfy 0 < decay < 1, got {decay!r}")
        self.module = copy.deepcopy(model)
        self.decay = float(decay)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long))   # for the state_dict
        self.updates = 0                                                        # the host's count

    def _pairs(self, model: torch.nn.Module):
        ours = itertools.chain(self.module.parameters(), self.module.buffers())
        theirs = itertools.chain(model.parameters(), model.buffers())
        return [(e.detach(), w.detach()) for e, w in zip(ours, theirs)]

    @torch.no_grad()
    def update_parameters(self, model: torch.nn.Module) -> None:
        pairs = self._pairs(model)
        if self.updates == 0:
            for e, w in pairs:
                e.copy_(w)
        else:
            floats = [(e, w) for e, w in pairs if e.is_floating_point()]
            torch._foreach_lerp_([e for e, _ in floats], [w for _, w in floats], 1 - self.decay)
            ints = [(e, w) for e, w in pairs if not e.is_floating_point()]
            if ints:     # d*e + (1-d)*w truncated to int64, on all of them at once (a few launches)
                ema_i, model_i = [e for e, _ in ints], [w for _, w in ints]
                flat_e = torch.cat([e.reshape(-1) for e in ema_i])
                flat_w = torch.cat([w.reshape(-1) for w in model_i])
                mixed = (flat_e * self.decay + flat_w * (1 - self.decay)).to(flat_e.dtype)
                parts = mixed.split([e.numel() for e in ema_i])
                torch._foreach_copy_(ema_i, [m.view_as(e) for m, e in zip(parts, ema_i)])
        self.updates += 1
        self.n_averaged += 1                     # a CPU tensor: no device sync

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Overwrite every floating-point parameter and buffer of `model` with the EMA's, in
        place (the optimizer's momentum and Lookahead's slow weights are left as they are).

        This is what the authors' code did at every epoch end (config ``ema_reset="epoch"``):
        its ``ModelEMA.apply()`` kept ``model.state_dict()`` as the backup - tensors that
        share storage with the model - then loaded the EMA into the model, so ``restore()``
        loaded the EMA back and training went on from the EMA.  Their EMA held the
        floating-point state_dict entries only, so integer buffers stay the model's."""
        for e, w in self._pairs(model):
            if w.is_floating_point():
                w.copy_(e)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict, assign)
        self.updates = int(self.n_averaged)
        return result

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def build_ema(model: torch.nn.Module, decay: float = 0.999) -> EMA:
    """The paper's EMA of `model` (see EMA); call ``ema.update_parameters(model)`` after each
    optimizer step and evaluate ``ema.module``."""
    return EMA(model, decay)
