"""The training loop (paper Section 3.3), one readable path in the airbench manner.

The whole data set sits on the training device as uint8; each epoch is permuted and
augmented there in a few large chunks (crop, flip, Cutout: samlib.augment), each step
takes its batch, mixes it (MixUp) and runs forward/backward under autocast.  Metrics accumulate on the device and are read once per epoch, so the
GPU never waits on the host mid-epoch.  Every epoch ends with an atomic checkpoint that
holds everything needed to continue the run bit for bit: weights, EMA, optimiser
(Lookahead slow weights included), scheduler, scaler, both RNG states and the metrics.

Run directories are named `<config>-s<seed>-<hash>`: a finished run (final.json present)
is returned as is, an unfinished one resumes from its last checkpoint, and a run trained
on other data (run.json's data fingerprint) is refused, never reused.
"""
from __future__ import annotations

import csv
import io
import platform
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data as D
from .augment import TrainTransform, mix_batch, one_hot, to_pixels
from .config import Config
from .errors import CheckpointError, SamlibError
from .infer import predict_logits
from .io import atomic_write_text, load_checkpoint, read_json, save_checkpoint, write_json
from .model import build_model
from .optim import build_ema, build_optimizer, build_scheduler
from . import dist

AUGMENT_CHUNK = 8192   # images per crop/flip/Cutout call: big enough to amortise per-op cost

METRIC_FIELDS = ("epoch", "lr", "mix_alpha", "train_loss", "train_acc_mixed", "train_acc_clean",
                 "val_acc", "val_acc_ema", "test_acc", "test_acc_ema", "nonfinite_steps", "seconds")


class NonFiniteLossError(SamlibError):
    """The loss became NaN/inf and no AMP scaler was there to skip the step."""


# ---------------------------------------------------------------- data on the device

def split_data(cfg: Config, dataset: D.CIFAR10) -> dict:
    """Profile subset, then the stratified validation split: {split: (images NHWC, labels)}."""
    if cfg.train_subset or cfg.test_subset:
        dataset = D.subset(dataset, cfg.train_subset, cfg.test_subset, seed=cfg.split_seed)
    train_idx, val_idx = D.split_train_val(dataset.train_labels, cfg.val_size, cfg.split_seed)
    x, y = dataset.train_images, dataset.train_labels
    return {"train": (x[train_idx], y[train_idx]), "val": (x[val_idx], y[val_idx]),
            "test": (dataset.test_images, dataset.test_labels)}


def to_device(images: np.ndarray, labels: np.ndarray, device) -> tuple:
    """uint8 NHWC numpy -> uint8 NCHW tensor on `device` (4x smaller than float)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).contiguous()
    return x.to(device), torch.from_numpy(labels).to(device)


def accuracy_of(model, images, labels, batch_size) -> float:
    if len(labels) == 0:
        return float("nan")
    logits = predict_logits(model, images, batch_size=batch_size)[0]
    return (logits.argmax(1) == labels.cpu()).float().mean().item()


# ---------------------------------------------------------------- method pieces

def mix_alpha_at(cfg: Config, epoch: int) -> float:
    """The reference code ramps MixUp's alpha: 0.15, 0.225, then 0.3 from epoch 100 of 200."""
    if cfg.mix == "none":
        return 0.0
    if not cfg.alpha_ramp:
        return cfg.mix_alpha
    progress = epoch / cfg.epochs
    return cfg.mix_alpha * (0.5 if progress < 0.25 else 0.75 if progress < 0.5 else 1.0)


def amp_dtype_for(cfg: Config, device: torch.device):
    """bf16 where the GPU supports it (no scaler needed), fp16 + GradScaler otherwise; off on CPU."""
    if cfg.amp == "off" or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def resolve_device(device=None) -> torch.device:
    """`device` ("cpu", "cuda", "cuda:1"; default cuda when available) or a clear error."""
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError, ValueError):
        raise SamlibError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise SamlibError(f"device {device!r} asked for, but {torch.cuda.device_count()} CUDA GPU(s) "
                          "are visible; use --device cpu (or leave --device out)")
    return dev


def run_dir_for(cfg: Config, out) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.name)
    return Path(out) / f"{safe}-s{cfg.seed}-{cfg.hash()}"


