"""The report layer: parameter checks, tables, summary.json, notebook upkeep, figures."""
from __future__ import annotations

import json
import pickle

import nbformat
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from samlib.config import SWITCHES, resolve
from samlib.data import load_unlabeled
from samlib.errors import ConfigError, SamlibError
from samlib.infer import STRATEGIES
from samlib.io import write_json
from samlib.report import figures as plots
from samlib.report import params as nb
from samlib.report.tables import (PAPER_FIGURE1, best_strategy, figure1_across_seeds, figure1_deltas,
                                  reliability_table, temperature_table)

import nbfilter                         # tools/nbfilter.py


def _params(tmp_path, **kw):
    base = dict(profile="smoke", data_dir=tmp_path / "data", seeds=[84], results_dir=tmp_path / "results",
                runs_dir=tmp_path / "runs", device="cpu")
    return nb.check_params(**dict(base, **kw))


def test_check_params_resolves(tmp_path):
    p = _params(tmp_path, seeds=None, switches=None, kaggle_file=None, strategy="best")
    assert p.profile == "smoke" and p.seeds == nb.DEFAULT_SEEDS["smoke"]
    assert p.switches == ["schedule"] and p.kaggle_file is None and p.strategy == "best"
    assert p.results == (tmp_path / "results" / "smoke").resolve()
    assert p.runs == (tmp_path / "runs" / "smoke").resolve()
    assert _params(tmp_path, profile="auto").profile == "quick"      # device cpu -> quick
    assert _params(tmp_path, profile="paper").scale_note == ""
    assert "scaled-down" in p.scale_note and "smoke" in p.caption
    paper = _params(tmp_path, profile="paper", seeds=None, switches=None)
    assert paper.seeds == [84] and paper.switches == []          # the paper's protocol: 4 runs
    assert _params(tmp_path, profile="paper", switches="all").switches == list(SWITCHES)


@pytest.mark.parametrize("kw, word", [
    (dict(seeds="84"), "seeds"), (dict(seeds=[84, "85"]), "seeds"), (dict(seeds=[True]), "seeds"),
    (dict(seeds=[]), "seeds"), (dict(seeds=[84, 84]), "seeds"), (dict(profile="fast"), "profile"),
    (dict(device="gpu"), "device"), (dict(data_dir=None), "data_dir"), (dict(switches=["warmup"]), "switches"),
    (dict(strategy="vote"), "strategy"), (dict(colour="red"), "colour"),
])
def test_check_params_names_the_bad_parameter(tmp_path, kw, word):
    with pytest.raises(ConfigError, match=word):
        _params(tmp_path, **kw)


def test_markdown_table_and_save_table(tmp_path):
    frame = pd.DataFrame({"a": [1.234, float("nan")], "b": ["x|y", "z"], "n": [4697162, 7]})
    md = nb.markdown_table(frame)
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in md.splitlines()]
    assert rows[0] == ["a", "b", "n"] and set(md.splitlines()[1]) <= set("|-: ")
    assert rows[2] == ["1.23", "x\\|y", "4,697,162"]
    assert rows[3] == ["", "z", "7"]
    p = _params(tmp_path)
    p.data_source = "synthetic"
    nb.save_table(frame, p, "t", "Title", notes="a note")
    text = (p.results / "t.md").read_text()
    assert text.startswith("### Title") and p.caption in text and "a note" in text and p.scale_note in text
    assert pd.read_csv(p.results / "t.csv").shape == (2, 3)


def test_summary_merges_sections_and_timings(tmp_path):
    p = _params(tmp_path)
    nb.update_summary(p, table1=pd.DataFrame({"x": [1.0, float("nan")]}), timings={"00": 1.5})
    nb.finish(p, "01")
    s = json.loads((p.results / "summary.json").read_text())
    assert s["profile"] == "smoke" and s["seeds"] == [84]
    assert s["table1"] == [{"x": 1.0}, {"x": None}]             # NaN -> null: strict JSON
    assert set(s["timings"]) == {"00", "01"} and s["timings"]["00"] == 1.5


