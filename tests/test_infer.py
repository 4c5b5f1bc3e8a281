"""samlib.infer and samlib.views against hand-made images, hand-computed metrics and independent formulas."""
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from samlib.errors import DataError, SamlibError
from samlib.infer import (PAPER_TTA, STRATEGIES, accuracy, ece, ensemble, evaluate_strategies,
                          get_strategy, model_norm, nll, predict_logits,
                          strategy_probs, tta_logits, tta_probs)
from samlib.report.tables import reliability_table
from helpers_method import AS_RUN_TTA, load_bench
from samlib.views import (as_run_hpad, as_run_tta, as_run_vshift, brightness, hflip, identity,
                          normalised_brightness, shift)

from helpers_core import fit_temperature

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def ramp(h=4, w=5):
    """(1, 1, h, w) image whose pixel (i, j) holds 10*i + j."""
    return (10 * torch.arange(h)[:, None] + torch.arange(w)[None, :]).float().view(1, 1, h, w)


# ---------------------------------------------------------------- views

def test_identity_and_hflip_by_hand():
    img = torch.tensor([[1., 2., 3.], [4., 5., 6.]]).view(1, 1, 2, 3)
    assert identity(img) is img
    assert torch.equal(hflip(img), torch.tensor([[3., 2., 1.], [6., 5., 4.]]).view(1, 1, 2, 3))


def test_shift_right_by_one_replicates_left_edge():
    x = ramp()[0, 0]
    expected = torch.cat([x[:, :1], x[:, :-1]], dim=1)      # content moves right
    assert torch.equal(shift(ramp(), 1, 0)[0, 0], expected)


def test_shift_down_by_one_replicates_top_edge():
    x = ramp()[0, 0]
    expected = torch.cat([x[:1], x[:-1]], dim=0)
    assert torch.equal(shift(ramp(), 0, 1)[0, 0], expected)


def test_shift_two_two_by_hand():
    x = ramp()[0, 0]
    rows = torch.cat([x[:1], x[:1], x[:-2]], dim=0)
    expected = torch.cat([rows[:, :1], rows[:, :1], rows[:, :-2]], dim=1)
    out = shift(ramp(), 2, 2)[0, 0]
    assert torch.equal(out, expected)
    assert out[0, 0] == 0 and out[3, 4] == 10 * 1 + 2            # pixel (1, 2) ends at (3, 4)


def test_shift_matches_replicate_pad_and_crop():
    x = torch.rand(2, 3, 6, 7)
    padded = nn.functional.pad(x, (2, 0, 0, 1), mode="replicate")    # 2 left, 1 bottom
    assert torch.equal(shift(x, 2, -1), padded[..., 1:7, 0:7])


def test_brightness_clamps():
    x = torch.tensor([0.9, 0.99, 0.0, 0.5]).view(1, 1, 2, 2)
    out = brightness(x, 1.05).flatten()
    assert out[0].item() == pytest.approx(0.945, abs=1e-6)
    assert out[1].item() == 1.0 and out[2].item() == 0.0
    assert brightness(x, 0.95).flatten()[3].item() == pytest.approx(0.475, abs=1e-7)


def test_paper_views_keep_shape_and_range():
    x = torch.rand(3, 3, 8, 8)
    assert [v.name for v in PAPER_TTA] == ["original", "hflip", "shift_1", "shift_2",
                                           "bright_1.05", "bright_0.95"]
    assert all(v.weight == 1.0 for v in PAPER_TTA)
    for v in PAPER_TTA + AS_RUN_TTA:
        y = v.fn(x)
        assert y.shape == x.shape


# ---------------------------------------------------------------- as-run views

def test_as_run_vshift_drops_first_row_and_replicates_bottom():
    x = ramp()[0, 0]
    expected = torch.cat([x[1:], x[-1:]], dim=0)
    assert torch.equal(as_run_vshift(ramp())[0, 0], expected)


def test_as_run_hpad_only_replaces_column_zero():
    x = ramp()[0, 0]
    expected = x.clone()
    expected[:, 0] = x[:, 1]
    assert torch.equal(as_run_hpad(ramp())[0, 0], expected)


