"""The training loop (paper Section 3.3), in the airbench manner: uint8 data on the device, per epoch one
permutation and crop/flip/Cutout, per step MixUp/CutMix, clipped Lookahead-SGD, LR schedule and EMA."""
import reprlib

import numpy as np
import torch
import torch.nn.functional as F

from . import dist
from .augment import TrainTransform, mix_batch, one_hot, to_pixels
from .config import Config
from .device import autocast, precision_for, runs_natively
from .errors import CheckpointError, SamlibError
from .infer import predict_logits
from .model import build_model
from .optim import EMA, build_optimizer, build_scheduler
from .progress import progress_bar
from .selection import BestCheckpoints

AUGMENT_CHUNK = 8192   # images per crop/flip/Cutout call: big enough to amortise per-op cost
RNG_SIZES = (16, len(torch.Generator().get_state()))   # a CUDA (Philox) and a CPU (Mersenne) state


class NonFiniteLossError(SamlibError):
    """The loss became NaN/inf without a scaler to skip the step, or the scaler skipped a whole epoch."""


def to_device(images: np.ndarray, labels: np.ndarray, device) -> tuple:
    """uint8 NHWC numpy -> uint8 NCHW tensor on `device` (4x smaller than float)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    return x.to(device), torch.from_numpy(labels).to(device)


def accuracy_of(model, images, labels, batch_size, precision=None, bar=None) -> float:
    if len(labels) == 0:                         # (a split of zero images)
        return float("nan")
    logits = predict_logits(model, images, batch_size=batch_size, precision=precision, bar=bar)[0]
    return (logits.argmax(1) == labels.cpu()).float().mean().item()


def mix_alpha_at(cfg: Config, epoch: int) -> float:
    """The reference code ramps MixUp's alpha: 0.15, 0.225, then 0.3 from epoch 100 of 200."""
    if cfg.mix == "none" or not cfg.alpha_ramp:
        return 0.0 if cfg.mix == "none" else cfg.mix_alpha
    progress = epoch / cfg.epochs
    return cfg.mix_alpha * (0.5 if progress < 0.25 else 0.75 if progress < 0.5 else 1.0)


def fits(where, field: str, load, *args):
    """load(*args); what torch raises on a state that does not fit is a CheckpointError naming `field`."""
    try:
        return load(*args)
    except Exception as e:
        detail = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        raise CheckpointError(f"{where}: field '{field}' does not fit this run ({detail})") from None


class EpochMeter:
    """One epoch's loss, lambda-weighted accuracy, non-finite losses and skipped steps, on the device."""

    def __init__(self, steps: int, device):
        self.loss = torch.zeros((), device=device)
        self.mixed_correct = torch.zeros((), device=device)
        self.finite = torch.ones(steps, device=device, dtype=torch.bool)
        self.skipped = torch.zeros(steps, device=device, dtype=torch.bool)

    def add(self, step: int, loss, logits, targets, skipped=None) -> None:
        self.finite[step] = torch.isfinite(loss)
        if skipped is not None:
            self.skipped[step] = skipped
        self.loss += torch.nan_to_num(loss) * len(targets)
        # The paper's "train acc" (Table 1): the target mass on the predicted class.
        self.mixed_correct += targets.gather(1, logits.argmax(1, keepdim=True)).sum()

    def result(self, images: int) -> dict:
        """Means over `images`, summed over data-parallel ranks: one host read per epoch."""
        bad = (~self.finite).float()
        totals = dist.all_reduce_sum(torch.cat([torch.stack([self.loss, self.mixed_correct,
                                                             self.skipped.sum().float()]), bad])).cpu()
        bad_steps = torch.nonzero(totals[3:]).flatten().tolist()
        return {"train_loss": totals[0].item() / images, "train_acc_mixed": totals[1].item() / images,
                "nonfinite_steps": len(bad_steps), "skipped_steps": round(totals[2].item() / dist.world_size()),
                "first_nonfinite_step": bad_steps[0] + 1 if bad_steps else None}


