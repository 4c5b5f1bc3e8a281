"""Where a run computes and at which precision (paper Section 3.3: "AMP").

One rule for training and inference alike: bf16 autocast on a GPU with native bf16
(compute capability 8.0 or newer: A100, L4, H100...; no loss scaling needed), fp16 +
GradScaler on an older GPU (T4, V100: the paper's own setting), full fp32 on the CPU.
`torch.cuda.is_bf16_supported()` is not the test: it says yes on a T4 too, through a slow
emulation, and it asks about the current GPU rather than the chosen one.
"""
from __future__ import annotations

import contextlib
import re

import torch

from .errors import SamlibError

AMP_MODES = ("auto", "off")


SUPPORTED_DEVICES = "cpu, cuda or cuda:N (N = 0, 1, ...)"
_DEVICE = re.compile(r"cpu|cuda(:\d{1,4})?")


def resolve_device(device=None) -> torch.device:
    """`device` ("cpu", "cuda", "cuda:1"; default cuda when available) or a clear error.

    Only the CPU and CUDA GPUs are supported: other torch devices (mps, meta, xla, ...)
    are refused here rather than failing somewhere in the loop."""
    if device is None or device == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = str(device).strip() if isinstance(device, (str, torch.device)) else None
    if name is None or not _DEVICE.fullmatch(name):
        raise SamlibError(f"unknown device {device!r}; supported: {SUPPORTED_DEVICES} "
                          "(e.g. --device cpu, or leave --device out)")
    dev = torch.device(name)
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise SamlibError(f"device {device!r} asked for, but {torch.cuda.device_count()} CUDA GPU(s) "
                          "are visible; use --device cpu (or leave --device out)")
    return dev


def amp_dtype_for(amp: str, device: torch.device):
    """The autocast dtype for `amp` ("auto" | "off") on `device`, or None for fp32."""
    if amp == "off" or device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, _ = torch.cuda.get_device_capability(index)
    return torch.bfloat16 if major >= 8 else torch.float16


def autocast(device: torch.device, dtype):
    """torch.autocast for `dtype` on `device`; a no-op context when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
