"""Speed benchmark, `python benchmarks/bench.py --out X.json`: the paper's input pipeline against samlib's.

The paper's code (SAMResNet.py) augments each image on its own as a PIL image in DataLoader workers, then copies
batches to the GPU; samlib keeps the training set on the device as uint8 and augments whole batches there (as
airbench does).  Each comparison runs both sides in one process, on the same data and device:
  augment       crop, flip, to float, Cutout (+ Normalize on the naive side; samlib's model normalises inside).
  augment_mixup the same plus one_hot + MixUp on both sides: a training-ready batch.
  train_step    the same Trainer.train_step fed by either pipeline (the naive feed without Normalize).
  tta           predict_logits (all PAPER_TTA views in one forward per batch) vs predict_logits_sequential
                (one pass per view), and the model's forward alone, the ceiling for any TTA loop.
  amp_train     samlib against itself: Trainer.train_step with amp="off" (fp32) vs amp="auto", per width.
Plans (PLANS, costs in benchmarks/README.md): "cuda" on a GPU; on a CPU "cpu", or "cpu_full" with --full; "quick"
tests the benchmark itself.  Each figure is the median images/s over timed windows (torch.utils.benchmark.Timer)
after an untimed warm-up, with the device synchronised before every clock read.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.benchmark import Timer
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from samlib import data as D
from samlib import paths
from samlib.augment import mix_batch, one_hot
from samlib.cli import error_message
from samlib.config import resolve
from samlib.device import resolve_device
from samlib.errors import SamlibError
from samlib.infer import PAPER_TTA, _check_images, _forward, _model_device, _pixel_batch, predict_logits
from samlib.io import atomic_write_text
from samlib.rundir import describe_data, provenance
from samlib.train import Trainer, to_device
from samlib.views import View, identity

# Per plan: training images, TTA test images, steps per timed window, windows per side, and
# the widths amp_train compares (why these sizes: benchmarks/README.md, "What it costs").
PAPER_AND_CPU = ("paper", "cpu_profile")
PLANS = {
    "quick": dict(n_train=1024, n_tta=256, aug_naive=4, steps=2, repeats=2, tta_repeats=2,
                  amp_steps=1, amp_repeats=1, amp_widths=()),
    "cpu": dict(n_train=4096, n_tta=128, aug_naive=10, steps=3, repeats=3, tta_repeats=2,
                amp_steps=2, amp_repeats=2, amp_widths=("cpu_profile",)),
    "cpu_full": dict(n_train=8000, n_tta=2000, aug_naive=20, steps=8, repeats=3, tta_repeats=2,
                     amp_steps=3, amp_repeats=3, amp_widths=PAPER_AND_CPU),
    "cuda": dict(n_train=45000, n_tta=5000, aug_naive=40, steps=60, repeats=5,
                 tta_repeats=3, amp_steps=30, amp_repeats=3, amp_widths=PAPER_AND_CPU),
}
# What each plan is for and roughly how long it takes (printed before timing starts).
PLAN_COST = {
    "quick": "a test of the benchmark itself, well under a minute",
    "cpu": "the default on a CPU, small samples: 1-3 minutes on 2 cores; --full for the long plan",
    "cpu_full": "the long CPU plan (--full): 7 to 20+ minutes on 2 cores",
    "cuda": "the GPU plan, paper-sized: about 2 minutes on an H100 (estimated), torch.compile included",
}
NOTES = {"ratio": "samlib images/s / naive images/s (medians of timed windows)",
         "augment": "naive: per-image PIL crop/flip/ToTensor/Cutout/Normalize in a DataLoader; samlib: "
                    "Trainer.epoch_batches (mixing off): crop/flip/Cutout over the epoch in 8192-image "
                    "uint8 chunks on the device (TrainTransform), then per batch to float",
         "augment_mixup": "as augment, then one_hot + MixUp on the device on both sides",
         "train_step": "the same Trainer.train_step; naive feed without Normalize (the model normalises)",
         "amp_train": "Trainer.train_step on samlib's feed, amp='off' (fp32) vs amp='auto'; ratio = "
                       "AMP images/s / fp32 images/s, per width (first-stage channels; the default "
                       "CPU plan: the cpu profile's width only)",
         "tta": "naive: predict_logits_sequential; samlib: predict_logits; images, not image-views; "
                "forward_only: the model alone on the same view batches (ceiling_ratio = forward_only / naive)"}
EPOCH_IMAGES = 45_000   # the paper's training images per epoch (50,000 less validation)


# ---------------------------------------------------------------- the paper's pipeline

class Cutout:
    """The reference's per-image Cutout(n_holes=1, length=16) on a (C, H, W) tensor after
    ToTensor: centre uniform over the pixels, rows/columns [c - 8, c + 8) clipped, zeroed.
    (`random`, which DataLoader seeds per worker, stands in for the code's np.random.)"""

    def __init__(self, length: int = 16):
        self.length = length

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        cy, cx, half = random.randrange(h), random.randrange(w), self.length // 2
        mask = torch.ones(h, w, dtype=img.dtype)
        mask[max(cy - half, 0):min(cy + half, h), max(cx - half, 0):min(cx + half, w)] = 0
        return img * mask


def paper_transform(normalize: bool = True) -> T.Compose:
    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), Cutout(16)]
    return T.Compose(steps + ([T.Normalize(D.CIFAR_MEAN, D.STD_AS_RUN)] if normalize else []))


