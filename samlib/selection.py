"""Which checkpoints a run keeps (Section 3.3: "both the regular and the EMA model are
checkpointed at their best"): on a validation split, or as the code ran, on the test set."""
from __future__ import annotations

SELECTIONS = ("val", "test")
AS_RUN_MARGIN = 0.005   # the code kept the regular model within 0.5 points of the best EMA


class BestCheckpoints:
    """The best accuracies so far and their epochs; `state` (regular, ema, regular_epoch, ema_epoch)
    is stored in checkpoints and final.json as "best"."""

    def __init__(self, selection: str = "val", ema: bool = False, state: dict | None = None):
        self.selection, self.ema = selection, ema
        self.state = state if state is not None else {
            "regular": -1.0, "ema": -1.0, "regular_epoch": None, "ema_epoch": None}

    def _record(self, kind: str, accuracy: float, epoch: int) -> None:
        self.state.update({kind: accuracy, f"{kind}_epoch": epoch})

    def update(self, row: dict, epoch: int) -> tuple[bool, bool]:
        """(save regular, save EMA) after an epoch.  "val": each model at its best validation accuracy.
        "test" (as run): EMA at its best test accuracy, the regular one whenever it is within 0.5
        points of that best (of its own best without EMA)."""
        best = self.state
        if self.selection == "val":
            reg = row["val_acc"] > best["regular"]
            ema = self.ema and row["val_acc_ema"] > best["ema"]
            if reg:
                self._record("regular", row["val_acc"], epoch)
            if ema:
                self._record("ema", row["val_acc_ema"], epoch)
            return reg, ema
        ema = self.ema and row["test_acc_ema"] > best["ema"]
        if ema:
            self._record("ema", row["test_acc_ema"], epoch)
        reference = best["ema"] if self.ema else best["regular"]
        reg = row["test_acc"] >= reference - AS_RUN_MARGIN
        if reg:
            self._record("regular", max(best["regular"], row["test_acc"]), epoch)
        return reg, ema