# ---------------------------------------------------------------- provenance

def provenance(device: torch.device, data_source: str) -> dict:
    repo = Path(__file__).resolve().parent.parent

    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True,
                                  text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    import torchvision
    return {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "torch": torch.__version__, "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
        f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "data_source": data_source,
        "world_size": dist.world_size(),
    }


def describe_data(dataset: D.CIFAR10, data_dir, data_id: str) -> str:
    """Provenance's data source: the report's label, the folder and the data fingerprint."""
    where = f"{data_dir}; " if data_dir is not None else ""
    return f"{D.describe_source(dataset, data_dir)} ({where}fingerprint {data_id})"


# ---------------------------------------------------------------- the loop

class Trainer:
    """State of one run: model, EMA, optimiser, scheduler, RNGs, metrics, bests."""

    def __init__(self, cfg: Config, splits: dict, device: torch.device):
        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.seed)                       # weight init
        self.model = build_model(se=cfg.se, se_placement=cfg.se_placement, widths=cfg.widths,
                                 blocks=cfg.blocks, norm_std=cfg.norm_std).to(device)
        if device.type == "cuda" and cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # AveragedModel keeps its step counter `n_averaged` on the host (it is created on the
        # CPU and never moved), so its `n_averaged == 0` test costs no GPU sync per step.
        self.ema = build_ema(self.model, cfg.ema_decay) if cfg.ema else None
        self.train_x, self.train_y = to_device(*splits["train"], device)
        self.transform = TrainTransform(self.train_x, cfg.crop_padding, cfg.flip, cfg.cutout)
        self.eval_sets = {name: to_device(*splits[name], device) for name in ("val", "test")}
        g = torch.Generator().manual_seed(cfg.split_seed)   # fixed clean-train-accuracy subset
        k = min(cfg.train_eval_size, len(self.train_y))
        idx = torch.randperm(len(self.train_y), generator=g)[:k].to(device)
        self.eval_sets["train"] = (self.train_x[idx], self.train_y[idx])
        if cfg.test_eval_size:
            x, y = self.eval_sets["test"]
            self.eval_sets["test_curve"] = (x[:cfg.test_eval_size], y[:cfg.test_eval_size])
        self.global_batch = cfg.batch_size
        self.steps_per_epoch = len(self.train_y) // cfg.batch_size   # drop the ragged last batch
        if self.steps_per_epoch == 0:
            raise SamlibError(f"batch_size {cfg.batch_size} exceeds the {len(self.train_y)} training "
                              "images; lower batch_size or use more data")
        self.net = dist.wrap(self.model, device)
        if cfg.compile:   # optional: the first epoch then includes compilation (reported apart)
            self.net = torch.compile(self.net)
        self.optimizer = build_optimizer(self.model, cfg.lr, cfg.momentum, cfg.nesterov,
                                         cfg.weight_decay, cfg.lookahead_k, cfg.lookahead_alpha)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.epochs, self.steps_per_epoch,
                                         max_lr=cfg.lr, warmup_epochs=cfg.warmup_epochs,
                                         pct_start=cfg.pct_start)
        self.amp_dtype = amp_dtype_for(cfg, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        # Two generators: per-sample draws on the device, per-batch scalars (MixUp's lambda) on
        # the host, so no step waits on the GPU. Same seed on every rank: same batches everywhere.
        self.gen_aug = torch.Generator(device).manual_seed(cfg.seed)
        self.gen_host = torch.Generator().manual_seed(cfg.seed + 1)
        self.epoch = 0
        self.metrics: list[dict] = []
        self.best = {"regular": -1.0, "ema": -1.0, "regular_epoch": None, "ema_epoch": None}

    # -- checkpoint state
    def state_dict(self) -> dict:
        return {"arch": self.model.arch, "config": self.cfg.to_dict(), "epoch": self.epoch,
                "model": self.model.state_dict(),
                "ema": self.ema.state_dict() if self.ema else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": {"aug": self.gen_aug.get_state(), "host": self.gen_host.get_state()},
                "metrics": self.metrics, "best": self.best}

    def load_state_dict(self, ckpt: dict) -> None:
        check_arch(ckpt, self.model.arch)
        self.model.load_state_dict(ckpt["model"])
        if self.ema:
            self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.gen_aug.set_state(ckpt["rng"]["aug"])
        self.gen_host.set_state(ckpt["rng"]["host"])
        self.epoch, self.metrics, self.best = ckpt["epoch"], ckpt["metrics"], ckpt["best"]

    # -- one optimiser step on an already augmented batch
    def train_step(self, x: torch.Tensor, y: torch.Tensor):
        """Forward, backward, clip, (Lookahead-)SGD, LR schedule, EMA. Returns (loss, logits), detached."""
        cfg, dev = self.cfg, self.device
        if dev.type == "cuda" and cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            logits = self.net(x)
        loss = F.cross_entropy(logits.float(), y)   # = lam*CE(y_a) + (1-lam)*CE(y_b)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.grad_clip:                            # paper: clip the gradient norm at 1.0
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)             # skips the step on fp16 overflow
        self.scaler.update()
        self.scheduler.step()                        # the LR schedules are per step
        if self.ema:
            self.ema.update_parameters(self.model)   # EMA every step, BN buffers included
        return loss.detach(), logits.detach()

    # -- the data of one epoch
    def epoch_batches(self, alpha: float):
        """This epoch's augmented training batches: (x float pixel-space, y soft targets).

        airbench-style: one permutation of the device-resident uint8 data, crop/flip/Cutout
        over the whole epoch in a few large uint8 chunks (per-op overhead paid once per chunk,
        not per batch), then per batch a float conversion and MixUp.  Every rank draws the
        same numbers, so every rank builds the same global batches and keeps its slice.
        """
        cfg, dev = self.cfg, self.device
        n = self.steps_per_epoch * cfg.batch_size            # the ragged last batch is dropped
        order = torch.randperm(len(self.train_y), generator=self.gen_aug, device=dev)[:n]
        x_epoch = torch.cat([self.transform(chunk, self.gen_aug) for chunk in order.split(AUGMENT_CHUNK)])
        y_epoch = one_hot(self.train_y[order], 10)
        rank, world = dist.rank(), dist.world_size()
        for step in range(self.steps_per_epoch):
            batch = slice(step * cfg.batch_size, (step + 1) * cfg.batch_size)
            # lambda and CutMix's box come from the host generator: no sync per step.
            x, y = mix_batch(to_pixels(x_epoch[batch]), y_epoch[batch], cfg.mix, alpha, self.gen_aug,
                             host_generator=self.gen_host, inplace=True)
            if world > 1:
                x, y = x.chunk(world)[rank], y.chunk(world)[rank]
            yield x, y

    # -- one epoch
    def train_epoch(self, progress: bool) -> dict:
        cfg, dev = self.cfg, self.device
        self.net.train()
        alpha = mix_alpha_at(cfg, self.epoch)
        loss_sum = torch.zeros((), device=dev)
        mixed_correct = torch.zeros((), device=dev)
        finite = torch.ones(self.steps_per_epoch, device=dev, dtype=torch.bool)  # read once, at the end
        batches = self.epoch_batches(alpha)
        if progress:
            batches = tqdm(batches, total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                           leave=False)
        for step, (x, y) in enumerate(batches):
            loss, logits = self.train_step(x, y)
            finite[step] = torch.isfinite(loss)
            loss_sum += torch.nan_to_num(loss) * len(y)
            # The paper's "train acc": lambda-weighted accuracy on mixed batches = target mass
            # on the predicted class (67% in Table 1 is this number, not a clean accuracy).
            mixed_correct += y.gather(1, logits.argmax(1, keepdim=True)).sum()
        bad = (~finite).float()
        totals = dist.all_reduce_sum(torch.cat([torch.stack([loss_sum, mixed_correct]), bad]))
        n = self.steps_per_epoch * cfg.batch_size
        bad_steps = torch.nonzero(totals[2:]).flatten().tolist()
        return {"train_loss": totals[0].item() / n, "train_acc_mixed": totals[1].item() / n,
                "nonfinite_steps": len(bad_steps), "first_nonfinite_step": bad_steps[0] + 1 if bad_steps else None,
                "mix_alpha": alpha}

    def evaluate(self) -> dict:
        bs = self.cfg.eval_batch_size
        test = self.eval_sets.get("test_curve", self.eval_sets["test"])
        out = {"train_acc_clean": accuracy_of(self.model, *self.eval_sets["train"], bs),
               "val_acc": accuracy_of(self.model, *self.eval_sets["val"], bs),
               "test_acc": accuracy_of(self.model, *test, bs)}
        if self.ema:
            out["val_acc_ema"] = accuracy_of(self.ema.module, *self.eval_sets["val"], bs)
            out["test_acc_ema"] = accuracy_of(self.ema.module, *test, bs)
        return out


