"""The command line with untrusted or mistaken input (issue 5): one line 'error: ...' with a
hint on stderr, exit status 2, never a traceback, and never code run from a file.

Most cases call samlib.cli.main in this process (an uncaught exception fails the test just
as a traceback would); a few run `python -m samlib` for real.  The library-level checks live
in test_data.py, test_io.py and test_config.py; these are the end-to-end versions.
"""
import ast
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from samlib import cli
from samlib.config import resolve
from samlib.data import FOLDER
from samlib.io import CHECKPOINT_FORMAT, save_checkpoint
from samlib.model import build_model
from samlib.rundir import RunDir

PACKAGE = Path(__file__).resolve().parents[1] / "samlib"
TINY = dict(widths="4,8,8", blocks="1,1,1", epochs="1", train_subset="none", test_subset="none",
            val_size="64", train_eval_size="64")
TINY_ARGS = ["--profile", "smoke", "--device", "cpu", "--no-progress",
             *[a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]]


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    assert cli.main(["synthetic", str(root), "--n-train", "512", "--n-test", "128"]) == 0
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """Finished one-epoch runs: 'final' (with EMA) and 'baseline' (without)."""
    out = tmp_path_factory.mktemp("runs")
    dirs = {}
    for config in ("final", "baseline"):
        argv = ["train", "--config", config, "--data-dir", str(data_dir), "--out", str(out), *TINY_ARGS]
        assert cli.main(argv) == 0
        dirs[config] = RunDir.for_config(resolve(config, "smoke", **TINY), out).path
        assert (dirs[config] / "final.json").exists()
    return dirs


def assert_one_clear_error(code, err, *words):
    assert code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


# ---------------------------------------------------------------- inputs that go wrong

