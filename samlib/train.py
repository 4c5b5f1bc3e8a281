"""The training loop (paper Section 3.3), one readable path in the airbench manner.

The training set sits on the device as uint8.  Each epoch: one permutation, crop/flip/Cutout
over the epoch in a few large chunks, then per step MixUp, forward and backward under
autocast, gradient clipping, Lookahead-SGD, the per-step LR schedule, the EMA.  Then
evaluation, selection and an atomic checkpoint to continue bit for bit.  Metrics stay on
the device until the epoch ends (no host sync mid-epoch).  Bookkeeping: samlib.rundir.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import data as D
from . import dist
from .augment import TrainTransform, mix_batch, one_hot, to_pixels
from .config import Config
from .device import autocast, precision_for, resolve_device, runs_natively
from .errors import SamlibError
from .infer import predict_logits
from .model import build_model
from .optim import build_ema, build_optimizer, build_scheduler
from .progress import progress_bar
from .rundir import RunDir, check_arch, describe_data, load_model, provenance
from .selection import BestCheckpoints

AUGMENT_CHUNK = 8192   # images per crop/flip/Cutout call: big enough to amortise per-op cost


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
        # The paper's "train acc": the target mass on the predicted class, i.e. lam * [pred ==
        # y_a] + (1 - lam) * [pred == y_b] on mixed batches (Table 1's 67% is this number).
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
        self.model = build_model(se=cfg.se, se_placement=cfg.se_placement, widths=cfg.widths,
                                 blocks=cfg.blocks, norm_std=cfg.norm_std).to(device)
        if device.type == "cuda" and cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = build_ema(self.model, cfg.ema_decay) if cfg.ema else None
        self._place_data(splits)
        self.net = dist.wrap(self.model, device)
        if cfg.compile:   # optional: the first epoch then includes compilation
            self.net = torch.compile(self.net)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.momentum, cfg.nesterov,
                                         cfg.weight_decay, cfg.lookahead_k, cfg.lookahead_alpha)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.epochs, self.steps_per_epoch,
                                         max_lr=cfg.lr, warmup_epochs=cfg.warmup_epochs,
                                         pct_start=cfg.pct_start)
        self._use_precision(precision_for(cfg.amp, device))
        # Per-sample draws on the device, per-batch scalars (MixUp's lambda, CutMix's box) on
        # the host, so no step waits on the GPU.  Same seeds on every rank: same batches.
        self.gen_aug = torch.Generator(device).manual_seed(cfg.seed)
        self.gen_host = torch.Generator().manual_seed(cfg.seed + 1)
        self.epoch, self.metrics = 0, []
        self.best = BestCheckpoints(cfg.selection, cfg.ema)

    def _place_data(self, splits: dict) -> None:
        """uint8 images on the device, the train transform's padded store, the evaluation sets."""
        cfg, device = self.cfg, self.device
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

    # -- checkpoint state
    def state_dict(self) -> dict:
        return {"arch": self.model.arch, "config": self.cfg.to_dict(), "epoch": self.epoch,
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "precision": self.precision,
                "rng": {"aug": self.gen_aug.get_state(), "host": self.gen_host.get_state()},
                "metrics": self.metrics, "best": self.best.state}

    def _use_precision(self, precision: str) -> None:
        """"fp32", "bf16" or "fp16" (recorded in checkpoints, never switched mid-run; training and
        the per-epoch evaluation both use it) and, for fp16 only, the loss scaler."""
        self.precision = precision
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

    def load_state_dict(self, ckpt: dict) -> None:
        """Continue from a checkpoint read on the CPU (load_state_dict moves each part to its
        device; generator states must stay CPU ByteTensors, whatever device trains)."""
        check_arch(ckpt, self.model.arch)
        saved = ckpt.get("precision", self.precision)      # absent in checkpoints before it was kept
        if saved != self.precision:
            # A run keeps the precision it started in.  amp="auto" picked it on the first device;
            # another device continues in it when it computes it natively (fp32 everywhere: a
            # run started on a CPU without bf16 resumes in fp32 on one with bf16).
            if self.cfg.amp != "auto" or not runs_natively(saved, self.device):
                raise SamlibError(
                    f"{ckpt.get('_path', 'this checkpoint')} was trained in {saved}, but this device would "
                    f"continue in {self.precision} ({saved} is not native here): a run must not switch "
                    f"precision half-way. Resume it on a device with native {saved}, or start it again "
                    "(another --out folder).")
            self._use_precision(saved)
        aug = ckpt["rng"]["aug"].cpu()
        if aug.numel() != self.gen_aug.get_state().numel():   # a CUDA (Philox) vs CPU (Mersenne) stream
            raise SamlibError(
                f"{ckpt.get('_path', 'this checkpoint')} holds the random stream of another kind of device "
                f"than {self.device.type} ({aug.numel()} bytes, this device's has {self.gen_aug.get_state().numel()}): "
                "a run continues only on the kind of device it started on. Resume it there, or start "
                "it again (another --out folder).")
        self.model.load_state_dict(ckpt["model"])
        if self.ema:
            self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.scaler.is_enabled():                       # fp16 only; bf16/fp32 have no scaler state
            self.scaler.load_state_dict(ckpt["scaler"])
        self.gen_aug.set_state(aug)
        self.gen_host.set_state(ckpt["rng"]["host"].cpu())
        self.epoch, self.metrics = ckpt["epoch"], ckpt["metrics"]
        self.best = BestCheckpoints(self.cfg.selection, self.cfg.ema, state=ckpt["best"])

    # -- the data of one epoch
    def epoch_batches(self, alpha: float):
        """This epoch's training batches: (x float pixel-space, y soft targets).

        airbench-style: one permutation of the device-resident uint8 data, crop/flip/Cutout
        over the whole epoch in a few large uint8 chunks (per-op overhead paid per chunk,
        not per batch), then per batch a float conversion and MixUp.  Every rank draws the
        same numbers, so every rank builds the same global batches and keeps its slice.
        """
        bs, dev = self.cfg.batch_size, self.device
        order = torch.randperm(len(self.train_y), generator=self.gen_aug, device=dev)[:self.steps_per_epoch * bs]
        x_epoch = torch.cat([self.transform(chunk, self.gen_aug) for chunk in order.split(AUGMENT_CHUNK)])
        y_epoch = one_hot(self.train_y[order], 10)
        rank, world = dist.rank(), dist.world_size()
        for step in range(self.steps_per_epoch):
            batch = slice(step * bs, (step + 1) * bs)
            # lambda and CutMix's box come from the host generator: no sync per step.
            x, y = mix_batch(to_pixels(x_epoch[batch]), y_epoch[batch], self.cfg.mix, alpha, self.gen_aug,
                             host_generator=self.gen_host, inplace=True)
            if world > 1:
                x, y = x.chunk(world)[rank], y.chunk(world)[rank]
            yield x, y

    # -- one optimiser step on a mixed batch
    def train_step(self, x: torch.Tensor, y: torch.Tensor):
        """Forward, backward, clip, (Lookahead-)SGD, LR schedule, EMA.  Returns (loss, logits, skipped),
        detached; `skipped` (fp16 only, else None): on the device, whether the scaler skipped the step."""
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
        self.scaler.step(self.optimizer)             # skips the step on fp16 overflow
        scale = self.scaler._scale.clone() if self.scaler.is_enabled() else None   # stays on the device
        self.scaler.update()                         # after a skipped step it backs the scale off
        skipped = None if scale is None else self.scaler._scale < scale
        self.scheduler.step()                        # the LR schedules are per step
        if self.ema:
            self.ema.update_parameters(self.model)   # EMA every step, BN buffers included
        return loss.detach(), logits.detach(), skipped

    # -- one epoch
    def train_epoch(self, progress: bool = False) -> dict:
        self.net.train()
        alpha = mix_alpha_at(self.cfg, self.epoch)
        meter = EpochMeter(self.steps_per_epoch, self.device)
        with progress_bar(self.epoch_batches(alpha), total=self.steps_per_epoch, disable=not progress,
                          desc=f"epoch {self.epoch + 1}/{self.cfg.epochs}") as batches:
            for step, (x, y) in enumerate(batches):  # permute, crop/flip/Cutout, MixUp
                loss, logits, skipped = self.train_step(x, y)   # forward/backward, clip, step, LR, EMA
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
        """fp16's GradScaler skips overflowing steps by design (skipped_steps), but an epoch of only
        skipped steps trained nothing; without a scaler a NaN/inf loss has spoiled the weights.
        Either way: stop, keep the last checkpoint."""
        if self.scaler.is_enabled() and row.get("skipped_steps", 0) >= self.steps_per_epoch:
            raise NonFiniteLossError(
                f"every step of epoch {row['epoch']} overflowed in fp16: the loss scaler skipped all {self.steps_per_epoch}"
                f" steps (loss scale now {self.scaler.get_scale():g}); nothing of this epoch was saved. Last good "
                f"checkpoint: {last_good or 'none (first epoch)'}. Lower the learning rate (--set lr=...) "
                "or train in fp32 (--set amp=off), then rerun to resume.")
        if row["nonfinite_steps"] and not self.scaler.is_enabled():
            raise NonFiniteLossError(
                f"loss became non-finite at epoch {row['epoch']}, step {row['first_nonfinite_step']} "
                f"({row['nonfinite_steps']} of {self.steps_per_epoch} steps); nothing of this epoch "
                f"was saved. Last good checkpoint: {last_good or 'none (first epoch)'}. "
                "Lower the learning rate (--set lr=...) or check the data, then rerun to resume.")

    def final_test(self, run: RunDir, progress: bool = False) -> dict:
        """Full-test-set accuracy of the selected checkpoints (what Table 1 reports)."""
        test_x, test_y = self.eval_sets["test"]
        kinds = [k for k in ("regular", "ema") if (run / f"best_{k}.pt").exists()]
        last = self.metrics[-1]
        final = {"epochs": self.epoch, "best": self.best.state, "train_acc_mixed": last["train_acc_mixed"],
                 "train_acc_clean": last["train_acc_clean"], "test_size": len(test_y)}
        with progress_bar(total=len(kinds) * len(test_y), desc="test of the selected checkpoints",
                          disable=not progress) as bar:
            for kind in kinds:
                model = load_model(run / f"best_{kind}.pt", self.device, expect_arch=self.model.arch)
                final[f"test_acc_{kind}"] = accuracy_of(model, test_x, test_y, self.cfg.eval_batch_size,
                                                        self.precision, bar)
        return final