def check_arch(ckpt: dict, arch: dict) -> None:
    got = ckpt.get("arch")
    if got is not None and {k: list(v) if isinstance(v, tuple) else v for k, v in got.items()} != \
            {k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()}:
        raise CheckpointError(f"{ckpt.get('_path', 'checkpoint')} holds a model with architecture "
                              f"{got}, not the expected {arch}; it belongs to another config")


def load_model(path, device="cpu", expect_arch: dict | None = None) -> torch.nn.Module:
    """Rebuild a model from a samlib checkpoint (weights_only load; architecture checked)."""
    ckpt = load_checkpoint(path, map_location=device)
    if expect_arch is not None:
        check_arch(ckpt, expect_arch)
    model = build_model(**ckpt["arch"]).to(device)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt['_path']} does not fit its recorded architecture: "
                              f"{str(e).splitlines()[0]}") from None
    return model.eval()


def _select(cfg: Config, best: dict, row: dict, epoch: int) -> tuple[bool, bool]:
    """Which checkpoints to save this epoch: (regular, ema).

    "val": each model at its best validation accuracy.  "test" (as run): the EMA model when
    its test accuracy is the best so far; the regular one whenever its test accuracy is
    within 0.5 points of that best.
    """
    if cfg.selection == "val":
        reg = row["val_acc"] > best["regular"]
        ema = cfg.ema and row["val_acc_ema"] > best["ema"]
        if reg:
            best.update(regular=row["val_acc"], regular_epoch=epoch)
        if ema:
            best.update(ema=row["val_acc_ema"], ema_epoch=epoch)
        return reg, ema
    ema = cfg.ema and row["test_acc_ema"] > best["ema"]
    if ema:
        best.update(ema=row["test_acc_ema"], ema_epoch=epoch)
    reference = best["ema"] if cfg.ema else best["regular"]
    reg = row["test_acc"] >= reference - 0.005
    if reg:
        best.update(regular=max(best["regular"], row["test_acc"]), regular_epoch=epoch)
    return reg, ema


