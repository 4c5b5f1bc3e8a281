"""Where a run computes and at which precision (paper Section 3.3: "AMP").

One rule for training and inference alike (`amp="auto"`, samlib.device.precision_for): bf16 autocast on a GPU with
native bf16 (compute capability 8.0 or newer: A100, L4, H100...; no loss scaling needed),
fp16 + GradScaler on an older GPU (T4, V100: the paper's own setting), bf16 autocast on a
CPU with native bf16 instructions (x86 AVX512-BF16 or AMX-BF16: Xeon Cooper Lake, Sapphire
Rapids and newer; AMD Zen 4 and newer), fp32 on any other CPU.  `amp="off"` is fp32
everywhere.  `torch.cuda.is_bf16_supported()` is not the GPU test: it says yes on a T4
too, through a slow emulation, and it asks about the current GPU rather than the chosen
one.  On a CPU without native bf16, autocast would emulate it, slower than fp32.

The config's `amp` is the one setting of the precision (`--set amp=off`: fp32 everywhere);
a run already started keeps the precision it started in (see Trainer.load_state_dict).  The
environment variable SAMLIB_CPU_AMP, which once chose fp32 on CPUs with bf16, is refused.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re

import torch

from .errors import SamlibError

AMP_MODES = ("auto", "off")
REMOVED_ENV = "SAMLIB_CPU_AMP"


SUPPORTED_DEVICES = "cpu, cuda or cuda:N (N = 0, 1, ...)"
_DEVICE = re.compile(r"cpu|cuda(:\d{1,4})?")


def resolve_device(device=None) -> torch.device:
    """`device` ("cpu", "cuda", "cuda:1"; default cuda when available) as a torch.device
    (a GPU always with its index: "cuda" is the current one), or a clear error.

    Only the CPU and CUDA GPUs are supported: other torch devices (mps, meta, xla, ...)
    are refused here rather than failing somewhere in the loop."""
    check_environment()
    if device is None or device == "":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    name = str(device).strip() if isinstance(device, (str, torch.device)) else None
    if name is None or not _DEVICE.fullmatch(name):
        raise SamlibError(f"unknown device {device!r}; supported: {SUPPORTED_DEVICES} "
                          "(e.g. --device cpu, or leave --device out)")
    dev = torch.device(name)
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise SamlibError(f"device {device!r} asked for, but {torch.cuda.device_count()} CUDA GPU(s) "
                          "are visible; use --device cpu (or leave --device out)")
    if dev.type == "cuda" and dev.index is None:
        # "cuda" means the current GPU; an indexed device is what torch.cuda.set_device and
        # the device queries accept, and what the provenance names.
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = "/proc/cpuinfo"


def _cpuinfo(key: str) -> str | None:
    """The value of the first `key` line of Linux's /proc/cpuinfo, or None (no such line, no
    such file, not text)."""
    try:
        with open(CPUINFO) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1]
    except (OSError, UnicodeDecodeError):
        pass
    return None


def _cpu_flags() -> set:
    """The CPU's feature flags: torch's own detection when this torch has it, else Linux's
    /proc/cpuinfo; an empty set where neither answers (macOS, Windows, an old torch)."""
    detect = getattr(getattr(torch._C, "_cpu", None), "_get_cpu_capability", None)
    if detect is not None:
        try:
            return {name for name, present in detect().items() if present is True}
        except Exception:   # a private API: any failure falls back to the kernel's list
            pass
    return set((_cpuinfo("flags") or "").split())


@functools.lru_cache(maxsize=None)
def cpu_model() -> str:
    """The CPU's model name from Linux's /proc/cpuinfo ("AMD EPYC", "Intel(R) Xeon(R) ..."),
    or "" where there is none: which machine a CPU number came from."""
    return " ".join((_cpuinfo("model name") or "").split())


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX-BF16)."""
    return bool(_cpu_flags() & set(CPU_BF16_FLAGS))


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_for(amp: str, device: torch.device) -> str:
    """The precision ("fp32" | "bf16" | "fp16") the config's `amp` setting ("auto" | "off")
    picks on `device`: the one place that decides it.  A started run keeps the one it
    recorded (Trainer.load_state_dict)."""
    if amp == "off":
        return "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, _ = torch.cuda.get_device_capability(index)
    return "bf16" if major >= 8 else "fp16"


def check_environment() -> None:
    """Every command's device choice starts here, on every machine: an environment setting
    this project no longer reads is one clear error, not silently ignored."""
    if REMOVED_ENV in os.environ:
        raise SamlibError(f"{REMOVED_ENV} is no longer read: the config's amp setting alone decides "
                          "the precision (--set amp=off trains in fp32 everywhere; a started run keeps "
                          f"its own precision); unset {REMOVED_ENV}")


def runs_natively(precision: str, device: torch.device) -> bool:
    """Whether `device` computes `precision` in hardware: fp32 everywhere, fp16 on every CUDA
    GPU, bf16 on a GPU of compute capability 8.0+ or a CPU with native bf16 (elsewhere it is
    emulated, or not offered)."""
    if precision == "fp32":
        return True
    if precision == "fp16":
        return device.type == "cuda"
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return precision_for("auto", device) == "bf16"


def autocast(device: torch.device, precision: str):
    """torch.autocast in `precision` on `device`; a no-op context for fp32."""
    if PRECISIONS[precision] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])
