"""Configs and profiles: names, overrides, validation, hashing."""
import importlib

import pytest

from samlib.config import CONFIGS, PROFILES, SWITCHES, TABLE1, from_dict, resolve
from samlib.errors import ConfigError


def test_table1_configs_add_one_component_each():
    rows = [resolve(name, "paper") for name in TABLE1]
    assert [(c.se, c.mix, c.ema) for c in rows] == [
        (False, "none", False), (True, "none", False), (True, "mixup", False), (True, "mixup", True)]


def test_defaults_are_what_the_reference_code_ran_except_selection():
    cfg = resolve("final", "paper")
    assert (cfg.widths, cfg.blocks, cfg.epochs, cfg.batch_size, cfg.seed) == ((64, 128, 256), (4, 4, 3), 200, 128, 84)
    assert (cfg.schedule, cfg.se_placement, cfg.cutout, cfg.alpha_ramp, cfg.norm_std) == (
        "as_run", "as_run", 16, True, "as_run")
    assert (cfg.mix_alpha, cfg.ema_decay, cfg.lookahead_k, cfg.lookahead_alpha, cfg.grad_clip) == (0.3, 0.999, 5, 0.5, 1.0)
    assert cfg.selection == "val" and cfg.val_size == 5000


def test_every_switch_is_a_named_config_differing_in_one_field():
    base = resolve("final", "paper").to_dict()
    for field, value in SWITCHES.items():
        d = resolve(f"final+{field}={value}", "paper").to_dict()
        diff = {k for k in d if d[k] != base[k]} - {"name"}
        assert diff == {field} and d[field] == value


def test_profiles_scale_without_changing_the_method():
    method = ("se", "mix", "ema", "schedule", "lookahead_k", "mix_alpha", "cutout")
    paper = resolve("final", "paper")
    for profile in PROFILES:
        cfg = resolve("final", profile)
        assert all(getattr(cfg, k) == getattr(paper, k) for k in method)


def test_overrides_are_coerced_from_strings():
    cfg = resolve("final", "smoke", epochs="3", widths="4,8,16", ema="false", mix_alpha="0.8")
    assert (cfg.epochs, cfg.widths, cfg.ema, cfg.mix_alpha) == (3, (4, 8, 16), False, 0.8)


def test_hash_depends_on_method_not_speed_knobs():
    a = resolve("final", "smoke")
    assert a.hash() == resolve("final", "smoke", eval_batch_size="7", compile="true").hash()
    assert a.hash() != resolve("final", "smoke", seed="1").hash()
    assert from_dict(a.to_dict()) == a


@pytest.mark.parametrize("kwargs, words", [
    (dict(config="nope"), "unknown config"),
    (dict(profile="huge"), "unknown profile"),
    (dict(epochs="-1"), "epochs must be >= 1"),
    (dict(mix_alpha="-0.1"), "mix_alpha must be > 0"),
    (dict(ema_decay="1.0"), "ema_decay must be in (0, 1)"),
    (dict(widths="0,8,16"), "must be positive"),
    (dict(epochs="ten"), "expects a number"),
    (dict(ema="maybe"), "true or false"),
    (dict(bogus="1"), "unknown setting"),
    (dict(schedule="cosine"), "schedule must be one of"),
    (dict(val_size="0"), "selection='val' needs val_size > 0"),
])
def test_bad_settings_raise_one_clear_error(kwargs, words):
    args = {"config": "final", "profile": "smoke"}
    args.update({k: kwargs.pop(k) for k in ("config", "profile") if k in kwargs})
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        resolve(args["config"], args["profile"], **kwargs)


def test_config_names_cover_table1_and_switches():
    assert set(TABLE1) <= set(CONFIGS) and len(CONFIGS) == len(TABLE1) + len(SWITCHES)


@pytest.mark.parametrize("field, owner", [
    ("se_placement", "samlib.model.SE_PLACEMENTS"), ("norm_std", "samlib.model.NORM_STDS"),
    ("mix", "samlib.augment.MIX_KINDS"), ("schedule", "samlib.optim.SCHEDULES"),
    ("amp", "samlib.device.AMP_MODES"), ("selection", "samlib.selection.SELECTIONS"),
])
def test_option_settings_accept_exactly_what_the_owning_module_offers(field, owner):
    """One place for validation: each option list comes from the module that implements it."""
    module, name = owner.rsplit(".", 1)
    options = list(getattr(importlib.import_module(module), name))
    for value in options:
        assert getattr(resolve("final", "smoke", **{field: value}), field) == value
    with pytest.raises(ConfigError, match=f"{field} must be one of"):
        resolve("final", "smoke", **{field: "bogus"})


@pytest.mark.parametrize("profile, train_images", [("paper", 45000), ("quick", 7000)])
def test_profiles_keep_the_papers_ema_horizon_as_a_fraction_of_the_run(profile, train_images):
    """Paper: decay 0.999 = a 1000-step horizon over 200 x (45,000 // 128) = 70,200 steps (1.4%)."""
    cfg = resolve("final", profile)
    subset = cfg.train_subset or 50000
    assert train_images == subset - cfg.val_size
    total_steps = cfg.epochs * (train_images // cfg.batch_size)
    horizon = 1 / (1 - cfg.ema_decay)
    assert 0.012 < horizon / total_steps < 0.017


def test_inert_settings_do_not_change_the_hash():
    base = resolve("baseline", "quick")               # no EMA, no MixUp, as-run schedule, no SE
    same = resolve("baseline", "quick", ema_decay="0.5", mix_alpha="0.9", alpha_ramp="false",
                   warmup_epochs="3", se_placement="standard")
    assert base.hash() == same.hash()
    assert resolve("final", "quick").hash() != resolve("final", "quick", ema_decay="0.5").hash()
    assert resolve("final", "quick").hash() != resolve("final", "quick", mix_alpha="0.9").hash()