class PILDataset(Dataset):
    """uint8 (N, 32, 32, 3) arrays -> PIL image per item -> transform (torchvision's CIFAR10)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def naive_loader(images, labels, device, normalize: bool, batch_size: int = 128) -> DataLoader:
    return DataLoader(PILDataset(images, labels, paper_transform(normalize)), batch_size=batch_size,
                      shuffle=True, drop_last=True, num_workers=min(2, os.cpu_count() or 1),
                      persistent_workers=True, pin_memory=device.type == "cuda")


# ---------------------------------------------------------------- the naive TTA loop

def predict_logits_sequential(model: torch.nn.Module, images, views: Optional[Sequence[View]] = None,
                              batch_size: int = 1000, device=None, precision=None) -> torch.Tensor:
    """Same result as samlib.infer.predict_logits, one view at a time over the whole set:
    the benchmark's naive TTA baseline (V passes over the data, one forward per view and batch)."""
    views = list(views) if views else [View("original", identity)]
    _check_images(images)
    device = _model_device(model, device)
    was_training, n = model.training, len(images)
    model.eval()
    try:
        with torch.inference_mode():
            per_view = []
            for view in views:
                batches = (view.fn(_pixel_batch(images, s, s + batch_size, device)) for s in range(0, n, batch_size))
                per_view.append(torch.cat([_forward(model, x, device, precision).cpu() for x in batches]))
    finally:
        model.train(was_training)
    return torch.stack(per_view)


# ---------------------------------------------------------------- the two feeds

def naive_feed(loader: DataLoader, trainer: Trainer, alpha: float):
    """Endless (x, soft y) batches: DataLoader batch -> device, one_hot, then the training
    loop's own mix_batch call (no mixing when alpha == 0)."""
    dev, cfg = trainer.device, trainer.cfg
    while True:
        for x, y in loader:
            x, y = x.to(dev, non_blocking=True), one_hot(y.to(dev, non_blocking=True))
            yield mix_batch(x, y, cfg.mix, alpha, trainer.gen_aug, host_generator=trainer.gen_host,
                            inplace=True)


def samlib_feed(trainer: Trainer, alpha: float):
    """Endless (x, soft y) batches from Trainer.epoch_batches, the training loop's own feed
    (alpha == 0: no mixing)."""
    while True:
        yield from trainer.epoch_batches(alpha)


# ---------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device: torch.device):
    """Timer's clock for `device`: synchronise that GPU, then read perf_counter.  (Timer's own
    clock synchronises the current accelerator, which need not be `device`.)"""
    def clock() -> float:
        _sync(device)
        return time.perf_counter()
    return clock


def images_per_second(step, images_per_step: int, steps: int, repeats: int, device,
                      warmup: int = 0) -> list[float]:
    """images/s of each of `repeats` windows of `steps` calls of `step` (one Timer.timeit per
    window, after `warmup` untimed calls; the thread count left as it is, not Timer's one)."""
    for _ in range(warmup):
        step()
    timer = Timer(stmt="step()", globals={"step": step}, timer=_clock(device),
                  num_threads=torch.get_num_threads())
    return [images_per_step / timer.timeit(steps).mean for _ in range(repeats)]


def starting(name: str, what: str) -> None:
    """One line as a comparison (or a long part of one) starts: no long silence before its row."""
    print(f"  .. {name}: {what}", flush=True)


def side_by_side(name: str, naive: list, samlib: list, **extra) -> dict:
    n, s = statistics.median(naive), statistics.median(samlib)
    print(f"{name:<18}{n:>14,.0f}{s:>14,.0f}{s / n:>9.1f}x", flush=True)
    return {"naive_images_per_s": n, "samlib_images_per_s": s, "ratio": s / n,
            "naive_windows": [round(r, 1) for r in naive],
            "samlib_windows": [round(r, 1) for r in samlib], **extra}


