"""Adversarial settings, writes and signals (issue 5, "Reliability" in the README): a mistake
ends with one `error:` line that says what to do, exit status 2, no traceback, and nothing
lost - the previous file intact, no temporary file left behind.  SIGTERM and SIGINT stop a
run with the last good checkpoint kept (exit 143 / 130), and rerunning finishes it exactly
as an uninterrupted run would have.

Most cases call samlib.cli.main in this process (an uncaught exception fails the test just as
a traceback would); a full disk (a file-size limit: EFBIG) and the signals use real
`python -m samlib` processes.  Faults in the middle of a write (ENOSPC in fsync, EROFS in
mkstemp, ...) are injected by file name into the real command.
"""
import csv
import dataclasses
import errno
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import samlib.cli
import samlib.io
import samlib.report.submit
from samlib import cli
from samlib.config import SEED_MAX, Config, resolve
from samlib.errors import ConfigError, DataError, SamlibError
from samlib.io import atomic_write_bytes, atomic_write_text, load_checkpoint
from samlib.report.submit import validate_submission, write_submission
from samlib.rundir import RunDir
from samlib.run import train
from test_reliability import (CFG, TINY, TINY_ARGS, _dataset, _env, assert_checkpoints_loadable,
                              assert_same_run, train_cmd)

ROOT = Path(__file__).resolve().parents[1]
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
ROOT_SKIP = "runs as root, and root ignores file modes (chmod 555 does not stop it writing)"


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    from samlib.data import write_cifar10
    write_cifar10(root, _dataset())
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """An uninterrupted run of CFG (3 epochs), in this process."""
    return train(CFG, data_dir=data_dir, out=tmp_path_factory.mktemp("ref"), device="cpu", progress=False)


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory, data_dir):
    """The runs folder of CFG stopped after epoch 1 (copy it before writing into it)."""
    out = tmp_path_factory.mktemp("one_epoch")
    train(CFG, data_dir=data_dir, out=out, device="cpu", progress=False, stop_after=1)
    return out


def assert_one_clear_error(code, err, *words):
    """Exit 2, exactly one `error:` line (the last line), no traceback, the words in it."""
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert sum("error:" in line for line in lines) == 1, err
    assert lines[-1].startswith("error: "), err
    for word in words:
        assert word in lines[-1], (word, err)
    return lines[-1]


def run_main(capsys, argv):
    capsys.readouterr()
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def temporaries(folder: Path) -> list:
    return sorted(p.name for p in Path(folder).rglob("*.tmp"))


def _train(data_dir, out, *extra):
    return ["train", "--data-dir", data_dir, "--out", out, *TINY_ARGS, *extra]


# ================================================================ settings

