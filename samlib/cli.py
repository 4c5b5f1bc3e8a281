"""Command line: `python -m samlib {train,evaluate,submit,synthetic,sweep,bench} ...`.

User mistakes (a missing file, an unknown config, a bad value) end with one line on
stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import SamlibError
from .infer import STRATEGIES


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

    table = evaluate_run(args.run_dir, args.data_dir, device=args.device)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"written {Path(args.run_dir) / 'strategies.csv'}")


def cmd_submit(args) -> None:
    from .report.submit import predict_file

    summary = predict_file(args.run_dir, args.input, args.output, strategy=args.strategy,
                           device=args.device)
    print(f"wrote {summary['rows']} predictions to {args.output} ({args.strategy})")


def cmd_synthetic(args) -> None:
    from .data import synthetic_cifar10, write_cifar10

    folder = write_cifar10(args.dir, synthetic_cifar10(args.n_train, args.n_test, seed=args.seed))
    print(folder)


def cmd_sweep(args) -> None:
    from .sweep import sweep

    extra = [a for pair in (args.set or ()) for a in ("--set", pair)]
    results = sweep(args.configs.split(","), [int(s) for s in args.seeds.split(",")], args.profile,
                    args.data_dir, args.out, args.devices.split(",") if args.devices else None, extra)
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
                  data_dir=args.data_dir or "auto", compile=False if args.no_compile else None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m samlib", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a named config at a profile (or reuse/resume its run)")
    t.add_argument("--config", default="final", help="baseline | se | se_mixup | final | final+<switch>")
    t.add_argument("--profile", default="paper", help="smoke | quick | paper")
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
    w.add_argument("--profile", default="paper")
    w.add_argument("--data-dir", required=True)
    w.add_argument("--out", default="runs")
    w.add_argument("--devices", help="comma-separated, e.g. cuda:0,cuda:1 (default: every GPU, else cpu)")
    w.add_argument("--set", action="append", metavar="KEY=VALUE")
    w.set_defaults(func=cmd_sweep)

    b = sub.add_parser("bench", help="side-by-side speed benchmark (naive vs samlib)")
    b.add_argument("--out", required=True, help="json file to write")
    b.add_argument("--width", type=int, help="first-stage width (default: 64 on GPU, 16 on CPU)")
    b.add_argument("--device")
    b.add_argument("--quick", action="store_true", help="fewer repeats (tests)")
    b.add_argument("--data-dir", help="folder holding cifar-10-batches-py (default: ./data if present, "
                                      "else synthetic images)")
    b.add_argument("--threads", type=int, help="torch CPU threads for the timed process")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile timing (CUDA)")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SamlibError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