def time_augment(trainer: Trainer, images, labels, plan: dict, alpha: float) -> dict:
    """Feed alone: the paper's PIL pipeline (with Normalize) vs batched on-device augmentation,
    both followed by MixUp when alpha > 0.  samlib's windows span whole epochs, so each pays
    its share of the per-epoch crop/flip/Cutout, whatever the window length."""
    dev, bs = trainer.device, trainer.cfg.batch_size
    name = "augment_mixup" if alpha > 0 else "augment"
    starting(name, f"naive PIL DataLoader, {plan['repeats']} windows of {plan['aug_naive']} batches; "
                   f"then samlib's feed, {plan['repeats']} one-epoch windows")
    naive = naive_feed(naive_loader(images, labels, dev, normalize=True, batch_size=bs), trainer, alpha)
    n = images_per_second(lambda: next(naive), bs, plan["aug_naive"], plan["repeats"], dev, warmup=4)
    naive.close()   # frees the DataLoader: its workers stop before samlib is timed
    feed = samlib_feed(trainer, alpha)
    s = images_per_second(lambda: next(feed), bs, trainer.steps_per_epoch, plan["repeats"], dev, warmup=2)
    return side_by_side(name, n, s, naive_normalize=True, mix_alpha=alpha)


def time_train_step(trainer: Trainer, images, labels, plan: dict) -> dict:
    """Trainer.train_step fed by each pipeline; also seconds per 45,000-image epoch."""
    dev, bs = trainer.device, trainer.cfg.batch_size
    alpha = trainer.cfg.mix_alpha
    starting("train_step", f"each feed, {plan['repeats']} windows of {plan['steps']} training steps")
    naive = naive_feed(naive_loader(images, labels, dev, normalize=False, batch_size=bs), trainer, alpha)
    n = images_per_second(lambda: trainer.train_step(*next(naive)), bs, plan["steps"], plan["repeats"],
                          dev, warmup=4)
    naive.close()
    feed = samlib_feed(trainer, alpha)
    s = images_per_second(lambda: trainer.train_step(*next(feed)), bs, plan["steps"], plan["repeats"], dev,
                          warmup=2)
    out = side_by_side("train_step", n, s, naive_normalize=False)
    out["seconds_per_epoch_45k"] = {"naive": EPOCH_IMAGES / out["naive_images_per_s"],
                                    "samlib": EPOCH_IMAGES / out["samlib_images_per_s"]}
    return out


def time_compiled_step(trainer: Trainer, plan: dict) -> dict:
    """samlib feed + train_step with the model under torch.compile (compile time reported apart)."""
    dev, bs, feed = trainer.device, trainer.cfg.batch_size, samlib_feed(trainer, trainer.cfg.mix_alpha)
    starting("train_step+compile", "torch.compile of the model (a minute or so), then the timed steps")
    try:
        trainer.net = torch.compile(trainer.model)
        t0 = time.perf_counter()
        for _ in range(3):
            trainer.train_step(*next(feed))
        _sync(dev)
        compile_s = time.perf_counter() - t0
        s = images_per_second(lambda: trainer.train_step(*next(feed)), bs, plan["steps"],
                              plan["repeats"], dev, warmup=2)
    except Exception as e:  # a missing compiler/triton must not cost the other figures
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    finally:
        trainer.net = trainer.model
    rate = statistics.median(s)
    print(f"{'train_step+compile':<18}{'':>14}{rate:>14,.0f}   (compile {compile_s:.0f} s)", flush=True)
    return {"samlib_images_per_s": rate, "samlib_windows": [round(r, 1) for r in s],
            "compile_seconds": compile_s, "seconds_per_epoch_45k": EPOCH_IMAGES / rate}