def test_strip_outputs_keeps_only_checked_cells(tmp_path):
    book = nbformat.v4.new_notebook()
    out = nbformat.v4.new_output("stream", name="stdout", text="4,697,162\n")
    checked = nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\nprint(1)", execution_count=3, outputs=[out])
    plain = nbformat.v4.new_code_cell("x = 1", execution_count=4, outputs=[out])
    book.cells = [checked, plain]
    path = tmp_path / "n.ipynb"
    nbformat.write(book, str(path))
    assert nbfilter.strip_outputs(path) == 1
    cells = nbformat.read(str(path), as_version=4).cells
    assert cells[0].outputs[0]["text"] == "4,697,162\n" and cells[1].outputs == []
    assert cells[0].execution_count == 1 and cells[1].execution_count is None


def test_kaggle_sample_reads_back(tmp_path):
    from samlib.data import synthetic_cifar10, write_cifar10

    write_cifar10(tmp_path, synthetic_cifar10(20, 30))
    path = nbfilter.write_kaggle_sample(tmp_path, tmp_path / "k.pkl", n=12)
    images, ids = load_unlabeled(path)
    assert images.shape == (12, 32, 32, 3) and list(ids) == list(range(1000, 1012))
    raw = pickle.loads(path.read_bytes())
    assert set(raw) == {b"data", b"ids"}


# ---------------------------------------------------------------- plots

def _strategy_table():
    """A strategy table as evaluate_strategies writes it: every strategy at its own
    temperature, then the selected one (ensemble+tta) at T = 1.2 and at a fitted T."""
    acc = {"standard": 0.90, "tta": 0.91, "ema": 0.905, "ema+tta": 0.915, "ensemble": 0.912,
           "ensemble+tta": 0.92, "ensemble+tta (as run)": 0.918}
    rows = [{"strategy": s, "temperature": STRATEGIES[s].temperature, "temperature_from": "strategy",
             "selected": s == "ensemble+tta", "test_accuracy": a, "test_nll": 0.3, "test_ece": 0.02}
            for s, a in acc.items()]
    rows += [{"strategy": "ensemble+tta", "temperature": t, "temperature_from": src, "selected": True,
              "test_accuracy": 0.921, "test_nll": 0.29, "test_ece": 0.01}
             for t, src in ((1.2, "paper"), (0.9, "fitted on validation"))]
    return pd.DataFrame(rows)


def test_best_strategy_reads_the_selected_rows():
    assert best_strategy(_strategy_table()) == "ensemble+tta"
    flipped = _strategy_table().assign(selected=lambda t: t["strategy"].eq("tta"))
    assert best_strategy(flipped) == "tta"


def test_temperature_table_keeps_the_selected_strategy_and_the_as_run_row():
    t = temperature_table(_strategy_table())
    assert t["strategy"].tolist() == ["ensemble+tta", "ensemble+tta (as run)", "ensemble+tta", "ensemble+tta"]
    assert t["temperature"].tolist() == [1.0, 1.2, 1.2, 0.9]
    assert t["test_accuracy"].iloc[0] == pytest.approx(92.0) and t["test_ece"].iloc[-1] == pytest.approx(1.0)


def test_figure1_deltas_by_hand():
    d = figure1_deltas(_strategy_table(), PAPER_FIGURE1).set_index("claim")
    assert d["reproduced"].iloc[0] == pytest.approx(1.0)        # 91 - 90
    assert d["reproduced"].iloc[1] == pytest.approx(1.0)        # 92 - 91, not the T=1.2 row's 92.1
    assert d["reproduced"].iloc[2] == pytest.approx(0.5)        # 91.5 - 91
    assert d["paper"].iloc[0] == 0.31 and d["paper"].iloc[1] == 0.16 and d["paper"].iloc[-1] == 92.99