def test_as_run_bright_wipes_below_mean_pixels():
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    x = torch.empty(1, 3, 1, 3)
    x[..., 0] = 0.1                                   # below the mean: z < 0 -> clamped to 0
    x[..., 1] = mean[..., 0] + 0.5 * std[..., 0]       # z = 0.5 -> 0.525
    x[..., 2] = 0.99                                  # z > 1 -> clamped to 1
    out = normalised_brightness(x, 1.05, MEAN, STD, clamp=True)
    assert torch.equal(out[..., 0], mean[..., 0])      # exactly the mean: normalised 0
    assert torch.equal((out[..., 0] - mean[..., 0]) / std[..., 0], torch.zeros(1, 3, 1))
    assert torch.allclose(out[..., 1], mean[..., 0] + 0.525 * std[..., 0], atol=1e-6)
    assert torch.allclose(out[..., 2], mean[..., 0] + std[..., 0], atol=1e-6)
    views = {v.name: v for v in as_run_tta(MEAN, STD)}
    assert torch.equal(views["as_run_bright_1.05"].fn(x), out)
    # x0.95 is not clamped in the reference: z -> 0.95 z
    dark = views["as_run_bright_0.95"].fn(x)
    z = (x - mean) / std
    assert torch.allclose((dark - mean) / std, 0.95 * z, atol=1e-5)


def test_as_run_views_reproduce_reference_ops_in_normalised_space():
    # The reference applied its views to z = (x - mean) / std; our views act on pixels and the
    # model normalises.  Normalising our output must give the reference's tensor.
    x = torch.rand(2, 3, 6, 5, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    z = (x - mean) / std
    pad = nn.functional.pad
    reference = {"original": z, "hflip": torch.flip(z, dims=[3]),
                 "as_run_vshift": pad(z[:, :, 1:, :], (0, 0, 0, 1), mode="replicate"),
                 "as_run_hpad": pad(z[:, :, :, 1:], (1, 0, 0, 0), mode="replicate"),
                 "as_run_bright_1.05": torch.clamp(z * 1.05, 0, 1),
                 "as_run_bright_0.95": z * 0.95}
    for view in as_run_tta(MEAN, STD):
        assert torch.allclose((view.fn(x) - mean) / std, reference[view.name], atol=1e-5), view.name


def test_as_run_weights():
    assert [v.weight for v in AS_RUN_TTA] == [1.5, 1.0, 1.0, 1.0, 1.0, 1.0]


# ---------------------------------------------------------------- prediction

class Tiny(nn.Module):
    def __init__(self, seed=0, classes=4):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def uint8_images(n, seed=0, size=8):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_batched_tta_equals_sequential_and_per_image():
    model = Tiny()
    model.bn.running_mean.uniform_(-0.1, 0.1)        # make eval-mode BN non-trivial
    images = uint8_images(37)
    views = PAPER_TTA[:3]
    model.train()
    batched = predict_logits(model, images, views, batch_size=16, precision="fp32")   # fp32, as the hand check
    sequential = load_bench().predict_logits_sequential(model, images, views, batch_size=16, precision="fp32")
    assert model.training                            # train mode restored
    assert batched.shape == (3, 37, 4) and batched.dtype == torch.float32
    assert torch.allclose(batched, sequential, atol=1e-5)
    model.eval()                                     # independent: one image, flipped, by hand
    x = torch.from_numpy(images[20]).permute(2, 0, 1).float()[None] / 255
    with torch.no_grad():
        assert torch.allclose(batched[1, 20], model(x.flip(-1))[0], atol=1e-5)


def test_predict_accepts_uint8_tensor_and_float_pixels():
    model = Tiny()
    images = uint8_images(5)
    as_tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    a = predict_logits(model, images)
    b = predict_logits(model, as_tensor)
    c = predict_logits(model, as_tensor.float() / 255)
    assert a.shape == (1, 5, 4)
    assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(DataError):
        predict_logits(model, images.transpose(0, 3, 1, 2))   # NCHW numpy: wrong layout


# ---------------------------------------------------------------- combination

def test_tta_probs_weighted_by_hand():
    logits = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]])   # V=3, N=1, C=2
    def sm(a, b):
        return np.array([math.exp(a), math.exp(b)]) / (math.exp(a) + math.exp(b))
    expected = (1.5 * sm(2, 0) + sm(0, 1) + sm(1, 1)) / 3.5
    assert np.allclose(tta_probs(logits, (1.5, 1, 1)).numpy()[0], expected, atol=1e-7)
    expected_t = (1.5 * sm(1, 0) + sm(0, 0.5) + sm(0.5, 0.5)) / 3.5          # T = 2
    assert np.allclose(tta_probs(logits, (1.5, 1, 1), 2.0).numpy()[0], expected_t, atol=1e-7)
    assert np.allclose(tta_logits(logits, (1.5, 1, 1), 2.0).numpy()[0],
                       (1.5 * np.array([1, 0]) + [0, 0.5] + [0.5, 0.5]) / 3.5, atol=1e-7)
    with pytest.raises(ValueError):
        tta_probs(logits, (1.0, 1.0))


