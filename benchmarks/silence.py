"""The longest silence a notebook user sees: each report notebook run cell by cell in a real
kernel (jupyter_client), every output message time-stamped (stream text, displays, progress
bar updates), and the longest gap with nothing new on screen while a cell runs.

    python benchmarks/silence.py --profile smoke --data-dir data [--results R --runs R]

Prints one row per notebook: cells, wall seconds, the longest silence and the cell it was in.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import time
from pathlib import Path

import jupyter_client
import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ["00_data_exploration", "01_table1_ablation", "02_figure1_inference", "03_submission"]
SHOWN = {"stream", "display_data", "update_display_data", "execute_result", "error", "comm_msg", "comm_open"}


def run_cell(kc, code: str) -> tuple[float, float]:
    """(wall seconds, longest gap between shown outputs, counting from the start to the end)."""
    msg_id = kc.execute(code)
    start = last = time.monotonic()
    longest = 0.0
    while True:
        try:
            msg = kc.get_iopub_msg(timeout=1)
        except queue.Empty:
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        now = time.monotonic()
        if msg["msg_type"] in SHOWN:
            longest, last = max(longest, now - last), now
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return now - start, max(longest, now - last)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default="smoke")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--results", default=str(ROOT / "local" / "silence" / "results"))
    ap.add_argument("--runs", default=str(ROOT / "local" / "silence" / "runs"))
    args = ap.parse_args()
    env = dict(os.environ, SAMLIB_PROFILE=args.profile, SAMLIB_DATA_DIR=str(Path(args.data_dir).resolve()),
               SAMLIB_RESULTS_DIR=args.results, SAMLIB_RUNS_DIR=args.runs)
    rows = []
    for name in NOTEBOOKS:
        km, kc = jupyter_client.manager.start_new_kernel(kernel_name="python3", env=env,
                                                          cwd=str(ROOT / "notebooks"))
        try:
            book = nbformat.read(ROOT / "notebooks" / f"{name}.ipynb", as_version=4)
            cells = [c for c in book.cells if c.cell_type == "code"]
            timed = [(run_cell(kc, c.source), i) for i, c in enumerate(cells)]
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
        (wall, gap), cell = max(timed, key=lambda t: t[0][1])
        rows.append({"notebook": name, "cells": len(cells), "seconds": round(sum(t[0][0] for t in timed), 1),
                     "longest_silence_s": round(gap, 1), "in_cell": cell, "that_cell_s": round(wall, 1)})
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
