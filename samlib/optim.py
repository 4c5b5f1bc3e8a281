"""Optimisation (paper Section 3.3): Nesterov SGD in Lookahead (k=5, alpha=0.5), a 10-epoch warm-up
then OneCycleLR, EMA decay 0.999.  The reference code's OneCycleLR overrode its warm-up: schedules
"as_run" and "as_written" (README, discrepancies)."""

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


class Lookahead(torch.optim.Optimizer):
    """Lookahead (Zhang et al. 2019, Algorithm 1): every ``k`` base steps slow += alpha * (fast - slow) and
    the fast weights restart there; ``param_groups``/``state`` are the base's, so schedulers drive it."""

    def __init__(self, base_optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidSetting(f"Lookahead k must be an integer >= 1 (steps between syncs), got {k!r}")
        if not 0.0 < float(alpha) <= 1.0:
            raise InvalidSetting(f"Lookahead alpha must satisfy 0 < alpha <= 1, got {alpha!r}")
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
        # Per tensor slow.add_(fast - slow, alpha=alpha); foreach: a few launches whatever the depth.
        torch._foreach_add_(self.slow, torch._foreach_sub(params, self.slow), alpha=self.alpha)
        torch._foreach_copy_(params, self.slow)     # fast restarts from the slow weights

    def step(self, closure=None):
        loss = self.base.step(closure)
        self.step_count += 1
        if self.step_count % self.k == 0:
            self._sync()
        return loss

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


def build_optimizer(model: torch.nn.Module, lr: float = 0.1, momentum: float = 0.9, nesterov: bool = True,
                    weight_decay: float = 5e-4, lookahead_k: int = 5, lookahead_alpha: float = 0.5):
    """Nesterov SGD (decay on every parameter, as the reference) in Lookahead; lookahead_k=0: plain SGD."""
    sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    return sgd if lookahead_k == 0 else Lookahead(sgd, k=lookahead_k, alpha=lookahead_alpha)


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, epochs: int, steps_per_epoch: int, max_lr: float = 0.1,
                    warmup_epochs: int = 10, warmup_start_lr: float = 0.001, pct_start: float = 0.4):
    """The per-step LR schedule: "as_run" plain OneCycleLR (what the reference ran), "as_written" a linear
    warm-up to max_lr over ``warmup_epochs``, then OneCycleLR.  Build it before loading an optimizer state."""
    for group in optimizer.param_groups:          # a fresh schedule: base lr = max_lr
        group["lr"] = max_lr
        group.pop("initial_lr", None)
    warmup_steps = warmup_epochs * steps_per_epoch if kind == "as_written" else 0
    one_cycle = dict(max_lr=max_lr, total_steps=epochs * steps_per_epoch - warmup_steps, pct_start=float(pct_start))
    if warmup_steps == 0:
        return OneCycleLR(optimizer, **one_cycle)
    momenta = [group.get("momentum") for group in optimizer.param_groups]
    warmup = LinearLR(optimizer, start_factor=warmup_start_lr / max_lr, end_factor=1.0, total_iters=warmup_steps)
    schedule = SequentialLR(optimizer, [warmup, OneCycleLR(optimizer, **one_cycle)], milestones=[warmup_steps])
    # OneCycleLR set initial_lr to max_lr/25 and SequentialLR reset lr to it, which would scale
    # the warm-up by 1/25; LinearLR multiplies the current lr, so restoring its start fixes it.
    for group, momentum in zip(optimizer.param_groups, momenta):
        group["lr"] = warmup_start_lr
        if momentum is not None:                  # OneCycleLR set 0.95 at construction
            group["momentum"] = momentum
    warmup._last_lr = schedule._last_lr = [group["lr"] for group in optimizer.param_groups]
    return schedule


def schedule_curves(kind: str, epochs: int, steps_per_epoch: int, **kwargs):
    """(lr, momentum) numpy arrays, one value per optimizer step, for plotting a schedule."""
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


class EMA(torch.nn.Module):
    """EMA of the weights and buffers (Section 3.3): e_1 = w_1, then e = d*e + (1-d)*w, as torch's
    AveragedModel(use_buffers=True, get_ema_multi_avg_fn(d)) bit for bit, with a host step count."""

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
            if ints:     # all integer buffers at once: a few launches, not a few per buffer
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
        """Overwrite `model`'s float parameters and buffers with the EMA's (``ema_reset="epoch"``)."""
        for e, w in self._pairs(model):
            if w.is_floating_point():
                w.copy_(e)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict, assign)
        self.updates = int(self.n_averaged)
        return result

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
