"""Configurations as plain data: the Table 1 configs (Section 4), the paper/code switches, and profiles
(how big a run is).  `resolve` gives the frozen `Config` a run records and hashes into its folder name;
this module is the one validation of every setting."""
import dataclasses
import hashlib
import json
import numbers
import sys
from dataclasses import dataclass

from .augment import MIX_KINDS
from .device import AMP_MODES
from .errors import ConfigError
from .model import NORM_STDS, SE_PLACEMENTS
from .optim import EMA_RESETS, SCHEDULES
from .selection import SELECTIONS

SPEED_KNOBS = ("eval_batch_size", "compile", "channels_last")   # change the time a run takes, not its numbers


@dataclass(frozen=True)
class Config:
    name: str = "final"
    # Model (Section 3.1): SE-ResNet, [4, 4, 3] basic blocks at 64/128/256 channels.
    se: bool = True
    se_placement: str = "as_run"      # "as_run" (after conv1-BN-SiLU) | "standard" (before the add)
    widths: tuple = (64, 128, 256)
    blocks: tuple = (4, 4, 3)
    norm_std: str = "as_run"          # "as_run" (0.2023, ...) | "true" (0.2470, ...)
    # Data: a stratified validation split for checkpoint selection and temperature fitting.
    val_size: int = 5000
    split_seed: int = 0
    train_subset: int | None = None      # profile knob: train on a stratified subset
    test_subset: int | None = None       # profile knob: smaller test set (smoke only)
    test_eval_size: int | None = None    # per-epoch test curve on this many; final eval uses all
    train_eval_size: int = 5000          # clean (un-augmented) train accuracy on this many
    # Augmentation (Section 3.2).
    crop_padding: int = 4
    flip: bool = True
    cutout: int = 16                  # hole side in px; 0 = off. The code keeps it on with MixUp.
    mix: str = "none"                 # "none" | "mixup" | "cutmix"
    mix_alpha: float = 0.3
    alpha_ramp: bool = True           # code: alpha/2 for the first quarter, 3/4 alpha to half-way
    # Optimisation (Section 3.3).
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lookahead_k: int = 5              # 0 = plain SGD
    lookahead_alpha: float = 0.5
    schedule: str = "as_run"          # "as_run" (plain OneCycle) | "as_written" (warm-up + OneCycle)
    warmup_epochs: int = 10
    pct_start: float = 0.4
    grad_clip: float = 1.0            # 0 = off
    ema: bool = False
    ema_decay: float = 0.999
    ema_reset: str = "never"          # "epoch": the authors' code put the EMA into the model each epoch
    amp: str = "auto"                 # "auto": samlib.device.precision_for decides | "off": fp32
    selection: str = "val"            # "val" | "test" (the reference code's as-run selection)
    seed: int = 84                    # the reference code's seed
    # Speed knobs (do not change the method).
    eval_batch_size: int = 1000
    compile: bool = False
    channels_last: bool = True        # on CUDA only

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def inert_fields(self) -> tuple:
        """Settings that have no effect given the others (e.g. ema_decay without EMA)."""
        rules = {"ema_decay": not self.ema, "ema_reset": not self.ema, "mix_alpha": self.mix == "none",
                 "alpha_ramp": self.mix == "none", "warmup_epochs": self.schedule == "as_run",
                 "se_placement": not self.se}
        return tuple(field for field, inert in rules.items() if inert)

    def hash(self) -> str:
        """Stable hash of what affects the result (the run folder's name): no speed knobs or inert settings."""
        skip = set(SPEED_KNOBS + self.inert_fields())
        if self.ema_reset == "never":   # added after runs were named: at its default, older names stay valid
            skip.add("ema_reset")
        d = {k: v for k, v in self.to_dict().items() if k not in skip}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


# Table 1 (Section 4): each row adds one component.
TABLE1 = ("baseline", "se", "se_mixup", "final")
FINAL = dict(se=True, mix="mixup", ema=True)

# Each paper/code discrepancy as a switch on `final`: field -> the value that departs from the
# code as run (see ../shared/reference and the README's discrepancy table).
SWITCHES = {
    "schedule": "as_written",     # paper's 10-epoch warm-up (the code's OneCycle overrode it)
    "se_placement": "standard",   # SE before the residual add, as usually done
    "cutout": 0,                  # the paper implies Cutout was dropped for MixUp
    "alpha_ramp": False,          # the paper states a fixed alpha = 0.3
    "norm_std": "true",           # the true CIFAR-10 std instead of the copied constant
    "selection": "test",          # the code selected checkpoints on the test set
    "mix": "cutmix",              # the paper's rejected alternative
    "ema_reset": "epoch",         # the code put the EMA into the trained model every epoch
}
CONFIGS = {
    "baseline": dict(se=False),
    "se": dict(se=True),
    "se_mixup": dict(se=True, mix="mixup"),
    "final": FINAL,
    **{f"final+{field}={value}": dict(FINAL, **{field: value}) for field, value in SWITCHES.items()},
}

