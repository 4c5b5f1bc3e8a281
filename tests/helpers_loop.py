"""Test helpers for the training loop: resume a run directory as samlib.train.train does."""
import torch

from samlib import data as D
from samlib.config import from_dict
from samlib.io import read_json
from samlib.run import load_resume_state
from samlib.rundir import RunDir
from samlib.train import Trainer


def resume(run_dir, cfg=None, dataset=None):
    """A CPU Trainer of `cfg` (default: the run's config.json) resumed from `run_dir` by
    RunDir.resume, as train() does; None when the run has no last.pt.  The Trainer is built
    only once the state is known to be this run's (on `dataset`, default a small synthetic one)."""
    run = RunDir(run_dir)
    cfg = cfg or from_dict(read_json(run / "config.json"), source=str(run / "config.json"))
    trainer = []

    def load(state):
        data = dataset if dataset is not None else D.synthetic_cifar10(n_train=256, n_test=64, seed=1)
        trainer.append(Trainer(cfg, D.split_data(cfg, data), torch.device("cpu")))
        load_resume_state(trainer[0], state)

    return trainer[0] if run.resume(cfg, load) else None
