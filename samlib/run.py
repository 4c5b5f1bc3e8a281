"""Training a config into its run directory (Section 3.3): reuse or resume, the epoch loop, the final test."""
import copy
import time
import warnings

import torch

from . import data as D
from . import dist
from .config import Config
from .device import resolve_device
from .errors import SamlibError
from .io import check_tensors, write_json
from .progress import epoch_line, progress_bar
from .rundir import RunDir, check_arch, describe_data, load_model, provenance
from .train import Trainer, accuracy_of, fits


def train(cfg: Config, data_dir=None, dataset: D.CIFAR10 | None = None, out="runs", device=None,
          profile: str | None = None, progress: bool = True, stop_after: int | None = None,
          wait: bool = False, later_seconds: float = 0.0):
    """Train `cfg` (or reuse / resume its run); its run directory.  data_dir: holds cifar-10-batches-py (or pass
    `dataset`); wait: for another process training it; later_seconds: the estimate of the runs queued after it."""
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
            resumed = run.resume(cfg, lambda state: load_resume_state(trainer, state))   # before any write
            run.start(cfg, profile, data_id)
            if dist.is_main():
                if resumed:
                    print(f"resuming {run.path} after epoch {trainer.epoch} (in {trainer.precision})")
                print(f"run directory: {run.path}")
            if fit(trainer, run, progress and dist.is_main(), stop_after, later_seconds):
                dist.barrier()
                if dist.is_main():                   # final.json last: it marks the run finished
                    final = final_test(trainer, run, progress)
                    write_json(run / "provenance.json", {
                        **provenance(device, describe_data(dataset, data_dir, data_id)), "seed": cfg.seed,
                        "precision": trainer.precision, "profile": profile,
                        "wall_seconds": round(time.time() - t0, 1),
                        "train_seconds": round(sum(r["seconds"] for r in trainer.metrics), 1)})
                    write_json(run / "final.json", final)
                dist.barrier()
        return run.path
    finally:
        dist.teardown()


def fit(trainer: Trainer, run: RunDir, progress: bool, stop_after: int | None = None,
        later_seconds: float = 0.0) -> bool:
    """The epoch loop: train, evaluate, select, checkpoint.  True when all epochs are done."""
    for done_here, epoch in enumerate(range(trainer.epoch, trainer.cfg.epochs), start=1):
        t_epoch = time.time()
        row = {"epoch": epoch + 1, **trainer.train_epoch(progress)}
        trainer.check_finite(row, last_good=epoch and run / "last.pt")
        row.update(trainer.evaluate(), lr=trainer.optimizer.param_groups[0]["lr"],
                   seconds=round(time.time() - t_epoch, 3))
        trainer.epoch = epoch + 1
        trainer.metrics.append(row)
        save_regular, save_ema = trainer.best.update(row, epoch + 1)     # checkpoint selection
        best_models = {"regular": trainer.model} if save_regular else {}
        if save_ema:
            best_models["ema"] = trainer.ema.module
        run.save_epoch(trainer.state_dict(), trainer.metrics, best_models)   # atomic checkpoint
        if progress:
            print(epoch_line(trainer, later_seconds), flush=True)
        if stop_after is not None and done_here >= stop_after:
            break
    return trainer.epoch == trainer.cfg.epochs


def final_test(trainer: Trainer, run: RunDir, progress: bool = False) -> dict:
    """Full-test-set accuracy of the selected checkpoints (what Table 1 reports)."""
    test_x, test_y = trainer.eval_sets["test"]
    kinds = [k for k in ("regular", "ema") if (run / f"best_{k}.pt").exists()]
    final = {"epochs": trainer.epoch, "best": trainer.best.state, "test_size": len(test_y),
             **{k: trainer.metrics[-1][k] for k in ("train_acc_mixed", "train_acc_clean")}}
    with progress_bar(total=len(kinds) * len(test_y), desc="test of the selected checkpoints",
                      disable=not progress) as bar:
        for kind in kinds:
            model = load_model(run / f"best_{kind}.pt", trainer.device, expect_arch=trainer.model.arch)
            final[f"test_acc_{kind}"] = accuracy_of(model, test_x, test_y, trainer.cfg.eval_batch_size,
                                                    trainer.precision, bar)
    return final


def load_resume_state(trainer: Trainer, state: dict) -> None:
    """trainer.load_state_dict(state) once its arch and tensors fit and its optimizer and scheduler took a step."""
    where = state.get("_path", "this checkpoint")
    check_arch(state, trainer.model.arch)
    check_tensors(state["model"], trainer.model.state_dict(), where, "model")
    if trainer.ema:
        check_tensors(state["ema"], trainer.ema.state_dict(), where, "ema")
    if state["epoch"] < trainer.cfg.epochs:      # a trial step: a state that would fail later fails here
        for p in trainer.model.parameters():
            p.grad = torch.zeros_like(p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fits(where, "optimizer", trainer.optimizer.load_state_dict, copy.deepcopy(state["optimizer"]))
            fits(where, "scheduler", trainer.scheduler.load_state_dict, copy.deepcopy(state["scheduler"]))
            fits(where, "optimizer", trainer.optimizer.step)
            fits(where, "scheduler", trainer.scheduler.step)
        trainer.optimizer.zero_grad(set_to_none=True)
    trainer.load_state_dict(state)                   # overwrites what the trial step changed
