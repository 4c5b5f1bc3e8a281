"""Batched, on-device training augmentation (paper Section "Data augmentation").

Reference pipeline (SAMResNet.py): RandomCrop(32, padding=4), RandomHorizontalFlip,
ToTensor, Cutout(1 hole, 16 px), Normalize; MixUp (alpha 0.3, one lambda per batch,
one random permutation) on top, Cutout kept on.  Here every step works on a whole float
batch in pixel space [0, 1] (B, C, H, W) with per-sample randomness drawn as tensors, as
airbench does: no per-image Python, no PIL, no DataLoader workers.  Normalisation is
inside the model (samlib.model.Normalize), so Cutout's 0 is a pixel-space 0, as in the
reference, where Cutout runs before Normalize.

Why not torchvision.transforms.v2 MixUp/CutMix/RandomCrop in the hot path: on a batched
tensor v2 draws ONE crop offset / flip decision for the whole call, and its MixUp/CutMix
sample from the global RNG with no `generator` argument, so runs cannot be seeded
per-stream.  v2.functional is used for the deterministic pieces (pad, flip).

Every function takes `generator` (None = global RNG).  Random tensors are drawn on the
generator's device (else images.device) and moved to images.device.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

MIX_KINDS = ("none", "mixup", "cutmix")


def _device(images: torch.Tensor, generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else images.device


def _randint(high: int, size, images, generator) -> torch.Tensor:
    dev = _device(images, generator)
    return torch.randint(0, high, size, generator=generator, device=dev).to(images.device)


def _crop_offsets(b: int, padding: int, images, generator):
    """(dy, dx): per-image crop offsets, uniform in 0..2*padding, dy drawn first."""
    dy = _randint(2 * padding + 1, (b,), images, generator)
    return dy, _randint(2 * padding + 1, (b,), images, generator)


def _coin_flips(b: int, images, generator) -> torch.Tensor:
    """(B,) bool: a fair coin per image."""
    return torch.rand(b, generator=generator, device=_device(images, generator)).to(images.device) < 0.5


def crop_windows(padded: torch.Tensor, index: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
                 size: tuple) -> torch.Tensor:
    """Crops of size (h, w) of padded[index] at per-image offsets (dy, dx), as ONE gather.

    Seen as a flat buffer, a contiguous (N, C, H, W) tensor holds every run of w
    consecutive elements; ``unfold`` lists them all as rows of a view (no copy).  Row r of
    channel c of crop i is the run that starts at element ((index_i*C + c)*H + dy_i + r)*W
    + dx_i, so one ``index_select`` of B*C*h runs is the whole crop - memcpy-sized copies
    instead of a per-element gather (8192 uint8 images: 6.7 ms against 37 ms for two
    ``gather``s on 2 CPU cores; index_select needs no host sync on a GPU either).
    """
    _, c, hp, wp = padded.shape
    h, w = size
    dev = padded.device
    plane = index[:, None, None] * c + torch.arange(c, device=dev)[None, :, None]      # (B, C, 1)
    rows = plane * hp + dy[:, None, None] + torch.arange(h, device=dev)                  # (B, C, h)
    starts = rows * wp + dx[:, None, None]
    runs = padded.contiguous().view(-1).unfold(0, w, 1)                                  # (numel-w+1, w)
    return runs.index_select(0, starts.reshape(-1)).view(len(index), c, h, w)


def _host_int(high: int, images, generator) -> int:
    """One uniform int in [0, high) as a Python int, drawn on the generator's device."""
    return int(torch.randint(0, high, (), generator=generator, device=_device(images, generator)))


