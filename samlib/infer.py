"""Inference (paper, "Inference" and Figure 1): batched TTA prediction, ensembling, temperature scaling,
calibration metrics and the registry of strategies."""

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from samlib.data import CIFAR_MEAN, STD_AS_RUN
from samlib.device import autocast, precision_for
from samlib.errors import DataError, SamlibError
from samlib.progress import progress_bar
from samlib.views import PAPER_TTA, View, as_run_tta, identity


def _check_images(images) -> None:
    is_numpy = isinstance(images, np.ndarray)
    if not is_numpy and not torch.is_tensor(images):
        raise DataError(f"images must be a numpy array or a torch tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[-1 if is_numpy else 1] != 3:
        expected = "a numpy array (N, H, W, 3)" if is_numpy else "a tensor (N, 3, H, W)"
        raise DataError(f"images must be {expected}, got shape {tuple(images.shape)}")
    if len(images) == 0:
        raise DataError("no images to predict")


def _pixel_batch(images, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Float (B, 3, H, W) pixel batch on ``device``; uint8 is divided by 255 (as ToTensor)."""
    if isinstance(images, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(images[start:stop])).to(device).permute(0, 3, 1, 2)
    else:
        x = images[start:stop].to(device)
    return (x.float().div(255.0) if x.dtype == torch.uint8 else x.float()).contiguous()


def _model_device(model: torch.nn.Module, device) -> torch.device:
    if device is None:
        return next(model.parameters()).device
    device = torch.device(device)
    model.to(device)
    return device


def _forward(model, x: torch.Tensor, device: torch.device, precision: Optional[str] = None) -> torch.Tensor:
    with autocast(device, precision or precision_for("auto", device)):
        return model(x).float()


def predict_logits(model: torch.nn.Module, images, views: Optional[Sequence[View]] = None,
                   batch_size: int = 1000, device=None, precision: Optional[str] = None, bar=None) -> torch.Tensor:
    """Float32 CPU logits (V, N, classes) of every view (None: the image itself) of uint8 numpy (N, H, W, 3)
    or tensor (N, 3, H, W) images in eval mode; each chunk of ``batch_size // V`` images passes once."""
    views = list(views) if views else [View("original", identity)]
    _check_images(images)
    device = _model_device(model, device)
    was_training, n, out = model.training, len(images), None
    model.eval()
    try:
        with torch.inference_mode():
            chunk = max(1, batch_size // len(views))
            for start in range(0, n, chunk):
                x = _pixel_batch(images, start, start + chunk, device)
                logits = _forward(model, torch.cat([v.fn(x) for v in views]), device, precision)
                logits = logits.view(len(views), len(x), -1).cpu()
                if out is None:
                    out = torch.empty(len(views), n, logits.shape[-1])
                out[:, start:start + len(x)] = logits
                if bar is not None:
                    bar.update(len(x) * len(views))
    finally:
        model.train(was_training)
    return out


def _views_and_weights(logits_v: torch.Tensor, weights):
    """(V, N, C) logits (a single view (N, C) too) and their normalised view weights (None: equal)."""
    logits_v = logits_v.unsqueeze(0) if logits_v.ndim == 2 else logits_v
    n_views = len(logits_v)
    w = torch.ones(n_views, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
    if w.shape != (n_views,) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"need {n_views} non-negative view weights with a positive sum, got {weights!r}")
    return logits_v, (w / w.sum()).to(logits_v.device, logits_v.dtype)


def tta_probs(logits_v: torch.Tensor, weights=None, temperature: float = 1.0) -> torch.Tensor:
    """(N, classes): softmax(logits / T) of each view, averaged with the view ``weights`` (the usual TTA)."""
    logits_v, w = _views_and_weights(logits_v, weights)
    return torch.einsum("v,vnc->nc", w, torch.softmax(logits_v / temperature, dim=-1))


def tta_logits(logits_v: torch.Tensor, weights=None, temperature: float = 1.0) -> torch.Tensor:
    """(N, classes): the reference code's ``tta_predict`` combination, sum_v w_v * logits_v / T."""
    logits_v, w = _views_and_weights(logits_v, weights)
    return torch.einsum("v,vnc->nc", w, logits_v / temperature)


def ensemble(probs_a: torch.Tensor, probs_b: torch.Tensor, weights=(0.4, 0.6)) -> torch.Tensor:
    """w_a * probs_a + w_b * probs_b (paper: 0.4 regular + 0.6 EMA; weights used as given)."""
    return weights[0] * probs_a + weights[1] * probs_b


def _labels(labels) -> torch.Tensor:
    return torch.as_tensor(np.asarray(labels) if not torch.is_tensor(labels) else labels).long().cpu()


def accuracy(probs: torch.Tensor, labels) -> float:
    """Fraction of arg-max predictions equal to the labels."""
    return (probs.argmax(-1).cpu() == _labels(labels)).double().mean().item()


def _nll(probs: torch.Tensor, labels) -> torch.Tensor:
    p_true = probs.double().cpu().gather(1, _labels(labels)[:, None]).squeeze(1)
    return -p_true.clamp_min(1e-12).log().mean()


def nll(probs: torch.Tensor, labels) -> float:
    """Mean -log p(true class), p clamped at 1e-12."""
    return _nll(probs, labels).item()


def calibration_bins(probs: torch.Tensor, labels, n_bins: int = 15) -> dict:
    """Equal-width confidence bins (lower, upper]: edges; per bin count, mean confidence, accuracy (NaN: empty)."""
    probs = probs.double().cpu()
    conf, pred = probs.max(-1)
    correct = (pred == _labels(labels)).double()
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)
    idx = torch.bucketize(conf, edges[1:-1], right=False)   # edges[i] < conf <= edges[i + 1]
    count = torch.bincount(idx, minlength=n_bins).double()
    return {"edges": edges, "count": count,
            "confidence": torch.bincount(idx, conf, minlength=n_bins) / count,
            "accuracy": torch.bincount(idx, correct, minlength=n_bins) / count}


def ece(probs: torch.Tensor, labels, n_bins: int = 15) -> float:
    """Expected calibration error: sum over bins of count/N * |accuracy - confidence|."""
    b = calibration_bins(probs, labels, n_bins)
    filled = b["count"] > 0
    gap = (b["accuracy"][filled] - b["confidence"][filled]).abs()
    return (b["count"][filled] * gap).sum().item() / b["count"].sum().item()


def fit_temperature_fn(probs_at: Callable[[torch.Tensor], torch.Tensor], labels,
                       t_min: float = 0.05, t_max: float = 20.0) -> float:
    """Temperature scaling: the T minimising nll(probs_at(T), labels), L-BFGS on log T from 1, clamped."""
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=100, tolerance_grad=1e-10,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = _nll(probs_at(log_t.exp()), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp().clamp(t_min, t_max))


PAPER_TEMPERATURE = 1.2


@dataclass(frozen=True)
class Strategy:
    """One inference strategy of Figure 1: which model(s), which views, how combined (tta_probs or tta_logits)."""
    name: str
    models: tuple = ("regular",)    # ("regular",) | ("ema",) | ("regular", "ema")
    views: str = "none"             # "none" | "paper" | "as_run"
    combine: str = "probs"          # "probs" | "logits"
    temperature: float = 1.0

    def view_list(self, norm=(CIFAR_MEAN, STD_AS_RUN)) -> list:
        """The views this strategy predicts; ``norm`` is the model's (mean, std) (as-run views)."""
        return {"none": PAPER_TTA[:1], "paper": PAPER_TTA, "as_run": as_run_tta(*norm)}[self.views]

    def probs(self, logits: dict, weights_v, temperature=None) -> torch.Tensor:
        """(N, classes) from {model: view logits (V, N, C)} of this strategy's views."""
        t = self.temperature if temperature is None else temperature
        mix = (0.4, 0.6) if len(self.models) == 2 else (1.0,)     # paper: 0.4 regular + 0.6 EMA
        if self.combine == "logits":
            return torch.softmax(sum(w * tta_logits(logits[m], weights_v, t)
                                     for w, m in zip(mix, self.models)), dim=-1)
        per_model = [tta_probs(logits[m], weights_v, t) for m in self.models]
        return per_model[0] if len(per_model) == 1 else ensemble(*per_model, mix)


STRATEGIES = {s.name: s for s in (
    Strategy("standard"),
    Strategy("tta", views="paper"),
    Strategy("ema", ("ema",)),
    Strategy("ema+tta", ("ema",), "paper"),
    Strategy("ensemble", ("regular", "ema")),
    Strategy("ensemble+tta", ("regular", "ema"), "paper"),
    Strategy("ensemble+tta (as run)", ("regular", "ema"), "as_run", "logits", PAPER_TEMPERATURE),
)}


def get_strategy(name: str, has_ema: bool = True) -> Strategy:
    """The registry entry, or a SamlibError naming the choices."""
    if name not in STRATEGIES:
        raise SamlibError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    strategy = STRATEGIES[name]
    if "ema" in strategy.models and not has_ema:
        raise SamlibError(f"strategy {name!r} needs an EMA checkpoint; this run trained without EMA "
                          "(use standard or tta)")
    return strategy


def model_norm(model: torch.nn.Module):
    """(mean, std) of the first submodule holding 3-channel ``mean``/``std`` tensors (Normalize), else None."""
    for module in model.modules():
        mean, std = getattr(module, "mean", None), getattr(module, "std", None)
        if torch.is_tensor(mean) and torch.is_tensor(std) and mean.numel() == std.numel() == 3:
            return tuple(mean.flatten().tolist()), tuple(std.flatten().tolist())
    return None


def strategy_probs(regular, ema, images, strategy: str = "ensemble+tta", device=None, batch_size: int = 500,
                   temperature=None, precision: Optional[str] = None, progress: bool = True) -> torch.Tensor:
    """Class probabilities (N, classes) of one registry strategy for a run's two models."""
    s = get_strategy(strategy, has_ema=ema is not None)
    views = s.view_list(model_norm(regular) or (CIFAR_MEAN, STD_AS_RUN))
    models = {"regular": regular, "ema": ema}
    with progress_bar(total=len(s.models) * len(views) * len(images), unit="img", disable=not progress,
                      desc=f"{strategy}: {len(s.models)} model(s) x {len(views)} views") as bar:
        logits = {m: predict_logits(models[m], images, views, batch_size, device, precision, bar).double()
                  for m in s.models}
    return s.probs(logits, [v.weight for v in views], temperature).float()


def evaluate_strategies(regular_model, ema_model, val, test, device=None, batch_size: int = 1000,
                        norm=None, precision: Optional[str] = None, progress: bool = True):
    """Figure 1: a row per strategy, then the validation-best one (no ``val``: test-best) at T = 1.2 and at the T
    fitted on ``val``; one prediction per model and split.  Returns (rows, test probs per strategy, selected_on)."""
    norm = norm or model_norm(regular_model) or (CIFAR_MEAN, STD_AS_RUN)
    models = {k: m for k, m in (("regular", regular_model), ("ema", ema_model)) if m is not None}
    strategies = [s for s in STRATEGIES.values() if all(m in models for m in s.models)]
    union = list({v.name: v for s in strategies for v in s.view_list(norm)}.values())
    pos = {v.name: i for i, v in enumerate(union)}
    splits = {"test": test, "val": val} if val is not None and len(val[1]) > 0 else {"test": test}
    total = len(models) * len(union) * sum(len(labels) for _, labels in splits.values())
    desc = f"{len(strategies)} strategies: {len(models)} model(s) x {len(union)} views x {' + '.join(splits)}"
    with progress_bar(total=total, unit="img", desc=desc, disable=not progress) as bar:
        logits = {(m, split): predict_logits(models[m], images, union, batch_size, device, precision, bar).double()
                  for m in models for split, (images, _) in splits.items()}

    def probs(s: Strategy, split: str, t=None):
        views = s.view_list(norm)
        rows = [pos[v.name] for v in views]
        return s.probs({m: logits[m, split][rows] for m in s.models}, [v.weight for v in views], t)

    on = "val" if "val" in splits else "test"

    def score(s):                                # higher accuracy, then lower NLL
        p = probs(s, on)
        return accuracy(p, splits[on][1]), -nll(p, splits[on][1])

    best = max(strategies, key=score)            # ties: the earlier (simpler) strategy
    rows, test_probs = [], {}

    def row(s, t, source):
        p = probs(s, "test", t)
        val_acc = accuracy(probs(s, "val", t), val[1]) if "val" in splits else float("nan")
        rows.append({"strategy": s.name, "temperature": float(t), "temperature_from": source,
                     "selected": s is best and source == "strategy", "test_images": len(test[1]),
                     "test_accuracy": accuracy(p, test[1]), "test_nll": nll(p, test[1]),
                     "test_ece": ece(p, test[1]), "val_accuracy": val_acc})
        return p

    for s in strategies:
        test_probs[s.name] = row(s, s.temperature, "strategy").float()
    row(best, PAPER_TEMPERATURE, "paper")
    if "val" in splits:
        row(best, fit_temperature_fn(lambda t: probs(best, "val", t), val[1]), "fitted on validation")
    return rows, test_probs, ("validation" if on == "val" else "test")