SETTINGS = {  # --set KEY=VALUE -> words of the message
    "momentum 0 with nesterov": ("momentum=0", "momentum must be > 0 when nesterov is on"),
    "momentum 1": ("momentum=1", "momentum must be in [0, 1), got 1.0"),
    "momentum negative": ("momentum=-0.5", "momentum must be in [0, 1)"),
    "weight decay negative": ("weight_decay=-1e-4", "weight_decay must be >= 0"),
    "lr 0": ("lr=0", "lr must be > 0, got 0.0"),
    "lr inf": ("lr=inf", "lr must be a finite number > 0, got inf"),
    "lr nan": ("lr=nan", "lr must be a finite number > 0"),
    "seed negative": ("seed=-1", "seed must be >= 0, got -1"),
    "seed 2**63-1": (f"seed={2**63 - 1}", f"seed must be <= {SEED_MAX}"),
    "seed 2**64": (f"seed={2**64}", f"[0, {SEED_MAX}]"),
    "split_seed negative": ("split_seed=-3", "split_seed must be >= 0"),
    "batch_size 0": ("batch_size=0", "batch_size must be >= 1"),
    "batch_size huge": ("batch_size=1000000000", "batch_size must be <= 65536"),
    "epochs 0": ("epochs=0", "epochs must be >= 1, got 0"),
    "epochs huge": ("epochs=10000000", "epochs must be <= 100000"),
    "epochs not an integer": ("epochs=2.5", "epochs expects a number"),
    "val_size negative": ("val_size=-1", "val_size must be >= 0"),
    "eval_batch_size 0": ("eval_batch_size=0", "eval_batch_size must be >= 1"),
    "train_eval_size 0": ("train_eval_size=0", "train_eval_size must be >= 1"),
    "test_eval_size 0": ("test_eval_size=0", "test_eval_size must be >= 1"),
    "train_subset 0": ("train_subset=0", "train_subset must be >= 1"),
    "test_subset negative": ("test_subset=-5", "test_subset must be >= 1"),
    "warmup_epochs negative": ("warmup_epochs=-1", "warmup_epochs must be >= 0"),
    "lookahead_k negative": ("lookahead_k=-2", "lookahead_k must be >= 0"),
    "lookahead_alpha 0": ("lookahead_alpha=0", "lookahead_alpha must be in (0, 1]"),
    "lookahead_alpha 1.5": ("lookahead_alpha=1.5", "lookahead_alpha must be in (0, 1]"),
    "crop_padding negative": ("crop_padding=-1", "crop_padding must be >= 0"),
    "crop_padding 33": ("crop_padding=33", "crop_padding must be <= 32"),
    "cutout negative": ("cutout=-1", "cutout must be >= 0"),
    "cutout 33": ("cutout=33", "cutout must be <= 32"),
    "pct_start 0": ("pct_start=0", "pct_start must be in (0, 1)"),
    "pct_start 1": ("pct_start=1", "pct_start must be in (0, 1)"),
    "grad_clip negative": ("grad_clip=-1", "grad_clip must be >= 0"),
    "grad_clip nan": ("grad_clip=nan", "grad_clip must be a finite number >= 0"),
    "mix_alpha 0": ("mix_alpha=0", "mix_alpha must be > 0"),
    "ema_decay 1": ("ema_decay=1", "ema_decay must be in (0, 1)"),
    "widths of another length": ("widths=4,8", "must be of equal length"),
    "a zero block": ("blocks=1,0,1", "blocks must be positive integers"),
    "width too large": ("widths=4,8,100000", "widths must be positive integers (each in [1, 8192])"),
}


@pytest.mark.parametrize("case", list(SETTINGS))
def test_bad_setting_is_one_clear_error(case, tmp_path, data_dir, capsys):
    setting, words = SETTINGS[case]
    code, err = run_main(capsys, _train(data_dir, tmp_path / "runs", "--set", setting))
    line = assert_one_clear_error(code, err, words)
    assert f"--set {setting.split('=')[0]}=" in line or "expects a number" in line   # what to do
    assert not (tmp_path / "runs").exists()          # refused before anything was written


def test_every_setting_has_one_rule():
    """Every Config field sits in exactly one of _validate's tables."""
    from samlib import config as C
    tables = [set(C._INTS), set(C._REALS), set(C._STAGES), set(C._BOOLS), set(C._OPTIONS), {"name"}]
    fields = {f.name for f in dataclasses.fields(Config)}
    assert sum(len(t) for t in tables) == len(set().union(*tables)) and set().union(*tables) == fields


@pytest.mark.parametrize("value", [SEED_MAX, 0])
def test_the_extreme_seeds_train(value, tmp_path, data_dir):
    """The allowed seed range is the one that works: torch.manual_seed, a torch Generator
    seeded with seed + 1, numpy's default_rng (split_seed) - one epoch end to end."""
    cfg = resolve("final", "smoke", **dict(TINY, epochs="1", seed=str(value), split_seed=str(value)))
    run = train(cfg, data_dir=data_dir, out=tmp_path, device="cpu", progress=False)
    assert (run / "final.json").exists()


def test_boundary_settings_are_accepted():
    cfg = resolve("final", "smoke", momentum="0", nesterov="false", pct_start="0.01", cutout="32",
                  crop_padding="0", lookahead_k="0", weight_decay="0", grad_clip="0", val_size="0",
                  selection="test", warmup_epochs="0", test_eval_size="none")
    assert (cfg.momentum, cfg.cutout, cfg.val_size) == (0.0, 32, 0)