def time_amp_train(images, labels, plan: dict, device, widths: dict) -> dict:
    """fp32 against AMP training steps (samlib's feed, the `cpu` profile's final config), for
    each {label: first-stage width}, the two precisions back to back in this process."""
    out, holdout = {}, (images[:100], labels[:100])
    for label, w in widths.items():
        rates, precision = {}, None
        starting(f"amp_train {label}", f"width {w}, fp32 then amp='auto', {plan['amp_repeats']} windows "
                                       f"of {plan['amp_steps']} steps each")
        for amp in ("off", "auto"):
            cfg = resolve("final", "cpu", widths=(w, 2 * w, 4 * w), epochs=200, amp=amp)
            trainer = Trainer(cfg, {"train": (images, labels), "val": holdout, "test": holdout}, device)
            feed = samlib_feed(trainer, cfg.mix_alpha)
            rates[amp] = images_per_second(lambda: trainer.train_step(*next(feed)), cfg.batch_size,
                                           plan["amp_steps"], plan["amp_repeats"], device, warmup=2)
            precision = trainer.precision
        fp32, amp = statistics.median(rates["off"]), statistics.median(rates["auto"])
        print(f"{'amp_train ' + str(w):<18}{fp32:>14,.0f}{amp:>14,.0f}{amp / fp32:>9.1f}x  (fp32 vs {precision})",
              flush=True)
        out[label] = {"widths": [w, 2 * w, 4 * w], "amp_precision": precision, "fp32_images_per_s": fp32,
                      "amp_images_per_s": amp, "ratio": amp / fp32,
                      "fp32_windows": [round(r, 1) for r in rates["off"]],
                      "amp_windows": [round(r, 1) for r in rates["auto"]]}
    return out


def time_tta(model, images: torch.Tensor, batch_size: int, plan: dict, device) -> dict:
    """All PAPER_TTA views in one forward per batch vs one view after another, and the
    forward passes alone on the same inputs (what no TTA loop can beat)."""
    n, rates = len(images), []
    for predict, what in ((predict_logits_sequential, "naive: one pass per view"),
                          (predict_logits, "samlib: all views in one forward per batch")):
        starting("tta", f"{what}, {n:,} images x {len(PAPER_TTA)} views, {plan['tta_repeats']} windows")
        predict(model, images[:batch_size], PAPER_TTA, batch_size)   # warm-up: full-size batches
        rates.append(images_per_second(lambda: predict(model, images, PAPER_TTA, batch_size),
                                       n, 1, plan["tta_repeats"], device))
    inputs = [v.fn(_pixel_batch(images, s, s + batch_size, device))      # the sequential loop's
              for v in PAPER_TTA for s in range(0, n, batch_size)]         # forward inputs
    model.eval()
    starting("tta", "the model's forward alone on the same view batches")
    with torch.inference_mode():
        forward = images_per_second(lambda: [_forward(model, x, device) for x in inputs], n, 1,
                                    plan["tta_repeats"], device)
    seq, bat = rates
    ceiling = statistics.median(forward) / statistics.median(seq)
    print(f"{'  forward alone':<18}{'':>14}{statistics.median(forward):>14,.0f}{ceiling:>9.1f}x", flush=True)
    return side_by_side("tta", seq, bat, views=len(PAPER_TTA), images=n, batch_size=batch_size,
                        forward_only_images_per_s=statistics.median(forward),
                        forward_only_windows=[round(r, 1) for r in forward], ceiling_ratio=ceiling)


# ---------------------------------------------------------------- the benchmark

def _load():   # other processes on a shared machine move every figure
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _dataset(data_dir, n_train: int, n_test: int):
    """(train images, train labels, test images, data source); real data when it is there."""
    if data_dir == "auto":
        data_dir = "data" if (Path("data") / D.FOLDER).is_dir() else None
    if data_dir is None:
        ds = D.synthetic_cifar10(n_train, n_test, seed=0)
        source = "synthetic (samlib.data.synthetic_cifar10)"
    else:
        ds = D.load_cifar10(data_dir)
        source = describe_data(ds, data_dir, D.fingerprint(ds))
    return ds.train_images[:n_train], ds.train_labels[:n_train], ds.test_images[:n_test], source


def select_plan(device: torch.device, quick: bool = False, full: bool = False) -> str:
    """The PLANS entry a run uses: quick when asked; on CUDA "cuda"; on a CPU the small
    "cpu" plan, or "cpu_full" with full (the GPU plan is already the full one)."""
    if quick:
        return "quick"
    if device.type == "cuda":
        return "cuda"
    return "cpu_full" if full else "cpu"