class Evil:
    """Unpickling this runs `touch marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def data_with(tmp, data_dir, name, payload):
    """A copy of the data folder with `name` replaced by `payload` (None: removed)."""
    root = tmp / "data"
    shutil.copytree(data_dir / FOLDER, root / FOLDER)
    target = root / FOLDER / name
    if payload is None:
        target.unlink()
    else:
        target.write_bytes(payload if isinstance(payload, bytes) else pickle.dumps(payload, protocol=2))
    return root


def kaggle(tmp, obj):
    path = tmp / "kaggle.pkl"
    path.write_bytes(pickle.dumps(obj))
    return path


def foreign_ema_run(tmp, runs):
    """The EMA run with best_ema.pt replaced by a (valid) checkpoint of another width."""
    run = tmp / "run"
    shutil.copytree(runs["final"], run)
    arch = dict(torch.load(run / "best_ema.pt", weights_only=True)["arch"], widths=[8, 8, 8])
    save_checkpoint({"arch": arch, "model": build_model(**arch).state_dict(), "epoch": 1},
                    run / "best_ema.pt", keep_previous=False)
    return run


def _train(tmp, data, *extra):
    return ["train", "--data-dir", str(data), "--out", str(tmp / "runs"), *TINY_ARGS, *extra]


def _submit(run, tmp, inp, *extra):
    return ["submit", str(run), "--input", str(inp), "--output", str(tmp / "sub.csv"),
            "--device", "cpu", *extra]


def _good_kaggle(tmp):
    return kaggle(tmp, {b"data": np.zeros((4, 32, 32, 3), np.uint8), b"ids": [3, 1, 2, 0]})


def _offline(monkeypatch):
    import torchvision

    def no_network(*args, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_network)


def _a_file(tmp):
    (tmp / "file").write_text("not a folder")
    return tmp / "file"


# id -> (tmp, data_dir, runs, monkeypatch) -> (argv, words the message must contain)
CASES = {
    "data folder missing": lambda t, d, r, m: (
        _train(t, t / "nowhere"), ["CIFAR-10 not found", "--download", "make_cifar10.py"]),
    "data folder missing, download offline": lambda t, d, r, m: (
        _offline(m) or _train(t, t / "nowhere", "--download"),
        ["could not download", "name resolution", "make_cifar10.py"]),
    "batch file missing": lambda t, d, r, m: (
        _train(t, data_with(t, d, "data_batch_3", None)), ["missing data_batch_3", "--download"]),
    "batch of wrong shape": lambda t, d, r, m: (
        _train(t, data_with(t, d, "data_batch_1", {b"labels": [0, 1], b"data": np.zeros((2, 1024), np.uint8)})),
        ["data_batch_1", "(2, 1024)", "flat (N, 3072)"]),
    "batch of wrong dtype": lambda t, d, r, m: (
        _train(t, data_with(t, d, "data_batch_4", {b"labels": [0, 1], b"data": np.zeros((2, 3072), np.float32)})),
        ["data_batch_4", "float32", "expected uint8"]),
    "label out of range": lambda t, d, r, m: (
        _train(t, data_with(t, d, "test_batch", {b"labels": [3, 10], b"data": np.zeros((2, 3072), np.uint8)})),
        ["test_batch", "labels must lie in 0..9", "found 3..10"]),
    "empty pickle": lambda t, d, r, m: (
        _train(t, data_with(t, d, "data_batch_2", b"")), ["data_batch_2: truncated or not a pickle", "copy"]),
    "truncated pickle": lambda t, d, r, m: (
        _train(t, data_with(t, d, "data_batch_5", (d / FOLDER / "data_batch_5").read_bytes()[:5000])),
        ["data_batch_5: truncated or not a pickle", "copy"]),
    "kaggle ids and data of different lengths": lambda t, d, r, m: (
        _submit(r["final"], t, kaggle(t, {b"data": np.zeros((3, 32, 32, 3), np.uint8), b"ids": [1, 2]})),
        ["kaggle.pkl", "one id per image"]),
    "kaggle duplicate ids": lambda t, d, r, m: (
        _submit(r["final"], t, kaggle(t, {b"data": np.zeros((3, 32, 32, 3), np.uint8), b"ids": [4, 5, 4]})),
        ["ids must be unique", "e.g. 4"]),
    "kaggle 28x28 images": lambda t, d, r, m: (
        _submit(r["final"], t, kaggle(t, {b"data": np.zeros((2, 28, 28, 3), np.uint8), b"ids": [0, 1]})),
        ["(2, 28, 28, 3)", "32x32x3"]),
    "kaggle file missing": lambda t, d, r, m: (
        _submit(r["final"], t, t / "absent.pkl"), ["absent.pkl not found", "Kaggle"]),
    "unknown config": lambda t, d, r, m: (
        _train(t, d, "--config", "fnal"), ["unknown config 'fnal'", "choose one of", "baseline"]),
    "unknown profile": lambda t, d, r, m: (
        _train(t, d, "--profile", "huge"), ["unknown profile 'huge'", "smoke"]),
    "negative epochs": lambda t, d, r, m: (_train(t, d, "--set", "epochs=-3"), ["epochs must be >= 1, got -3"]),
    "negative mixup alpha": lambda t, d, r, m: (
        _train(t, d, "--set", "mix_alpha=-1"), ["mix_alpha must be > 0, got -1.0"]),
    "EMA decay of 1": lambda t, d, r, m: (_train(t, d, "--set", "ema_decay=1"), ["ema_decay must be in (0, 1)"]),
    "EMA decay of 0": lambda t, d, r, m: (_train(t, d, "--set", "ema_decay=0"), ["ema_decay must be in (0, 1)"]),
    "zero width": lambda t, d, r, m: (_train(t, d, "--set", "widths=0,8,8"), ["must be positive"]),
    "not a number": lambda t, d, r, m: (_train(t, d, "--set", "lr=fast"), ["lr expects a number, got 'fast'"]),
    "unknown setting": lambda t, d, r, m: (_train(t, d, "--set", "epoch=3"), ["unknown setting(s) ['epoch']"]),
    "--set without =": lambda t, d, r, m: (_train(t, d, "--set", "epochs"), ["--set expects KEY=VALUE", "epochs=5"]),
    "unknown device": lambda t, d, r, m: (_train(t, d, "--device", "gpu"), ["unknown device 'gpu'", "cpu"]),
    "results folder under a file": lambda t, d, r, m: (
        _train(t, d, "--out", str(_a_file(t) / "runs")), ["--out", "is a file, not a folder"]),
    "submission under a file": lambda t, d, r, m: (
        ["submit", r["final"], "--input", _good_kaggle(t), "--output", _a_file(t) / "s.csv", "--device", "cpu"],
        ["--output", "is a file, not a folder"]),
    "evaluate, EMA checkpoint of another width": lambda t, d, r, m: (
        ["evaluate", str(foreign_ema_run(t, r)), "--data-dir", str(d), "--device", "cpu"],
        ["best_ema.pt", "another config"]),
    "submit, EMA checkpoint of another width": lambda t, d, r, m: (
        _submit(foreign_ema_run(t, r), t, _good_kaggle(t)), ["best_ema.pt", "another config"]),
    "submit, EMA strategy without EMA": lambda t, d, r, m: (
        _submit(r["baseline"], t, _good_kaggle(t), "--strategy", "ema+tta"),
        ["needs an EMA checkpoint", "use standard or tta"]),
    "submit, unknown strategy": lambda t, d, r, m: (
        _submit(r["final"], t, _good_kaggle(t), "--strategy", "best"), ["unknown strategy 'best'", "ensemble+tta"]),
    "submit, not a run directory": lambda t, d, r, m: (
        _submit(t, t, _good_kaggle(t)), ["no best_regular.pt", "python -m samlib train"]),
    "evaluate, not a run directory": lambda t, d, r, m: (
        ["evaluate", str(t / "nowhere"), "--data-dir", str(d)], ["not a samlib run directory", "train"]),
    "evaluate, unknown device": lambda t, d, r, m: (
        ["evaluate", str(r["final"]), "--data-dir", str(d), "--device", "tpu0"], ["unknown device 'tpu0'"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error(case, tmp_path, data_dir, runs, monkeypatch, capsys):
    argv, words = CASES[case](tmp_path, data_dir, runs, monkeypatch)
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    assert_one_clear_error(code, capsys.readouterr().err, *words)
    assert not (tmp_path / "sub.csv").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("command", ["train", "submit"])
def test_asking_for_a_missing_gpu_is_one_clear_error(command, tmp_path, data_dir, runs, capsys):
    argv = (_train(tmp_path, data_dir, "--device", "cuda") if command == "train"
            else _submit(runs["final"], tmp_path, _good_kaggle(tmp_path))[:-1] + ["cuda"])
    assert_one_clear_error(cli.main(argv), capsys.readouterr().err, "'cuda'", "--device cpu")


# ---------------------------------------------------------------- real processes

def run_cli(*argv):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "samlib", *map(str, argv)], capture_output=True,
                          text=True, env=env, timeout=300)


def test_malicious_cifar_batch_never_runs_code(tmp_path, data_dir):
    marker = tmp_path / "PWNED"
    data = data_with(tmp_path, data_dir, "data_batch_1", {b"labels": [0], b"data": Evil(marker)})
    done = run_cli(*_train(tmp_path, data))
    assert_one_clear_error(done.returncode, done.stderr, "refusing to unpickle", "data_batch_1", "malicious")
    assert not marker.exists()


def test_malicious_kaggle_file_never_runs_code(tmp_path, runs):
    marker = tmp_path / "PWNED"
    evil = kaggle(tmp_path, {b"data": Evil(marker), b"ids": [0]})
    done = run_cli(*_submit(runs["final"], tmp_path, evil))
    assert_one_clear_error(done.returncode, done.stderr, "refusing to unpickle", "kaggle.pkl", "malicious")
    assert not marker.exists() and not (tmp_path / "sub.csv").exists()


def test_malicious_checkpoint_never_runs_code(tmp_path, data_dir, runs):
    """Even with a matching sha256 sidecar: torch.load(weights_only=True) refuses the object."""
    marker = tmp_path / "PWNED"
    run = tmp_path / "run"
    shutil.copytree(runs["final"], run)
    torch.save({"format": CHECKPOINT_FORMAT, "arch": {}, "model": Evil(marker)}, run / "best_regular.pt")
    digest = hashlib.sha256((run / "best_regular.pt").read_bytes()).hexdigest()
    (run / "best_regular.pt.sha256").write_text(digest + "\n")
    done = run_cli("evaluate", run, "--data-dir", data_dir, "--device", "cpu")
    assert_one_clear_error(done.returncode, done.stderr, "refusing to load", "best_regular.pt",
                           "nothing in it was run")
    assert not marker.exists()


@pytest.mark.parametrize("case", ["results folder under a file"])
def test_user_mistakes_in_a_real_process(case, tmp_path, data_dir, runs, monkeypatch):
    argv, words = CASES[case](tmp_path, data_dir, runs, monkeypatch)
    done = run_cli(*argv)
    assert_one_clear_error(done.returncode, done.stderr, *words)


# ---------------------------------------------------------------- no other way in for pickles

UNSAFE = {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.load", "_pickle.loads",
          "dill.load", "dill.loads", "cloudpickle.load", "cloudpickle.loads", "joblib.load",
          "marshal.load", "marshal.loads", "shelve.open", "pandas.read_pickle", "torch.load",
          "numpy.load", "torch.serialization.load", "jsonpickle.decode"}
ALLOWED = {("unpickle.py", "pickle.Unpickler"), ("io.py", "torch.load")}  # restricted / weights_only


def deserialisers(tree: ast.AST) -> list:
    """(dotted name, node) for every use of an unpickling entry point in a parsed module,
    following `import x as y` and `from x import y` aliases."""
    alias = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                alias[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                alias[a.asname or a.name] = f"{node.module}.{a.name}"

    def dotted(node):
        if isinstance(node, ast.Name):
            return alias.get(node.id, node.id)
        if isinstance(node, ast.Attribute):
            base = dotted(node.value)
            return base and f"{base}.{node.attr}"
        return None

    return [(dotted(node), node) for node in ast.walk(tree)
            if isinstance(node, (ast.Attribute, ast.Name)) and isinstance(node.ctx, ast.Load)
            and dotted(node) in UNSAFE]


def test_the_scanner_finds_unsafe_loads():
    src = ("import pickle, torch as T\nfrom numpy import load as L\nimport pandas as pd\n"
           "pickle.load(f)\nT.load(p)\nL(q, allow_pickle=True)\npd.read_pickle(r)\n"
           "class U(pickle.Unpickler): pass\n")
    assert sorted(name for name, _ in deserialisers(ast.parse(src))) == [
        "numpy.load", "pandas.read_pickle", "pickle.Unpickler", "pickle.load", "torch.load"]


def test_every_pickle_the_package_reads_is_restricted():
    """Only two entry points exist: the restricted unpickler (unpickle.py) and torch.load with
    weights_only=True (io.py).  Anything new must go through one of them."""
    uses, torch_loads = set(), []
    for path in sorted(PACKAGE.glob("*.py")):
        tree = ast.parse(path.read_text(), path.name)
        found = deserialisers(tree)
        uses |= {(path.name, name) for name, _ in found}
        torch_loads += [node for node in ast.walk(tree) if isinstance(node, ast.Call)
                        and any(node.func is n for name, n in found if name == "torch.load")]
    assert uses <= ALLOWED, f"unpickling outside the restricted loaders: {sorted(uses - ALLOWED)}"
    assert torch_loads, "samlib.io should load checkpoints with torch.load"
    for node in torch_loads:
        kw = {k.arg: k.value for k in node.keywords}
        assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
            f"io.py:{node.lineno}: torch.load without weights_only=True"
    from samlib.unpickle import _RestrictedUnpickler
    assert _RestrictedUnpickler.find_class is not pickle.Unpickler.find_class
