"""Where a run computes and at which precision (paper Section 3.3, "AMP"): `precision_for` is the one
place that turns the config's `amp` into a precision; a started run keeps the one it recorded."""
import contextlib
import functools
import os
import re

import torch

from .errors import SamlibError

AMP_MODES = ("auto", "off")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CPUINFO = "/proc/cpuinfo"


def check_environment() -> None:
    """A removed environment setting is one clear error, not silently ignored."""
    if "SAMLIB_CPU_AMP" in os.environ:
        raise SamlibError("SAMLIB_CPU_AMP is no longer read: the config's amp setting alone decides the "
                          "precision (--set amp=off trains in fp32 everywhere; a started run keeps its own "
                          "precision); unset SAMLIB_CPU_AMP")


def resolve_device(device=None) -> torch.device:
    """`device` ("cpu", "cuda", "cuda:1"; default cuda when available) as a torch.device with its index."""
    check_environment()
    if device is None or device == "":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    name = str(device).strip() if isinstance(device, (str, torch.device)) else None
    if name is None or not re.fullmatch(r"cpu|cuda(:\d{1,4})?", name):
        raise SamlibError(f"unknown device {device!r}; supported: cpu, cuda or cuda:N (N = 0, 1, ...) "
                          "(e.g. --device cpu, or leave --device out)")
    dev = torch.device(name)
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise SamlibError(f"device {device!r} asked for, but {torch.cuda.device_count()} CUDA GPU(s) "
                          "are visible; use --device cpu (or leave --device out)")
    if dev.type == "cuda" and dev.index is None:     # what torch.cuda.set_device and the provenance take
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _cpuinfo(key: str) -> str:
    """The value of the first `key` line of /proc/cpuinfo, or ""."""
    try:
        with open(CPUINFO) as f:
            return next((line.split(":", 1)[1] for line in f if line.startswith(key)), "")
    except (OSError, UnicodeDecodeError):
        return ""


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, or "" (for the provenance)."""
    return " ".join(_cpuinfo("model name").split())


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware, by torch's detection, else /proc/cpuinfo's flags."""
    detect = getattr(getattr(torch._C, "_cpu", None), "_get_cpu_capability", None)
    try:
        flags = {name for name, present in detect().items() if present is True}
    except Exception:   # not in this torch (a private API), or it failed
        flags = set(_cpuinfo("flags").split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def precision_for(amp: str, device: torch.device) -> str:
    """The precision `amp` ("auto" | "off") picks on `device`: bf16 on a GPU of compute capability 8.0+ or a
    CPU with native bf16, fp16 + GradScaler on an older GPU, fp32 elsewhere."""
    if amp == "off":
        return "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, _ = torch.cuda.get_device_capability(index)
    return "bf16" if major >= 8 else "fp16"


def runs_natively(precision: str, device: torch.device) -> bool:
    """Whether `device` computes `precision` in hardware (bf16: where precision_for picks it)."""
    if precision == "bf16":
        return precision_for("auto", device) == "bf16"
    return precision == "fp32" or device.type == "cuda"


def autocast(device: torch.device, precision: str):
    """torch.autocast in `precision` on `device`; a no-op context for fp32."""
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