def run_benchmark(out, width: int | None = None, device=None, quick: bool = False,
                  data_dir="auto", compile: bool | None = None, full: bool = False) -> dict:
    """Time the comparisons, print a table as they go, write `out` (json), return it.

    width: first-stage channels (stages w, 2w, 4w); default 64 (paper) on CUDA, 16 on CPU.
    quick / full: the plan (select_plan): a test of the benchmark / the long CPU plan.
    data_dir: folder holding cifar-10-batches-py; "auto" = ./data if present; None = synthetic.
    compile: also time the samlib step under torch.compile (default: on CUDA, not quick).
    """
    t_start = time.time()
    device = resolve_device(device)
    cuda = device.type == "cuda"
    width = width or (64 if cuda else 16)
    plan_name = select_plan(device, quick=quick, full=full)
    plan = PLANS[plan_name]
    print(f"bench, plan {plan_name!r}: {PLAN_COST[plan_name]}", flush=True)
    profile = "paper" if cuda else "quick"
    # epochs=200: enough scheduler steps for any benchmark length (speed is unaffected).
    cfg = resolve("final", profile, widths=(width, 2 * width, 4 * width), epochs=200)
    x_train, y_train, x_test, source = _dataset(data_dir, plan["n_train"], plan["n_tta"])
    if cuda:
        torch.backends.cudnn.benchmark = True
    test = (x_test[:100], np.zeros(min(100, len(x_test)), dtype=np.int64))
    trainer = Trainer(cfg, {"train": (x_train, y_train), "val": test, "test": test}, device)
    env = {**provenance(device, source), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "width": width, "widths": list(cfg.widths), "profile": profile, "batch_size": cfg.batch_size,
           "amp": trainer.precision, "naive_num_workers": min(2, os.cpu_count() or 1),
           "train_images": len(y_train), "quick": quick, "plan": plan_name,
           "load_average_at_start": _load()}
    print(f"bench on {env['device']}: width {width}, batch {cfg.batch_size}, {source}")
    print(f"{'images/s':<18}{'naive':>14}{'samlib':>14}{'ratio':>10}", flush=True)
    result = {"augment": time_augment(trainer, x_train, y_train, plan, alpha=0.0),
              "augment_mixup": time_augment(trainer, x_train, y_train, plan, alpha=cfg.mix_alpha),
              "train_step": time_train_step(trainer, x_train, y_train, plan)}
    if compile if compile is not None else (cuda and not quick):
        result["train_step_compiled"] = time_compiled_step(trainer, plan)
    test_x, _ = to_device(x_test, np.zeros(len(x_test), dtype=np.int64), device)
    result["tta"] = time_tta(trainer.model, test_x, cfg.eval_batch_size, plan, device)
    named = {"paper": resolve("final", "paper").widths[0], "cpu_profile": resolve("final", "cpu").widths[0]}
    amp_widths = ({k: named[k] for k in plan["amp_widths"]} if plan["amp_widths"] else
                  {f"width_{width}": width})   # quick: a test of the benchmark itself
    result["amp_train"] = time_amp_train(x_train, y_train, plan, device, amp_widths)
    report = {"augment_ratio": result["augment"]["ratio"],
              "augment_mixup_ratio": result["augment_mixup"]["ratio"],
              "train_step_ratio": result["train_step"]["ratio"],
              "tta_ratio": result["tta"]["ratio"],
              "amp_train_ratio": {k: v["ratio"] for k, v in result["amp_train"].items()}, **result,
              "environment": {**env, "load_average_at_end": _load()},
              "seconds": round(time.time() - t_start, 1),
              "notes": NOTES}
    atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({report['seconds']:.0f} s)")
    return report


def main(argv=None) -> int:
    """The command line: its paths checked first; a SamlibError or OSError is one `error:` line (exit 2)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="json file to write")
    parser.add_argument("--width", type=int, help="first-stage width (default: 64 on GPU, 16 on CPU)")
    parser.add_argument("--device", help="cpu | cuda | cuda:1 (default: cuda when available)")
    plans = parser.add_mutually_exclusive_group()
    plans.add_argument("--quick", action="store_true", help="fewer repeats (tests)")
    plans.add_argument("--full", action="store_true",
                       help="on a CPU, the long, precise plan; a GPU always runs its full plan")
    parser.add_argument("--data-dir", help="folder holding cifar-10-batches-py (default: ./data, else synthetic)")
    parser.add_argument("--threads", type=int, help="torch CPU threads for the timed process")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile timing (CUDA)")
    args = parser.parse_args(argv)
    try:
        paths.output_dir(args.out, "--out", is_file=True)
        if args.data_dir is not None:
            paths.resolved(args.data_dir, "--data-dir")
        if args.threads:
            torch.set_num_threads(args.threads)
        run_benchmark(args.out, width=args.width, device=args.device, quick=args.quick,
                      data_dir=args.data_dir or "auto", compile=False if args.no_compile else None, full=args.full)
    except (SamlibError, OSError) as e:
        print(f"error: {error_message(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