def train(cfg: Config, data_dir=None, dataset: D.CIFAR10 | None = None, out="runs", device=None,
          profile: str | None = None, progress: bool = True, stop_after: int | None = None,
          wait: bool = False, later_seconds: float = 0.0):
    """Train `cfg` (or reuse / resume its run) and return the run directory's path.

    data_dir: parent of cifar-10-batches-py; or pass `dataset` directly (tests, synthetic).
    wait: when another process is training the same run, wait for it instead of refusing.
    later_seconds: the estimated time of the runs queued after this one (for the progress line).
    stop_after: end the process's work after this many epochs of *this call* (to test resume).
    """
    t0 = time.time()
    device = dist.setup(resolve_device(device))
    try:                                         # the process group is left however this ends
        run = RunDir.for_config(cfg, out)
        if dataset is None:
            if data_dir is None:
                raise SamlibError("give data_dir (the folder holding cifar-10-batches-py) or a dataset")
            dataset = D.load_cifar10(data_dir)
        data_id = D.fingerprint(dataset)
        run.check_data(data_id)
        with run.lock(wait=wait):                    # one writer per run directory
            if run.finished:                         # (perhaps finished while we waited)
                if dist.is_main():
                    print(f"reusing finished run {run.path}")
                return run.path
            if device.type == "cuda":
                torch.cuda.set_device(device)        # so device queries (bf16 support, name) read this GPU
                torch.backends.cudnn.benchmark = True
            trainer = Trainer(cfg, D.split_data(cfg, dataset), device)
            run.start(cfg, profile, data_id)
            state = run.resume_state("cpu", cfg)     # this run's; parts move to their devices as they load
            if state is not None:
                trainer.load_state_dict(state)
                if dist.is_main():
                    print(f"resuming {run.path} after epoch {trainer.epoch} (in {trainer.precision})")
            if dist.is_main():
                print(f"run directory: {run.path}")
            if fit(trainer, run, progress and dist.is_main(), stop_after, later_seconds):
                dist.barrier()
                if dist.is_main():
                    run.finish(trainer.final_test(run, progress), {
                        **provenance(device, describe_data(dataset, data_dir, data_id)), "seed": cfg.seed,
                        "precision": trainer.precision,
                        "profile": profile, "wall_seconds": round(time.time() - t0, 1),
                        "train_seconds": round(sum(r["seconds"] for r in trainer.metrics), 1)})
                dist.barrier()
        return run.path
    finally:
        dist.teardown()


