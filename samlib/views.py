"""Test-time views (paper, "Inference": original, flip, 1-2 px shifts, brightness +-5%) and
the views the authors' code actually used (SAMResNet.py ``tta_predict``).

Views act on pixel-space float images (B, 3, H, W) in [0, 1]; the model normalises inside.
"""
from __future__ import annotations

from functools import lru_cache, partial
from typing import Callable, NamedTuple

import torch

from samlib.data import CIFAR_MEAN, STD_AS_RUN


class View(NamedTuple):
    """One test-time view: ``fn`` maps (B, 3, H, W) pixel images to the same shape."""
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    weight: float = 1.0


# ---------------------------------------------------------------- the paper's views

def identity(images: torch.Tensor) -> torch.Tensor:
    return images


def hflip(images: torch.Tensor) -> torch.Tensor:
    """Mirror left-right."""
    return images.flip(-1)


# ---------------------------------------------------------------- constants, made once per device
# A view is called once per batch: its index and per-channel tensors are made on the first
# call for a device and kept (outside inference mode, so they serve any caller).

@lru_cache(maxsize=64)
def _shifted_index(n: int, offset: int, lo: int, device: torch.device) -> torch.Tensor:
    """arange(n) - offset, clamped to [lo, n - 1]: the source row/column of each output one."""
    with torch.inference_mode(False):
        return (torch.arange(n, device=device) - offset).clamp(lo, n - 1)


@lru_cache(maxsize=64)
def _channel_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype, device=device).view(1, -1, 1, 1)


def shift(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Move the content dx px right and dy px down (negative: left/up), filling with the edge
    pixels: the same as replicate-padding by (dx, dy) and cropping back to H x W."""
    h, w = images.shape[-2:]
    rows = _shifted_index(h, dy, 0, images.device)
    cols = _shifted_index(w, dx, 0, images.device)
    return images.index_select(-2, rows).index_select(-1, cols)


def brightness(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Scale pixel values by ``factor`` and clamp to [0, 1]."""
    return (images * factor).clamp(0.0, 1.0)


# Paper: "original, horizontal flip, shifts of 1-2 px, brightness +-5% (4-6 views)".  The
# shift direction is not given; we take the diagonal (right and down) by 1 and by 2 px.
PAPER_TTA = [
    View("original", identity, 1.0),
    View("hflip", hflip, 1.0),
    View("shift_1", partial(shift, dx=1, dy=1), 1.0),
    View("shift_2", partial(shift, dx=2, dy=2), 1.0),
    View("bright_1.05", partial(brightness, factor=1.05), 1.0),
    View("bright_0.95", partial(brightness, factor=0.95), 1.0),
]


def _channel_view(values, like: torch.Tensor) -> torch.Tensor:
    return _channel_constant(tuple(float(v) for v in values), like.dtype, like.device)


def as_run_hpad(images: torch.Tensor) -> torch.Tensor:
    """The reference's "horizontal shift" ``pad(img[..., 1:], (1, 0, 0, 0), 'replicate')``:
    drop column 0, replicate the new first column on the left.  Only column 0 changes (it
    becomes a copy of column 1); every other pixel stays put - nearly the identity."""
    cols = _shifted_index(images.shape[-1], 0, 1, images.device)
    return images.index_select(-1, cols)


def as_run_vshift(images: torch.Tensor) -> torch.Tensor:
    """The reference's vertical shift ``pad(img[:, :, 1:], (0, 0, 0, 1), 'replicate')``: drop
    row 0, replicate the last row at the bottom = content moves up 1 px."""
    return shift(images, dx=0, dy=-1)


def normalised_brightness(images: torch.Tensor, factor: float, mean, std, clamp: bool) -> torch.Tensor:
    """Brightness as the reference applied it: on the *normalised* tensor z = (x - mean)/std,
    z * factor, optionally clamped to [0, 1] there, then mapped back to pixel space so that a
    model normalising with (mean, std) sees exactly the reference model's input.  The clamp
    sends every below-mean value to z = 0, i.e. pixel value ``mean``."""
    m, s = _channel_view(mean, images), _channel_view(std, images)
    z = (images - m) / s * factor
    if clamp:
        z = z.clamp(0.0, 1.0)
    return z * s + m


def as_run_tta(mean=CIFAR_MEAN, std=STD_AS_RUN) -> list:
    """The six views of the reference ``tta_predict``, for a model normalising with
    (mean, std).  x1.05 is clamped in normalised space, x0.95 is not (as in the code)."""
    return [
        View("original", identity, 1.5),
        View("hflip", hflip, 1.0),
        View("as_run_vshift", as_run_vshift, 1.0),
        View("as_run_hpad", as_run_hpad, 1.0),
        View("as_run_bright_1.05",
             partial(normalised_brightness, factor=1.05, mean=mean, std=std, clamp=True), 1.0),
        View("as_run_bright_0.95",
             partial(normalised_brightness, factor=0.95, mean=mean, std=std, clamp=False), 1.0),
    ]


AS_RUN_TTA = as_run_tta(CIFAR_MEAN, STD_AS_RUN)
