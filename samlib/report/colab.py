"""The notebooks' first cell, `setup()`: the OpenMP setting every kernel needs and, on Colab, samlib importable,
Drive mounted when asked and the folders pointed there (SAMLIB_*_DIR), so a rerun resumes.  Imports no torch."""
import os
import subprocess
import sys
import warnings
from collections import namedtuple
from pathlib import Path

# Replace <owner> here and in the notebooks' setup cell with the account that holds the repository.
REPO_URL = "https://github.com/<owner>/samresnets"
CLONE_DIR = Path("/content/samresnets")
DRIVE_MOUNT = Path("/content/drive")
DRIVE_DIR = DRIVE_MOUNT / "MyDrive" / "samresnets"
# folder -> the variable the notebooks' parameters cell reads its default from
ENV = {"data": "SAMLIB_DATA_DIR", "runs": "SAMLIB_RUNS_DIR", "results": "SAMLIB_RESULTS_DIR"}
# In a checkout reports go to local/results/ (git-ignored); only `make publish` writes results/.
IN_CHECKOUT = {"data": "data", "runs": "runs", "results": "local/results"}


Folders = namedtuple("Folders", "data_dir runs_dir results_dir")


def on_colab() -> bool:
    """A Colab runtime: its kernel imports google.colab at start; the runtime sets COLAB_RELEASE_TAG."""
    return "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ


def quiet_threads() -> bool:
    """OMP_WAIT_POLICY=PASSIVE unless set (busy-waiting OpenMP threads slow a kernel); False once torch loaded."""
    late = "OMP_WAIT_POLICY" not in os.environ and "torch" in sys.modules
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if late:
        warnings.warn("torch was imported before samlib.report.colab.setup(): OMP_WAIT_POLICY has "
                      "no effect in this kernel; restart it and run the setup cell first")
    return not late


def repo_root(start=None, clone_dir=CLONE_DIR) -> Path | None:
    """The clone this samlib was imported from, else one at or above `start` (the cwd), else `clone_dir`, or None."""
    here = Path(__file__).resolve().parents[2]
    cwd = Path(start or os.getcwd()).resolve()
    return next((d for d in (here, cwd, *cwd.parents, Path(clone_dir))
                 if (d / "pyproject.toml").is_file() and (d / "samlib" / "__init__.py").is_file()), None)


def installed() -> bool:
    """samlib is pip-installed, asked of a fresh interpreter outside the clone (a stray egg-info misleads)."""
    return subprocess.run([sys.executable, "-c", "import samlib"], cwd=os.sep, capture_output=True).returncode == 0


def mount_drive(mountpoint=DRIVE_MOUNT) -> None:
    from google.colab import drive

    drive.mount(str(mountpoint))


def setup(drive: bool = False, data_dir=None, runs_dir=None, results_dir=None,
          repo_url: str = REPO_URL, clone_dir=CLONE_DIR) -> Folders:
    """Call first in every notebook: `quiet_threads()` and the folders (given, else the defaults); on Colab also
    samlib cloned, `pip install -e`d and on sys.path (no kernel restart), Drive when `drive`, SAMLIB_*_DIR set."""
    quiet_threads()
    given = {"data": data_dir, "runs": runs_dir, "results": results_dir}
    if not on_colab():
        return Folders(*(str(v) if v else os.environ.get(ENV[k], f"../{IN_CHECKOUT[k]}") for k, v in given.items()))
    root = repo_root(clone_dir=clone_dir)
    if root is None:
        root = Path(clone_dir)
        subprocess.run(["git", "clone", "-q", repo_url, str(root)], check=True)
    if not installed():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(root)], check=True)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if drive:
        mount_drive()
    folders = {k: Path(v) if v else (DRIVE_DIR / k if drive else root / IN_CHECKOUT[k]) for k, v in given.items()}
    os.environ.update({ENV[k]: str(path) for k, path in folders.items()})   # samlib creates them on first write
    print(f"Colab: samlib from {root}; " + ", ".join(f"{k} in {p}" for k, p in folders.items()))
    return Folders(*(str(p) for p in folders.values()))