def _write_metrics(run_dir: Path, rows: list) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run_dir / "metrics.csv", buf.getvalue())


def train(cfg: Config, data_dir=None, dataset: D.CIFAR10 | None = None, out="runs",
          device=None, profile: str | None = None, progress: bool = True,
          stop_after: int | None = None) -> Path:
    """Train `cfg` (or reuse/resume its run) and return the run directory.

    data_dir: parent of cifar-10-batches-py; or pass `dataset` directly (tests, synthetic).
    stop_after: end the process's work after this many epochs of *this call* (to test resume).
    """
    t0 = time.time()
    device = dist.setup(resolve_device(device))
    run_dir = run_dir_for(cfg, out)
    if dataset is None:
        if data_dir is None:
            raise SamlibError("give data_dir (the folder holding cifar-10-batches-py) or a dataset")
        dataset = D.load_cifar10(data_dir)
    data_id = D.fingerprint(dataset)
    recorded = read_json(run_dir / "run.json") if (run_dir / "run.json").exists() else {}
    if recorded.get("data", data_id) != data_id:
        raise SamlibError(f"{run_dir} was trained on other data (fingerprint {recorded['data']}, "
                          f"this data {data_id}); use another --out folder for this data")
    if (run_dir / "final.json").exists():
        if dist.is_main():
            print(f"reusing finished run {run_dir}")
        return run_dir
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    splits = split_data(cfg, dataset)
    trainer = Trainer(cfg, splits, device)
    if dist.is_main():   # write_json makes run_dir, or says clearly why it cannot
        write_json(run_dir / "config.json", cfg.to_dict())
        write_json(run_dir / "run.json", {"profile": profile, "config": cfg.name, "seed": cfg.seed,
                                          "hash": cfg.hash(), "data": data_id})
    if (run_dir / "last.pt").exists() or (run_dir / "last.prev.pt").exists():
        try:
            ckpt = load_checkpoint(run_dir / "last.pt", map_location=device)
        except CheckpointError as e:
            raise CheckpointError(f"cannot resume {run_dir}: {e}; move that folder away (or delete "
                                  "it) to start the run again from scratch") from None
        trainer.load_state_dict(ckpt)
        if dist.is_main():
            print(f"resuming {run_dir} after epoch {trainer.epoch}")
    if dist.is_main():
        print(f"run directory: {run_dir}")
    epochs = range(trainer.epoch, cfg.epochs)
    bar = tqdm(epochs, desc=cfg.name, disable=not (progress and dist.is_main()))
    done_here = 0
    for epoch in bar:
        t_epoch = time.time()
        row = {"epoch": epoch + 1, **trainer.train_epoch(progress and dist.is_main())}
        if row["nonfinite_steps"] and not trainer.scaler.is_enabled():
            # fp16's GradScaler skips overflowing steps by design (counted in the metrics);
            # without it a NaN/inf loss has already spoiled the weights: stop, keep last.pt.
            raise NonFiniteLossError(
                f"loss became non-finite at epoch {epoch + 1}, step {row['first_nonfinite_step']} "
                f"({row['nonfinite_steps']} of {trainer.steps_per_epoch} steps); nothing of this epoch "
                f"was saved. Last good checkpoint: {run_dir / 'last.pt' if epoch else 'none (first epoch)'}. "
                "Lower the learning rate (--set lr=...) or check the data, then rerun to resume.")
        row.update(trainer.evaluate(), lr=trainer.optimizer.param_groups[0]["lr"],
                   seconds=round(time.time() - t_epoch, 3))
        trainer.epoch = epoch + 1
        trainer.metrics.append(row)
        save_reg, save_ema = _select(cfg, trainer.best, row, epoch + 1)
        if dist.is_main():
            if save_reg:
                save_checkpoint({"arch": trainer.model.arch, "model": trainer.model.state_dict(),
                                 "epoch": epoch + 1}, run_dir / "best_regular.pt", keep_previous=False)
            if save_ema:
                save_checkpoint({"arch": trainer.model.arch, "model": trainer.ema.module.state_dict(),
                                 "epoch": epoch + 1}, run_dir / "best_ema.pt", keep_previous=False)
            _write_metrics(run_dir, trainer.metrics)
            save_checkpoint(trainer.state_dict(), run_dir / "last.pt")
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{row['val_acc']:.3f}",
                        test=f"{row['test_acc']:.3f}")
        done_here += 1
        if stop_after is not None and done_here >= stop_after and trainer.epoch < cfg.epochs:
            return run_dir
    dist.barrier()
    if dist.is_main():
        final = finalize(run_dir, trainer, device)
        write_json(run_dir / "provenance.json", {
            **provenance(device, describe_data(dataset, data_dir, data_id)), "seed": cfg.seed, "profile": profile,
            "wall_seconds": round(time.time() - t0, 1),
            "train_seconds": round(sum(r["seconds"] for r in trainer.metrics), 1)})
        write_json(run_dir / "final.json", final)
    dist.barrier()
    return run_dir


def finalize(run_dir: Path, trainer: Trainer, device) -> dict:
    """Full-test-set accuracy of the selected checkpoints (what Table 1 reports)."""
    bs = trainer.cfg.eval_batch_size
    test_x, test_y = trainer.eval_sets["test"]
    last = trainer.metrics[-1]
    final = {"epochs": trainer.epoch, "best": trainer.best,
             "train_acc_mixed": last["train_acc_mixed"], "train_acc_clean": last["train_acc_clean"],
             "test_size": len(test_y)}
    for kind in ("regular", "ema"):
        path = run_dir / f"best_{kind}.pt"
        if path.exists():
            model = load_model(path, device, expect_arch=trainer.model.arch)
            final[f"test_acc_{kind}"] = accuracy_of(model, test_x, test_y, bs)
    return final
