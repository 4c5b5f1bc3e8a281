"""Data-parallel training under torchrun (NCCL on GPUs, gloo on CPU): every rank builds the same global batch
and trains on its 1/N slice while DistributedDataParallel averages the gradients (BatchNorm statistics are per
slice).  Rank 0 writes every file.  Without torchrun's environment all of this is a no-op."""

import os

import torch
import torch.distributed as td

_joined = False     # whether setup() joined the group (a group the caller made is the caller's)


def world_size() -> int:
    return td.get_world_size() if td.is_available() and td.is_initialized() else 1


def rank() -> int:
    return td.get_rank() if td.is_available() and td.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (if any); return this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or td.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    td.init_process_group("nccl" if device.type == "cuda" else "gloo")
    global _joined
    _joined = True
    return device


def teardown() -> None:
    """Leave the process group setup() joined (an undestroyed NCCL group can hang the exit)."""
    global _joined
    if _joined and td.is_initialized():
        td.destroy_process_group()
    _joined = False


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    if world_size() == 1:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        td.all_reduce(t)
    return t


def barrier() -> None:
    if world_size() > 1:
        td.barrier()