@pytest.mark.parametrize("field, value", [("epochs", 2.5), ("se", 1), ("lr", True), ("seed", 1.0),
                                          ("widths", [4, 8, "x"]), ("momentum", None)])
def test_bad_values_in_config_json_are_refused(field, value):
    from samlib.config import from_dict
    d = resolve("final", "smoke").to_dict()
    d[field] = value
    with pytest.raises(ConfigError, match=field):
        from_dict(d)


DEVICES = ["mps", "meta", "xla", "vulkan", "cpu:0", "cuda:x", "CUDA", "gpu"]


@pytest.mark.parametrize("device", DEVICES)
def test_unsupported_device_is_one_clear_error(device, tmp_path, data_dir, capsys):
    code, err = run_main(capsys, _train(data_dir, tmp_path / "runs", "--device", device))
    assert_one_clear_error(code, err, f"unknown device {device!r}", "supported: cpu, cuda or cuda:N")


def _sweep(data_dir, out, *extra):
    return ["sweep", "--configs", "baseline", "--seeds", "1", "--profile", "smoke", "--data-dir", data_dir,
            "--out", out, "--devices", "cpu", *extra]


SWEEPS = {  # extra sweep arguments -> words
    "seed not a number": (["--seeds", "84,x"], ["--seeds expects comma-separated integers", "'x'"]),
    "seeds empty": (["--seeds", ""], ["--seeds expects a comma-separated list"]),
    "seed missing between commas": (["--seeds", "84,,85"], ["without empty entries"]),
    "seed negative": (["--seeds", "-1"], ["'-1'", f"[0, {SEED_MAX}]"]),
    "seed too large": (["--seeds", str(2**63)], [f"[0, {SEED_MAX}]"]),
    "device mps": (["--devices", "cpu,mps"], ["unknown device 'mps'", "cuda:N"]),
    "device list with a hole": (["--devices", "cpu,"], ["--devices expects a comma-separated list"]),
    "unknown config": (["--configs", "baseline,fnal"], ["unknown config 'fnal'"]),
    "bad setting": (["--set", "epochs=-1"], ["epochs must be >= 1"]),
}


@pytest.mark.parametrize("case", list(SWEEPS))
def test_bad_sweep_argument_is_one_clear_error(case, tmp_path, data_dir, capsys):
    extra, words = SWEEPS[case]
    code, err = run_main(capsys, _sweep(data_dir, tmp_path / "runs", *extra))
    assert_one_clear_error(code, err, *words)
    assert not (tmp_path / "runs").exists()          # checked before any job started


SYNTHETIC = {
    "--n-train -5": (["--n-train", "-5"], ["--n-train must be an integer in [1, 100000], got -5"]),
    "--n-train 0": (["--n-train", "0"], ["--n-train must be an integer in [1, 100000], got 0"]),
    "--n-train huge": (["--n-train", str(10**12)], ["--n-train must be an integer in [1, 100000]"]),
    "--n-test 0": (["--n-test", "0"], ["--n-test must be an integer"]),
    "--seed negative": (["--seed", "-1"], ["--seed must be an integer in [0, "]),
}


@pytest.mark.parametrize("case", list(SYNTHETIC))
def test_bad_synthetic_argument_is_one_clear_error(case, tmp_path, capsys):
    extra, words = SYNTHETIC[case]
    code, err = run_main(capsys, ["synthetic", tmp_path / "data", *extra])
    assert_one_clear_error(code, err, *words)
    assert not (tmp_path / "data").exists()


# ================================================================ the error boundary