def random_crop(images: torch.Tensor, padding: int = 4,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample RandomCrop(H x W, padding) with zero padding, as torchvision's.

    Offsets dy, then dx, uniform in 0..2*padding and independent per image; the crop is
    rows [dy, dy+H) and columns [dx, dx+W) of the zero-padded image (``crop_windows``).
    """
    if padding <= 0:
        return images
    b, c, h, w = images.shape
    dy, dx = _crop_offsets(b, padding, images, generator)
    padded = TF.pad(images, [padding], fill=0)
    return crop_windows(padded, torch.arange(b, device=images.device), dy, dx, (h, w))


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image flipped left-right with probability 0.5 (RandomHorizontalFlip)."""
    flip = _coin_flips(images.shape[0], images, generator)
    return torch.where(flip[:, None, None, None], TF.horizontal_flip(images), images)


def cutout(images: torch.Tensor, size: int = 16,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """One zero square per image (DeVries & Taylor; reference Cutout(n_holes=1, length=16)).

    Centre uniform over all pixels; rows [cy - size//2, cy + size//2) clipped to the
    image, likewise columns, so the hole is at most 2*(size//2) on a side.
    """
    if size <= 0:
        return images
    b, _, h, w = images.shape
    cy, cx = _randint(h, (b, 1), images, generator), _randint(w, (b, 1), images, generator)
    ys = torch.arange(h, device=images.device)[None, :]
    xs = torch.arange(w, device=images.device)[None, :]
    keep_rows = ((ys < cy - size // 2) | (ys >= cy + size // 2)).to(images.dtype)     # (B, H)
    keep_cols = ((xs < cx - size // 2) | (xs >= cx + size // 2)).to(images.dtype)     # (B, W)
    # A pixel survives unless both its row and its column are in the hole.  Zeroing by one
    # multiply with this 0/1 mask, not masked_fill: 4 ms against 16 ms per 8192 uint8
    # images on 2 CPU cores (masked_fill's broadcast bool mask takes a slow path).
    keep = torch.maximum(keep_rows[:, :, None], keep_cols[:, None, :])                 # (B, H, W)
    return images * keep[:, None]


def one_hot(labels: torch.Tensor, num_classes: int = 10,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Integer labels (B,) -> soft targets (B, num_classes).  A scatter, not F.one_hot, whose
    range check reads the labels' min and max on the host (a GPU sync every epoch)."""
    labels = labels.long()
    return torch.zeros(len(labels), num_classes, dtype=dtype, device=labels.device).scatter_(1, labels[:, None], 1)


def sample_lambda(alpha: float, generator: torch.Generator | None = None) -> float:
    """One draw from Beta(alpha, alpha), reproducible from `generator`.

    torch.distributions.Beta takes no generator, so a seed is drawn from the generator
    and fed to numpy.  alpha == 0 means "no mixing" (reference: lam = 1); callers skip
    mixing then (mix_batch does), so alpha <= 0 here is an error.
    """
    if not alpha > 0:
        raise ValueError(f"mixing alpha must be > 0, got {alpha!r} (use 0 only to mean 'no mixing')")
    dev = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=dev))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _permutation(images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    dev = _device(images, generator)
    return torch.randperm(images.shape[0], generator=generator, device=dev).to(images.device)


def _check_targets(images: torch.Tensor, targets: torch.Tensor) -> None:
    if targets.ndim != 2 or targets.shape[0] != images.shape[0]:
        raise ValueError(f"targets must be soft (B, classes) matching images' batch {images.shape[0]}, "
                         f"got shape {tuple(targets.shape)}; use one_hot(labels) first")


def mixup(images: torch.Tensor, targets: torch.Tensor, alpha: float,
          generator: torch.Generator | None = None, lam: float | None = None,
          inplace: bool = False, host_generator: torch.Generator | None = None):
    """MixUp (paper Section "MixUp", alpha 0.3): x = lam*x + (1-lam)*x[perm], same for y.

    One lambda per batch (Beta(alpha, alpha) unless `lam` is given) and one permutation,
    shared by images and soft targets - the reference's lam*CE(y_a) + (1-lam)*CE(y_b)
    equals CE against these mixed targets.  ``inplace`` overwrites ``images`` (the
    training loop owns its batch): the same numbers, one float pass and allocation fewer.
    lam is a host number: drawn from ``host_generator`` (a CPU generator) when given, so a
    batch on a GPU costs no device-to-host copy (sync); else from ``generator``.
    """
    _check_targets(images, targets)
    if lam is None:
        lam = sample_lambda(alpha, host_generator if host_generator is not None else generator)
    elif not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    perm = _permutation(images, generator)
    partners = images.index_select(0, perm)
    mixed_x = (images.mul_(lam) if inplace else images.mul(lam)).add_(partners, alpha=1.0 - lam)
    mixed_y = targets.mul(lam).add_(targets[perm], alpha=1.0 - lam)
    return mixed_x, mixed_y


def cutmix(images: torch.Tensor, targets: torch.Tensor, alpha: float,
           generator: torch.Generator | None = None, host_generator: torch.Generator | None = None):
    """CutMix (Yun et al. 2019): paste one box from the permuted batch into every image.

    Box of side int(H*sqrt(1-lam)) x int(W*sqrt(1-lam)), centre uniform, clipped; the
    target weight is recomputed from the clipped box area (as the reference does).
    The input tensor is not modified.  The box is a Python slice, so lam and its centre
    are host numbers: drawn from ``host_generator`` (a CPU generator) when given, so a
    batch on a GPU costs no device-to-host copy (sync) per step; else from ``generator``.
    """
    _check_targets(images, targets)
    scalars = host_generator if host_generator is not None else generator
    lam = sample_lambda(alpha, scalars)
    perm = _permutation(images, generator)
    h, w = images.shape[-2:]
    cut_h, cut_w = int(h * np.sqrt(1.0 - lam)), int(w * np.sqrt(1.0 - lam))
    cy, cx = _host_int(h, images, scalars), _host_int(w, images, scalars)
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
    mixed_x = images.clone()
    mixed_x[:, :, y1:y2, x1:x2] = images[perm, :, y1:y2, x1:x2]
    lam = 1.0 - (y2 - y1) * (x2 - x1) / (h * w)
    mixed_y = targets.mul(lam).add_(targets[perm], alpha=1.0 - lam)
    return mixed_x, mixed_y


def mix_batch(images: torch.Tensor, targets: torch.Tensor, kind: str, alpha: float,
              generator: torch.Generator | None = None, host_generator: torch.Generator | None = None,
              inplace: bool = False):
    """Dispatch "none" | "mixup" | "cutmix"; alpha == 0 also means no mixing.
    ``host_generator``: see mixup/cutmix; ``inplace``: MixUp may overwrite ``images``."""
    if kind not in MIX_KINDS:
        raise ValueError(f"mix kind must be one of {MIX_KINDS}, got {kind!r}")
    if kind == "none" or alpha == 0:
        return images, targets
    if kind == "mixup":
        return mixup(images, targets, alpha, generator, inplace=inplace, host_generator=host_generator)
    return cutmix(images, targets, alpha, generator, host_generator=host_generator)


class TrainTransform:
    """The reference's train transform - RandomCrop(32, padding=4), RandomHorizontalFlip,
    Cutout(1, 16) - for a uint8 (N, 3, H, W) image set that stays on the device.

    All three only move or zero pixels, so they run on uint8 (4x less memory traffic than
    float) and give exactly what the float path gives; the conversion comes once, later.
    The set is zero-padded once, here, and stored beside its mirror image: a flipped crop
    at column offset dx is the crop at 2*padding - dx of the mirror, so picking images,
    cropping and flipping a whole chunk is one ``crop_windows`` gather.  Cutout follows.
    On 2 CPU cores that is about 12 ms per 8192 images against 99 ms for pad + gather +
    where + masked_fill per chunk; the price is memory: 2 x (H+8)(W+8)/(HW) = 3.1x the set.

    Calling it with indices draws dy, dx, flip, then the Cutout centre, exactly as
    ``cutout(random_flip(random_crop(images[index])))`` does, so the two agree bit for bit
    for the same generator state.
    """

    def __init__(self, images_uint8: torch.Tensor, crop_padding: int = 4, flip: bool = True,
                 cutout_size: int = 16):
        if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4:
            raise ValueError(f"augmentation expects a uint8 (B, C, H, W) batch, got "
                             f"{images_uint8.dtype} of shape {tuple(images_uint8.shape)}")
        self.n, self.size = len(images_uint8), tuple(images_uint8.shape[-2:])
        self.padding, self.flip, self.cutout_size = max(crop_padding, 0), flip, cutout_size
        padded = TF.pad(images_uint8, [self.padding], fill=0) if self.padding else images_uint8
        self.store = torch.cat([padded, padded.flip(-1)]) if flip else padded.contiguous()

    def __call__(self, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (len(index), 3, H, W): images[index], augmented."""
        b, p = len(index), self.padding
        dy, dx = _crop_offsets(b, p, self.store, generator) if p else (index.new_zeros(b),) * 2
        if self.flip:                                 # CIFAR is mirror-symmetric
            flipped = _coin_flips(b, self.store, generator)
            index, dx = index + flipped * self.n, torch.where(flipped, 2 * p - dx, dx)
        x = crop_windows(self.store, index, dy, dx, self.size)   # translation by up to p px
        return cutout(x, self.cutout_size, generator)  # occlusion; zeros before Normalize, as run


def augment_uint8(images_uint8: torch.Tensor, crop_padding: int = 4, flip: bool = True,
                  cutout_size: int = 16, generator: torch.Generator | None = None) -> torch.Tensor:
    """One uint8 (B, 3, H, W) batch through the train transform (see ``TrainTransform``)."""
    transform = TrainTransform(images_uint8, crop_padding, flip, cutout_size)
    return transform(torch.arange(len(images_uint8), device=images_uint8.device), generator)


def to_pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 -> float pixel space [0, 1] (torchvision's ToTensor scaling), in one pass."""
    return torch.div(images_uint8, 255)


def augment_batch(images_uint8: torch.Tensor, crop_padding: int = 4, flip: bool = True,
                  cutout_size: int = 16, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> augmented float pixel-space batch: the reference's train transform."""
    return to_pixels(augment_uint8(images_uint8, crop_padding, flip, cutout_size, generator))
