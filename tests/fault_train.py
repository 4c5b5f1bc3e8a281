"""`python tests/fault_train.py <samlib CLI arguments>`: the samlib command line with a fault
injected into its atomic writes, for tests/test_reliability.py (never part of samlib).

SAMLIB_FAULT="kill-during-save:N[:NAME]" SIGKILLs the process during its N-th atomic write
(of files named NAME only, when given), after half of the temporary file is on disk and
before the rename: exactly the state a kill inside samlib.io.atomic_write_bytes leaves.
"""
import os
import signal
import sys
import tempfile
from pathlib import Path

import samlib.io
from samlib.cli import main

real_write = samlib.io.atomic_write_bytes
kind, n, name = (os.environ["SAMLIB_FAULT"].split(":", 2) + ["", ""])[:3]
assert kind == "kill-during-save" and n.isdigit(), f"SAMLIB_FAULT={os.environ['SAMLIB_FAULT']!r}"
writes = 0


def write_then_die(path, data: bytes):
    global writes
    path = Path(path)
    if not name or path.name == name:
        writes += 1
        if writes == int(n):
            fd, _ = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            print(f"SAMLIB_FAULT: killed while writing {path}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    return real_write(path, data)


samlib.io.atomic_write_bytes = write_then_die
sys.exit(main(sys.argv[1:]))
