"""Test-time views (paper Section 3.4: original, flip, 1-2 px shifts, brightness +-5%) and those the
authors' code used (SAMResNet.py ``tta_predict``; README, discrepancies).  A view maps pixel-space
images (B, 3, H, W) in [0, 1] to the same shape; the model normalises."""
from functools import lru_cache, partial
from typing import Callable, NamedTuple

import torch

from samlib.data import CIFAR_MEAN, STD_AS_RUN


class View(NamedTuple):
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    weight: float = 1.0


# Constants made once per device, outside inference mode so that they serve any caller.
@lru_cache(maxsize=64)
def _shifted_index(n: int, offset: int, lo: int, device: torch.device) -> torch.Tensor:
    """arange(n) - offset, clamped to [lo, n - 1]: the source row/column of each output one."""
    with torch.inference_mode(False):
        return (torch.arange(n, device=device) - offset).clamp(lo, n - 1)


@lru_cache(maxsize=64)
def _channel_constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        return torch.tensor(values, dtype=dtype, device=device).view(1, -1, 1, 1)


def identity(images: torch.Tensor) -> torch.Tensor:
    return images


def hflip(images: torch.Tensor) -> torch.Tensor:
    return images.flip(-1)


def shift(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """Content moved dx px right and dy px down (negative: left/up), edge pixels replicated."""
    h, w = images.shape[-2:]
    rows = _shifted_index(h, dy, 0, images.device)
    cols = _shifted_index(w, dx, 0, images.device)
    return images.index_select(-2, rows).index_select(-1, cols)


def brightness(images: torch.Tensor, factor: float) -> torch.Tensor:
    return (images * factor).clamp(0.0, 1.0)


# The paper gives no shift direction: we take the diagonal (right and down).
PAPER_TTA = [View("original", identity), View("hflip", hflip),
             View("shift_1", partial(shift, dx=1, dy=1)), View("shift_2", partial(shift, dx=2, dy=2)),
             View("bright_1.05", partial(brightness, factor=1.05)),
             View("bright_0.95", partial(brightness, factor=0.95))]


def as_run_hpad(images: torch.Tensor) -> torch.Tensor:
    """The code's "horizontal shift" ``pad(img[..., 1:], (1, 0, 0, 0), 'replicate')``: column 0 := column 1."""
    cols = _shifted_index(images.shape[-1], 0, 1, images.device)
    return images.index_select(-1, cols)


def as_run_vshift(images: torch.Tensor) -> torch.Tensor:
    """The code's ``pad(img[:, :, 1:], (0, 0, 0, 1), 'replicate')``: content up 1 px."""
    return shift(images, dx=0, dy=-1)


def normalised_brightness(images: torch.Tensor, factor: float, mean, std, clamp: bool) -> torch.Tensor:
    """The code's brightness on the normalised z = (x - mean)/std: z * factor, optionally clamped to [0, 1]."""
    m = _channel_constant(tuple(float(v) for v in mean), images.dtype, images.device)
    s = _channel_constant(tuple(float(v) for v in std), images.dtype, images.device)
    z = (images - m) / s * factor
    if clamp:
        z = z.clamp(0.0, 1.0)
    return z * s + m


def as_run_tta(mean=CIFAR_MEAN, std=STD_AS_RUN) -> list:
    """The six views of the code's ``tta_predict`` for a model normalising with (mean, std)."""
    return [View("original", identity, 1.5), View("hflip", hflip), View("as_run_vshift", as_run_vshift),
            View("as_run_hpad", as_run_hpad),
            View("as_run_bright_1.05", partial(normalised_brightness, factor=1.05, mean=mean, std=std, clamp=True)),
            View("as_run_bright_0.95", partial(normalised_brightness, factor=0.95, mean=mean, std=std, clamp=False))]
