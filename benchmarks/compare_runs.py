"""Two runs on the same 10,000 test images: accuracies (95% Wilson) and paired differences.

    python benchmarks/compare_runs.py results/runs/cpu/final-s84-* results/runs/cpu/final_ema_reset_epoch-s84-*
"""
import sys

import numpy as np

from samlib.errors import SamlibError
from samlib.report.tables import binomial_interval, correct_on_test, paired_bootstrap


def paired_difference(correct_a, correct_b) -> dict:
    """Two models on the same test images: accuracies, a - b in points with its 95% paired-
    bootstrap interval, and the images only one of them gets right (McNemar's counts)."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise SamlibError(f"the two runs were tested on different test sets ({len(a)} and {len(b)} images)")
    diff, lo, hi = paired_bootstrap(a, b)
    return {"acc_a": 100 * a.mean(), "acc_b": 100 * b.mean(), "difference": diff, "interval": (lo, hi),
            "only_a": int((a & ~b).sum()), "only_b": int((b & ~a).sum()), "images": len(a)}


def main(final, reset):
    """EMA-reset effect and EMA-vs-regular, paired on the test images."""
    from samlib.data import load_cifar10

    ds = load_cifar10("data")
    c = {(r, k): correct_on_test(d, ds, k) for r, d in (("final", final), ("reset", reset)) for k in ("ema", "regular")}
    for (r, k), v in c.items():
        lo, hi = binomial_interval(v.mean(), len(v))
        print(f"{r:6} {k:8} {100*v.mean():.2f} ({100*lo:.2f}-{100*hi:.2f})")
    for name, a, b in [("ema_reset=epoch EMA - final EMA", c["reset", "ema"], c["final", "ema"]),
                       ("ema_reset=epoch regular - final regular", c["reset", "regular"], c["final", "regular"]),
                       ("final: EMA - regular", c["final", "ema"], c["final", "regular"]),
                       ("ema_reset: EMA - regular", c["reset", "ema"], c["reset", "regular"])]:
        d = paired_difference(a, b)
        print(f"{name}: {d['difference']:+.2f} ({d['interval'][0]:+.2f} .. {d['interval'][1]:+.2f}), "
              f"only a {d['only_a']}, only b {d['only_b']}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
