"""Command line: `python -m samlib {train,evaluate,submit,synthetic,sweep} ...`.
A user's mistake is one `error:` line (exit 2), a bug a traceback; Ctrl-C (130) or SIGTERM (143): rerun to resume."""
import argparse
import contextlib
import errno
import signal
import subprocess
import sys
import threading
from pathlib import Path

from . import paths
from .config import PROFILES, SEED_MAX
from .errors import SamlibError
from .infer import STRATEGIES

FLAG = {"action": "store_true"}
DATA_DIR = ("--data-dir", {"required": True, "help": "folder holding cifar-10-batches-py"})
PROFILE = ("--profile", {"default": "paper", "help": " | ".join(PROFILES)})
OUT = ("--out", {"default": "runs", "help": "parent folder of run directories"})
DEVICE = ("--device", {"help": "cpu | cuda | cuda:1 (default: cuda when available)"})
SET = ("--set", {"action": "append", "metavar": "KEY=VALUE", "help": "override a config field"})

# command -> (help, arguments)
COMMANDS = {
    "train": ("train a named config at a profile (or reuse/resume its run)", [
        ("--config", {"default": "final", "help": "baseline | se | se_mixup | final | final+<switch>"}),
        PROFILE, DATA_DIR, ("--download", {**FLAG, "help": "download CIFAR-10 into --data-dir if absent"}),
        OUT, ("--seed", {"type": int}), DEVICE, SET, ("--no-progress", FLAG)]),
    "evaluate": ("Figure 1's table of inference strategies for a run", [
        ("run_dir", {}), DATA_DIR, DEVICE,
        ("--allow-other-data", {**FLAG, "help": "evaluate on data other than the run was trained on"})]),
    "submit": ("write a Kaggle submission (ID,Labels) for an unlabeled file", [
        ("run_dir", {}), ("--input", {"required": True, "help": "the competition's test pickle"}),
        ("--output", {"default": "submission.csv"}),
        ("--strategy", {"default": "ensemble+tta", "help": " | ".join(STRATEGIES)}), DEVICE]),
    "synthetic": ("write a small synthetic cifar-10-batches-py (offline tests)", [
        ("dir", {}), ("--n-train", {"type": int, "default": 2000}), ("--n-test", {"type": int, "default": 1000}),
        ("--seed", {"type": int, "default": 0})]),
    "sweep": ("run configs x seeds side by side, one process per device", [
        ("--configs", {"default": "baseline,se,se_mixup,final"}), ("--seeds", {"default": "84"}),
        PROFILE, DATA_DIR, OUT, SET,
        ("--devices", {"help": "comma-separated, e.g. cuda:0,cuda:1 (default: every GPU, else cpu)"}),
        ("--plan", {**FLAG, "help": "print the plan and its estimate, train nothing"})]),
}

# Path flags, checked (samlib.paths) before any work: "in" (read), "out" (a writable folder) or "file" (a file to write)
PATH_FLAGS = {
    "train": {"out": ("--out", "out"), "data_dir": ("--data-dir", "in")},
    "evaluate": {"run_dir": ("the run directory", "in"), "data_dir": ("--data-dir", "in")},
    "submit": {"run_dir": ("the run directory", "in"), "input": ("--input", "in"), "output": ("--output", "file")},
    "synthetic": {"dir": ("the folder", "out")},
    "sweep": {"out": ("--out", "out"), "data_dir": ("--data-dir", "in")},
}


def _items(text: str, flag: str, example: str, seeds: bool = False) -> list:
    """The entries of a comma-separated flag; with `seeds`, integers in [0, SEED_MAX]."""
    items = [item.strip() for item in str(text).split(",")]
    if not all(items):
        raise SamlibError(f"{flag} expects a comma-separated list without empty entries "
                          f"(e.g. {flag} {example}), got {text!r}")
    for item in items if seeds else ():
        if not item.isdecimal() or int(item) > SEED_MAX:
            raise SamlibError(f"{flag} expects comma-separated integers in [0, {SEED_MAX}] "
                              f"(e.g. {flag} {example}), got {item!r} in {text!r}")
    return [int(item) for item in items] if seeds else items


def _overrides(pairs) -> dict:
    for pair in pairs or ():
        if "=" not in pair:
            raise SamlibError(f"--set expects KEY=VALUE, got {pair!r} (e.g. --set epochs=5)")
    return {key.strip(): value.strip() for key, value in (pair.split("=", 1) for pair in pairs or ())}


def cmd_train(args) -> None:
    from . import dist
    from .config import resolve
    from .run import train

    overrides = _overrides(args.set)
    if args.seed is not None:
        overrides["seed"] = str(args.seed)
    cfg = resolve(args.config, args.profile, **overrides)
    if args.download:
        from .data import load_cifar10
        load_cifar10(args.data_dir, download=True)
    run_dir = train(cfg, data_dir=args.data_dir, out=args.out, device=args.device,
                    profile=args.profile, progress=not args.no_progress)
    if dist.is_main():
        print(run_dir)


def cmd_evaluate(args) -> None:
    from .report.runs import evaluate_run

    table = evaluate_run(args.run_dir, args.data_dir, device=args.device, allow_other_data=args.allow_other_data)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"written {Path(args.run_dir) / 'strategies.csv'}")


def cmd_submit(args) -> None:
    from .report.submit import predict_file

    summary = predict_file(args.run_dir, args.input, args.output, strategy=args.strategy, device=args.device)
    print(f"wrote {summary['rows']} predictions to {args.output} ({args.strategy})")


