"""Atomic writes and checkpoint loading: corruption is detected, code never runs."""
import os
import pickle

import pytest
import torch

from samlib.errors import CheckpointError, SamlibError
from samlib.io import atomic_write_text, load_checkpoint, save_checkpoint


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_text(tmp_path / "a.txt", "one")
    atomic_write_text(tmp_path / "a.txt", "two")
    assert (tmp_path / "a.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_unwritable_folder_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SamlibError, match="cannot write to"):
        atomic_write_text(blocker / "sub" / "a.txt", "x")


def test_checkpoint_round_trip_and_previous_kept(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    save_checkpoint({"epoch": 2, "w": torch.full((3,), 2.0)}, path)
    ck = load_checkpoint(path)
    assert ck["epoch"] == 2 and torch.equal(ck["w"], torch.full((3,), 2.0))
    assert load_checkpoint(tmp_path / "last.prev.pt")["epoch"] == 1


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_checkpoint_falls_back_to_previous(tmp_path, damage, capsys):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)
    save_checkpoint({"epoch": 2}, path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert load_checkpoint(path)["epoch"] == 1
    assert "previous good checkpoint" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path, fallback=False)


def test_corrupt_checkpoint_without_sidecar_is_still_detected(tmp_path):
    path = tmp_path / "x.pt"
    save_checkpoint({"epoch": 1}, path, keep_previous=False)
    (tmp_path / "x.pt.sha256").unlink()
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_checkpoint_never_runs_code(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"format": "samlib-checkpoint-v1", "model": _Evil(marker)}, path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_foreign_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(CheckpointError, match="not a samlib checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pt")