def test_plots_return_and_save_figures(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(40) % 10
    probs = rng.dirichlet(np.ones(10), 40)
    run = tmp_path / "run"
    write_json(run / "config.json", resolve("final", "smoke").to_dict())
    pd.DataFrame({"epoch": [1, 2], "train_loss": [2.3, 2.2], "val_acc": [0.1, 0.2], "val_acc_ema": [0.1, 0.15],
                  "test_acc": [0.1, 0.2], "test_acc_ema": [0.1, 0.15], "lr": [0.1, 0.01]}).to_csv(
        run / "metrics.csv", index=False)
    figures = {
        "grid": plots.sample_grid(images, labels, per_class=2),
        "unlabelled": plots.sample_grid(images, names=np.arange(40), per_class=2),
        "balance": plots.plot_class_balance(pd.DataFrame({"train": np.ones(10)}, index=list("abcdefghij"))),
        "hist": plots.plot_pixel_histograms(images),
        "curves": plots.plot_training_curves({"final": [run]}),
        "lr": plots.plot_lr_schedules(epochs=20, steps_per_epoch=2, warmup_epochs=2),
        "fig1": plots.plot_figure1(_strategy_table(), PAPER_FIGURE1),
        "rel": plots.plot_reliability(reliability_table(__import__("torch").tensor(probs), labels)),
        "cm": plots.plot_confusion(np.eye(10, dtype=int) * 3),
        "pred": plots.plot_prediction_histogram(np.arange(10)),
    }
    for name, fig in figures.items():
        assert isinstance(fig, Figure), name
    path = tmp_path / "out" / "f.png"
    plots.plot_confusion(np.eye(10, dtype=int), title="t", caption="profile smoke", save=path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_evaluate_run_refuses_other_data_and_keys_its_cache_by_data(tmp_path):
    from samlib.data import fingerprint, synthetic_cifar10
    from samlib.errors import SamlibError
    from samlib.io import read_json
    from samlib.report.runs import evaluate_run
    from samlib.run import train

    data_a, data_b = synthetic_cifar10(256, 64, seed=1), synthetic_cifar10(256, 64, seed=2)
    cfg = resolve("final", "smoke", widths=(4, 8, 8), blocks=(1, 1, 1), epochs=1, val_size=64,
                  train_subset=None, test_subset=None, train_eval_size=32)
    run = train(cfg, dataset=data_a, out=tmp_path, device="cpu", progress=False)
    on_a = evaluate_run(run, dataset=data_a)
    assert read_json(run / "strategies.json")["data"] == fingerprint(data_a)
    with pytest.raises(SamlibError, match="trained on other data"):
        evaluate_run(run, dataset=data_b)
    evaluate_run(run, dataset=data_b, allow_other_data=True)
    assert read_json(run / "strategies.json")["data"] == fingerprint(data_b)   # not A's table
    again = evaluate_run(run, dataset=data_a)                                   # recomputed for A
    assert read_json(run / "strategies.json")["data"] == fingerprint(data_a)
    pd.testing.assert_frame_equal(again, on_a)
    # a damaged cache (table, its key or the saved probabilities) is recomputed, never an error
    from samlib.report.runs import saved_test_probs
    for damage in (b"\xff\xfe not a csv", b"", b"strategy\nstandard\n"):
        (run / "strategies.csv").write_bytes(damage)
        pd.testing.assert_frame_equal(evaluate_run(run, dataset=data_a), on_a)
    (run / "strategies.json").write_bytes(b"{truncated")
    pd.testing.assert_frame_equal(evaluate_run(run, dataset=data_a), on_a)
    (run / "strategy_probs.pt").write_bytes(b"garbage")
    (run / "strategy_probs.pt.sha256").unlink(missing_ok=True)
    assert saved_test_probs(run) == (None, None)


def test_binomial_interval_matches_the_wilson_formula_by_hand():
    from samlib.report.tables import binomial_interval

    lo, hi = binomial_interval(0.9, 100)        # Wilson: centre 0.8847, half-width 0.0634
    assert (lo, hi) == pytest.approx((0.8256, 0.9448), abs=1e-4)
    lo, hi = binomial_interval(0.9299, 10_000)  # the paper's final on the full test set: +-0.5 points
    assert hi - lo == pytest.approx(0.0100, abs=2e-4)


def test_paired_bootstrap_interval_of_a_known_difference():
    from samlib.report.tables import paired_bootstrap

    rng = np.random.default_rng(0)
    a = rng.random(4000) < 0.9
    b = a.copy()
    flip = rng.choice(4000, 40, replace=False)     # b loses 40 images a gets right: exactly +1 point
    b[flip] = False
    a[flip] = True
    diff, lo, hi = paired_bootstrap(a, b)
    assert diff == pytest.approx(1.0) and 0.6 < lo < 1.0 < hi < 1.4
    same = paired_bootstrap(a, a)
    assert same == (0.0, 0.0, 0.0)                 # identical predictions: no spread at all


def test_table1_view_shows_sd_for_seeds_and_an_interval_for_one_seed():
    from samlib.report.tables import table1_view

    t1 = pd.DataFrame({"paper_row": ["a", "b"], "seeds": [1, 3], "paper_train_acc": [1.0, 1.0],
                       "train_acc_mixed": [1.0, 1.0], "train_acc_clean": [1.0, 1.0], "paper_test_acc": [91.0, 92.0],
                       "test_acc": [90.0, 91.0], "test_acc_sd": [float("nan"), 0.2],
                       "test_acc_ci_low": [89.4, float("nan")], "test_acc_ci_high": [90.6, float("nan")],
                       "delta_test": [-1.0, -1.0], "paper_params": ["x", "y"], "params_paper_width": [1, 2],
                       "params_profile": [1, 2]})
    view = table1_view(t1)
    assert view["test % 95% interval (1 seed)"].tolist() == ["89.40 - 90.60", ""]
    assert view["test % sd (>= 2 seeds)"].isna().tolist() == [True, False]
    assert view["trained in"].tolist() == ["", ""]          # a table from before it was recorded


def test_table1_names_the_precision_each_configs_seeds_trained_in(monkeypatch):
    import samlib.report.tables as tables

    def fake_run(path):
        name, seed, precision = path.split(":")
        final = {"test_acc_ema": 0.8, "test_acc_regular": 0.7, "train_acc_mixed": 0.6, "train_acc_clean": 0.9,
                 "test_size": 10000}
        return {"config": resolve(name, "smoke", seed=int(seed)), "final": final,
                "provenance": {"precision": precision} if precision else {}}

    monkeypatch.setattr(tables, "load_run", fake_run)
    t1 = tables.table1({"baseline": ["baseline:84:fp32"], "final": ["final:84:bf16", "final:85:fp32"],
                        "se": ["se:84:"]})
    assert dict(zip(t1["config"], t1["trained_in"])) == {"baseline": "fp32", "final": "bf16, fp32",
                                                         "se": "unrecorded"}
    assert tables.table1_view(t1)["trained in"].tolist() == ["fp32", "bf16, fp32", "unrecorded"]


def test_drop_table_removes_an_earlier_reports_table_only(tmp_path):
    p = _params(tmp_path)
    p.data_source = "synthetic"
    nb.save_table(pd.DataFrame({"x": [1]}), p, "discrepancies", "Old")
    nb.save_table(pd.DataFrame({"x": [1]}), p, "table1", "Kept")
    nb.drop_table(p, "discrepancies")
    nb.drop_table(p, "never_written")                      # nothing to remove: no error
    assert sorted(f.name for f in p.results.iterdir()) == ["table1.csv", "table1.md"]


def test_final_seeds_default_per_profile_and_always_include_seeds(tmp_path):
    cpu = _params(tmp_path, profile="cpu", seeds=None, final_seeds=None, switches=None)
    assert cpu.seeds == [84] and cpu.final_seeds == [84, 85] and cpu.switches == ["ema_reset"]
    assert _params(tmp_path, seeds=[84, 86], final_seeds=None).final_seeds == [84, 86]   # smoke: = seeds
    assert _params(tmp_path, seeds=[86], final_seeds=[84, 85]).final_seeds == [86, 84, 85]
    assert _params(tmp_path, seeds=[84, 85], final_seeds=[85]).final_seeds == [84, 85]
    for bad in ([], [84, 84], "84", [-1]):
        with pytest.raises(ConfigError, match="final_seeds"):
            _params(tmp_path, final_seeds=bad)


def test_figure1_across_seeds_by_hand():
    one = _strategy_table()
    two = one.assign(test_accuracy=np.where(one["strategy"].eq("tta"), 0.93, one["test_accuracy"]))
    t = figure1_across_seeds({84: figure1_deltas(one), 85: figure1_deltas(two)}).set_index("claim")
    tta = t.loc["TTA gain: tta - standard"]
    assert tta["seed 84"] == pytest.approx(1.0) and tta["seed 85"] == pytest.approx(3.0)   # 91-90, 93-90
    assert tta["mean"] == pytest.approx(2.0) and tta["sd"] == pytest.approx(2 ** 0.5)      # sd of (1, 3)
    assert tta["paper"] == 0.31 and tta["reading"] == "cannot resolve (no interval)"      # no test probs given
    ens = t.loc["ensemble gain: ensemble+tta - tta"]                                       # 92-91, 92-93
    assert (ens["seed 84"], ens["seed 85"], ens["mean"]) == pytest.approx((1.0, -1.0, 0.0))
    assert np.isnan(figure1_across_seeds({84: figure1_deltas(one)}).set_index("claim").loc[
        "TTA gain: tta - standard", "sd"])


def test_figure1_across_seeds_reads_each_seed_then_all():
    """Seed 84 right on every image under TTA and wrong without: its gain is supported; seed 85 no gain:
    contradicted.  Across the seeds the readings disagree, and the table says so."""
    labels = np.zeros(400, dtype=int)
    good, bad = torch.eye(10)[[0] * 400], torch.eye(10)[[1] * 400]
    t = _strategy_table().assign(test_images=400)
    seed84 = {s: (good if s != "standard" else bad) for s in STRATEGIES}
    seed85 = {s: good for s in STRATEGIES}
    deltas = {84: figure1_deltas(t, PAPER_FIGURE1, seed84, labels), 85: figure1_deltas(t, PAPER_FIGURE1, seed85, labels)}
    by_seed = figure1_across_seeds(deltas).set_index("claim").loc["TTA gain: tta - standard"]
    assert by_seed["seed 84 95% interval"] == "100.00 - 100.00" and by_seed["seed 85 95% interval"] == "0.00 - 0.00"
    assert deltas[84].set_index("claim").loc["TTA gain: tta - standard", "reading"] == "supported"
    assert by_seed["reading"] == "cannot resolve (seeds disagree)"
    alone = figure1_across_seeds({84: deltas[84]}).set_index("claim").loc["TTA gain: tta - standard"]
    assert alone["reading"] == "supported"


@pytest.mark.parametrize("readings, reading", [
    (["supported", "supported"], "supported"), (["contradicted"], "contradicted"),
    (["supported", "cannot resolve"], "cannot resolve (seeds disagree)"), (["", ""], "")])
def test_one_reading_across_seeds(readings, reading):
    from samlib.report.tables import read_across_seeds

    assert read_across_seeds(readings) == reading


def test_table1_claims_pair_each_row_with_the_one_above_at_the_same_seed(monkeypatch):
    """Table 1's gains from per-image correctness: SE over baseline, MixUp over SE, EMA (final) over MixUp,
    each at the seeds both rows have; the paper's gains are its Table 1 differences."""
    from samlib.report import tables

    n = 1000
    right = lambda k: np.arange(n) < k                                 # the first k images right
    correct = {("baseline", 84): right(800), ("se", 84): right(900),  # +10 points: supported
               ("se_mixup", 84): right(880),                          # -2 points: contradicted
               ("final", 84): right(881), ("final", 85): right(500)}  # +0.1 at seed 84; 85 has no pair
    kinds = {}
    monkeypatch.setattr(tables, "load_run", lambda d: {"config": resolve(d[0], "smoke", seed=d[1])})
    monkeypatch.setattr(tables, "correct_on_test",
                        lambda d, dataset, kind, device=None: kinds.setdefault(d, kind) and correct[d])
    runs = {c: [k for k in correct if k[0] == c] for c in ("baseline", "se", "se_mixup", "final")}
    t = tables.table1_claims(runs, dataset="data").set_index("claim")
    assert list(t.index) == ["+ SE blocks gain: se - baseline", "+ MixUp (a=0.3) gain: se_mixup - se",
                             "+ EMA (final) gain: final - se_mixup"]
    assert t["paper"].tolist() == pytest.approx([0.62, 0.69, 0.25])      # 92.05-91.43, 92.74-92.05, 92.99-92.74
    assert t["seed 84"].tolist() == pytest.approx([10.0, -2.0, 0.1])
    assert "seed 85" not in t.columns                                     # final's seed 85 has nothing to pair with
    assert t["reading"].tolist()[:2] == ["supported", "contradicted"]
    lo, hi = (float(x) for x in t.loc["+ EMA (final) gain: final - se_mixup", "seed 84 95% interval"].split(" - "))
    assert 0 <= lo <= 0.1 <= hi and t.loc["+ EMA (final) gain: final - se_mixup", "reading"] == "cannot resolve"
    assert kinds[("baseline", 84)] == "regular" and kinds[("final", 84)] == "ema"   # the checkpoint Table 1 reports
    assert len(kinds) == 4                                                # each run evaluated once
    without_se = tables.table1_claims({c: d for c, d in runs.items() if c != "se"}, dataset="data")
    assert without_se["claim"].tolist() == ["+ EMA (final) gain: final - se_mixup"]   # no row above to pair with


def test_discrepancy_table_pairs_each_switch_with_final_at_the_same_seed(monkeypatch):
    from samlib.report import tables

    n = 200
    right = lambda k: np.arange(n) < k                                # the first k images right
    correct = {("final", 84): right(160), ("sw", 84): right(164),     # +4 images: +2 points
               ("final", 85): right(170), ("sw", 85): right(170),     # the same images: 0
               ("one", 85): right(166), ("lone", 86): right(100)}     # -2 points; 86: final has no seed 86
    asked = []
    monkeypatch.setattr(tables, "load_run", lambda d: {"config": resolve("final", "smoke", seed=d[1])})
    monkeypatch.setattr(tables, "correct_on_test", lambda d, dataset, kind, device=None: asked.append(d) or correct[d])
    t = tables.discrepancy_table([("final", 84), ("final", 85)], {"sw": [("sw", 84), ("sw", 85)],
                                 "one": [("one", 85)], "lone": [("lone", 86)]}, dataset="data").set_index("switch")
    assert list(t.index) == ["sw", "one"]                             # nothing to pair "lone" with
    assert sorted(asked) == sorted(set(correct) - {("lone", 86)})     # final's seeds evaluated once, not per switch
    assert t.loc["sw", "test_acc"] == pytest.approx(83.5)             # (164 + 170) / 400
    assert (t.loc["sw", "seed 84"], t.loc["sw", "seed 85"]) == pytest.approx((2.0, 0.0))
    assert t.loc["sw", "mean"] == pytest.approx(1.0) and t.loc["sw", "sd"] == pytest.approx(2 ** 0.5)
    lo, hi = (float(x) for x in t.loc["sw", "seed 84 95% interval"].split(" - "))
    assert 0 <= lo < 2.0 < hi                                         # +2 points, never below 0
    assert t.loc["sw", "seed 85 95% interval"] == "0.00 - 0.00"       # identical predictions
    assert t.loc["one", "seed 85"] == pytest.approx(-2.0) and np.isnan(t.loc["one", "seed 84"])
    assert np.isnan(t.loc["one", "sd"]) and "reading" not in t.columns   # a switch is not a paper claim


@pytest.mark.parametrize("trained, native, amp, expected", [
    ("fp32", True, "auto", "fp32"),     # trained on a CPU without bf16, evaluated on one with it
    ("bf16", True, "auto", "bf16"),
    ("bf16", False, "auto", "fp32"),    # bf16 not native here: the device's own rule (fp32)
    ("fp16", True, "auto", "bf16"),     # fp16 is native on GPUs only: this CPU's own choice
    (None, True, "auto", "bf16"),       # unrecorded (older runs)
    ("fp64", True, "off", "fp32"),      # a damaged provenance.json is ignored
    (3, True, "auto", "bf16")])
def test_a_run_is_evaluated_in_the_precision_it_trained_in_where_native(monkeypatch, trained, native, amp, expected):
    import samlib.device as dev
    from samlib.config import resolve
    from samlib.report.runs import inference_precision

    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: native)
    run = {"config": resolve("final", "smoke", amp=amp), "provenance": {"precision": trained}}
    assert inference_precision(run) == expected
    for device in ("cpu", torch.device("cpu")):        # notebooks pass their parameter, a str
        assert inference_precision(run, device) == expected
    assert inference_precision(dict(run, provenance=None)) == {"off": "fp32"}.get(amp, "bf16" if native else "fp32")


def test_paired_difference_against_hand_counts():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_runs.py"
    spec = importlib.util.spec_from_file_location("compare_runs", path)
    compare_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare_runs)
    paired_difference = compare_runs.paired_difference

    a = [1, 1, 0, 0, 1, 1, 0, 1]
    b = [1, 0, 0, 1, 0, 1, 0, 1]
    d = paired_difference(a, b)
    assert d["acc_a"] == pytest.approx(62.5) and d["acc_b"] == pytest.approx(50.0)
    assert d["difference"] == pytest.approx(12.5)             # (2 - 1) / 8 images
    assert (d["only_a"], d["only_b"], d["images"]) == (2, 1, 8)
    lo, hi = d["interval"]
    assert lo <= 12.5 <= hi and lo >= -100 and hi <= 100
    same = paired_difference(a, a)
    assert same["difference"] == 0 and same["interval"] == (0, 0)
    with pytest.raises(SamlibError, match="different test sets"):
        paired_difference(a, b[:-1])


