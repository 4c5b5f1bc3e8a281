"""Two runs on the same 10,000 test images: accuracies (95% Wilson) and paired differences.

    python benchmarks/compare_runs.py results/runs/cpu/final-s84-* results/runs/cpu/final_ema_reset_epoch-s84-*
"""
# EMA-reset effect and EMA-vs-regular, paired on the 10,000 test images (samlib.report.tables)
import sys
from samlib.data import load_cifar10
from samlib.report.tables import binomial_interval, correct_on_test, paired_difference
ds = load_cifar10("data")
final, reset = sys.argv[1], sys.argv[2]
c = {(r, k): correct_on_test(d, ds, k) for r, d in (("final", final), ("reset", reset)) for k in ("ema", "regular")}
for (r, k), v in c.items():
    lo, hi = binomial_interval(v.mean(), len(v))
    print(f"{r:6} {k:8} {100*v.mean():.2f} ({100*lo:.2f}-{100*hi:.2f})")
for name, a, b in [("ema_reset=epoch EMA - final EMA", c["reset", "ema"], c["final", "ema"]),
                   ("ema_reset=epoch regular - final regular", c["reset", "regular"], c["final", "regular"]),
                   ("final: EMA - regular", c["final", "ema"], c["final", "regular"]),
                   ("ema_reset: EMA - regular", c["reset", "ema"], c["reset", "regular"])]:
    d = paired_difference(a, b)
    print(f"{name}: {d['difference']:+.2f} ({d['interval'][0]:+.2f} .. {d['interval'][1]:+.2f}), only a {d['only_a']}, only b {d['only_b']}")