# Profiles scale a config without changing the method.  Two knobs tied to the run's length scale
# with it: the warm-up (10 of 200 epochs) and the EMA decay, whose horizon 1 / (1 - decay) stays
# at the paper's 1.4% of all steps (smoke: 0.5, since the rule gives less than one step).
PROFILES = {
    "smoke": dict(widths=(8, 16, 32), epochs=2, batch_size=64, train_subset=768, val_size=256, test_subset=512,
                  train_eval_size=256, warmup_epochs=1, eval_batch_size=256, ema_decay=0.5),  # seconds: CI, nbval
    "quick": dict(widths=(16, 32, 64), epochs=8, batch_size=128, train_subset=8000, val_size=1000,
                  test_eval_size=2000, train_eval_size=1000, warmup_epochs=1, eval_batch_size=250,
                  ema_decay=0.84),                                  # minutes on a CPU, real data
    "cpu": dict(widths=(16, 32, 64), epochs=20, batch_size=128, test_eval_size=1000, train_eval_size=1000,
                warmup_epochs=1, eval_batch_size=500, ema_decay=0.99),  # the committed CPU report
    "paper": dict(),                                                # 200 epochs at full width
}


# The one validation of settings: every Config field is in exactly one of these tables.
SEED_MAX = 2**63 - 2      # seeds go to torch (64-bit) and numpy; the loop also seeds with seed + 1
_COUNT_MAX = 10_000_000   # image counts: far above CIFAR-10's 60,000, far below int64 overflow
_INTS = {  # field -> (lowest, highest, None allowed)
    "epochs": (1, 100_000, False), "batch_size": (1, 65_536, False),
    "eval_batch_size": (1, 65_536, False), "val_size": (0, _COUNT_MAX, False),
    "train_eval_size": (1, _COUNT_MAX, False), "test_eval_size": (1, _COUNT_MAX, True),
    "train_subset": (1, _COUNT_MAX, True), "test_subset": (1, _COUNT_MAX, True),
    "warmup_epochs": (0, 100_000, False), "lookahead_k": (0, 10_000, False),
    "crop_padding": (0, 32, False), "cutout": (0, 32, False),     # pixels of a 32x32 image
    "seed": (0, SEED_MAX, False), "split_seed": (0, SEED_MAX, False),
}
_REALS = {  # field -> (the allowed range in words, its test)
    "lr": ("> 0", lambda v: v > 0), "momentum": ("in [0, 1)", lambda v: 0 <= v < 1),
    "weight_decay": (">= 0", lambda v: v >= 0), "mix_alpha": ("> 0", lambda v: v > 0),
    "ema_decay": ("in (0, 1)", lambda v: 0 < v < 1), "lookahead_alpha": ("in (0, 1]", lambda v: 0 < v <= 1),
    "pct_start": ("in (0, 1)", lambda v: 0 < v < 1), "grad_clip": (">= 0", lambda v: v >= 0),
}
_STAGES = {"widths": 8192, "blocks": 1000}     # per-stage channels, blocks: integers in [1, max]
_BOOLS = ("se", "flip", "alpha_ramp", "nesterov", "ema", "compile", "channels_last")
_OPTIONS = {"se_placement": SE_PLACEMENTS, "norm_std": tuple(NORM_STDS), "mix": MIX_KINDS,
            "schedule": SCHEDULES, "amp": AMP_MODES, "selection": SELECTIONS,
            "ema_reset": EMA_RESETS}


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _validate(cfg: Config) -> None:
    """Every setting against its allowed range: a ConfigError naming the first bad one."""
    def need(ok, msg, field):
        if not ok:
            raise ConfigError(f"invalid config '{cfg.name}': {msg}; change it with --set {field}=VALUE")

    need(isinstance(cfg.name, str) and cfg.name != "", f"name must be a non-empty string, got {cfg.name!r}",
         "name")
    for field, (lo, hi, none_ok) in _INTS.items():
        v = getattr(cfg, field)
        allowed = f"an integer in [{lo}, {hi}]" + (" or none" if none_ok else "")
        need(_is_int(v) or (v is None and none_ok), f"{field} must be {allowed}, got {v!r}", field)
        need(v is None or v >= lo, f"{field} must be >= {lo}, got {v} (allowed: {allowed})", field)
        need(v is None or v <= hi, f"{field} must be <= {hi}, got {v} (allowed: {allowed})", field)
    for field, (rule, test) in _REALS.items():
        v = getattr(cfg, field)
        # finite: not inf or nan, nor an integer beyond any float
        finite = isinstance(v, numbers.Real) and not isinstance(v, bool) and abs(v) <= sys.float_info.max
        need(finite, f"{field} must be a finite number {rule}, got {v!r}", field)
        need(test(v), f"{field} must be {rule}, got {v!r}", field)
    settings = vars(cfg)
    for field in _BOOLS:
        need(isinstance(settings[field], bool), f"{field} must be true or false, got {settings[field]!r}", field)
    for field, options in _OPTIONS.items():
        need(settings[field] in options, f"{field} must be one of {options}, got {settings[field]!r}", field)
    for field, hi in _STAGES.items():
        v = settings[field]
        need(isinstance(v, (tuple, list)) and len(v) >= 1 and all(_is_int(x) and 1 <= x <= hi for x in v),
             f"{field} must be positive integers (each in [1, {hi}]), one per stage, got {v!r}", field)
    need(len(cfg.widths) == len(cfg.blocks), f"widths {cfg.widths} and blocks {cfg.blocks} must be of equal "
         "length (one of each per stage)", "widths")
    need(not cfg.nesterov or cfg.momentum > 0,
         f"momentum must be > 0 when nesterov is on (torch's SGD requires it), got {cfg.momentum} "
         "(or turn nesterov off: --set nesterov=false)", "momentum")
    need(cfg.selection == "test" or cfg.val_size > 0,
         "selection='val' needs val_size > 0 (or ask for the as-run selection='test')", "val_size")
    need(cfg.ema or cfg.ema_reset == "never",
         f"ema_reset={cfg.ema_reset!r} needs an EMA (--set ema=true)", "ema_reset")
    need(cfg.schedule == "as_run" or cfg.warmup_epochs < cfg.epochs,
         f"warmup_epochs ({cfg.warmup_epochs}) must be shorter than epochs ({cfg.epochs})", "warmup_epochs")


