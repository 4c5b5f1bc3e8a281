"""Batched, on-device training augmentation (paper Section 3.2): crop, flip, Cutout, MixUp, CutMix on whole
batches with per-sample draws, as airbench does.  Draws are made on the generator's device (None: the global
RNG) and moved to the images'.  Pixels stay in [0, 1]: the model normalises."""
import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

MIX_KINDS = ("none", "mixup", "cutmix")


def _draw(images: torch.Tensor, generator: torch.Generator | None, sample, *args) -> torch.Tensor:
    """sample(*args) drawn on the generator's device, moved to the images' device."""
    device = generator.device if generator is not None else images.device
    return sample(*args, generator=generator, device=device).to(images.device)


def crop_windows(padded: torch.Tensor, index: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, size: tuple):
    """Crops of size (h, w) of padded[index] at offsets (dy, dx) as one gather over ``unfold``'s runs of w
    elements: row r of channel c of crop i starts at ((index_i*C + c)*H + dy_i + r)*W + dx_i."""
    _, c, hp, wp = padded.shape
    h, w = size
    dev = padded.device
    plane = index[:, None, None] * c + torch.arange(c, device=dev)[None, :, None]      # (B, C, 1)
    rows = plane * hp + dy[:, None, None] + torch.arange(h, device=dev)                  # (B, C, h)
    starts = rows * wp + dx[:, None, None]
    runs = padded.contiguous().view(-1).unfold(0, w, 1)                                  # (numel-w+1, w)
    return runs.index_select(0, starts.reshape(-1)).view(len(index), c, h, w)


def cutout(images: torch.Tensor, size: int = 16, generator: torch.Generator | None = None) -> torch.Tensor:
    """One zero square per image (DeVries & Taylor; reference Cutout(1, 16)) around a uniform centre, clipped."""
    if size <= 0:
        return images
    b, _, h, w = images.shape
    cy = _draw(images, generator, torch.randint, 0, h, (b, 1))
    cx = _draw(images, generator, torch.randint, 0, w, (b, 1))
    ys = torch.arange(h, device=images.device)[None, :]
    xs = torch.arange(w, device=images.device)[None, :]
    keep_rows = ((ys < cy - size // 2) | (ys >= cy + size // 2)).to(images.dtype)     # (B, H)
    keep_cols = ((xs < cx - size // 2) | (xs >= cx + size // 2)).to(images.dtype)     # (B, W)
    # Zero where row and column are both in the hole: a 0/1 multiply (masked_fill's broadcast is slow).
    keep = torch.maximum(keep_rows[:, :, None], keep_cols[:, None, :])                 # (B, H, W)
    return images * keep[:, None]


def one_hot(labels: torch.Tensor, num_classes: int = 10, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Labels (B,) -> targets (B, num_classes).  A scatter: F.one_hot reads the labels on the host."""
    labels = labels.long()
    return torch.zeros(len(labels), num_classes, dtype=dtype, device=labels.device).scatter_(1, labels[:, None], 1)


def sample_lambda(alpha: float, generator: torch.Generator | None = None) -> float:
    """One Beta(alpha, alpha) draw: a seed from `generator` feeds numpy (torch's Beta takes no generator)."""
    dev = generator.device if generator is not None else "cpu"
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=dev))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _check_targets(images: torch.Tensor, targets: torch.Tensor) -> None:
    if targets.ndim != 2 or targets.shape[0] != images.shape[0]:
        raise ValueError(f"targets must be soft (B, classes) matching images' batch {images.shape[0]}, "
                         f"got shape {tuple(targets.shape)}; use one_hot(labels) first")


def mixup(images: torch.Tensor, targets: torch.Tensor, alpha: float, generator: torch.Generator | None = None,
          lam: float | None = None, inplace: bool = False, host_generator: torch.Generator | None = None):
    """MixUp (paper Section 3.2, alpha 0.3): x = lam*x + (1-lam)*x[perm], the same for soft y.  One lam
    per batch (from ``host_generator`` if given: no GPU sync), one permutation; ``inplace`` overwrites x."""
    _check_targets(images, targets)
    if lam is None:
        lam = sample_lambda(alpha, host_generator if host_generator is not None else generator)
    perm = _draw(images, generator, torch.randperm, images.shape[0])
    partners = images.index_select(0, perm)
    mixed_x = (images.mul_(lam) if inplace else images.mul(lam)).add_(partners, alpha=1.0 - lam)
    mixed_y = targets.mul(lam).add_(targets[perm], alpha=1.0 - lam)
    return mixed_x, mixed_y


def cutmix(images: torch.Tensor, targets: torch.Tensor, alpha: float, generator: torch.Generator | None = None,
           host_generator: torch.Generator | None = None):
    """CutMix (Yun et al. 2019; the paper's rejected alternative): one clipped box of side int(H*sqrt(1-lam))
    from the permuted batch, targets weighted by its area; lam and the centre from ``host_generator``."""
    _check_targets(images, targets)
    scalars = host_generator if host_generator is not None else generator
    lam = sample_lambda(alpha, scalars)
    perm = _draw(images, generator, torch.randperm, images.shape[0])
    h, w = images.shape[-2:]
    cut_h, cut_w = int(h * np.sqrt(1.0 - lam)), int(w * np.sqrt(1.0 - lam))
    dev = scalars.device if scalars is not None else images.device
    cy, cx = (int(torch.randint(0, n, (), generator=scalars, device=dev)) for n in (h, w))
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
    """Dispatch "none" | "mixup" | "cutmix"; alpha == 0 also means no mixing."""
    if kind == "none" or alpha == 0:
        return images, targets
    if kind == "mixup":
        return mixup(images, targets, alpha, generator, inplace=inplace, host_generator=host_generator)
    return cutmix(images, targets, alpha, generator, host_generator=host_generator)


class TrainTransform:
    """The reference's RandomCrop(32, padding=4), RandomHorizontalFlip, Cutout(1, 16) on a uint8 image set
    kept on the device, padded once beside its mirror (a flipped crop at dx is the mirror's at 2p - dx)."""

    def __init__(self, images_uint8: torch.Tensor, crop_padding: int = 4, flip: bool = True, cutout_size: int = 16):
        if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4:
            raise ValueError(f"augmentation expects a uint8 (B, C, H, W) batch, got "
                             f"{images_uint8.dtype} of shape {tuple(images_uint8.shape)}")
        self.n, self.size = len(images_uint8), tuple(images_uint8.shape[-2:])
        self.padding, self.flip, self.cutout_size = crop_padding, flip, cutout_size
        padded = TF.pad(images_uint8, [self.padding], fill=0) if self.padding else images_uint8
        self.store = torch.cat([padded, padded.flip(-1)]) if flip else padded.contiguous()

    def __call__(self, index: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 (len(index), 3, H, W): images[index], augmented."""
        b, p = len(index), self.padding
        dy = dx = index.new_zeros(b)
        if p:                                       # offsets uniform in 0..2p, dy drawn first
            dy = _draw(self.store, generator, torch.randint, 0, 2 * p + 1, (b,))
            dx = _draw(self.store, generator, torch.randint, 0, 2 * p + 1, (b,))
        if self.flip:
            flipped = _draw(self.store, generator, torch.rand, b) < 0.5
            index, dx = index + flipped * self.n, torch.where(flipped, 2 * p - dx, dx)
        return cutout(crop_windows(self.store, index, dy, dx, self.size), self.cutout_size, generator)


def to_pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 -> float pixel space [0, 1] (torchvision's ToTensor scaling), in one pass."""
    return torch.div(images_uint8, 255)