OS_ERRORS = {
    "PermissionError": (PermissionError(errno.EACCES, "Permission denied", "/x/y"), "Permission denied: /x/y"),
    "IsADirectoryError": (IsADirectoryError(errno.EISDIR, "Is a directory", "/x"), "give a file name"),
    "NotADirectoryError": (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/x"), "is a file"),
    "FileNotFoundError": (FileNotFoundError(errno.ENOENT, "No such file or directory", "/nope"), "/nope"),
    "ENOSPC": (OSError(errno.ENOSPC, "No space left on device"), "free some space"),
    "EROFS": (OSError(errno.EROFS, "Read-only file system", "/ro"), "read-only"),
    "EFBIG": (OSError(errno.EFBIG, "File too large", "/big"), "ulimit"),
}


@pytest.mark.parametrize("case", list(OS_ERRORS))
def test_os_errors_become_one_error_line(case, monkeypatch, capsys, tmp_path):
    exc, words = OS_ERRORS[case]

    def fail(args):
        raise exc
    monkeypatch.setattr(samlib.cli, "cmd_synthetic", fail)
    code, err = run_main(capsys, ["synthetic", tmp_path])
    assert_one_clear_error(code, err, words, "run the same command again")


def test_a_multi_line_message_still_makes_one_line(monkeypatch, capsys, tmp_path):
    def fail(args):
        raise SamlibError("first\n\nsecond")
    monkeypatch.setattr(samlib.cli, "cmd_synthetic", fail)
    code, err = run_main(capsys, ["synthetic", tmp_path])
    assert assert_one_clear_error(code, err) == "error: first; second"


def test_anything_else_is_a_bug_and_keeps_its_traceback(monkeypatch, tmp_path):
    def fail(args):
        raise ValueError("a bug")
    monkeypatch.setattr(samlib.cli, "cmd_synthetic", fail)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["synthetic", str(tmp_path)])
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers   # put back


# ================================================================ writes

def _is_temporary_of(tmp_name: str, name: str) -> bool:
    """Is `tmp_name` atomic_write_bytes' temporary file for `name` (.NAME.XXXXXXXX.tmp)?"""
    middle = tmp_name[len(name) + 2:-4]
    return tmp_name.startswith(f".{name}.") and tmp_name.endswith(".tmp") and "." not in middle


def inject(monkeypatch, where: str, name: str, code: int):
    """Make the atomic write of files called `name` fail with errno `code` at `where`:
    "mkstemp" (making the temporary file), "fsync" (its data reaching the disk: ENOSPC lands
    here on a full disk) or "replace" (the rename)."""
    err = OSError(code, os.strerror(code))
    if where == "mkstemp":
        real = samlib.io.tempfile.mkstemp

        def mkstemp(*a, **k):
            if k.get("prefix") == f".{name}.":
                raise err
            return real(*a, **k)
        monkeypatch.setattr(samlib.io.tempfile, "mkstemp", mkstemp)
    elif where == "fsync":
        real = os.fsync

        def fsync(fd):
            if _is_temporary_of(Path(os.readlink(f"/proc/self/fd/{fd}")).name, name):
                raise err
            return real(fd)
        monkeypatch.setattr(samlib.io.os, "fsync", fsync)
    else:
        real = os.replace

        def replace(src, dst):
            if Path(dst).name == name and Path(src).name.endswith(".tmp"):
                raise err
            return real(src, dst)
        monkeypatch.setattr(samlib.io.os, "replace", replace)



HELPER_FAULTS = [("fsync", errno.ENOSPC, "disk is full"), ("fsync", errno.EDQUOT, "quota"),
                 ("fsync", errno.EFBIG, "ulimit -f"), ("fsync", errno.EIO, "Input/output error"),
                 ("mkstemp", errno.EROFS, "read-only"), ("mkstemp", errno.EACCES, "permission denied"),
                 ("replace", errno.EISDIR, "is a folder"), ("replace", errno.EPERM, "permission denied")]


@pytest.mark.parametrize("where, code, words", HELPER_FAULTS,
                         ids=[f"{w}-{errno.errorcode[c]}" for w, c, _ in HELPER_FAULTS])
