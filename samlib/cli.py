"""Command line: `python -m samlib {train,evaluate,submit,synthetic,sweep,bench} ...`.

User mistakes (a missing file, an unknown config, a bad value, an unwritable folder, a
full disk) end with one `error: ...` line on stderr that says what to do, and exit status
2, never a traceback; anything else is a bug and keeps its traceback.  Ctrl-C (SIGINT,
exit 130) and SIGTERM (a cluster scheduler, Colab; exit 143) stop with the last good
checkpoint kept: running the same command again resumes.
"""
from __future__ import annotations

import argparse
import errno
import signal
import sys
import threading
from pathlib import Path

from .config import PROFILES
from .errors import SamlibError
from .infer import STRATEGIES


SYNTHETIC_MAX = 100_000        # images per split of `synthetic` (CIFAR-10 has 50,000 + 10,000)


def _items(text: str, flag: str, example: str) -> list:
    """A comma-separated flag value as a list of non-empty items, or a clear error."""
    items = [item.strip() for item in str(text).split(",")]
    if not all(items):
        raise SamlibError(f"{flag} expects a comma-separated list without empty entries "
                          f"(e.g. {flag} {example}), got {text!r}")
    return items


def _seeds(text: str) -> list:
    from .config import SEED_MAX

    seeds = []
    for item in _items(text, "--seeds", "84,85"):
        try:
            seed = int(item)
        except ValueError:
            seed = None
        if seed is None or not 0 <= seed <= SEED_MAX:
            raise SamlibError(f"--seeds expects comma-separated integers in [0, {SEED_MAX}] "
                              f"(e.g. --seeds 84,85), got {item!r} in {text!r}")
        seeds.append(seed)
    return seeds


def _count(flag: str, value: int, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise SamlibError(f"{flag} must be an integer in [{lo}, {hi}], got {value}")
    return value


def _overrides(pairs) -> dict:
    out = {}
    for pair in pairs or ():
        if "=" not in pair:
            raise SamlibError(f"--set expects KEY=VALUE, got {pair!r} (e.g. --set epochs=5)")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def cmd_train(args) -> None:
    from . import dist
    from .config import resolve
    from .train import train

    overrides = _overrides(args.set)
    if args.seed is not None:
        overrides["seed"] = str(args.seed)
    cfg = resolve(args.config, args.profile, **overrides)
    data_dir = args.data_dir
    if args.download:
        from .data import load_cifar10
        load_cifar10(data_dir, download=True)
    run_dir = train(cfg, data_dir=data_dir, out=args.out, device=args.device,
                    profile=args.profile, progress=not args.no_progress)
    if dist.is_main():
        print(run_dir)


def cmd_evaluate(args) -> None:
    from .report.runs import evaluate_run

    table = evaluate_run(args.run_dir, args.data_dir, device=args.device,
                         allow_other_data=args.allow_other_data)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"written {Path(args.run_dir) / 'strategies.csv'}")


def cmd_submit(args) -> None:
    from .report.submit import predict_file

    summary = predict_file(args.run_dir, args.input, args.output, strategy=args.strategy,
                           device=args.device)
    print(f"wrote {summary['rows']} predictions to {args.output} ({args.strategy})")


def cmd_synthetic(args) -> None:
    from .config import SEED_MAX
    from .data import FOLDER, synthetic_cifar10, write_cifar10

    _count("--n-train", args.n_train, 1, SYNTHETIC_MAX)
    _count("--n-test", args.n_test, 1, SYNTHETIC_MAX)
    _count("--seed", args.seed, 0, SEED_MAX)
    target = Path(args.dir) / FOLDER
    for path in (Path(args.dir), target):
        if path.exists() and not path.is_dir():
            raise SamlibError(f"cannot write the synthetic data to {target}: {path} is a file, not a "
                              "folder; give another folder")
    dataset = synthetic_cifar10(args.n_train, args.n_test, seed=args.seed)
    try:
        folder = write_cifar10(args.dir, dataset)
    except OSError as e:
        raise SamlibError(f"cannot write the synthetic data to {target}: {e.strerror or e}"
                          f"{f' ({e.filename})' if e.filename else ''}; choose a writable folder "
                          "with free space, then run the same command again") from None
    print(folder)