def fit(trainer: Trainer, run: RunDir, progress: bool, stop_after: int | None = None,
        later_seconds: float = 0.0) -> bool:
    """The epoch loop: train, evaluate, select, checkpoint.  True when all epochs are done.

    progress: a step bar within each epoch and one line per epoch with the time left for the
    run, and for the whole plan when `later_seconds` (the estimate of the runs after this
    one) is given.
    """
    cfg = trainer.cfg
    for done_here, epoch in enumerate(range(trainer.epoch, cfg.epochs), start=1):
        t_epoch = time.time()
        row = {"epoch": epoch + 1, **trainer.train_epoch(progress)}   # data, mix, steps, EMA
        trainer.check_finite(row, last_good=epoch and run / "last.pt")
        row.update(trainer.evaluate(), lr=trainer.optimizer.param_groups[0]["lr"],
                   seconds=round(time.time() - t_epoch, 3))
        trainer.epoch = epoch + 1
        trainer.metrics.append(row)
        save_reg, save_ema = trainer.best.update(row, epoch + 1)      # select
        best_models = {"regular": trainer.model} if save_reg else {}
        if save_ema:
            best_models["ema"] = trainer.ema.module
        run.save_epoch(trainer.state_dict(), trainer.metrics, best_models)   # checkpoint
        if progress:
            print(epoch_line(trainer, later_seconds), flush=True)
        if stop_after is not None and done_here >= stop_after:
            break
    return trainer.epoch == cfg.epochs