def test_atomic_write_failure_keeps_the_previous_file(where, code, words, tmp_path, monkeypatch):
    target = tmp_path / "metrics.csv"
    target.write_text("old\n")
    inject(monkeypatch, where, "metrics.csv", code)
    with pytest.raises(SamlibError) as e:
        atomic_write_text(target, "new\n" * 1000)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg and words in msg, msg
    assert errno.errorcode[code] in msg and "previous metrics.csv is unchanged" in msg
    assert target.read_text() == "old\n" and temporaries(tmp_path) == []


def test_interrupt_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """What SIGTERM raises (cli.Terminated) during a write: old file intact, no temporary file."""
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")

    def fsync(fd):
        raise cli.Terminated()
    monkeypatch.setattr(samlib.io.os, "fsync", fsync)
    with pytest.raises(cli.Terminated):
        atomic_write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"old" and temporaries(tmp_path) == []


TRAIN_FAULTS = [  # (where, file, errno): faults while `train` resumes the one-epoch run
    ("mkstemp", "config.json", errno.EROFS), ("mkstemp", "run.json", errno.EACCES),
    ("fsync", "metrics.csv", errno.ENOSPC), ("fsync", "last.pt", errno.EDQUOT),
    ("fsync", "last.pt.sha256", errno.ENOSPC), ("replace", "last.pt", errno.EIO),
]


@pytest.mark.parametrize("where, name, code", TRAIN_FAULTS,
                         ids=[f"{w}-{n}-{errno.errorcode[c]}" for w, n, c in TRAIN_FAULTS])
def test_train_write_failure_is_one_clear_error_and_loses_nothing(where, name, code, tmp_path, data_dir,
                                                                   one_epoch, monkeypatch, capsys):
    out = tmp_path / "runs"
    shutil.copytree(one_epoch, out)
    run_dir = RunDir.for_config(CFG, out).path
    before = snapshot(run_dir)
    inject(monkeypatch, where, name, code)
    code_, err = run_main(capsys, _train(data_dir, out))
    line = assert_one_clear_error(code_, err, "cannot write to", errno.errorcode[code], "--out",
                                  "run the same command again")
    assert str(run_dir) in line
    assert temporaries(out) == []
    assert_checkpoints_loadable(run_dir)
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1       # the last good checkpoint
    last = run_dir / ("last.pt" if (run_dir / "last.pt").exists() else "last.prev.pt")
    assert last.read_bytes() == before["last.pt"]
    if name in before and name not in ("last.pt", "last.pt.sha256"):
        assert (run_dir / name).read_bytes() == before[name], name


def _limit_file_size(limit):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)    # the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return preexec


@pytest.mark.slow
def test_file_size_limit_in_the_atomic_helper(tmp_path):
    """A real EFBIG (RLIMIT_FSIZE): SamlibError naming the file, old file kept, no temporary."""
    target = tmp_path / "best.pt"
    target.write_bytes(b"old")
    code = ("import sys\nfrom samlib.io import atomic_write_bytes\nfrom samlib.errors import SamlibError\n"
            "try:\n    atomic_write_bytes(sys.argv[1], b'x' * 100_000)\n"
            "except SamlibError as e:\n    print(e)\n    sys.exit(2)\n")
    done = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True,
                          cwd=ROOT, env=_env(), preexec_fn=_limit_file_size(10_000), timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"cannot write to {target}: File too large [EFBIG]" in done.stdout
    assert "previous best.pt is unchanged" in done.stdout
    assert target.read_bytes() == b"old" and temporaries(tmp_path) == []