def test_ensemble_weighted_sum():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert torch.allclose(ensemble(a, b), torch.tensor([[0.4, 0.6]]))


# ---------------------------------------------------------------- metrics

def test_accuracy_and_nll_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.25, 0.5, 0.25]])
    labels = [0, 1, 1]
    assert accuracy(probs, labels) == pytest.approx(2 / 3)
    assert nll(probs, np.array(labels)) == pytest.approx(-(math.log(0.7) + math.log(0.3) + math.log(0.5)) / 3)
    assert nll(torch.tensor([[1.0, 0.0]]), [1]) == pytest.approx(-math.log(1e-12))


def test_ece_by_hand_two_bins():
    # confidences 0.9 (right), 0.8 (wrong) -> bin (0.5, 1]; 0.4 (right), 0.45 (wrong) -> (0, 0.5]
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.4, 0.3, 0.3], [0.3, 0.25, 0.45]])
    labels = [0, 0, 0, 0]
    high = abs(0.5 - 0.85)                          # acc 1/2, mean conf 0.85
    low = abs(0.5 - 0.425)                          # acc 1/2, mean conf 0.425
    assert ece(probs, labels, n_bins=2) == pytest.approx(0.5 * high + 0.5 * low)
    table = reliability_table(probs, labels, n_bins=2)      # the report's frame of calibration_bins
    assert list(table.columns) == ["bin_lower", "bin_upper", "count", "confidence", "accuracy"]
    assert table["count"].tolist() == [2, 2]
    assert table["confidence"].tolist() == pytest.approx([0.425, 0.85])
    empty = reliability_table(probs, labels, n_bins=15)
    assert empty["count"].sum() == 4
    assert ((empty["count"] > 0) == empty["accuracy"].notna()).all()   # NaN exactly when empty


def test_ece_edge_confidence_goes_to_lower_bin():
    table = reliability_table(torch.tensor([[0.5, 0.5]]), [0], n_bins=2)   # (0, 0.5]
    assert table["count"].tolist() == [1, 0]


def test_fit_temperature_recovers_two():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 5, generator=gen) * 2
    labels = torch.multinomial(torch.softmax(z, -1), 1, generator=gen).squeeze(1)
    t = fit_temperature(2 * z, labels)
    assert t == pytest.approx(2.0, rel=0.05)
    # (V, N, C) with identical views and any weights: the same T
    t_v = fit_temperature(torch.stack([2 * z, 2 * z]), labels, weights=(1.5, 1.0))
    assert t_v == pytest.approx(t, rel=1e-3)


# ---------------------------------------------------------------- strategy table

