"""Test-only helpers of samlib's core modules (config, data, device, infer)."""
from __future__ import annotations

import torch

from samlib.infer import fit_temperature_fn, tta_probs


def fit_temperature(logits: torch.Tensor, labels, weights=None) -> float:
    """Temperature minimising the NLL of softmax(logits / T): ``logits`` (N, C), or (V, N, C) with
    view ``weights`` (one T divides every view's logits; the NLL of ``tta_probs``)."""
    logits = logits.double()
    return fit_temperature_fn(lambda t: tta_probs(logits, weights, t), labels)