def cmd_synthetic(args) -> None:
    from .data import FOLDER, synthetic_cifar10, write_cifar10

    for flag, value, low, high in (("--n-train", args.n_train, 1, 100_000), ("--n-test", args.n_test, 1, 100_000),
                                   ("--seed", args.seed, 0, SEED_MAX)):
        if not low <= value <= high:
            raise SamlibError(f"{flag} must be an integer in [{low}, {high}], got {value}")
    target = Path(args.dir) / FOLDER
    paths.output_dir(target, "the synthetic data's folder")
    try:
        folder = write_cifar10(args.dir, synthetic_cifar10(args.n_train, args.n_test, seed=args.seed))
    except OSError as e:
        raise SamlibError(f"cannot write the synthetic data to {target}: {error_message(e)}") from None
    print(folder)


def cmd_sweep(args) -> None:
    from .config import resolve
    from .device import resolve_device
    from .plan import show_plan
    from .sweep import sweep

    configs, seeds = _items(args.configs, "--configs", "baseline,se"), _items(args.seeds, "--seeds", "84,85", True)
    devices = _items(args.devices, "--devices", "cuda:0,cuda:1") if args.devices else None
    overrides = _overrides(args.set)
    for config in configs:          # every job's settings, checked before any job starts
        for seed in seeds:
            resolve(config, args.profile, **dict(overrides, seed=str(seed)))
    device = resolve_device(devices[0] if devices else None)
    slots = [str(resolve_device(d)) for d in devices] if devices else [str(device)]
    if device.type == "cuda" and not args.plan:
        # Probe in a process of its own: here it would hold a CUDA context beside that GPU's training job.
        if subprocess.run([sys.executable, "-m", "samlib", *args.argv, "--plan"]).returncode != 0:
            raise SamlibError("the sweep's plan failed (see the line above); nothing was trained")
    else:
        show_plan(configs, seeds, args.profile, args.out, device, slots, **overrides)
    if args.plan:
        return
    set_flags = [flag for pair in (args.set or ()) for flag in ("--set", pair)]
    results = sweep(configs, seeds, args.profile, args.data_dir, args.out, devices, set_flags)
    failed = [r for r in results if r[3] != 0]
    if failed:
        raise SamlibError(f"{len(failed)} of {len(results)} runs failed; see " +
                          ", ".join(str(r[4]) for r in failed))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m samlib", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, arguments) in COMMANDS.items():
        command = commands.add_parser(name, help=help_text)
        for flag, options in arguments:
            command.add_argument(flag, **options)
    return parser


def check_paths(args) -> None:
    check = {"in": paths.resolved, "out": paths.output_dir,
             "file": lambda path, what: paths.output_dir(path, what, is_file=True)}
    for name, (what, kind) in PATH_FLAGS[args.command].items():
        value = getattr(args, name, None)
        if value is not None:
            check["out" if name == "data_dir" and getattr(args, "download", False) else kind](value, what)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every `finally` (atomic writes' cleanup) runs."""


def _on_signal(signum, frame):
    # Already stopping: a later SIGTERM would only interrupt the cleanup (a second Ctrl-C still does).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def _signals_raise(program: bool):
    """SIGTERM (and SIGINT, where Python's default is in place) raise while a command runs; ignored signals stay
    ignored.  Afterwards an in-process caller gets its handlers back; the program ignores late signals."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
            if signal.getsignal(signum) is default:
                previous[signum] = signal.signal(signum, _on_signal)
    try:
        yield
    finally:
        mask = getattr(signal, "pthread_sigmask", None)
        if mask:
            blocked = mask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        try:
            for signum, handler in previous.items():
                signal.signal(signum, signal.SIG_IGN if program else handler)
        finally:
            if mask:
                mask(signal.SIG_SETMASK, blocked)


OS_HINTS = {
    errno.ENOENT: "check the path",
    **dict.fromkeys((errno.EACCES, errno.EPERM), "check the permissions or choose another folder"),
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.ENOSPC: "the disk is full: free some space or choose another folder",
    errno.EDQUOT: "the disk quota is used up: free some space or choose another folder",
    errno.EFBIG: "the file is larger than this system allows (ulimit -f?): raise the limit or choose another folder",
    errno.EISDIR: "that path is a folder: give a file name",
    errno.ENOTDIR: "a part of that path is a file, not a folder: choose another path",
}


def error_message(e: Exception) -> str:
    """A SamlibError or OSError as one line for the user; an OSError's says what to do."""
    message = str(e)
    if isinstance(e, OSError):
        where = "".join(f" {name}" for name in (e.filename, e.filename2) if name is not None)
        hint = OS_HINTS.get(e.errno, "check the paths given and try again")
        message = (f"{e.strerror or message or type(e).__name__}{':' + where if where else ''}; {hint}, "
                   "then run the same command again")
    return "; ".join(line.strip() for line in message.splitlines() if line.strip()) or "failed"


def main(argv=None) -> int:
    """Run one command: the command line's one error boundary."""
    args = build_parser().parse_args(argv)
    args.argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]    # for the processes it starts
    with _signals_raise(program=argv is None):
        try:
            check_paths(args)
            globals()[f"cmd_{args.command}"](args)      # looked up now, so that tests can replace a command
        except (SamlibError, OSError) as e:
            print(f"error: {error_message(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            how = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted (SIGINT)"
            print(f"{how}: the files written so far are intact and the last good checkpoint is kept; "
                  "run the same command again to resume", file=sys.stderr)
            return 143 if isinstance(e, Terminated) else 130
    return 0
