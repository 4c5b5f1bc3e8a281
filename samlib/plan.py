"""The plan shown before any training: each config x seed run, its state on disk and its time on *this* device."""
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import data as D
from .config import Config, resolve
from .device import resolve_device
from .progress import format_duration
from .rundir import RunDir, describe_device
from .sweep import job_env
from .train import Trainer, accuracy_of


@dataclass
class PlannedRun:
    config: str
    seed: int
    run_dir: Path
    epochs: int
    done: int                 # epochs already in metrics.csv
    finished: bool
    seconds: float = float("nan")   # estimated time still to train

    @property
    def status(self) -> str:
        if self.finished:
            return "finished (reused)"
        return f"resumes after epoch {self.done}" if self.done else "new"

    @property
    def remaining(self) -> int:
        return 0 if self.finished else self.epochs - self.done


def _epochs_done(run: RunDir) -> int:
    """Epochs an unfinished run has recorded (metrics.csv is written just before last.pt)."""
    try:
        lines = (run / "metrics.csv").read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return 0
    return max(0, len([line for line in lines if line.strip()]) - 1)


def plan_runs(configs, seeds, profile: str, out, **overrides) -> list[PlannedRun]:
    """Every config x seed in training order, with its state on disk (`seeds`: a list, or {config: seeds})."""
    plan = []
    for name in configs:
        for seed in (seeds.get(name, []) if isinstance(seeds, dict) else seeds):
            cfg = resolve(name, profile, seed=seed, **overrides)
            run = RunDir.for_config(cfg, out)
            plan.append(PlannedRun(name, seed, run.path, cfg.epochs, _epochs_done(run), run.finished))
    return plan


def epoch_seconds(cfg: Config, device=None, train_images: int | None = None) -> float:
    """Seconds one epoch of `cfg` takes here: timed train steps on synthetic images scaled up, plus evaluation."""
    device = resolve_device(device)
    steps, warmup = 5, 2
    ds = D.synthetic_cifar10((steps + warmup) * cfg.batch_size, cfg.eval_batch_size, seed=0)
    test = (ds.test_images, ds.test_labels)
    trainer = Trainer(cfg, {"train": (ds.train_images, ds.train_labels), "val": test, "test": test}, device)
    trainer.net.train()
    batches = trainer.epoch_batches(cfg.mix_alpha if cfg.mix != "none" else 0.0)
    step = _timed(lambda: trainer.train_step(*next(batches)), warmup, steps, device)
    x, y = trainer.eval_sets["test"]
    per_image = _timed(lambda: accuracy_of(trainer.model, x, y, cfg.eval_batch_size), 1, 2, device) / len(y)
    if train_images is None:
        train_images = (cfg.train_subset or 50_000) - cfg.val_size
    test_images = min(cfg.test_eval_size or 10_000, cfg.test_subset or 10_000)
    models = 2 if cfg.ema else 1                  # the EMA model is evaluated too
    eval_images = min(cfg.train_eval_size, train_images) + models * (cfg.val_size + test_images)
    return (train_images // cfg.batch_size) * step + eval_images * per_image


def _timed(fn, warmup: int, repeats: int, device) -> float:
    """Mean seconds of `fn` over `repeats` calls after `warmup` untimed ones."""
    clock = []
    for calls in (warmup, repeats):
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        clock.append(time.perf_counter())
    return (clock[1] - clock[0]) / repeats


def estimate(plan: list[PlannedRun], profile: str, device=None, say=None, **overrides) -> list[PlannedRun]:
    """Fill in each unfinished run's estimated seconds (one probe per architecture, announced to `say`)."""
    probes: dict = {}
    for item in plan:
        if item.finished:
            item.seconds = 0.0
            continue
        cfg = resolve(item.config, profile, seed=item.seed, **overrides)
        key = (cfg.se, cfg.se_placement, cfg.widths, cfg.blocks, cfg.batch_size, cfg.mix, cfg.ema)
        if key not in probes:
            if say:
                say(f"timing a few training steps of {item.config} here, for the estimate...")
            probes[key] = epoch_seconds(cfg, device)
        item.seconds = probes[key] * item.remaining
    return plan


def wall_seconds(plan: list[PlannedRun], slots: int) -> float:
    """Wall time with `slots` jobs side by side, each run taking the first free slot (as samlib.sweep does)."""
    ends = [0.0] * max(1, slots)
    for item in plan:
        if not item.finished:
            ends[ends.index(min(ends))] += item.seconds
    return max(ends)


def format_plan(plan: list[PlannedRun], device_name: str = "") -> str:
    """A plain-text table of the plan and its total."""
    lines = [f"{'run':<34}{'epochs':>8}  {'state':<24}{'estimate':>12}"]
    for item in plan:
        lines.append(f"{item.config + ' seed ' + str(item.seed):<34}{item.epochs:>8}  {item.status:<24}"
                     f"{format_duration(item.seconds):>12}")
    todo = [i for i in plan if not i.finished]
    where = f" on {device_name}" if device_name else ""
    lines.append(f"{len(plan)} runs, {len(todo)} to train, about {format_duration(sum(i.seconds for i in todo))}"
                 f"{where} (an estimate from a short timing probe)")
    return "\n".join(lines)


def show_plan(configs, seeds, profile: str, out, device, slots: list, **overrides) -> None:
    """Print a sweep's plan and estimate, probed on `device` at each job's OMP_NUM_THREADS (samlib.sweep.job_env)."""
    threads = int(job_env(slots).get("OMP_NUM_THREADS", 0) or 0) if device.type == "cpu" else 0
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads or before)
        plan = estimate(plan_runs(configs, seeds, profile, out, **overrides), profile, device,
                        say=lambda line: print(line, flush=True), **overrides)
    finally:
        torch.set_num_threads(before)
    text = format_plan(plan, describe_device(device))
    if len(slots) > 1:
        each = f", {threads} thread(s) each" if threads else ""
        wall = format_duration(wall_seconds(plan, len(slots)))
        text += f"; {len(slots)} jobs side by side{each}: about {wall} from start to end"
    print(text, flush=True)