def epoch_line(trainer: Trainer, later_seconds: float = 0.0) -> str:
    """`final seed 84: epoch 3/8  loss 1.912  val 41.2% (EMA 40.1%)  24.1 s/epoch  left ...`."""
    cfg, row = trainer.cfg, trainer.metrics[-1]
    per_epoch = sum(r["seconds"] for r in trainer.metrics[-3:]) / len(trainer.metrics[-3:])
    run_left = per_epoch * (cfg.epochs - trainer.epoch)
    ema = f" (EMA {100 * row['val_acc_ema']:.1f}%)" if "val_acc_ema" in row else ""
    plan = f", plan {format_duration(run_left + later_seconds)}" if later_seconds else ""
    return (f"{cfg.name} seed {cfg.seed}: epoch {trainer.epoch}/{cfg.epochs}  loss {row['train_loss']:.3f}  "
            f"val {100 * row['val_acc']:.1f}%{ema}  {row['seconds']:.1f} s/epoch  "
            f"left: run {format_duration(run_left)}{plan}")


def format_duration(seconds: float) -> str:
    """7 h 01 min, 1 min 01 s, 59 s."""
    if not math.isfinite(seconds):               # (an estimate that could not be made)
        return "?"
    h, rest = divmod(int(round(seconds)), 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"