def test_correct_on_test_agrees_with_the_training_loops_final_test(tmp_path):
    """The per-image correctness of a run's selected checkpoints averages to the accuracy the
    training loop wrote in final.json (computed there by its own path)."""
    from samlib.data import synthetic_cifar10
    from samlib.report.tables import correct_on_test
    from samlib.run import train

    ds = synthetic_cifar10(n_train=160, n_test=48, seed=3)
    cfg = resolve("final", "smoke", widths=(4, 8, 8), blocks=(1, 1, 1), epochs=2, batch_size=32, val_size=32,
                  train_subset=None, test_subset=None, train_eval_size=32)
    run = train(cfg, dataset=ds, out=tmp_path, device="cpu", progress=False)
    final = json.loads((run / "final.json").read_text())
    for kind in ("ema", "regular"):
        correct = correct_on_test(run, ds, kind)
        assert correct.shape == (48,) and correct.dtype == bool
        assert correct.mean() == pytest.approx(final[f"test_acc_{kind}"])


def test_parameter_counts_are_the_codes_and_the_shortcut_variants():
    from samlib.report.tables import parameter_counts

    assert parameter_counts()["parameters"].tolist() == [4_697_162, 4_733_610, 4_697_162 + 128 * 256 * 8,
                                     4_697_162 + 128 * 256 * 8 + 64 * 128 * 8]


