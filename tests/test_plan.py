"""The plan before training: each run's state on disk, the probe's arithmetic, the totals."""
import pytest

import samlib.plan as P
from samlib.config import resolve
from samlib.io import write_json
from samlib.progress import format_duration
from samlib.rundir import RunDir


def _fake_runs(tmp_path):
    """baseline: finished; se: 3 of 8 epochs in metrics.csv; final: nothing yet."""
    finished = RunDir.for_config(resolve("baseline", "quick", seed=84), tmp_path)
    write_json(finished / "final.json", {"epochs": 8})
    partial = RunDir.for_config(resolve("se", "quick", seed=84), tmp_path)
    partial.path.mkdir(parents=True)
    (partial / "metrics.csv").write_text("epoch,lr\n1,0.1\n2,0.1\n3,0.1\n")
    return P.plan_runs(["baseline", "se", "final"], [84], "quick", tmp_path)


def test_plan_reads_finished_partial_and_new_runs(tmp_path):
    plan = _fake_runs(tmp_path)
    assert [(i.config, i.status, i.remaining) for i in plan] == [
        ("baseline", "finished (reused)", 0), ("se", "resumes after epoch 3", 5), ("final", "new", 8)]


def test_estimate_is_remaining_epochs_times_the_probed_epoch(tmp_path, monkeypatch):
    per_epoch = {True: 30.0, False: 20.0}            # seconds, by SE or not
    monkeypatch.setattr(P, "epoch_seconds", lambda cfg, device=None: per_epoch[cfg.se])
    plan = P.estimate(_fake_runs(tmp_path), "quick", "cpu")
    assert [i.seconds for i in plan] == [0.0, 5 * 30.0, 8 * 30.0]
    text = P.format_plan(plan, "test cpu")
    assert "3 runs, 2 to train, about 6 min 30 s on test cpu" in text        # 150 + 240 s
    assert "resumes after epoch 3" in text and "finished (reused)" in text


def test_probe_scales_the_timed_steps_to_an_epoch_plus_evaluation(monkeypatch):
    """A fake clock: a train_step takes exactly 0.25 s and evaluating the probe's test images
    (eval_batch_size of them) 0.5 s, so the arithmetic is exact."""
    import samlib.train

    clock = {"t": 0.0}
    monkeypatch.setattr(P.time, "perf_counter", lambda: clock["t"])
    real_step = samlib.train.Trainer.train_step

    def step(self, x, y):
        clock["t"] += 0.25
        return real_step(self, x, y)

    def evaluate(model, x, y, batch_size):
        clock["t"] += 0.5
        return 0.1

    monkeypatch.setattr(samlib.train.Trainer, "train_step", step)
    monkeypatch.setattr(P, "accuracy_of", evaluate)
    cfg = resolve("final", "smoke", widths=(4, 8, 8), blocks=(1, 1, 1))
    seconds = P.epoch_seconds(cfg, "cpu", train_images=640)
    steps = 640 // cfg.batch_size
    evaluated = min(cfg.train_eval_size, 640) + 2 * (cfg.val_size + cfg.test_subset)   # EMA: twice
    assert seconds == pytest.approx(steps * 0.25 + evaluated * 0.5 / cfg.eval_batch_size)


@pytest.mark.parametrize("seconds, text", [(0, "0 s"), (59.4, "59 s"), (61, "1 min 01 s"),
                                           (3600 * 7 + 65, "7 h 01 min"), (float("nan"), "?")])
def test_durations_read_as_people_write_them(seconds, text):
    assert format_duration(seconds) == text


def test_sweep_shows_the_plan_first_and_plan_only_trains_nothing(tmp_path, capsys, monkeypatch):
    from samlib import cli

    monkeypatch.setattr(P, "epoch_seconds", lambda cfg, device=None: 10.0)
    finished = RunDir.for_config(resolve("baseline", "smoke", seed=84), tmp_path / "runs")
    write_json(finished / "final.json", {"epochs": 2})
    code = cli.main(["sweep", "--profile", "smoke", "--configs", "baseline,se", "--seeds", "84",
                     "--data-dir", str(tmp_path), "--out", str(tmp_path / "runs"), "--devices", "cpu", "--plan"])
    out = capsys.readouterr().out
    assert code == 0
    assert "baseline seed 84" in out and "finished (reused)" in out and "se seed 84" in out
    assert "2 runs, 1 to train, about 20 s" in out                     # 2 epochs x 10 s
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [finished.path.name]   # nothing new


def test_wall_time_of_jobs_side_by_side_follows_the_sweeps_queue(tmp_path):
    def runs(*seconds):
        return [P.PlannedRun("c", i, tmp_path, 1, 0, False, s) for i, s in enumerate(seconds)]
    assert P.wall_seconds(runs(100, 100), 2) == 100
    assert P.wall_seconds(runs(100, 50, 50), 2) == 100            # the two short runs share a slot
    assert P.wall_seconds(runs(30, 60, 90), 2) == 120             # 90 waits for the first free slot
    assert P.wall_seconds(runs(30, 60, 90), 1) == 180
    done = [P.PlannedRun("c", 9, tmp_path, 1, 1, True, 0.0)]
    assert P.wall_seconds(done + runs(40), 3) == 40


def test_a_cpu_sweep_probes_at_each_jobs_thread_count_and_prints_its_wall_time(tmp_path, monkeypatch, capsys):
    """Two jobs on 2 cores train with 1 thread each: the probe runs at 1 thread (then the
    process's threads are back), and the plan says how long the two take side by side."""
    import os
    import torch
    from samlib.cli import main

    seen = []
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(P, "epoch_seconds", lambda cfg, device=None: seen.append(torch.get_num_threads()) or 30.0)
    before = torch.get_num_threads()
    assert main(["sweep", "--configs", "final", "--seeds", "84,85", "--profile", "smoke", "--data-dir",
                 str(tmp_path), "--out", str(tmp_path), "--devices", "cpu,cpu", "--plan"]) == 0
    out = capsys.readouterr().out
    assert seen == [1] and torch.get_num_threads() == before
    assert "about 2 min 00 s" in out                                     # 2 runs x 2 epochs x 30 s
    assert "2 jobs side by side, 1 thread(s) each: about 1 min 00 s from start to end" in out
