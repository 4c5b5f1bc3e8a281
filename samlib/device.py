"""Where a run computes and at which precision (paper Section 3.3: "AMP").

One rule for training and inference alike: bf16 autocast on a GPU that supports it (no
loss scaling needed), fp16 + GradScaler on an older GPU, full fp32 on the CPU.
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
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype):
    """torch.autocast for `dtype` on `device`; a no-op context when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
