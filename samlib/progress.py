"""Progress bars that go away when their work ends, however it ends.

tqdm's notebook widget stays on screen, red, when a loop is interrupted (Kernel -> Interrupt),
over the one `interrupted:` line the notebook prints; here an interrupted bar is removed
like a finished one.
"""
from __future__ import annotations

import contextlib

from tqdm.auto import tqdm


@contextlib.contextmanager
def progress_bar(iterable=None, **kwargs):
    """tqdm(iterable, leave=False, **kwargs), closed (and removed) on exit or interruption."""
    bar = tqdm(iterable, leave=False, **kwargs)
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