def _coerce(field: dataclasses.Field, value):
    """A command-line string (or a json value) as the field's type."""
    if not isinstance(value, str):
        return tuple(value) if isinstance(value, list) else value
    default = field.default
    if isinstance(default, bool):
        if value.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ConfigError(f"{field.name} must be true or false, got {value!r}")
        return value.lower() in ("1", "true", "yes", "on")
    try:
        if isinstance(default, tuple):
            return tuple(int(v) for v in value.strip("()[] ").split(","))
        if isinstance(default, int) or default is None:     # None: the optional image counts
            return None if value.lower() == "none" else int(value)
        if isinstance(default, float):
            return float(value)
    except ValueError:
        raise ConfigError(f"{field.name} expects a number, got {value!r}") from None
    return value


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def resolve(config: str = "final", profile: str = "paper", **overrides) -> Config:
    """The Config for a named config at a profile, with field overrides on top."""
    if config not in CONFIGS:
        raise ConfigError(f"unknown config {config!r}; choose one of: {', '.join(CONFIGS)}")
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    unknown = sorted(set(overrides) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown setting(s) {unknown}; valid ones: {', '.join(_FIELDS)}")
    values = dict(PROFILES[profile], **CONFIGS[config], name=config)
    values.update({k: _coerce(_FIELDS[k], v) for k, v in overrides.items()})
    cfg = Config(**values)
    _validate(cfg)
    return cfg


_FILE_FIX = ("the file was edited by hand or damaged: restore it, or move its run folder away "
             "(or delete it) and train the run again")


def _check_stored(v) -> None:
    """A stored setting is a JSON scalar (64-bit integers, valid Unicode) or a flat list of them."""
    for i, x in enumerate(v) if isinstance(v, (list, tuple)) else [(None, v)]:
        at = "" if i is None else f"[{i}] "
        if _is_int(x) and abs(x) >= 2**63:
            raise ConfigError(f"{at}holds an integer too large for any setting ({x.bit_length()} bits)")
        if isinstance(x, str) and any("\ud800" <= c <= "\udfff" for c in x):    # what UTF-8 cannot encode
            raise ConfigError(f"{at}holds text that is not valid Unicode ({x!a})")
        if x is not None and not isinstance(x, (bool, int, float, str)):
            raise ConfigError(f"{at}must be a number, text, true/false or null, got {type(x).__name__}")


def from_dict(d: dict, source: str = "config.json") -> Config:
    """Rebuild a Config from config.json (lists back to tuples); anything wrong is a ConfigError naming `source`."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source} must hold an object of settings, got {type(d).__name__}; {_FILE_FIX}")
    unknown = sorted(str(k) for k in d if k not in _FIELDS)
    if unknown:
        raise ConfigError(f"{source} has unknown setting(s) {unknown}; written by another samlib version? {_FILE_FIX}")
    values = {}
    for key, value in d.items():
        try:
            _check_stored(value)
            values[key] = _coerce(_FIELDS[key], value)
        except ConfigError as e:
            raise ConfigError(f"{source}: field '{key}': {e}; {_FILE_FIX}") from None
    cfg = Config(**values)
    try:
        _validate(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source} holds an invalid setting: {e}; {_FILE_FIX}") from None
    return cfg
