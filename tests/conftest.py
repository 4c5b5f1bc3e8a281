"""Fixtures shared by several test modules."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions run fastest on one thread; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SIMGPU = __import__("pathlib").Path(__file__).parent / "simgpu"


def simulated_gpu_env(tmp_path, count: int = 1, capability=(9, 0), name: str = "NVIDIA H100 (simulated)") -> dict:
    """The environment of a subprocess that sees `count` simulated GPUs (tests/simgpu); each
    Python process of it logs what it did with them to tmp_path/simlog/<pid>.json, and tracks
    devices (an op mixing a GPU tensor with a CPU one fails, as on CUDA)."""
    import os

    import simgpu

    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(SIMGPU), os.environ.get("PYTHONPATH", "")]),
                SAMLIB_SIMULATED_GPU=simgpu.env_value(count, capability, name),
                SAMLIB_SIMULATED_GPU_LOG=str(tmp_path / "simlog"), SAMLIB_SIMULATED_GPU_TRACK="1",
                OMP_NUM_THREADS="1")


def simulated_gpu_logs(tmp_path) -> list:
    """What each simulated-GPU process did (see simulated_gpu_env), sorted by argv."""
    import json

    logs = [json.loads(p.read_text()) for p in (tmp_path / "simlog").glob("*.json")]
    return sorted(logs, key=lambda log: log["argv"])


import sys as _sys  # noqa: E402

_sys.path.insert(0, str(SIMGPU))
_sys.path.insert(0, str(SIMGPU.parents[1] / "tools"))   # repository tooling: import nbfilter, report