def cmd_sweep(args) -> None:
    import torch

    from .config import resolve
    from .sweep import job_env

    configs, seeds = _items(args.configs, "--configs", "baseline,se"), _seeds(args.seeds)
    devices = _items(args.devices, "--devices", "cuda:0,cuda:1") if args.devices else None  # sweep checks each
    overrides = _overrides(args.set)
    for config in configs:          # every job's settings, checked before any job starts
        for seed in seeds:
            resolve(config, args.profile, **dict(overrides, seed=str(seed)))
    from .device import resolve_device
    from .plan import estimate, format_plan, plan_runs, wall_seconds
    from .rundir import describe_device
    from .train import format_duration

    device = resolve_device(devices[0] if devices else None)
    slots = [str(resolve_device(d)) for d in devices] if devices else [str(device)]
    if device.type == "cuda" and not args.plan:
        # The timing probe in a process of its own: in this one it would keep a CUDA context
        # (and its memory) on the GPU for the whole sweep, beside that GPU's training job.
        _plan_in_child(args)
        return _start_sweep(args, configs, seeds, devices)
    # Jobs that share the CPU each get OMP_NUM_THREADS threads (samlib.sweep.job_env): probe at that.
    threads = int(job_env(slots).get("OMP_NUM_THREADS", 0) or 0) if device.type == "cpu" else 0
    before = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        plan = estimate(plan_runs(configs, seeds, args.profile, args.out, **overrides), args.profile, device,
                        say=lambda line: print(line, flush=True), **overrides)
    finally:
        torch.set_num_threads(before)
    parallel = ""
    if len(slots) > 1:
        each = f", {threads} thread(s) each" if threads else ""
        parallel = (f"; {len(slots)} jobs side by side{each}: about {format_duration(wall_seconds(plan, len(slots)))} "
                    "from start to end")
    print(format_plan(plan, describe_device(device)) + parallel, flush=True)
    if not args.plan:
        _start_sweep(args, configs, seeds, devices)


def _plan_in_child(args) -> None:
    """`sweep ... --plan` in a child process (it prints the plan, or one error line)."""
    import subprocess

    argv = [sys.executable, "-m", "samlib", "sweep", "--configs", args.configs, "--seeds", args.seeds,
            "--profile", args.profile, "--data-dir", str(args.data_dir), "--out", str(args.out), "--plan",
            *(["--devices", args.devices] if args.devices else []), *_set_args(args)]
    if subprocess.run(argv).returncode != 0:
        raise SamlibError("the sweep's plan failed (see the line above); nothing was trained")


def _set_args(args) -> list:
    """The command's --set KEY=VALUE flags, for the processes it starts."""
    return [a for pair in (args.set or ()) for a in ("--set", pair)]


def _start_sweep(args, configs, seeds, devices) -> None:
    from .sweep import sweep

    results = sweep(configs, seeds, args.profile, args.data_dir, args.out, devices, _set_args(args))
    failed = [r for r in results if r[3] != 0]
    if failed:
        raise SamlibError(f"{len(failed)} of {len(results)} runs failed; see " +
                          ", ".join(str(r[4]) for r in failed))


