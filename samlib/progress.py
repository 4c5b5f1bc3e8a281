"""What a user watches while training: progress bars that go away when their work ends, however it ends
(tqdm's notebook widget would stay, red, after Kernel -> Interrupt), and one line per epoch with the time left."""
import contextlib
import math
import sys

from tqdm.auto import tqdm


@contextlib.contextmanager
def progress_bar(iterable=None, disable: bool = False, **kwargs):
    """tqdm(iterable, leave=False, **kwargs), removed on exit or interruption; drawn in a notebook or terminal only."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    on_screen = type(shell).__name__ == "ZMQInteractiveShell" or getattr(sys.stderr, "isatty", lambda: False)()
    bar = tqdm(iterable, leave=False, disable=disable or not on_screen, **kwargs)
    try:
        yield bar
    except BaseException:
        bar.n = bar.total or bar.n              # a complete bar closes without the failure style
        container = getattr(bar, "container", None)
        if container is not None and not bar.disable:
            container.close()                   # the notebook widget, even if already styled red
        raise
    finally:
        bar.close()


def epoch_line(trainer, later_seconds: float = 0.0) -> str:
    """`final seed 84: epoch 3/8  loss 1.912  val 41.2% (EMA 40.1%)  24.1 s/epoch  left ...`."""
    cfg, row = trainer.cfg, trainer.metrics[-1]
    per_epoch = sum(r["seconds"] for r in trainer.metrics[-3:]) / len(trainer.metrics[-3:])
    run_left = per_epoch * (cfg.epochs - trainer.epoch)
    ema = f" (EMA {100 * row['val_acc_ema']:.1f}%)" if "val_acc_ema" in row else ""
    plan = f", plan {format_duration(run_left + later_seconds)}" if later_seconds else ""
    return (f"{cfg.name} seed {cfg.seed}: epoch {trainer.epoch}/{cfg.epochs}  loss {row['train_loss']:.3f}  "
            f"val {100 * row['val_acc']:.1f}%{ema}  {row['seconds']:.1f} s/epoch  "
            f"left: run {format_duration(run_left)}{plan}")


def format_duration(seconds: float) -> str:
    """7 h 01 min, 1 min 01 s, 59 s."""
    if not math.isfinite(seconds):               # (an estimate that could not be made)
        return "?"
    h, rest = divmod(int(round(seconds)), 3600)
    m, s = divmod(rest, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"
