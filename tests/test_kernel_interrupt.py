"""Kernel -> Interrupt during training, as a notebook user does it (a real kernel through
jupyter_client): the cell ends with one `interrupted:` line and no traceback, the epoch's
progress bar is closed, and running the cell again resumes the run to the same end as a run
never interrupted."""
from __future__ import annotations

import queue
import time

import pytest

jupyter_client = pytest.importorskip("jupyter_client")

CELL = """
from samlib.report import params as nb          # the notebooks' first import: installs the handler
from samlib.config import resolve
from samlib.data import synthetic_cifar10
from samlib.run import train
cfg = resolve("final", "smoke", widths=(4, 8, 8), blocks=(1, 1, 1), epochs={epochs}, batch_size=32,
              val_size=32, train_subset=None, test_subset=None, train_eval_size=32)
run = train(cfg, dataset=synthetic_cifar10(4000, 64, seed=0), out={out!r}, device="cpu", progress=True)
print("done", run)
"""


def _execute(kc, code, timeout=300, on_output=None):
    """Run `code`; returns (reply content, iopub messages of it)."""
    msg_id = kc.execute(code)
    messages, deadline = [], time.monotonic() + timeout
    while True:
        try:
            msg = kc.get_iopub_msg(timeout=1)
        except queue.Empty:
            if on_output:
                on_output(messages)
            assert time.monotonic() < deadline, "the cell did not finish"
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        messages.append(msg)
        if on_output:
            on_output(messages)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    return kc.get_shell_msg(timeout=10)["content"], messages


def _metrics_rows(out):
    found = list(out.glob("*/metrics.csv"))
    return len(found[0].read_text().splitlines()) - 1 if found else 0


@pytest.mark.slow
def test_an_interrupted_notebook_training_shows_one_line_and_resumes_exactly(tmp_path):
    import os

    env = dict(os.environ, OMP_NUM_THREADS="1")
    km, kc = jupyter_client.manager.start_new_kernel(kernel_name="python3", env=env)
    try:
        interrupted = []

        def interrupt_after_first_epoch(messages):
            # (again after 5 s, as a user would, if a SIGINT landed where Python could not see it)
            if _metrics_rows(tmp_path / "split") >= 1 and (not interrupted or time.monotonic() - interrupted[-1] > 5):
                km.interrupt_kernel()
                interrupted.append(time.monotonic())

        reply, messages = _execute(kc, CELL.format(epochs=3, out=str(tmp_path / "split")),
                                   on_output=interrupt_after_first_epoch)
        assert interrupted and reply["status"] == "error" and reply["ename"] == "KeyboardInterrupt"
        errors = [m["content"] for m in messages if m["msg_type"] == "error"]
        assert len(errors) == 1 and len(errors[0]["traceback"]) == 1
        assert errors[0]["traceback"][0].startswith("interrupted: every file written so far is intact")
        streams = "".join(m["content"].get("text", "") for m in messages if m["msg_type"] == "stream")
        assert "Traceback" not in streams and "KeyboardInterrupt" not in streams
        bars = [m for m in messages if m["msg_type"] == "comm_open"
                and m["content"]["data"].get("state", {}).get("_model_name") == "HBoxModel"]
        closed = {m["content"]["comm_id"] for m in messages if m["msg_type"] == "comm_close"}
        assert bars and all(b["content"]["comm_id"] in closed for b in bars)   # no bar left behind
        kept = _metrics_rows(tmp_path / "split")
        assert 1 <= kept < 3
        reply, messages = _execute(kc, CELL.format(epochs=3, out=str(tmp_path / "split")))
        assert reply["status"] == "ok"
        streams = "".join(m["content"].get("text", "") for m in messages if m["msg_type"] == "stream")
        assert f"after epoch {kept}" in streams
        reply, _ = _execute(kc, CELL.format(epochs=3, out=str(tmp_path / "whole")))
        assert reply["status"] == "ok"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    import torch

    from samlib.io import load_checkpoint
    (split,), (whole,) = (list((tmp_path / d).glob("*/last.pt")) for d in ("split", "whole"))
    a, b = load_checkpoint(split), load_checkpoint(whole)
    untimed = lambda ckpt: [{k: v for k, v in r.items() if k != "seconds"} for r in ckpt["metrics"]]
    assert untimed(a) == untimed(b) and a["epoch"] == 3
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
