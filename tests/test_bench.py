"""benchmarks/bench.py: the json it writes, and that both sides of the comparison do the same work.

No speed is asserted: the figures are benchmark results, not timed tests.
"""
import json
import math
import random
import time

import numpy as np
import pytest
import torch
from PIL import Image

from helpers_method import augment_batch, load_bench
from samlib.augment import cutout
from samlib.device import precision_for

bench = load_bench()                       # benchmarks/bench.py
Cutout, PILDataset, paper_transform = bench.Cutout, bench.PILDataset, bench.paper_transform
images_per_second, run_benchmark = bench.images_per_second, bench.run_benchmark

SIZE, HOLE = 32, 16


def possible_spans(n=SIZE, length=HOLE):
    """Every [start, stop) a hole can cover along one axis: centre c in 0..n-1, rows
    c - length//2 .. c + length//2 - 1, clipped to the image (DeVries & Taylor's Cutout)."""
    return {(max(c - length // 2, 0), min(c + length // 2, n)) for c in range(n)}


def expected_zero_fraction(n=SIZE, length=HOLE):
    """E[hole area] / n^2 with independent uniform centres: (mean clipped span / n)^2."""
    mean_span = sum(min(c + length // 2, n) - max(c - length // 2, 0) for c in range(n)) / n
    return (mean_span / n) ** 2


def hole_of(img):
    """(rows, cols) spans of the zeros of a (3, H, W) image that is 1 elsewhere; asserts
    the zeros are one axis-aligned rectangle, the same in every channel."""
    zero = img == 0
    assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2])
    assert torch.all(img[~zero] == 1)
    rows = torch.nonzero(zero[0].any(1)).flatten()
    cols = torch.nonzero(zero[0].any(0)).flatten()
    span = (int(rows[0]), int(rows[-1]) + 1), (int(cols[0]), int(cols[-1]) + 1)
    rect = torch.zeros_like(zero[0])
    rect[span[0][0]:span[0][1], span[1][0]:span[1][1]] = True
    assert torch.equal(zero[0], rect), "zeros are not one rectangle"
    return span


def test_naive_and_batched_cutout_cut_the_same_kind_of_hole():
    random.seed(0)
    ones = torch.ones(3, SIZE, SIZE)
    naive = [hole_of(Cutout(HOLE)(ones)) for _ in range(2000)]
    batched = cutout(torch.ones(2000, 3, SIZE, SIZE), HOLE, torch.Generator().manual_seed(0))
    samlib = [hole_of(img) for img in batched]
    spans = possible_spans()
    for holes in (naive, samlib):
        assert all(r in spans and c in spans for r, c in holes)       # one clipped 16x16 square
        area = np.mean([(r[1] - r[0]) * (c[1] - c[0]) for r, c in holes]) / SIZE ** 2
        assert area == pytest.approx(expected_zero_fraction(), abs=0.015)  # ~4 standard errors
        assert {r for r, _ in holes} == spans                          # every position occurs


def test_naive_pipeline_and_augment_batch_agree_on_the_rest():
    """Without holes and flips, both are a 4-px zero-padded random crop of the same image."""
    img = np.random.default_rng(0).integers(1, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    padded = np.zeros((SIZE + 8, SIZE + 8, 3), np.uint8)
    padded[4:-4, 4:-4] = img
    crops = {padded[dy:dy + SIZE, dx:dx + SIZE].tobytes() for dy in range(9) for dx in range(9)}
    ds = PILDataset(img[None], np.zeros(1, np.int64), paper_transform(normalize=False))
    ds.transform.transforms[1].p = 0.0                 # RandomHorizontalFlip off
    ds.transform.transforms.pop(3)                     # Cutout off
    x_naive = [ds[0][0] for _ in range(20)]
    x_samlib = augment_batch(torch.from_numpy(img).permute(2, 0, 1)[None].repeat(20, 1, 1, 1),
                             4, False, 0, torch.Generator().manual_seed(0))
    for x in [*x_naive, *x_samlib]:
        as_uint8 = (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert as_uint8.tobytes() in crops
    assert np.array_equal(np.asarray(Image.fromarray(img)), img)   # PIL round trip is exact


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine, 2 OpenMP threads + DataLoader workers
    + other processes can slow small ops tenfold; this test checks the json, not speed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_images_per_second_rates_are_per_call_over_fixed_windows():
    """Each window's rate is images per step / seconds per call, after the untimed warm-up;
    the thread count the benchmark runs with is kept (Timer's default would be one)."""
    calls = []
    threads = torch.get_num_threads()

    def step():
        calls.append(torch.get_num_threads())
        time.sleep(0.002)

    rates = images_per_second(step, images_per_step=10, steps=3, repeats=2, device=torch.device("cpu"),
                              warmup=4)
    assert len(rates) == 2
    assert all(0 < r <= 10 / 0.002 for r in rates)        # at least 2 ms per call of 10 images
    assert len(calls) >= 4 + 2 * 3                       # warm-up + the timed calls
    assert set(calls) == {threads} and torch.get_num_threads() == threads


def test_quick_benchmark_writes_ratios_raw_figures_and_environment(tmp_path, one_thread):
    out = tmp_path / "bench.json"
    report = run_benchmark(out, width=8, device="cpu", quick=True, data_dir=None)
    saved = json.loads(out.read_text())
    assert saved["augment_ratio"] == pytest.approx(report["augment_ratio"])
    for key in ("augment_ratio", "augment_mixup_ratio", "train_step_ratio", "tta_ratio"):
        assert isinstance(saved[key], float) and math.isfinite(saved[key]) and saved[key] > 0
    for part in ("augment", "augment_mixup", "train_step", "tta"):
        figures = saved[part]
        for side in ("naive", "samlib"):
            rate = figures[f"{side}_images_per_s"]
            assert math.isfinite(rate) and rate > 0 and figures[f"{side}_windows"]
        assert figures["ratio"] == pytest.approx(figures["samlib_images_per_s"] / figures["naive_images_per_s"])
    assert saved["train_step"]["seconds_per_epoch_45k"]["samlib"] > 0
    assert saved["tta"]["views"] == 6
    assert saved["augment"]["mix_alpha"] == 0 and saved["augment_mixup"]["mix_alpha"] == 0.3
    tta = saved["tta"]
    assert tta["ceiling_ratio"] == pytest.approx(tta["forward_only_images_per_s"] / tta["naive_images_per_s"])
    # fp32 against AMP, side by side: the AMP side runs at samlib.device's precision for this CPU
    amp = saved["amp_train"]["width_8"]
    expected = precision_for("auto", torch.device("cpu"))
    assert amp["amp_precision"] == expected and amp["widths"] == [8, 16, 32]
    assert amp["ratio"] == pytest.approx(amp["amp_images_per_s"] / amp["fp32_images_per_s"])
    assert saved["amp_train_ratio"] == {"width_8": pytest.approx(amp["ratio"])}
    env = saved["environment"]
    for key in ("device", "torch", "torchvision", "threads", "cpu_count", "width", "batch_size",
                "git_commit", "data_source"):
        assert key in env
    assert env["threads"] == 1 and env["width"] == 8 and env["widths"] == [8, 16, 32] and env["batch_size"] == 128
    assert env["data_source"].startswith("synthetic") and env["plan"] == "quick"


@pytest.mark.parametrize("flags, plan", [((), "cpu"), (("--full",), "cpu_full"), (("--quick",), "quick")])
def test_cli_default_plan_on_a_cpu_is_the_small_one_and_full_the_long_one(tmp_path, monkeypatch, flags, plan):
    """`python benchmarks/bench.py --out X` on a CPU runs the small plan, `--full` the long one
    (the old CPU plan); the plan chosen, not its speed, is what is checked."""
    calls = []
    monkeypatch.setattr(bench, "run_benchmark", lambda out, **kw: calls.append(kw))
    assert bench.main(["--out", str(tmp_path / "b.json"), "--device", "cpu", *flags]) == 0
    (kw,) = calls
    assert bench.select_plan(torch.device("cpu"), quick=kw["quick"], full=kw["full"]) == plan
    small, full = bench.PLANS["cpu"], bench.PLANS["cpu_full"]
    for key in ("n_train", "n_tta", "aug_naive", "steps", "tta_repeats", "amp_repeats"):
        assert small[key] <= full[key]
    assert small["n_tta"] < full["n_tta"] and small["steps"] < full["steps"]
    assert small["amp_widths"] == ("cpu_profile",) and full["amp_widths"] == ("paper", "cpu_profile")


def test_gpu_plan_is_the_cuda_one_whatever_full_says():
    PLAN_COST, PLANS, select_plan = bench.PLAN_COST, bench.PLANS, bench.select_plan

    for full in (False, True):
        assert select_plan(torch.device("cuda"), full=full) == "cuda"
    assert select_plan(torch.device("cuda"), quick=True) == "quick"
    assert set(PLAN_COST) == set(PLANS)


def test_quick_and_full_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path / "b.json"), "--quick", "--full"])
    assert "not allowed with" in capsys.readouterr().err


def test_a_bad_out_path_is_one_error_line_before_any_work(tmp_path, capsys, monkeypatch):
    """(Moved from test_paths: the benchmark checks its paths with samlib.paths, as the CLI does.)"""
    monkeypatch.setattr(bench, "run_benchmark", lambda out, **kw: pytest.fail("ran despite a bad --out"))
    assert bench.main(["--out", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --out ") and "is a folder; give a file name" in lines[0]
    assert "Traceback" not in captured.out + captured.err
