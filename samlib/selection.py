"""Which checkpoints a run keeps (Section 3.3: "both the regular and the EMA model are
checkpointed at their best"): on a validation split, or as the code ran, on the test set."""
SELECTIONS = ("val", "test")


class BestCheckpoints:
    """The best accuracies so far and their epochs; `state` is stored in checkpoints and final.json as "best"."""

    def __init__(self, selection: str = "val", ema: bool = False, state: dict | None = None):
        self.selection, self.ema = selection, ema
        self.state = state if state is not None else {
            "regular": -1.0, "ema": -1.0, "regular_epoch": None, "ema_epoch": None}

    def update(self, row: dict, epoch: int) -> tuple[bool, bool]:
        """(save regular, save EMA) after an epoch.  "val": each at its best validation accuracy.  "test" (as run):
        EMA at its best test accuracy, the regular model within 0.5 points of that (of its own best without EMA)."""
        best, key = self.state, f"{self.selection}_acc"     # val_acc or test_acc
        ema = self.ema and row[f"{key}_ema"] > best["ema"]
        if ema:
            best.update(ema=row[f"{key}_ema"], ema_epoch=epoch)
        if self.selection == "val":
            regular, accuracy = row[key] > best["regular"], row[key]
        else:
            regular = row[key] >= (best["ema"] if self.ema else best["regular"]) - 0.005
            accuracy = max(best["regular"], row[key])
        if regular:
            best.update(regular=accuracy, regular_epoch=epoch)
        return regular, ema
