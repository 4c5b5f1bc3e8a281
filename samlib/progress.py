"""Progress bars that go away when their work ends, however it ends.

tqdm's notebook widget stays on screen, red, when a loop is interrupted (Kernel -> Interrupt),
over the one `interrupted:` line the notebook prints; here an interrupted bar is removed
like a finished one.
"""
from __future__ import annotations

import contextlib
import sys

from tqdm.auto import tqdm


def _on_screen() -> bool:
    """A bar is drawn in a notebook kernel or on a terminal, never into a log file or a pipe
    (a command's stderr then holds only its messages)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    in_kernel = type(shell).__name__ == "ZMQInteractiveShell"          # Jupyter, Colab, papermill
    return in_kernel or bool(getattr(sys.stderr, "isatty", lambda: False)())


@contextlib.contextmanager
def progress_bar(iterable=None, disable: bool = False, **kwargs):
    """tqdm(iterable, leave=False, **kwargs), closed (and removed) on exit or interruption;
    drawn only where someone watches (see _on_screen)."""
    bar = tqdm(iterable, leave=False, disable=disable or not _on_screen(), **kwargs)
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
