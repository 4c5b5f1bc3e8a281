"""Installs the simulated GPU (simgpu.py beside this file) in every Python process started
with this folder on PYTHONPATH and SAMLIB_SIMULATED_GPU set: the tests' subprocesses."""
import os

if os.environ.get("SAMLIB_SIMULATED_GPU"):
    import simgpu

    simgpu.install_from_env()