@pytest.mark.parametrize("stated, low, high, absolute, reading", [
    (0.31, 0.35, 0.90, False, "supported"), (0.16, -0.33, 0.07, False, "contradicted"),
    (0.16, -0.10, 0.30, False, "cannot resolve"), (float("nan"), -0.48, 0.04, False, "cannot resolve"),
    (float("nan"), 0.0, 0.0, False, "contradicted"),
    (0.31, float("nan"), float("nan"), False, "cannot resolve (no interval)"),
    (92.99, 92.5, 93.5, True, "supported"), (92.99, 80.0, 81.6, True, "contradicted")])
def test_claim_reading_from_the_interval(stated, low, high, absolute, reading):
    from samlib.report.tables import claim_reading

    assert claim_reading(stated, low, high, absolute) == reading


def test_figure1_deltas_read_the_papers_claims_only():
    t = _strategy_table().assign(test_images=10_000)
    probs = {s: torch.eye(10)[[0] * 10] for s in STRATEGIES}
    d = figure1_deltas(t, PAPER_FIGURE1, probs, np.zeros(10)).set_index("claim")
    assert d["reading"].iloc[:3].tolist() == ["contradicted", "contradicted", "contradicted"]   # identical: no gain
    assert d["reading"].iloc[3:5].tolist() == ["", ""]                   # not the paper's claims
    assert d["reading"].iloc[-1] == "contradicted" and d["ci95_low"].iloc[-1] < 92 < d["ci95_high"].iloc[-1]