def cmd_bench(args) -> None:
    from .report.bench import run_benchmark

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    run_benchmark(args.out, width=args.width, device=args.device, quick=args.quick,
                  data_dir=args.data_dir or "auto", compile=False if args.no_compile else None,
                  full=args.full)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m samlib", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a named config at a profile (or reuse/resume its run)")
    t.add_argument("--config", default="final", help="baseline | se | se_mixup | final | final+<switch>")
    t.add_argument("--profile", default="paper", help=" | ".join(PROFILES))
    t.add_argument("--data-dir", required=True, help="folder holding cifar-10-batches-py")
    t.add_argument("--download", action="store_true", help="download CIFAR-10 into --data-dir if absent")
    t.add_argument("--out", default="runs", help="parent folder of run directories")
    t.add_argument("--seed", type=int)
    t.add_argument("--device", help="cpu | cuda | cuda:1 (default: cuda when available)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="Figure 1's table of inference strategies for a run")
    e.add_argument("run_dir")
    e.add_argument("--data-dir", required=True)
    e.add_argument("--device")
    e.add_argument("--allow-other-data", action="store_true",
                   help="evaluate on data other than the run was trained on (e.g. the real test set "
                        "for a run trained on a copy); the table says so")
    e.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("submit", help="write a Kaggle submission (ID,Labels) for an unlabeled file")
    s.add_argument("run_dir")
    s.add_argument("--input", required=True, help="the competition's test pickle")
    s.add_argument("--output", default="submission.csv")
    s.add_argument("--strategy", default="ensemble+tta", help=" | ".join(STRATEGIES))
    s.add_argument("--device")
    s.set_defaults(func=cmd_submit)

    y = sub.add_parser("synthetic", help="write a small synthetic cifar-10-batches-py (offline tests)")
    y.add_argument("dir")
    y.add_argument("--n-train", type=int, default=2000)
    y.add_argument("--n-test", type=int, default=1000)
    y.add_argument("--seed", type=int, default=0)
    y.set_defaults(func=cmd_synthetic)

    w = sub.add_parser("sweep", help="run configs x seeds side by side, one process per device")
    w.add_argument("--configs", default="baseline,se,se_mixup,final")
    w.add_argument("--seeds", default="84")
    w.add_argument("--profile", default="paper", help=" | ".join(PROFILES))
    w.add_argument("--data-dir", required=True)
    w.add_argument("--out", default="runs")
    w.add_argument("--devices", help="comma-separated, e.g. cuda:0,cuda:1 (default: every GPU, else cpu)")
    w.add_argument("--set", action="append", metavar="KEY=VALUE")
    w.add_argument("--plan", action="store_true", help="print the plan and its estimate, train nothing")
    w.set_defaults(func=cmd_sweep)

    b = sub.add_parser("bench", help="side-by-side speed benchmark (naive vs samlib)")
    b.add_argument("--out", required=True, help="json file to write")
    b.add_argument("--width", type=int, help="first-stage width (default: 64 on GPU, 16 on CPU)")
    b.add_argument("--device")
    size = b.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer repeats (tests)")
    size.add_argument("--full", action="store_true",
                      help="on a CPU, the long, precise plan (tens of minutes; the default CPU plan "
                           "takes 1-3 minutes on 2 cores); a GPU always runs its full plan")
    b.add_argument("--data-dir", help="folder holding cifar-10-batches-py (default: ./data if present, "
                                      "else synthetic images)")
    b.add_argument("--threads", type=int, help="torch CPU threads for the timed process")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile timing (CUDA)")
    b.set_defaults(func=cmd_bench)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that every
    `finally` and samlib.io.atomic_write_bytes' cleanup run and the files on disk stay whole."""


def _on_signal(signum, frame):
    # Already stopping: a later SIGTERM (e.g. a sweep passing one on) would only interrupt
    # the cleanup.  A second Ctrl-C still interrupts, as usual.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def _install_signal_handlers() -> dict:
    """SIGTERM (and SIGINT, where Python's default is in place) -> _on_signal; returns the
    previous handlers.  Signals left ignored (e.g. SIGINT of a background job) stay ignored."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for signum, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
        if signal.getsignal(signum) is default:
            previous[signum] = signal.signal(signum, _on_signal)
    return previous


_OS_HINTS = {
    errno.ENOENT: "check the path",
    errno.EACCES: "check the permissions or choose another folder",
    errno.EPERM: "check the permissions or choose another folder",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.ENOSPC: "the disk is full: free some space or choose another folder",
    errno.EDQUOT: "the disk quota is used up: free some space or choose another folder",
    errno.EFBIG: "the file is larger than this system allows (ulimit -f?): raise the limit or "
                 "choose another folder",
    errno.EISDIR: "that path is a folder: give a file name",
    errno.ENOTDIR: "a part of that path is a file, not a folder: choose another path",
}


def _os_error_line(e: OSError) -> str:
    where = "".join(f" {name}" for name in (e.filename, e.filename2) if name is not None)
    what = e.strerror or str(e) or type(e).__name__
    hint = _OS_HINTS.get(e.errno, "check the paths given and try again")
    return f"{what}{':' + where if where else ''}; {hint}, then run the same command again"


def _error(message: str) -> int:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    print(f"error: {'; '.join(lines) or 'failed'}", file=sys.stderr)
    return 2


def _after(previous: dict, program: bool) -> None:
    """Put the handlers back for an in-process caller.  The program itself (argv from the
    command line) is done and only exits: there a late signal is ignored, so it can neither
    turn a finished command into a kill nor interrupt the exit."""
    mask = getattr(signal, "pthread_sigmask", None)
    if mask:
        blocked = mask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_IGN if program else handler)
    finally:
        if mask:
            mask(signal.SIG_SETMASK, blocked)


# Every path flag of every command, checked (samlib.paths) before any work starts: inputs for
# symlink loops (their other faults have messages of their own), outputs for a writable folder.
PATH_FLAGS = {
    "train": {"out": ("--out", "out"), "data_dir": ("--data-dir", "in")},
    "evaluate": {"run_dir": ("the run directory", "in"), "data_dir": ("--data-dir", "in")},
    "submit": {"run_dir": ("the run directory", "in"), "input": ("--input", "in"), "output": ("--output", "file")},
    "synthetic": {"dir": ("the folder", "out")},
    "sweep": {"out": ("--out", "out"), "data_dir": ("--data-dir", "in")},
    "bench": {"out": ("--out", "file"), "data_dir": ("--data-dir", "in")},
}


def check_paths(args) -> None:
    from . import paths

    check = {"in": paths.resolved, "out": paths.output_dir, "file": paths.output_file}
    for name, (what, kind) in PATH_FLAGS.get(args.command, {}).items():
        value = getattr(args, name, None)
        if value is not None:
            check["out" if name == "data_dir" and getattr(args, "download", False) else kind](value, what)


def main(argv=None) -> int:
    """Run one command; the one error boundary of the command line (see the module docstring)."""
    args = build_parser().parse_args(argv)
    previous = {}
    try:
        previous = _install_signal_handlers()
        check_paths(args)
        args.func(args)
    except SamlibError as e:
        return _error(str(e))
    except OSError as e:
        return _error(_os_error_line(e))
    except KeyboardInterrupt as e:
        how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted (SIGINT)"
        print(f"{how}: the files written so far are intact and the last good checkpoint is kept; "
              "run the same command again to resume", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        _after(previous, program=argv is None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