def test_evaluate_strategies_rows_and_ensemble():
    regular, ema = Tiny(seed=1), Tiny(seed=2)
    rng = np.random.default_rng(3)
    val = (uint8_images(40, seed=4), rng.integers(0, 4, 40))
    test = (uint8_images(50, seed=5), rng.integers(0, 4, 50))
    rows, probs, selected_on = evaluate_strategies(regular, ema, val, test, batch_size=16, norm=(MEAN, STD),
                                                   precision="fp32")
    frame = pd.DataFrame(rows)
    assert selected_on == "validation"
    best = frame.loc[frame["selected"], "strategy"].tolist()
    assert len(best) == 1 and best[0] in STRATEGIES              # exactly one row is selected
    assert frame["strategy"].tolist() == list(STRATEGIES) + best * 2
    assert frame["temperature_from"].tolist() == ["strategy"] * len(STRATEGIES) + ["paper", "fitted on validation"]
    assert frame["temperature"].iloc[-2] == 1.2 and set(probs) == set(STRATEGIES)
    assert frame[["test_accuracy", "val_accuracy"]].stack().between(0, 1).all()
    # the selected strategy has the best validation accuracy of the T = strategy rows
    own = frame[frame["temperature_from"] == "strategy"].set_index("strategy")
    assert own.loc[best[0], "val_accuracy"] == own["val_accuracy"].max()
    # independent recomputation of the ensemble row
    x = torch.from_numpy(test[0]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        p = 0.4 * torch.softmax(regular.eval()(x), -1) + 0.6 * torch.softmax(ema.eval()(x), -1)
    acc = (p.argmax(1).numpy() == test[1]).mean()
    assert own.loc["ensemble", "test_accuracy"] == pytest.approx(acc)
    assert torch.allclose(probs["ensemble"], p, atol=1e-5)
    # the as-run row: the code's logit average / 1.2 with its own views and weights
    views = as_run_tta(MEAN, STD)
    w = torch.tensor([v.weight for v in views]) / sum(v.weight for v in views)
    with torch.no_grad():
        z = sum(wv * (0.4 * regular(v.fn(x)) + 0.6 * ema(v.fn(x))) for wv, v in zip(w, views)) / 1.2
    assert torch.allclose(probs["ensemble+tta (as run)"], torch.softmax(z, -1), atol=1e-5)
    assert own.loc["ensemble+tta (as run)", "temperature"] == 1.2


def test_evaluate_strategies_without_ema_or_val():
    model = Tiny(seed=1)
    test = (uint8_images(20, seed=5), np.arange(20) % 4)
    rows, probs, selected_on = evaluate_strategies(model, None, None, test, batch_size=8, norm=(MEAN, STD))
    frame = pd.DataFrame(rows)
    best = frame.loc[frame["selected"], "strategy"].iloc[0]
    assert frame["strategy"].tolist() == ["standard", "tta", best]
    assert selected_on == "test" and set(probs) == {"standard", "tta"}
    assert frame["val_accuracy"].isna().all()


def test_registry_names_models_views_and_combination():
    """Every strategy's probabilities from the registry equal a hand-written combination."""
    regular, ema = Tiny(seed=1), Tiny(seed=2)
    images = uint8_images(12, seed=6)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        def soft(model, views):
            return sum(torch.softmax(model.eval()(v.fn(x)), -1) for v in views) / len(views)
        expected = {"standard": soft(regular, PAPER_TTA[:1]), "tta": soft(regular, PAPER_TTA),
                    "ema": soft(ema, PAPER_TTA[:1]), "ema+tta": soft(ema, PAPER_TTA),
                    "ensemble": 0.4 * soft(regular, PAPER_TTA[:1]) + 0.6 * soft(ema, PAPER_TTA[:1]),
                    "ensemble+tta": 0.4 * soft(regular, PAPER_TTA) + 0.6 * soft(ema, PAPER_TTA)}
    for name, want in expected.items():
        got = strategy_probs(regular, ema, images, name, batch_size=6, precision="fp32")   # fp32, as by hand
        assert torch.allclose(got, want, atol=1e-5), name
    with pytest.raises(SamlibError, match="EMA"):
        strategy_probs(regular, None, images, "ensemble")
    with pytest.raises(SamlibError, match="unknown strategy"):
        get_strategy("vote")


def test_model_norm_reads_normalize_buffers():
    class Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))
    net = nn.Sequential(Norm(), nn.Identity())
    mean, std = model_norm(net)
    assert mean == pytest.approx(MEAN) and std == pytest.approx(STD)
    assert model_norm(nn.Linear(1, 1)) is None


@pytest.mark.parametrize("native", [True, False])
def test_inference_precision_follows_the_training_rule(monkeypatch, native):
    """precision=None: bf16 autocast on a CPU with native bf16, else fp32 (samlib.device's rule for
    training); "fp32": fp32 everywhere.  bf16 logits are close to fp32 ones, not equal."""
    import samlib.device as dev

    monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda: native)
    model = Tiny(seed=1)
    images = uint8_images(16, seed=7)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).contiguous()   # NCHW, as predict_logits feeds it
    with torch.no_grad():
        fp32 = model.eval()(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x).float()
    assert not torch.equal(fp32, bf16)                  # the two precisions can be told apart
    auto = predict_logits(model, images, precision=None)[0]
    assert torch.equal(auto, bf16 if native else fp32)
    assert torch.equal(predict_logits(model, images, precision="fp32")[0], fp32)