class Trainer:
    """One run's state: model and EMA, data on the device, optimiser, RNGs, metrics, bests."""

    def __init__(self, cfg: Config, splits: dict, device: torch.device):
        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.seed)                       # weight init
        self.model = build_model(cfg).to(device)
        if device.type == "cuda" and cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = EMA(self.model, cfg.ema_decay) if cfg.ema else None
        # uint8 images on the device, the train transform's padded store, the evaluation sets.
        self.train_x, self.train_y = to_device(*splits["train"], device)
        self.transform = TrainTransform(self.train_x, cfg.crop_padding, cfg.flip, cfg.cutout)
        self.eval_sets = {name: to_device(*splits[name], device) for name in ("val", "test")}
        g = torch.Generator().manual_seed(cfg.split_seed)   # fixed clean-train-accuracy subset
        idx = torch.randperm(len(self.train_y), generator=g)[:min(cfg.train_eval_size, len(self.train_y))]
        self.eval_sets["train"] = (self.train_x[idx.to(device)], self.train_y[idx.to(device)])
        if cfg.test_eval_size:
            x, y = self.eval_sets["test"]
            self.eval_sets["test_curve"] = (x[:cfg.test_eval_size], y[:cfg.test_eval_size])
        world = dist.world_size()
        if cfg.batch_size % world:       # every rank must train on an equal slice of each batch
            raise SamlibError(f"batch_size {cfg.batch_size} does not split evenly over {world} processes; "
                              f"use a multiple of {world} (--set batch_size=...)")
        self.steps_per_epoch = len(self.train_y) // cfg.batch_size   # drop the ragged last batch
        if self.steps_per_epoch == 0:
            raise SamlibError(f"batch_size {cfg.batch_size} exceeds the {len(self.train_y)} training "
                              "images; lower batch_size or use more data")
        self.net = dist.wrap(self.model, device)
        if cfg.compile:   # optional: the first epoch then includes compilation
            self.net = torch.compile(self.net)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.momentum, cfg.nesterov,
                                         cfg.weight_decay, cfg.lookahead_k, cfg.lookahead_alpha)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.epochs, self.steps_per_epoch,
                                         max_lr=cfg.lr, warmup_epochs=cfg.warmup_epochs,
                                         pct_start=cfg.pct_start)
        self.precision = precision_for(cfg.amp, device)           # "fp32", "bf16" or "fp16"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        # Per-sample draws on the device, per-batch scalars (MixUp's lambda, CutMix's box) on the host.
        self.gen_aug = torch.Generator(device).manual_seed(cfg.seed)
        self.gen_host = torch.Generator().manual_seed(cfg.seed + 1)
        self.epoch, self.metrics = 0, []
        self.best = BestCheckpoints(cfg.selection, cfg.ema)

    # -- checkpoint state
    def state_dict(self) -> dict:
        return {"arch": self.model.arch, "config": self.cfg.to_dict(), "epoch": self.epoch,
                "model": self.model.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "precision": self.precision,
                "rng": {"aug": self.gen_aug.get_state(), "host": self.gen_host.get_state()},
                "metrics": self.metrics, "best": self.best.state}

    def load_state_dict(self, ckpt: dict) -> None:
        """Continue from `ckpt` (read on the CPU); samlib.run.load_resume_state checks it first."""
        where, saved = ckpt.get("_path", "this checkpoint"), ckpt.get("precision", self.precision)
        if saved != self.precision:   # amp="auto" picked it on the first device: keep it where it is native
            if self.cfg.amp != "auto" or not runs_natively(saved, self.device):
                raise SamlibError(
                    f"{where} was trained in {saved}, but this device would continue in {self.precision} "
                    f"({saved} is not native here): a run must not switch precision half-way. Resume it on a "
                    f"device with native {saved}, or start it again (another --out folder).")
            self.precision = saved
            self.scaler = torch.amp.GradScaler("cuda", enabled=saved == "fp16")
        for name, generator in (("aug", self.gen_aug), ("host", self.gen_host)):   # they stay CPU ByteTensors
            state = ckpt["rng"].get(name) if isinstance(ckpt["rng"], dict) else None
            size, own = state.numel() if isinstance(state, torch.Tensor) else None, generator.get_state().numel()
            if name == "aug" and size in RNG_SIZES and size != own:
                raise SamlibError(
                    f"{where} holds the random stream of another kind of device than {self.device.type} "
                    f"({size} bytes, this device's has {own}): a run continues only on the kind of device it "
                    "started on. Resume it there, or start it again (another --out folder).")
            try:
                generator.set_state(state.cpu())
            except Exception:
                got = f"{size} bytes" if size is not None else reprlib.repr(state)
                raise CheckpointError(f"{where}: field 'rng' entry {name!r} ({got}) is not a valid "
                                      "generator state") from None
        parts = {"model": self.model, "ema": self.ema, "optimizer": self.optimizer, "scheduler": self.scheduler,
                 "scaler": self.scaler if self.scaler.is_enabled() else None}   # fp16 only has scaler state
        for field, part in parts.items():
            if part is not None:
                fits(where, field, part.load_state_dict, ckpt[field])
        self.epoch, self.metrics = ckpt["epoch"], ckpt["metrics"]
        self.best = BestCheckpoints(self.cfg.selection, self.cfg.ema, state=ckpt["best"])

    # -- one epoch
    def epoch_batches(self, alpha: float):
        """This epoch's (pixels, soft targets); every rank builds the same global batch and keeps its slice."""
        bs, dev = self.cfg.batch_size, self.device
        order = torch.randperm(len(self.train_y), generator=self.gen_aug, device=dev)[:self.steps_per_epoch * bs]
        x_epoch = torch.cat([self.transform(chunk, self.gen_aug) for chunk in order.split(AUGMENT_CHUNK)])
        y_epoch = one_hot(self.train_y[order], 10)
        rank, world = dist.rank(), dist.world_size()
        for step in range(self.steps_per_epoch):
            batch = slice(step * bs, (step + 1) * bs)
            x, y = mix_batch(to_pixels(x_epoch[batch]), y_epoch[batch], self.cfg.mix, alpha, self.gen_aug,
                             host_generator=self.gen_host, inplace=True)
            if world > 1:
                x, y = x.chunk(world)[rank], y.chunk(world)[rank]
            yield x, y

    def train_step(self, x: torch.Tensor, y: torch.Tensor):
        """Forward, backward, clip, Lookahead-SGD, LR schedule, EMA; (loss, logits, skipped by fp16's scaler)."""
        if self.device.type == "cuda" and self.cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            logits = self.net(x)
        loss = F.cross_entropy(logits.float(), y)   # soft targets: lam*CE(y_a) + (1-lam)*CE(y_b)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip:                       # paper: clip the gradient norm at 1.0
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)             # Lookahead-SGD; skipped on fp16 overflow
        scale = self.scaler._scale.clone() if self.scaler.is_enabled() else None   # stays on the device
        self.scaler.update()
        skipped = None if scale is None else self.scaler._scale < scale
        self.scheduler.step()                        # LR schedule, per step
        if self.ema:
            self.ema.update_parameters(self.model)   # EMA every step, BN buffers included
        return loss.detach(), logits.detach(), skipped

    def train_epoch(self, progress: bool = False) -> dict:
        self.net.train()
        alpha = mix_alpha_at(self.cfg, self.epoch)
        meter = EpochMeter(self.steps_per_epoch, self.device)
        with progress_bar(self.epoch_batches(alpha), total=self.steps_per_epoch, disable=not progress,
                          desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}") as batches:
            for step, (x, y) in enumerate(batches):
                loss, logits, skipped = self.train_step(x, y)
                meter.add(step, loss, logits, y, skipped)
        if self.cfg.ema_reset == "epoch":            # the authors' apply()/restore() bug: go on
            self.ema.copy_to(self.model)             # from the EMA (optimizer state untouched)
        return {**meter.result(self.steps_per_epoch * self.cfg.batch_size), "mix_alpha": alpha}

    def evaluate(self) -> dict:
        """Clean train, validation and (per-epoch subset of) test accuracy, regular and EMA."""
        bs, amp = self.cfg.eval_batch_size, self.precision
        test = self.eval_sets.get("test_curve", self.eval_sets["test"])
        out = {"train_acc_clean": accuracy_of(self.model, *self.eval_sets["train"], bs, amp),
               "val_acc": accuracy_of(self.model, *self.eval_sets["val"], bs, amp),
               "test_acc": accuracy_of(self.model, *test, bs, amp)}
        if self.ema:
            out["val_acc_ema"] = accuracy_of(self.ema.module, *self.eval_sets["val"], bs, amp)
            out["test_acc_ema"] = accuracy_of(self.ema.module, *test, bs, amp)
        return out

    def check_finite(self, row: dict, last_good) -> None:
        """Stop when fp16's scaler skipped every step of the epoch or, without one, a loss was NaN/inf."""
        epoch, steps = row["epoch"], self.steps_per_epoch
        if self.scaler.is_enabled() and row.get("skipped_steps", 0) >= steps:
            what = (f"every step of epoch {epoch} overflowed in fp16: the loss scaler skipped all {steps} steps "
                    f"(loss scale now {self.scaler.get_scale():g})")
            fix = "train in fp32 (--set amp=off)"
        elif row["nonfinite_steps"] and not self.scaler.is_enabled():
            what = (f"loss became non-finite at epoch {epoch}, step {row['first_nonfinite_step']} "
                    f"({row['nonfinite_steps']} of {steps} steps)")
            fix = "check the data"
        else:
            return
        raise NonFiniteLossError(f"{what}; nothing of this epoch was saved. Last good checkpoint: "
                                 f"{last_good or 'none (first epoch)'}. Lower the learning rate (--set lr=...) "
                                 f"or {fix}, then rerun to resume.")
