"""A simulated CUDA GPU for the tests: torch believes one or more GPUs are present while every
tensor stays on the CPU.

What is simulated, and how:
- the CUDA runtime's C bindings (device count, current device, set/exchange device,
  synchronize, device properties) are replaced at their lowest Python-visible level, so
  torch's own Python checks around them stay real: ``torch.cuda.set_device("cuda")`` still
  refuses an unindexed device, ``get_device_properties(5)`` still asserts on a missing one;
- a TorchFunctionMode places every tensor asked for on ``cuda[:n]`` on the CPU instead
  (factory ``device=`` arguments, ``Tensor.to``/``.cuda``, ``pin_memory``), after checking
  the index against the device count as the CUDA runtime would;
- ``torch.Generator("cuda")`` gives a CPU generator, ``torch.load(map_location="cuda:n")``
  loads on the CPU (index checked), ``torch.autocast("cuda", ...)`` runs torch's CUDA checks
  and then autocasts the CPU in the same dtype, so bf16/fp16 arithmetic really happens;
  GradScaler("cuda") is enabled because the device is "available".

What it cannot show: speed, memory, real CUDA kernels and their numerics, and device
mixing (all tensors are CPU tensors; tests/test_gpu_step.py checks that with fake tensors).

Use in-process with ``simulated_gpu(count, capability, name)`` (a context manager), or in a
subprocess by putting this folder on PYTHONPATH and setting SAMLIB_SIMULATED_GPU to
``COUNT:MAJOR.MINOR:NAME`` (sitecustomize.py here installs it at interpreter start).
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
import types
import weakref

import torch
from torch.overrides import TorchFunctionMode

ENV = "SAMLIB_SIMULATED_GPU"
H100 = (1, (9, 0), "NVIDIA H100 80GB HBM3 (simulated)")
T4 = (1, (7, 5), "Tesla T4 (simulated)")


def env_value(count: int = 1, capability=(9, 0), name: str = H100[2]) -> str:
    """The SAMLIB_SIMULATED_GPU value for a subprocess."""
    return f"{count}:{capability[0]}.{capability[1]}:{name}"


def parse_env(value: str):
    count, capability, name = value.split(":", 2)
    major, minor = capability.split(".")
    return int(count), (int(major), int(minor)), name


class _State:
    def __init__(self, count, capability, name):
        self.count, self.capability, self.name = count, capability, name
        self.current = 0
        self.synchronized = 0          # how many times torch.cuda.synchronize ran
        self.placed = set()            # GPU indexes tensors were asked for on
        self.set_devices = []          # torch.cuda.set_device's arguments, in order
        self.autocast = set()          # dtypes of the autocast("cuda") regions entered
        self.cuda_generators = []      # weak references to the generators made for "cuda"

    def is_cuda_generator(self, generator) -> bool:
        """Whether `generator` (perhaps another Python object for the same generator, as the
        dispatcher passes it) is one made for "cuda": compared by state."""
        state = generator.get_state()
        return any(g() is not None and torch.equal(g().get_state(), state) for g in self.cuda_generators)

    def record(self) -> dict:
        return {"placed": sorted(self.placed), "set_devices": self.set_devices, "current": self.current,
                "autocast": sorted(str(d).replace("torch.", "") for d in self.autocast),
                "synchronized": self.synchronized}

    def check_index(self, index) -> int:
        index = 0 if index is None else int(index)
        if not 0 <= index < self.count:
            # the CUDA runtime's own words
            raise RuntimeError("CUDA error: invalid device ordinal")
        return index

    def properties(self, index):
        major, minor = self.capability
        return types.SimpleNamespace(name=self.name, major=major, minor=minor,
                                     total_memory=80 * 2**30, multi_processor_count=132,
                                     is_integrated=False, is_multi_gpu_board=False)


# Functions a GPU tensor may meet a (non-scalar) CPU tensor in: copies, indexing with CPU
# indices (torch moves them), metadata and module plumbing.
MIXING_ALLOWED = {"copy_", "__setitem__", "__getitem__", "index_put_", "_has_compatible_shallow_copy_type",
                  "swap_tensors", "module_load", "__get__", "__set__", "to", "cpu", "cuda", "set_", "data", "grad"}


class SimulatedCudaTensor(torch.Tensor):
    """A CPU tensor that says it lives on GPU 0 of the simulation (device, is_cuda), keeps
    saying so through every op (torch's subclass propagation), and refuses, as CUDA does,
    an op that mixes it with a non-scalar CPU tensor.  `.cpu()` gives a plain tensor;
    `.numpy()` is refused as on a GPU.  Gradients read through `.grad` are GPU tensors too."""

    index = 0          # the GPU this process placed its tensors on

    @property
    def device(self):
        return torch.device("cuda", SimulatedCudaTensor.index)

    @property
    def is_cuda(self):
        return True

    @property
    def grad(self):
        g = torch.Tensor.grad.__get__(self)
        return g.as_subclass(SimulatedCudaTensor) if g is not None and type(g) is torch.Tensor else g

    @grad.setter
    def grad(self, value):
        torch.Tensor.grad.__set__(self, value)

    def __deepcopy__(self, memo):
        if id(self) not in memo:
            with torch._C.DisableTorchFunctionSubclass(), torch.no_grad():
                copy = self.as_subclass(torch.Tensor).clone().as_subclass(SimulatedCudaTensor)
            copy.requires_grad_(self.requires_grad)
            if getattr(self, "_is_param", False):
                copy._is_param = True
            memo[id(self)] = copy
        return memo[id(self)]

    def __reduce_ex__(self, protocol):
        """Saved as the plain tensor it is (torch.save of a GPU tensor, loaded on the CPU)."""
        with torch._C.DisableTorchFunctionSubclass():
            return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "numpy":
            raise TypeError(f"can't convert cuda:{cls.index} device type tensor to numpy. Use Tensor.cpu() to copy "
                            "the tensor to host memory first. (simulated GPU)")
        if name not in MIXING_ALLOWED:
            for t in _tensors((args, kwargs)):
                if not isinstance(t, SimulatedCudaTensor) and t.dim() > 0:
                    raise RuntimeError("Expected all tensors to be on the same device, but found at least two "
                                       f"devices, cuda:{cls.index} and cpu! (simulated GPU, in {name})")
        if name == "cpu" or (name == "to" and _targets_cpu(args[1:], kwargs)):
            with torch._C.DisableTorchFunctionSubclass():
                out = func(*args, **kwargs)
            return out.as_subclass(torch.Tensor) if torch.is_tensor(out) else out
        return super().__torch_function__(func, types, args, kwargs)


def _tensors(tree) -> list:
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _targets_cpu(args, kwargs) -> bool:
    for value in (*args, kwargs.get("device")):
        if isinstance(value, (str, torch.device)) and torch.device(value).type == "cpu":
            return True
    return False


def _is_cuda(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return isinstance(value, str) and (value == "cuda" or value.startswith("cuda:"))


class _OnTheCpu(TorchFunctionMode):
    """Tensors asked for on a CUDA device are made (or kept) on the CPU."""

    def __init__(self, state: _State, track: bool = False):
        super().__init__()
        self.state, self.track = state, track

    def _on_gpu(self, out):
        """With tracking, what was placed on a GPU becomes a SimulatedCudaTensor."""
        if self.track and torch.is_tensor(out) and not isinstance(out, SimulatedCudaTensor):
            if isinstance(out, torch.nn.Parameter):
                return torch.nn.Parameter(out.detach().as_subclass(SimulatedCudaTensor), out.requires_grad)
            return out.as_subclass(SimulatedCudaTensor)
        return out

    def _host(self, value):
        if _is_cuda(value):
            index = torch.device(value).index
            index = self.state.check_index(self.state.current if index is None else index)
            self.state.placed.add(index)
            SimulatedCudaTensor.index = index
            return torch.device("cpu")
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        to_gpu = _is_cuda(kwargs.get("device"))
        if "device" in kwargs:
            kwargs["device"] = self._host(kwargs["device"])
        if func in (torch.Tensor.cuda,):
            device = args[1] if len(args) > 1 else kwargs.get("device")
            device = torch.device("cuda", device) if isinstance(device, int) else device or "cuda"
            self._host(device)
            return self._on_gpu(args[0])
        if func in (torch.Tensor.pin_memory,):
            return args[0]
        if func in (torch.Tensor.to,):
            to_gpu = to_gpu or any(_is_cuda(a) for a in args[1:])
            args = tuple(self._host(a) for a in args)
        out = func(*args, **kwargs)
        return self._on_gpu(out) if to_gpu else out


def _generator_class(state: _State):
    real = torch.Generator

    class Generator(real):
        """torch.Generator, with "cuda[:n]" made on the CPU."""

        def __new__(cls, device="cpu"):
            on_gpu = _is_cuda(device)
            if on_gpu:
                state.check_index(torch.device(device).index)
                device = "cpu"
            generator = real.__new__(cls, device)
            if on_gpu:
                state.cuda_generators.append(weakref.ref(generator))
            return generator

        def __init__(self, device="cpu"):
            pass

    return real, Generator


def _autocast_class(state: _State):
    real = torch.autocast

    class autocast(real):
        """torch.autocast; "cuda" runs torch's CUDA checks, then autocasts the CPU."""

        def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
            if device_type == "cuda":
                super().__init__("cuda", dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)
                if self._enabled:
                    state.autocast.add(self.fast_dtype)
                device_type, dtype, enabled = "cpu", self.fast_dtype, self._enabled
            super().__init__(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

    return real, autocast


@contextlib.contextmanager
def simulated_gpu(count: int = 1, capability=(9, 0), name: str = H100[2], place_on_cpu: bool = True,
                  track_devices: bool = False):
    """torch sees `count` CUDA GPUs of `capability` named `name`; tensors stay on the CPU.
    Yields the simulation's state (current device, synchronize count).

    place_on_cpu=False: the CUDA runtime and torch.Generator("cuda") only, for fake CUDA
    tensors (FakeTensorMode), which keep their device and need no placement or autocast help.
    track_devices=True: tensors placed on a GPU are SimulatedCudaTensors, so an op mixing
    them with CPU tensors fails as it would on CUDA (a process using one GPU: the index is
    the last one placed on)."""
    state = _State(count, tuple(capability), name)
    mode = _OnTheCpu(state, track=track_devices)
    real_load = torch.load

    def load(f, map_location=None, *args, **kwargs):
        if _is_cuda(map_location):
            map_location = mode._host(map_location)
        return real_load(f, map_location, *args, **kwargs)

    def set_device(index):
        state.current = state.check_index(index)
        state.set_devices.append(index)

    def exchange(index):
        previous = state.current
        if index >= 0:
            state.current = state.check_index(index)
        return previous

    def synchronize():
        state.synchronized += 1

    real_generator, generator = _generator_class(state)
    real_autocast, autocast = _autocast_class(state)
    patches = [
        (torch.cuda, "is_available", lambda: True),
        (torch.cuda, "device_count", lambda: state.count),
        (torch.cuda, "_lazy_init", lambda: None),
        (torch.cuda, "_get_device_properties", lambda index: state.properties(index)),
        (torch.cuda, "_exchange_device", exchange),
        (torch.cuda, "_maybe_exchange_device", exchange),
        (torch.cuda, "empty_cache", lambda: None),
        (torch.cuda, "max_memory_allocated", lambda device=None: 0),
        (torch.cuda, "memory_allocated", lambda device=None: 0),
        (torch.cuda, "reset_peak_memory_stats", lambda device=None: None),
        (torch._C, "_cuda_setDevice", set_device),
        (torch._C, "_cuda_getDevice", lambda: state.current),
        (torch._C, "_cuda_synchronize", synchronize),
        (torch, "Generator", generator),
        # DataLoader(pin_memory=True) pins in a thread of its own, outside the placement mode
        (torch.Tensor, "pin_memory", lambda self, *args, **kwargs: self),
        (torch.accelerator, "current_device_index", lambda: state.current),
        (torch.accelerator, "set_device_index", set_device),
    ]
    if place_on_cpu:
        patches += [(torch, "autocast", autocast), (torch.amp, "autocast", autocast), (torch, "load", load)]
    missing = object()        # torch.cuda._get_device_properties exists once CUDA initialised
    saved = [(obj, attr, getattr(obj, attr, missing)) for obj, attr, _ in patches]
    for obj, attr, value in patches:
        setattr(obj, attr, value)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    # Module.to swaps each parameter for its GPU one (else it would set .data, keeping the class)
    torch.__future__.set_swap_module_params_on_conversion(swap or track_devices)
    try:
        with mode if place_on_cpu else contextlib.nullcontext():
            yield state
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
        for obj, attr, value in saved:
            if value is missing:
                delattr(obj, attr)
            else:
                setattr(obj, attr, value)


def install_from_env() -> None:
    """Enter the simulation for the rest of this process when SAMLIB_SIMULATED_GPU is set.
    With SAMLIB_SIMULATED_GPU_LOG=<folder>, the process writes what it did with the GPUs to
    <folder>/<pid>.json at exit (its argv, GPU indexes used, set_device calls, autocast dtypes)."""
    value = os.environ.get(ENV)
    if value:
        global _ACTIVE
        _ACTIVE = simulated_gpu(*parse_env(value), track_devices=os.environ.get(ENV + "_TRACK") == "1")
        state = _ACTIVE.__enter__()
        log = os.environ.get(ENV + "_LOG")
        if log:
            atexit.register(_write_log, log, state)


def _write_log(folder: str, state: _State) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{os.getpid()}.json"), "w") as f:
        json.dump({"argv": sys.argv, **state.record()}, f)


_ACTIVE = None
