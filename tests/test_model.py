"""samlib.model against hand-known numbers and independent formulas."""
import math

import pytest
import torch
from torch import nn

from samlib.config import resolve
from samlib.errors import CheckpointError, ConfigError
from samlib.model import (BasicBlock, Normalize, SEResNet, SqueezeExcite, build_model,
                          count_parameters)
from samlib.rundir import check_arch

NARROW = dict(widths=(8, 16, 32), blocks=(2, 2, 1))


def test_parameter_counts_match_reference_code():
    # Counted by hand from SAMResNet.py (see shared/reference): 4,697,162 / 4,733,610.
    assert count_parameters(build_model(se=False)) == 4_697_162
    assert count_parameters(build_model(se=True)) == 4_733_610
    assert count_parameters(build_model(se=True)) < 5_000_000  # the Kaggle rule


def test_plain_resnet_count_by_hand_formula():
    def conv(i, o, k):
        return i * o * k * k

    def bn(c):
        return 2 * c

    total = conv(3, 64, 3) + bn(64)
    in_ch = 64
    for width, n in zip((64, 128, 256), (4, 4, 3)):
        for _ in range(n):
            total += conv(in_ch, width, 3) + conv(width, width, 3) + 2 * bn(width)
            if in_ch != width:
                total += conv(in_ch, width, 1) + bn(width)
            in_ch = width
    total += 256 * 10 + 10
    assert total == count_parameters(build_model(se=False))


def test_se_adds_hand_formula():
    # Each block of out channels C gets 1x1 convs C->h->C with biases: 2*C*h + h + C.
    extra = sum(n * (2 * c * (c // 16) + c // 16 + c) for c, n in ((64, 4), (128, 4), (256, 3)))
    assert extra == 36_448
    assert count_parameters(build_model(se=True)) - count_parameters(build_model(se=False)) == extra
    assert count_parameters(SqueezeExcite(64)) == 2 * 64 * 4 + 4 + 64  # hidden = 4


@pytest.mark.parametrize("placement", ["as_run", "standard"])
def test_output_shape_default_and_narrow(placement):
    x = torch.rand(2, 3, 32, 32)
    for kw in ({}, dict(widths=(8, 16, 32))):
        model = build_model(se_placement=placement, **kw).eval()
        with torch.no_grad():
            assert model(x).shape == (2, 10)


def test_placements_same_parameters_different_function():
    torch.manual_seed(0)
    as_run = build_model(se_placement="as_run", **NARROW).eval()
    standard = build_model(se_placement="standard", **NARROW).eval()
    assert count_parameters(as_run) == count_parameters(standard)
    standard.load_state_dict(as_run.state_dict())  # same keys and shapes
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(as_run(x), standard(x), atol=1e-4)


def test_se_off_ignores_placement():
    torch.manual_seed(0)
    a = build_model(se=False, se_placement="as_run", **NARROW).eval()
    b = build_model(se=False, se_placement="standard", **NARROW).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_normalize_on_constant_image():
    norm = Normalize((0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    out = norm(torch.full((1, 3, 2, 2), 1.0))
    expected = torch.tensor([(1 - 0.5) / 0.5, (1 - 0.25) / 0.25, (1 - 0.0) / 2.0])
    assert torch.allclose(out, expected.view(1, 3, 1, 1).expand(1, 3, 2, 2))
    assert set(norm.state_dict()) == {"mean", "std"} and count_parameters(norm) == 0


def test_model_normalisation_constants():
    as_run = build_model(**NARROW)
    true = build_model(norm_std="true", **NARROW)
    assert torch.allclose(as_run.normalize.mean.flatten(), torch.tensor([0.4914, 0.4822, 0.4465]))
    assert torch.allclose(as_run.normalize.std.flatten(), torch.tensor([0.2023, 0.1994, 0.2010]))
    assert torch.allclose(true.normalize.std.flatten(), torch.tensor([0.2470, 0.2435, 0.2616]))
    assert "normalize.mean" in as_run.state_dict() and "normalize.std" in as_run.state_dict()


@pytest.mark.parametrize("kwargs", [
    dict(widths=(64, 128), blocks=(4, 4, 3)),
    dict(widths=(64, 0, 256)),
    dict(blocks=(4, -1, 3)),
    dict(widths=()), dict(blocks=()),
    dict(widths=(64, 128.0, 256)),
    dict(blocks=(True, 4, 3)),
    dict(widths=64),
    dict(se_placement="after_add"),
    dict(norm_std="imagenet"),
    dict(num_classes=0),
    dict(se_reduction=0),
])
def test_invalid_arguments_raise_config_error(kwargs):
    # samlib.config is the one validation of the model's settings (a Config's fields).
    with pytest.raises(ConfigError):
        resolve("final", "smoke", **kwargs)


@pytest.mark.parametrize("field", ["num_classes", "se_reduction"])
def test_invalid_checkpoint_arch_raises(field):
    # Not Config fields: a checkpoint's recorded arch is validated by rundir.check_arch.
    arch = dict(se=True, se_placement="as_run", widths=[8], blocks=[1], num_classes=10, norm_std="as_run",
                se_reduction=16)
    with pytest.raises(CheckpointError, match=field):
        check_arch({"arch": dict(arch, **{field: 0})}, arch)


def test_block_rejects_unknown_placement_listing_options():
    with pytest.raises(ConfigError, match="as_run.*standard"):
        resolve("final", "smoke", se_placement="middle")


def test_block_shortcuts():
    assert isinstance(BasicBlock(8, 8, 1, True).shortcut, nn.Identity)
    for block in (BasicBlock(8, 16, 1, True), BasicBlock(8, 8, 2, False)):
        conv = block.shortcut.conv
        assert conv.kernel_size == (1, 1) and conv.bias is None
    out = BasicBlock(8, 16, 2, True)(torch.rand(2, 8, 10, 10))
    assert out.shape == (2, 16, 5, 5)


def test_stage_feature_map_sizes():
    model = build_model(**NARROW).eval()
    shapes = []
    hooks = [s.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
             for s in (model.stem, *model.stages)]
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert shapes == [(2, 8, 32, 32), (2, 8, 32, 32), (2, 16, 16, 16), (2, 32, 8, 8)]
    assert [len(s) for s in model.stages] == [2, 2, 1]


def test_init_kaiming_fan_out_and_bn():
    torch.manual_seed(0)
    model = build_model()
    w = model.stages[2][1].conv2.weight  # 256 -> 256, 3x3: fan_out = 256 * 9
    assert math.isclose(w.std().item(), math.sqrt(2 / (256 * 9)), rel_tol=0.02)
    assert abs(w.mean().item()) < 1e-3
    bn = model.stages[1][0].bn2
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_arch_is_plain_dict_that_rebuilds_model():
    model = build_model(se_placement="standard", norm_std="true", **NARROW)
    assert type(model.arch) is dict
    assert model.arch["se_placement"] == "standard" and model.arch["norm_std"] == "true"
    assert list(model.arch["widths"]) == [8, 16, 32]
    again = SEResNet(**model.arch)
    again.load_state_dict(model.state_dict())
    assert again.arch == model.arch