def test_the_runs_say_their_seeds_precision_scale_and_time(monkeypatch):
    import samlib.report.runs as runs
    from samlib.data import synthetic_cifar10

    def fake_run(path):
        name, seed, precision = path.split(":")
        provenance = {"precision": precision, "train_seconds": 10.0} if precision else {}
        return {"config": resolve(name, "smoke", seed=int(seed)), "provenance": provenance,
                "metrics": pd.DataFrame({"seconds": [1.5, 2.0]})}

    monkeypatch.setattr(runs, "load_run", fake_run)
    table = {"se": ["se:84:fp32"], "final": ["final:84:bf16", "final:85:"]}
    assert runs.trained_precisions(table) == "bf16, fp32, unrecorded"
    assert runs.trained_precisions(["se:84:fp32"]) == "fp32"
    scale = runs.run_scale(table, synthetic_cifar10(1000, 10)).set_index("config")
    assert scale.loc["final", "seeds"] == [84, 85] and scale.loc["final", "trained_in"] == "bf16, unrecorded"
    assert scale.loc["final", "train_seconds"] == 13.5              # 10 s recorded + 3.5 s from metrics.csv
    assert scale.loc["se", "training_images"] == 768 - 256          # smoke: train_subset - val_size
    assert scale.loc["se", "epochs"] == 2 and scale.loc["se", "widths"] == [8, 16, 32]


def test_ablation_seeds_and_split_runs():
    from samlib.report.runs import ablation_seeds, split_runs

    seeds_of = ablation_seeds(["schedule"], [84], [84, 85])
    assert seeds_of == {"baseline": [84], "se": [84], "se_mixup": [84], "final": [84, 85],
                        "final+schedule=as_written": [84]}
    table1_runs, switch_runs = split_runs({c: [c] for c in seeds_of}, ["schedule"])
    assert list(table1_runs) == ["baseline", "se", "se_mixup", "final"]
    assert switch_runs == {"schedule=as_written": ["final+schedule=as_written"]}
