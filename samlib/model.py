"""The SE-ResNet of the paper (Section 3.1): [4, 4, 3] basic blocks at 64/128/256 channels, built as
the reference code (SAMResNet.py) ran it (README, discrepancies).  Input is pixel space [0, 1]."""

from collections import OrderedDict

import torch
from torch import nn
from torch.nn import functional as F

from samlib.data import CIFAR_MEAN, STD_AS_RUN, STD_TRUE

SE_PLACEMENTS = ("as_run", "standard")
NORM_STDS = {"as_run": STD_AS_RUN, "true": STD_TRUE}
ARCH_FIELDS = ("se", "se_placement", "widths", "blocks", "norm_std")   # the Config fields of the model


class Normalize(nn.Module):
    """(x - mean) / std per channel; mean and std are buffers, so a checkpoint carries them."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SqueezeExcite(nn.Module):
    """The reference SEBlock: avg pool -> 1x1 conv (C -> max(1, C//r), biased) -> SiLU -> 1x1 conv -> sigmoid gate."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.reduce = nn.Conv2d(channels, hidden, 1, bias=True)
        self.expand = nn.Conv2d(hidden, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = F.silu(self.reduce(F.adaptive_avg_pool2d(x, 1)), inplace=True)
        return x * torch.sigmoid(self.expand(squeezed))


class BasicBlock(nn.Module):
    """conv3x3-BN-SiLU-conv3x3-BN + shortcut (identity, or 1x1 conv + BN), SiLU after the add.  SE
    "as_run": after conv1-BN-SiLU (SAMResNet.py); "standard": before the add (Hu et al.)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, se: bool = True, se_placement: str = "as_run",
                 se_reduction: int = 16):
        super().__init__()
        self.se_placement = se_placement
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.se = SqueezeExcite(out_ch, se_reduction) if se else nn.Identity()
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), bn=nn.BatchNorm2d(out_ch)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.silu(self.bn1(self.conv1(x)), inplace=True)
        if self.se_placement == "as_run":
            out = self.se(out)
        out = self.bn2(self.conv2(out))
        if self.se_placement == "standard":
            out = self.se(out)
        return F.silu(out + self.shortcut(x), inplace=True)


class SEResNet(nn.Module):
    """Normalize -> stem -> stages -> avg pool -> linear.  ``arch``, the arguments as a plain dict, goes
    into checkpoints: ``SEResNet(**arch)`` rebuilds the model."""

    def __init__(self, se: bool = True, se_placement: str = "as_run", widths=(64, 128, 256), blocks=(4, 4, 3),
                 num_classes: int = 10, norm_std: str = "as_run", se_reduction: int = 16):
        super().__init__()     # config.py validates a Config's arguments, rundir.check_arch a checkpoint's
        self.arch = dict(se=bool(se), se_placement=se_placement, widths=list(widths), blocks=list(blocks),
                         num_classes=num_classes, norm_std=norm_std, se_reduction=se_reduction)
        self.normalize = Normalize(CIFAR_MEAN, NORM_STDS[norm_std])
        self.stem = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
                                              bn=nn.BatchNorm2d(widths[0]), act=nn.SiLU(inplace=True)))
        stages, in_ch = [], widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            stage = []
            for j in range(n):      # the first block of every stage but the first halves the size
                stage.append(BasicBlock(in_ch, width, 2 if i > 0 and j == 0 else 1, se, se_placement, se_reduction))
                in_ch = width
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(widths[-1], num_classes)
        # As SAMResNet.py: every conv (SE convs included) Kaiming-normal fan_out/relu;
        # BN weight 1, bias 0; conv biases and the linear layer keep PyTorch defaults.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(self.normalize(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build_model(cfg=None, **arch) -> SEResNet:
    """The paper's model from a Config's model fields and/or SEResNet's keyword arguments (which win)."""
    if cfg is not None:
        arch = {name: getattr(cfg, name) for name in ARCH_FIELDS} | arch
    return SEResNet(**arch)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (the Kaggle rule counts these; buffers are not parameters)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
