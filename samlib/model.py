"""The SE-ResNet of the paper (Section "Model architecture"): [4, 4, 3] basic blocks.

Normalize -> stem conv3x3 + BN + SiLU -> three stages of BasicBlocks (64/128/256 channels,
strides 1/2/2) -> global average pool -> one linear layer.  The model takes pixel-space
input in [0, 1]; mean/std are buffers, so a checkpoint carries its own normalisation.

Parameter counts of the reference code (SAMResNet.py), reproduced exactly here:
4,697,162 without SE and 4,733,610 with SE (r=16; SE adds 0.78%).  The paper's Table 1
says 4.96M / 5.02M ("+1.2%"), which its own code does not give.  The only single change
found that lands on 4.96M is a 3x3 projection shortcut into stage 3 (4,959,306); 3x3
projections into stages 2 and 3 give 5,024,842 - so the paper's pair may come from
shortcut variants rather than from SE.  We build the model the code actually ran.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from samlib.data import CIFAR_MEAN, STD_AS_RUN, STD_TRUE
from samlib.errors import ConfigError

SE_PLACEMENTS = ("as_run", "standard")
NORM_STDS = {"as_run": STD_AS_RUN, "true": STD_TRUE}


class Normalize(nn.Module):
    """(x - mean) / std per channel, with mean/std as state_dict buffers."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SqueezeExcite(nn.Module):
    """Channel gate: avg pool -> 1x1 conv (C -> C//r, biased) -> SiLU -> 1x1 conv -> sigmoid.

    As in the reference SEBlock.  The hidden width is floored at 1 so narrow test models
    (e.g. 8 channels, r=16) still build; at the paper's widths it is exactly C // r.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, hidden, 1, bias=True)
        self.act = nn.SiLU(inplace=True)
        self.expand = nn.Conv2d(hidden, channels, 1, bias=True)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-SiLU-conv3x3-BN + shortcut, SiLU after the add.

    se_placement "as_run": SE after conv1-BN-SiLU, before conv2 (what SAMResNet.py does);
    "standard": SE after the second BN, before the residual add (Hu et al.).
    Shortcut: identity, or 1x1 conv + BN when the stride or the width changes.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, se: bool = True,
                 se_placement: str = "as_run", se_reduction: int = 16):
        super().__init__()
        if se_placement not in SE_PLACEMENTS:
            raise ValueError(f"se_placement must be one of {SE_PLACEMENTS}, got {se_placement!r}")
        self.se_placement = se_placement
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.act1 = nn.SiLU(inplace=True)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.se = SqueezeExcite(out_ch, se_reduction) if se else nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(OrderedDict(
                conv=nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                bn=nn.BatchNorm2d(out_ch)))
        else:
            self.shortcut = nn.Identity()
        self.act2 = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        if self.se_placement == "as_run":
            out = self.se(out)
        out = self.bn2(self.conv2(out))
        if self.se_placement == "standard":
            out = self.se(out)
        return self.act2(out + self.shortcut(x))


def _check_ints(name: str, values) -> tuple:
    try:
        values = tuple(values)
    except TypeError:
        raise ConfigError(f"{name} must be a sequence of positive ints, got {values!r}") from None
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                             for v in values):
        raise ConfigError(f"{name} must be a non-empty sequence of positive ints, got {values!r}")
    return values


class SEResNet(nn.Module):
    """Normalize -> stem -> stages (stride 1, then 2) -> avg pool -> linear.

    `arch` (a plain dict of the constructor arguments) is kept on the model so that a
    checkpoint can record it and `SEResNet(**arch)` rebuilds the same architecture.
    """

    def __init__(self, se: bool = True, se_placement: str = "as_run",
                 widths=(64, 128, 256), blocks=(4, 4, 3), num_classes: int = 10,
                 norm_std: str = "as_run", se_reduction: int = 16):
        super().__init__()
        widths, blocks = _check_ints("widths", widths), _check_ints("blocks", blocks)
        if len(widths) != len(blocks):
            raise ConfigError(f"widths {widths} and blocks {blocks} must have the same length")
        _check_ints("num_classes", [num_classes])
        _check_ints("se_reduction", [se_reduction])
        if se_placement not in SE_PLACEMENTS:
            raise ConfigError(f"se_placement must be one of {SE_PLACEMENTS}, got {se_placement!r}")
        if norm_std not in NORM_STDS:
            raise ConfigError(f"norm_std must be one of {tuple(NORM_STDS)}, got {norm_std!r}")
        self.arch = dict(se=bool(se), se_placement=se_placement, widths=list(widths),
                         blocks=list(blocks), num_classes=num_classes, norm_std=norm_std,
                         se_reduction=se_reduction)

        self.normalize = Normalize(CIFAR_MEAN, NORM_STDS[norm_std])
        self.stem = nn.Sequential(OrderedDict(
            conv=conv3x3(3, widths[0]), bn=nn.BatchNorm2d(widths[0]), act=nn.SiLU(inplace=True)))
        stages, in_ch = [], widths[0]
        for i, (width, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n):
                layers.append(BasicBlock(in_ch, width, stride if j == 0 else 1, se,
                                         se_placement, se_reduction))
                in_ch = width
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
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
        return self.head(torch.flatten(self.pool(x), 1))


def build_model(se: bool = True, se_placement: str = "as_run", widths=(64, 128, 256),
                blocks=(4, 4, 3), num_classes: int = 10, norm_std: str = "as_run",
                se_reduction: int = 16) -> SEResNet:
    """The paper's model; defaults = SAMResNet.py (SE r=16 after conv1, std as run)."""
    return SEResNet(se=se, se_placement=se_placement, widths=widths, blocks=blocks,
                    num_classes=num_classes, norm_std=norm_std, se_reduction=se_reduction)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (the Kaggle rule counts these; buffers are not parameters)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
