"""Test-only forms of samlib's method modules: per-batch augmentation, the LR curve, the
as-run TTA views.  They draw exactly what the library's training path draws."""
from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from samlib.augment import TrainTransform, _draw, crop_windows, to_pixels
from samlib.data import CIFAR_MEAN, STD_AS_RUN
from samlib.optim import schedule_curves
from samlib.views import as_run_tta


def random_crop(images: torch.Tensor, padding: int = 4,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample RandomCrop(H x W, padding) with zero padding: offsets dy, then dx, uniform
    in 0..2*padding; the crop is rows [dy, dy+H), columns [dx, dx+W) of the padded image."""
    if padding <= 0:
        return images
    b, c, h, w = images.shape
    dy = _draw(images, generator, torch.randint, 0, 2 * padding + 1, (b,))
    dx = _draw(images, generator, torch.randint, 0, 2 * padding + 1, (b,))
    padded = TF.pad(images, [padding], fill=0)
    return crop_windows(padded, torch.arange(b, device=images.device), dy, dx, (h, w))


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image flipped left-right with probability 0.5 (RandomHorizontalFlip)."""
    flip = _draw(images, generator, torch.rand, images.shape[0]) < 0.5
    return torch.where(flip[:, None, None, None], TF.horizontal_flip(images), images)


def augment_uint8(images_uint8: torch.Tensor, crop_padding: int = 4, flip: bool = True,
                  cutout_size: int = 16, generator: torch.Generator | None = None) -> torch.Tensor:
    """One uint8 (B, 3, H, W) batch through the train transform (see ``TrainTransform``)."""
    transform = TrainTransform(images_uint8, crop_padding, flip, cutout_size)
    return transform(torch.arange(len(images_uint8), device=images_uint8.device), generator)


def augment_batch(images_uint8: torch.Tensor, crop_padding: int = 4, flip: bool = True,
                  cutout_size: int = 16, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> augmented float pixel-space batch: the reference's train transform."""
    return to_pixels(augment_uint8(images_uint8, crop_padding, flip, cutout_size, generator))


def lr_curve(kind: str, epochs: int, steps_per_epoch: int, **kwargs) -> np.ndarray:
    """The LR used at each of the epochs * steps_per_epoch optimizer steps."""
    return schedule_curves(kind, epochs, steps_per_epoch, **kwargs)[0]


AS_RUN_TTA = as_run_tta(CIFAR_MEAN, STD_AS_RUN)


def load_bench():
    """benchmarks/bench.py (a script, not part of the package), loaded once by its path."""
    import importlib.util
    import sys
    from pathlib import Path

    if "bench" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench", Path(__file__).parents[1] / "benchmarks" / "bench.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules["bench"] = module
    return sys.modules["bench"]