@pytest.mark.slow
def test_file_size_limit_while_training_then_resume(tmp_path, data_dir, one_epoch, reference):
    """`python -m samlib train` under a 64 KB file-size limit: the 125 KB last.pt of epoch 2
    cannot be written.  One error line, exit 2, the epoch-1 checkpoint kept (as last.prev.pt,
    byte for byte), no temporary file; rerun without the limit: equal to an uninterrupted run."""
    shutil.copytree(one_epoch, tmp_path, dirs_exist_ok=True)
    run_dir = RunDir.for_config(CFG, tmp_path).path
    before = snapshot(run_dir)
    assert len(before["last.pt"]) > 64_000, "the checkpoint grew: adjust the limit"
    done = subprocess.run(train_cmd(data_dir, tmp_path), env=_env(), capture_output=True, text=True,
                          preexec_fn=_limit_file_size(64_000), timeout=300)
    assert_one_clear_error(done.returncode, done.stderr, f"cannot write to {run_dir / 'last.pt'}",
                           "File too large [EFBIG]", "ulimit -f", "run the same command again")
    assert temporaries(tmp_path) == []
    assert_checkpoints_loadable(run_dir)
    assert (run_dir / "last.prev.pt").read_bytes() == before["last.pt"]
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1
    done = subprocess.run(train_cmd(data_dir, tmp_path), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming" in done.stdout
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_file_size_limit_while_writing_synthetic_data(tmp_path):
    done = subprocess.run([sys.executable, "-m", "samlib", "synthetic", str(tmp_path / "d"), "--n-train", "200",
                           "--n-test", "20"], capture_output=True, text=True, env=_env(),
                          preexec_fn=_limit_file_size(50_000), timeout=120)
    assert_one_clear_error(done.returncode, done.stderr, "cannot write the synthetic data", "File too large")


def _a_file(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    return tmp_path / "file"


def _kaggle(tmp_path, n=4):
    import pickle
    path = tmp_path / "kaggle.pkl"
    path.write_bytes(pickle.dumps({b"data": np.zeros((n, 32, 32, 3), np.uint8), b"ids": list(range(n))[::-1]}))
    return path


def _submit(run, inp, output, *extra):
    return ["submit", run, "--input", inp, "--output", output, "--device", "cpu", *extra]


WRITES = {  # (tmp, data_dir, reference run) -> (argv, words, the files that must stay as they were)
    "--output an existing folder": lambda t, d, r: (
        _submit(r, _kaggle(t), t), ["is a folder", "give a file name"], [t / "kaggle.pkl"]),
    "--output the input file": lambda t, d, r: (
        _submit(r, _kaggle(t), _kaggle(t)), ["is the input file", "choose another name"], [t / "kaggle.pkl"]),
    "--output the input through a hard link": lambda t, d, r: (
        _submit(r, _kaggle(t), os.link(t / "kaggle.pkl", t / "link.csv") or t / "link.csv"),
        ["is the input file"], [t / "kaggle.pkl"]),
    "--output the input through ..": lambda t, d, r: (
        _submit(r, _kaggle(t), t / "x" / ".." / "kaggle.pkl"), ["is the input file"], [t / "kaggle.pkl"]),
    "--output under a file": lambda t, d, r: (
        _submit(r, _kaggle(t), _a_file(t) / "s.csv"), ["--output", "is a file, not a folder"],
        [t / "file"]),
    "train --out under a file": lambda t, d, r: (
        _train(d, _a_file(t) / "runs"), ["--out", "is a file, not a folder"], [t / "file"]),
    "sweep --out under a file": lambda t, d, r: (
        _sweep(d, _a_file(t) / "runs"), ["--out", "is a file, not a folder"],
        [t / "file"]),
    "synthetic into a file": lambda t, d, r: (
        ["synthetic", _a_file(t)], ["must be a folder, but it is a file"], [t / "file"]),
}


@pytest.mark.parametrize("case", list(WRITES))
def test_unwritable_output_is_one_clear_error(case, tmp_path, data_dir, reference, capsys):
    argv, words, kept = WRITES[case](tmp_path, data_dir, reference)
    before = {p: p.read_bytes() for p in kept}
    code, err = run_main(capsys, argv)
    assert_one_clear_error(code, err, *words)
    assert {p: p.read_bytes() for p in kept} == before and temporaries(tmp_path) == []
    assert not list(tmp_path.glob("*.csv")) or case.endswith("hard link")


@pytest.mark.skipif(AS_ROOT, reason=ROOT_SKIP)
@pytest.mark.parametrize("command", ["train", "submit"])
def test_read_only_folder_is_one_clear_error(command, tmp_path, data_dir, reference, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "submission.csv").write_text("ID,Labels\n")
    folder.chmod(0o555)
    try:
        argv = (_train(data_dir, folder / "runs") if command == "train"
                else _submit(reference, _kaggle(tmp_path), folder / "submission.csv"))
        code, err = run_main(capsys, argv)
    finally:
        folder.chmod(0o755)
    assert_one_clear_error(code, err, "cannot write to", "Permission denied", "run the same command again")
    assert (folder / "submission.csv").read_text() == "ID,Labels\n" and temporaries(folder) == []


@pytest.mark.parametrize("ids, labels, words", [
    ([1, 1, 2], [0, 1, 2], "duplicate id 1"),
    ([1, 2, 3], [0, 10, 2], "labels must be integers 0..9"),
    ([1, 2, 3], [0, -1, 2], "labels must be integers 0..9"),
    ([1, 2, 3], [0, 1], "3 ids but 2 predictions"),
])
def test_a_submission_that_fails_validation_is_never_written(ids, labels, words, tmp_path):
    path = tmp_path / "submission.csv"
    with pytest.raises(DataError, match=words):
        write_submission(ids, labels, path)
    assert not path.exists() and temporaries(tmp_path) == []
    path.write_text("ID,Labels\n7,3\n")                           # a previous good one stays
    with pytest.raises(DataError, match=words):
        write_submission(ids, labels, path)
    assert path.read_text() == "ID,Labels\n7,3\n"
    write_submission([5, 6], [1, 2], path)
    assert validate_submission(path, [5, 6]) == {"rows": 2, "class_counts": [0, 1, 1] + [0] * 7}


def test_submit_with_invalid_predictions_writes_no_csv(tmp_path, reference, monkeypatch, capsys):
    """Predictions outside 0..9 (an 11-class head) are refused before anything is written."""
    def eleven_classes(regular, ema, images, strategy, device):
        probs = torch.zeros(len(images), 11)
        probs[:, 10] = 1
        return probs
    monkeypatch.setattr(samlib.report.submit, "strategy_probs", eleven_classes)
    code, err = run_main(capsys, _submit(reference, _kaggle(tmp_path), tmp_path / "sub.csv"))
    assert_one_clear_error(code, err, "labels must be integers 0..9")
    assert not (tmp_path / "sub.csv").exists() and temporaries(tmp_path) == []


# ================================================================ signals

SIGNALS = {signal.SIGTERM: (143, "terminated (SIGTERM)"), signal.SIGINT: (130, "interrupted (SIGINT)")}


@pytest.mark.slow
@pytest.mark.parametrize("signum", list(SIGNALS), ids=lambda s: signal.Signals(s).name)
def test_signal_at_random_points_then_rerun_equals_uninterrupted(signum, tmp_path, data_dir, reference):
    """`python -m samlib train` sent the signal at a seeded random instant 0.05 to 1 epoch
    into its loop (mid-step, mid-evaluation or mid-save), three times, each resuming the last:
    exit 143 / 130 with a message, no traceback, every checkpoint loads, no temporary file; a
    rerun then finishes equal to the uninterrupted reference."""
    status, message = SIGNALS[signum]
    rng = random.Random(int(signum))
    with open(reference / "metrics.csv", newline="") as f:
        epoch_s = sum(float(r["seconds"]) for r in csv.DictReader(f)) / CFG.epochs
    run_dir = RunDir.for_config(CFG, tmp_path).path
    history = []
    for attempt in range(3):
        if (run_dir / "final.json").exists():
            break
        delay = rng.uniform(0.05, 1.0) * epoch_s
        proc = subprocess.Popen(train_cmd(data_dir, tmp_path), env=_env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for line in proc.stdout:                 # the loop starts right after this line
            if line.startswith("run directory:"):
                break
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
        history.append((round(delay, 3), proc.returncode))
        assert "Traceback" not in err, err
        finished = proc.returncode == 0 and (run_dir / "final.json").exists()   # before the signal
        assert proc.returncode == status or finished, (history, err)
        if proc.returncode == status:
            assert message in err and "last good checkpoint is kept" in err and "run the same command" in err
        assert_checkpoints_loadable(run_dir)
        assert temporaries(tmp_path) == []
    assert sum(rc == status for _, rc in history) >= 2, history
    done = subprocess.run(train_cmd(data_dir, tmp_path), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, (history, done.stderr)
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_sigterm_to_a_sweep_reaches_its_jobs(tmp_path, data_dir):
    """A scheduler's SIGTERM to the sweep process: the sweep passes it on, each job stops with
    its checkpoints intact (143 in its log), and the sweep exits 143."""
    argv = [sys.executable, "-m", "samlib", *_sweep(data_dir, tmp_path, "--configs", "final", "--seeds", "84",
                                                    *[a for k, v in dict(TINY, epochs="30").items()
                                                      for a in ("--set", f"{k}={v}")])]
    proc = subprocess.Popen(argv, env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = tmp_path / "logs" / "final-s84.log"
    deadline = time.monotonic() + 120
    while "run directory:" not in (log.read_text() if log.exists() else ""):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "terminated (SIGTERM)" in err and "Traceback" not in err, err
    text = log.read_text()
    assert "terminated (SIGTERM)" in text and "Traceback" not in text, text
    run_dir = next(p.parent for p in tmp_path.glob("final-*/config.json"))
    assert_checkpoints_loadable(run_dir)
    assert temporaries(tmp_path) == [] and not (run_dir / "final.json").exists()


# ================================================================ evaluate --allow-other-data

def test_evaluate_on_other_data_needs_allow_other_data(tmp_path, reference, capsys):
    from samlib.data import synthetic_cifar10, write_cifar10
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    other = tmp_path / "other"
    write_cifar10(other, synthetic_cifar10(n_train=512, n_test=128, seed=1))
    argv = ["evaluate", run, "--data-dir", other, "--device", "cpu"]
    code, err = run_main(capsys, argv)
    assert_one_clear_error(code, err, "trained on other data", "--allow-other-data")
    assert not (run / "strategies.csv").exists()
    code, err = run_main(capsys, argv + ["--allow-other-data"])
    assert code == 0 and (run / "strategies.csv").exists(), err


# ---------------------------------------------------------------- odd values found by reading the loaders again

def test_a_real_setting_given_an_integer_beyond_any_float_is_refused_in_one_line():
    from samlib.config import resolve
    with pytest.raises(ConfigError, match="lr must be a finite number"):
        resolve("final", "smoke", lr=10 ** 400)


def test_submission_ids_that_look_like_missing_values_stay_ids(tmp_path):
    from samlib.report.submit import validate_submission
    path = tmp_path / "submission.csv"
    path.write_text("ID,Labels\nNA,1\nnan,2\n,3\n")
    assert validate_submission(path, ids=["NA", "nan", ""])["rows"] == 3
    path.write_text("ID,Labels\n0,NA\n")
    with pytest.raises(DataError, match="labels must be integers"):
        validate_submission(path, ids=["0"])


def test_a_binary_sidecar_or_lock_file_does_not_stop_a_save_or_a_lock(tmp_path):
    from samlib.io import load_checkpoint, save_checkpoint
    from samlib.rundir import RunDir
    path = tmp_path / "state.pt"
    save_checkpoint({"x": torch.ones(2)}, path, keep_previous=False)
    (tmp_path / "state.pt.sha256").write_bytes(b"\xff\xfe\x00garbage\x80")
    save_checkpoint({"x": torch.zeros(2)}, path, keep_previous=False)
    assert torch.equal(load_checkpoint(path, fallback=False)["x"], torch.zeros(2))
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run / ".lock").write_bytes(b"\xff\xfe\x80\x00")
    import fcntl
    with open(run / ".lock", "rb") as holder:          # another holder whose note is garbage
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(SamlibError, match="is being trained by"):
            with run.lock():
                pass
        fcntl.flock(holder, fcntl.LOCK_UN)
    with run.lock():
        assert "process" in (run / ".lock").read_text(errors="replace")
