"""Every file samlib reads is untrusted.  A damaged or odd file ends in exactly one
DataError / CheckpointError / ConfigError whose message names the file (and the field) and
says what to do - never another exception, and nothing in a file is ever run.

Per file kind (the Kaggle pickle, the CIFAR-10 batches, the json/csv run files, checksum
sidecars, checkpoints): a table of hand-made bad (or odd but valid) files, then property
tests that mutate valid files at random, byte by byte and value by value.
"""
import codecs
import io
import json
import os
import pickle
import re
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings, strategies as st

from samlib import data as D
from samlib.config import resolve
from samlib.errors import CheckpointError, ConfigError, DataError, SamlibError
from samlib.io import load_checkpoint, save_checkpoint
from samlib.report.runs import load_run
from samlib.rundir import METRIC_FIELDS, RunDir, load_model, load_run_models
from helpers_loop import resume

EXPECTED = (DataError, CheckpointError, ConfigError)
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
NOT_AS_ROOT = pytest.mark.skipif(ROOT, reason="running as root, and root reads any file whatever its "
                                             "mode: chmod 000 cannot make a file unreadable here")
# A message says what to do: one of these words is in every one.
ACTIONS = ("restore", "replace", "move", "delete", "download", "chmod", "train", "put ", "pass ")
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])
DIR, CHMOD, DELETE = "<a folder in its place>", "<chmod 000>", "<deleted>"
TINY = dict(widths="4,8,8", blocks="1,1,1", epochs="2", batch_size="64", val_size="64",
            train_eval_size="64", train_subset="none", test_subset="none")


def fails(call, path, kinds=EXPECTED, match=None) -> str:
    """call() raises one samlib error of `kinds` naming `path` and saying what to do."""
    with pytest.raises(SamlibError) as e:        # any other exception fails the test
        call()
    msg = str(e.value)
    assert isinstance(e.value, kinds), f"{type(e.value).__name__}: {msg}"
    assert str(path) in msg, msg
    assert any(word in msg for word in ACTIONS), msg
    if match:
        assert re.search(match, msg), msg
    return msg


def table(cases: dict) -> list:
    """pytest.param per case, id = its name; chmod cases skipped as root."""
    return [pytest.param(*values, id=name, marks=[NOT_AS_ROOT] if any(v is CHMOD for v in values) else [])
            for name, values in cases.items()]


def works_or_fails_cleanly(call, path):
    """The property: call() returns, or raises one expected samlib error naming `path`."""
    try:
        result = call()
    except EXPECTED as e:
        assert str(path) in str(e), str(e)
        event(f"refused: {type(e).__name__}")
        return None
    event("works")
    return result


def put(path: Path, payload):
    """Write `payload` at `path`: bytes as they are, DIR, CHMOD (the file made unreadable),
    DELETE, or any other object pickled (protocol 2, as the CIFAR files)."""
    if path.is_dir():
        shutil.rmtree(path)
    elif payload is not CHMOD:
        path.unlink(missing_ok=True)
    if payload is DIR:
        path.mkdir()
    elif payload is CHMOD:
        path.chmod(0)
    elif payload is not DELETE:
        path.write_bytes(payload if isinstance(payload, bytes) else pickle.dumps(payload, protocol=2))


class Reduce:
    """Pickles as a call of `func(*args)`: how a hostile file asks the unpickler to call things."""
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def ragged(*rows):
    a = np.empty(len(rows), dtype=object)
    a[:] = [list(r) for r in rows]
    return a


def tar_bytes() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("storages")
        info.size = 5
        tf.addfile(info, io.BytesIO(b"hello"))
    return buf.getvalue()


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", b"not a pickle")
    return buf.getvalue()


# ============================================================== the Kaggle pickle

X2 = np.zeros((2, 32, 32, 3), np.uint8)
_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]


def kaggle(ids=(7, 3), data=X2):
    return {b"data": data, b"ids": list(ids) if isinstance(ids, tuple) else ids}


KAGGLE_BAD = {
    "ids non-UTF-8 bytes": (kaggle([b"\xff\xfe", b"b"]), r"ids\[0\] is not UTF-8"),
    "ids hold None": (kaggle(["a", None]), r"ids\[1\] is NoneType"),
    "ids ragged lists": (kaggle(ragged([1, 2], [3])), r"ids\[0\] is list"),
    "ids lone surrogate": (kaggle(["\ud800", "b"]), "lone surrogate"),
    "ids surrogate in a str array": (kaggle(np.array(["a", "\udcff"])), "lone surrogate"),
    "ids non-UTF-8 bytes array": (kaggle(np.array([b"\xc3", b"b"])), "not UTF-8"),
    "ids floats": (kaggle([0.5, 1.5]), r"ids\[0\] is float"),
    "ids float array": (kaggle(np.array([0.5, 1.5])), "integer or text"),
    "ids bools": (kaggle([True, False]), r"ids\[0\] is bool"),
    "ids 2-D": (kaggle(np.zeros((2, 1), np.int64)), "integer or text per image"),
    "ids a dict": (kaggle({1: 2, 3: 4}), "list or 1-D array"),
    "ids a string": (kaggle("ab"), "list or 1-D array"),
    "ids too few": (kaggle([1]), "1 ids for 2 images"),
    "ids repeated": (kaggle([4, 4]), "unique.*e.g. 4"),
    "ids repeated once texts": (kaggle([1, "1"]), "unique"),
    "ids with a line break": (kaggle(["a\nb", "c"]), "control character"),
    "ids with NUL": (kaggle(["a\x00", "c"]), "control character"),
    "ids empty text": (kaggle(["", "c"]), "empty"),
    "data float64": (kaggle(data=X2.astype(np.float64)), "float64.*uint8"),
    "data complex": (kaggle(data=X2.astype(np.complex64)), "complex64"),
    "data objects": (kaggle(data=X2.astype(object)), "object"),
    "data bools": (kaggle(data=X2.astype(bool)), "bool"),
    "data negative int16": (kaggle(data=np.full((2, 32, 32, 3), -1, np.int16)), "0..255"),
    "data 3-D": (kaggle(data=np.zeros((2, 32, 32), np.uint8)), r"\(2, 32, 32\)"),
    "data rows of 3071": (kaggle(data=np.zeros((2, 3071), np.uint8)), r"\(2, 3071\)"),
    "data no images": (kaggle(data=np.zeros((0, 3072), np.uint8)), "N >= 1"),
    "data a list": (kaggle(data=[[0] * 3072] * 2), "cannot be read as an array"),
    "data None": (kaggle(data=None), "cannot be read as an array"),
    "no data": ({b"ids": [1, 2]}, "no b'data'"),
    "odd keys": ({(((1,),),): 1, 2.5: None}, "no b'data'"),
    "a list": ([X2], "expected a pickled dict"),
    "a set (no global)": (pickle.dumps({b"data": {1, 2}}, protocol=4), "cannot be read as an array"),
    "a set (global)": ({b"data": {1, 2}}, "refusing to unpickle"),
    "empty file": (b"", "truncated or not a pickle"),
    "text file": (b"ID,Labels\n1,2\n", "truncated or not a pickle"),
    "truncated": (pickle.dumps(kaggle())[:300], "truncated or not a pickle"),
    "huge array allocation": ({b"data": Reduce(_RECONSTRUCT, np.ndarray, (2 ** 40,), b"b")}, "not a pickle"),
    "huge bytes allocation": ({b"data": Reduce(bytes, 10 ** 10)}, "not a pickle"),
    "another codec": ({b"data": Reduce(codecs.encode, "x", "zlib")}, "not a pickle"),
    "ndarray called": ({b"data": Reduce(np.ndarray, (10,))}, "not a pickle"),
    "os.system": ({b"data": Reduce(os.system, "true")}, "refusing to unpickle.*malicious"),
    "a folder": (DIR, "is a folder"),
    "unreadable": (CHMOD, "permission denied"),
}


@pytest.mark.parametrize("payload, match", table(KAGGLE_BAD))
def test_kaggle_pickle_bad(tmp_path, payload, match):
    path = tmp_path / "cifar_test_nolabel.pkl"
    put(path, pickle.dumps(kaggle()))
    put(path, payload)
    fails(lambda: D.load_unlabeled(path), path, DataError, match)


KAGGLE_ODD = {   # odd but valid: loads, with these ids
    "bytes and str ids": (kaggle([b"a", "b"]), ["a", "b"]),
    "ints mixed with text": (kaggle([7, "b"]), ["7", "b"]),
    "ints beyond int64": (kaggle([2 ** 70, 1]), [str(2 ** 70), "1"]),
    "uint8 id array": (kaggle(np.array([9, 8], np.uint8)), [9, 8]),
    "object array of ints": (kaggle(np.array([5, 6], dtype=object)), [5, 6]),
    "big-endian 16-bit pixels": (kaggle(data=np.full((2, 32, 32, 3), 7, ">u2")), [7, 3]),
    "flat int64 rows": (kaggle(data=np.zeros((2, 3072), np.int64)), [7, 3]),
    "protocol 5": (pickle.dumps(kaggle(), protocol=5), [7, 3]),
    "str keys": ({"data": X2, "ids": (1, 2)}, [1, 2]),
}


@pytest.mark.parametrize("payload, ids", table(KAGGLE_ODD))
def test_kaggle_pickle_odd_but_valid(tmp_path, payload, ids):
    path = tmp_path / "k.pkl"
    put(path, payload)
    images, got = D.load_unlabeled(path)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert got.tolist() == ids


def test_kaggle_missing_file(tmp_path):
    fails(lambda: D.load_unlabeled(tmp_path / "absent.pkl"), tmp_path / "absent.pkl", DataError, "not found")


# ============================================================== the CIFAR-10 batches

def batch(n=2, labels=None, data=None):
    return {b"batch_label": b"x", b"labels": [1] * n if labels is None else labels,
            b"data": np.full((n, 3072), 5, np.uint8) if data is None else data}


META = {b"label_names": [c.encode() for c in D.CLASSES]}


def cifar_folder(root: Path) -> Path:
    """A valid, hand-written cifar-10-batches-py folder (2 images a batch)."""
    folder = root / D.FOLDER
    folder.mkdir(parents=True)
    for name in (*D.TRAIN_FILES, "test_batch"):
        put(folder / name, batch())
    put(folder / "batches.meta", META)
    return folder


def names(value):
    return {b"label_names": value}


CIFAR_BAD = {
    "label_names not text": ("batches.meta", names(list(range(10))), r"label_names\[0\] must be text"),
    "label_names non-UTF-8": ("batches.meta", names([b"\xff"] * 10), r"label_names\[0\] is not UTF-8"),
    "label_names surrogate": ("batches.meta", names(["\ud800"] * 10), "lone surrogate"),
    "label_names nested": ("batches.meta", names([["cat"]] * 10), "must be text"),
    "label_names nine": ("batches.meta", names([b"cat"] * 9), "10 label_names.*9 of them"),
    "label_names a string": ("batches.meta", names("airplane"), "10 label_names"),
    "label_names missing": ("batches.meta", {b"num_vis": 3072}, "10 label_names"),
    "label_names empty": ("batches.meta", names([b""] * 10), "empty"),
    "meta a list": ("batches.meta", [b"cat"], "expected a pickled dict"),
    "meta truncated": ("batches.meta", pickle.dumps(META, protocol=2)[:40], "truncated"),
    "meta a folder": ("batches.meta", DIR, "folder"),
    "meta malicious": ("batches.meta", {b"label_names": Reduce(os.system, "true")}, "refusing"),
    "labels ragged": ("data_batch_2", batch(labels=[[1, 2], [3]]), r"labels\[0\] is list"),
    "labels 10": ("data_batch_2", batch(labels=[10, 0]), "0..9"),
    "labels -1": ("data_batch_2", batch(labels=[-1, 0]), "0..9"),
    "labels 2**70": ("data_batch_2", batch(labels=[2 ** 70, 0]), "0..9"),
    "labels uint8 200": ("data_batch_2", batch(labels=np.array([200, 1], np.uint8)), "0..9"),
    "labels bools": ("data_batch_2", batch(labels=[True, False]), "bool"),
    "labels floats": ("data_batch_2", batch(labels=[0.0, 1.0]), "float"),
    "labels text": ("data_batch_2", batch(labels=[b"1", b"2"]), "bytes"),
    "labels None": ("data_batch_2", batch(labels=None) | {b"labels": None}, "NoneType"),
    "labels too few": ("data_batch_2", batch(labels=[1]), "2 integers"),
    "labels 2-D": ("data_batch_2", batch(labels=np.ones((2, 1), np.int64)), "integers"),
    "data rows of 3000": ("data_batch_2", batch(data=np.zeros((2, 3000), np.uint8)), r"\(2, 3000\)"),
    "data 1-D": ("data_batch_2", batch(data=np.zeros(3072, np.uint8)), r"\(3072,\)"),
    "data float": ("data_batch_2", batch(data=np.zeros((2, 3072), np.float32)), "float32"),
    "data bytes rows": ("data_batch_2", batch(data=[bytes(3072)] * 2), "list"),
    "data objects": ("data_batch_2", batch(data=np.zeros((2, 3072), object)), "object"),
    "data None": ("test_batch", batch() | {b"data": None}, "NoneType"),
    "no labels": ("test_batch", {b"data": np.zeros((2, 3072), np.uint8)}, "labels"),
    "empty file": ("data_batch_5", b"", "truncated or not a pickle"),
    "garbage": ("data_batch_5", os.urandom(64), "not a pickle|refusing"),
    "truncated": ("data_batch_1", pickle.dumps(batch(), protocol=2)[:500], "truncated"),
    "a folder": ("data_batch_3", DIR, "is a folder"),
    "unreadable": ("data_batch_4", CHMOD, "permission denied"),
}


@pytest.mark.parametrize("name, payload, match", table(CIFAR_BAD))
def test_cifar_batches_bad(tmp_path, name, payload, match):
    folder = cifar_folder(tmp_path)
    put(folder / name, payload)
    fails(lambda: D.load_cifar10(tmp_path), folder / name, DataError, match)


def test_cifar_folder_problems(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / D.FOLDER).write_bytes(b"a file, not a folder")
    fails(lambda: D.load_cifar10(tmp_path / "a"), tmp_path / "a" / D.FOLDER, DataError, "not a folder")
    fails(lambda: D.load_cifar10(None), "data", DataError, "no CIFAR-10 folder")
    folder = cifar_folder(tmp_path / "b")
    put(folder / "test_batch", batch(0, labels=[], data=np.zeros((0, 3072), np.uint8)))
    fails(lambda: D.load_cifar10(folder), folder, DataError, "must each hold images")


@NOT_AS_ROOT
def test_cifar_folder_unsearchable(tmp_path):
    folder = cifar_folder(tmp_path)
    folder.chmod(0)
    try:
        fails(lambda: D.load_cifar10(tmp_path), folder, DataError, "unreadable|permission")
    finally:
        folder.chmod(0o755)


CIFAR_ODD = {   # odd but valid
    "label_names as str": ("batches.meta", names(list(D.CLASSES))),
    "label_names as an array": ("batches.meta", names(np.array([c.encode() for c in D.CLASSES]))),
    "label_names a tuple": ("batches.meta", names(tuple(D.CLASSES))),
    "labels an int array": ("data_batch_1", batch(labels=np.array([1, 1], np.int32))),
    "labels numpy ints": ("data_batch_1", batch(labels=[np.int64(1), np.uint8(1)])),
    "Fortran-order data": ("data_batch_1", batch(data=np.asfortranarray(np.full((2, 3072), 5, np.uint8)))),
    "protocol 5": ("data_batch_1", pickle.dumps(batch(), protocol=5)),
}


@pytest.mark.parametrize("name, payload", table(CIFAR_ODD))
def test_cifar_batches_odd_but_valid(tmp_path, name, payload):
    folder = cifar_folder(tmp_path)
    put(folder / name, payload)
    ds = D.load_cifar10(tmp_path)
    assert ds.classes == D.CLASSES and len(ds.train_labels) == 10 and (ds.train_labels == 1).all()
    assert (ds.train_images == 5).all()


# ============================================================== run files (json, csv)

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny EMA run: `partial` stopped after epoch 1 of 2 (resumable), `finished` done."""
    from samlib.run import train
    base = tmp_path_factory.mktemp("runs")
    dataset = D.synthetic_cifar10(n_train=256, n_test=64, seed=1)
    cfg = resolve("final", "smoke", **TINY)
    run = train(cfg, dataset=dataset, out=base / "out", device="cpu", progress=False, stop_after=1)
    shutil.copytree(run, base / "partial")
    train(cfg, dataset=dataset, out=base / "out", device="cpu", progress=False)
    return {"partial": base / "partial", "finished": run, "cfg": cfg, "dataset": dataset,
            "data_id": D.fingerprint(dataset)}


def copy_run(runs, which, dest: Path) -> Path:
    return Path(shutil.copytree(runs[which], dest / which))


def changes(**fields):
    """A payload maker: the valid file's JSON object with `fields` set (DELETE: removed)."""
    def make(valid: bytes) -> bytes:
        obj = dict(json.loads(valid), **fields)
        return json.dumps({k: v for k, v in obj.items() if v is not DELETE}).encode()
    return make


ANY_JSON = {   # file: (readers); each case below, through each reader of the file
    "config.json": ("load_run", "resume"), "run.json": ("load_run", "check_data"),
    "final.json": ("load_run",), "provenance.json": ("load_run",)}
JSON_DAMAGE = {
    "truncated": (lambda v: v[: len(v) // 2], "not valid JSON"),
    "empty": (b"", "not valid JSON"),
    "binary": (b"\x80\x81\xfe\xff" * 8, "not UTF-8"),
    "a list": (b"[1, 2]", "JSON list"),
    "a number": (b"3", "a number"),
    "a string": (b'"final"', "a string"),
    "deeply nested": (b"[" * 100_000, "nested too deeply|not valid JSON"),
    "lone surrogate": (b'{"x": "\\ud800"}', "not valid Unicode"),
    "UTF-8 BOM": (lambda v: b"\xef\xbb\xbf" + v, "not valid JSON"),
    "a folder": (DIR, "is a folder"),
    "unreadable": (CHMOD, "permission denied"),
}
FIELD_DAMAGE = {   # (file, payload, readers, match)
    "config epochs text": ("config.json", changes(epochs="many"), "'epochs'"),
    "config epochs 2.5": ("config.json", changes(epochs=2.5), "epochs"),
    "config lr 10**400": ("config.json", changes(lr=10 ** 400), "'lr'.*too large"),
    "config widths nested": ("config.json", changes(widths=[[4]]), "'widths'"),
    "config widths text": ("config.json", changes(widths="abc"), "'widths'"),
    "config blocks short": ("config.json", changes(blocks=[1, 1]), "equal length"),
    "config se maybe": ("config.json", changes(se="maybe"), "'se'"),
    "config name a number": ("config.json", changes(name=5), "name"),
    "config unknown key": ("config.json", changes(sam=True), "unknown setting"),
    "config mix a list": ("config.json", changes(mix=["mixup"]), "mix"),
    "config seed negative": ("config.json", changes(seed=-1), "seed"),
    "config ema_decay null": ("config.json", changes(ema_decay=None), "ema_decay"),
    "config amp an object": ("config.json", changes(amp={"on": 1}), "'amp'"),
    "config batch_size true": ("config.json", changes(batch_size=True), "batch_size"),
    "run data a number": ("run.json", changes(data=5), "'data'"),
    "run data null": ("run.json", changes(data=None), "'data'"),
    "final test_acc_ema text": ("final.json", changes(test_acc_ema="high"), "'test_acc_ema'"),
    "final no train_acc_mixed": ("final.json", changes(train_acc_mixed=DELETE), "'train_acc_mixed' is missing"),
    "final no test_acc_ema (EMA run)": ("final.json", changes(test_acc_ema=DELETE), "'test_acc_ema' is missing"),
    "final test_size 1.5": ("final.json", changes(test_size=1.5), "'test_size'"),
    "final train_acc_clean true": ("final.json", changes(train_acc_clean=True), "'train_acc_clean'"),
    "final test_acc 10**400": ("final.json", changes(test_acc_regular=10 ** 400), "'test_acc_regular'"),
    "final best a list": ("final.json", changes(best=[1]), "'best'"),
}
HEADER = b",".join(f.encode() for f in METRIC_FIELDS)
METRICS_DAMAGE = {
    "binary": (b"\xff\xfe\x00garbage" * 4, "not UTF-8"),
    "empty": (b"", "cannot be parsed"),
    "another header": (b"a,b\n1,2\n", "missing"),
    "text values": (HEADER + b"\n" + b"x," * 11 + b"y\n", "must hold numbers"),
    "unbalanced quote": (HEADER + b'\n"1,2\n', "cannot be parsed|must hold numbers"),
    "ragged rows": (lambda v: v + b"1,2,3,4,5,6,7,8,9,10,11,12,13,14,15\n", "cannot be parsed"),
    "NUL bytes": (lambda v: v.replace(b",", b"\x00", 3), "missing|cannot be parsed|must hold numbers"),
    "a folder": (DIR, "is a folder"),
    "unreadable": (CHMOD, "permission denied"),
}


def _json_table():
    cases = {}
    for name, readers in ANY_JSON.items():
        for what, (payload, match) in JSON_DAMAGE.items():
            for reader in readers:
                cases[f"{name} {what} via {reader}"] = (name, payload, reader, match)
    for what, (name, payload, match) in FIELD_DAMAGE.items():
        for reader in ANY_JSON[name]:
            if not (reader == "check_data" and "data" not in what):
                cases[f"{what} via {reader}"] = (name, payload, reader, match)
    for what, (payload, match) in METRICS_DAMAGE.items():
        cases[f"metrics.csv {what}"] = ("metrics.csv", payload, "load_run", match)
    return cases


RUN_FILE_BAD = _json_table()


def read_with(reader, runs, run_dir: Path):
    if reader == "load_run":
        return load_run(run_dir)
    if reader == "check_data":
        return RunDir(run_dir).check_data(runs["data_id"])
    return resume(run_dir)


@pytest.mark.parametrize("name, payload, reader, match", table(RUN_FILE_BAD))
def test_run_files_bad(runs, tmp_path, name, payload, reader, match):
    run_dir = copy_run(runs, "partial" if reader == "resume" else "finished", tmp_path)
    valid = (run_dir / name).read_bytes()
    put(run_dir / name, payload(valid) if callable(payload) else payload)
    try:
        fails(lambda: read_with(reader, runs, run_dir), run_dir / name, match=match)
    finally:
        (run_dir / name).chmod(0o755)


def test_run_files_odd_but_valid(runs, tmp_path):
    run_dir = copy_run(runs, "finished", tmp_path)
    valid = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps(dict(valid, se="yes", epochs="2")))   # command-line spelling
    (run_dir / "run.json").write_text(json.dumps({"data": runs["data_id"], "note": [1, {"x": None}]}))
    (run_dir / "provenance.json").write_text('{"x": NaN, "y": "\\u00e9"}')
    (run_dir / "metrics.csv").write_text((run_dir / "metrics.csv").read_text() + "\n\n")
    out = load_run(run_dir)
    assert out["config"].se is True and out["config"].epochs == 2 and len(out["metrics"]) == 2
    RunDir(run_dir).check_data(runs["data_id"])
    for name in ("final.json", "provenance.json", "run.json", "metrics.csv"):
        (run_dir / name).unlink()
    out = load_run(run_dir)
    assert out["final"] is None and out["metrics"].empty


def test_not_a_run_directory(tmp_path):
    with pytest.raises(SamlibError, match="not a samlib run directory"):
        load_run(tmp_path)


# ============================================================== sha256 sidecars

def saved(tmp_path, prev=False) -> Path:
    path = tmp_path / "x.pt"
    save_checkpoint({"epoch": 1}, path)
    if prev:
        save_checkpoint({"epoch": 2}, path)
    return path


SIDECAR_BAD = {
    "binary garbage": (b"\xff\xfe\x00\x81" * 20, "sidecar x.pt.sha256 is damaged"),
    "empty": (b"", "is damaged"),
    "not hex": (b"not a digest\n", "is damaged"),
    "short digest": (b"abc123\n", "is damaged"),
    "another digest": (b"0" * 64 + b"\n", "corrupt or truncated"),
    "a folder": (DIR, "is a folder"),
    "unreadable": (CHMOD, "permission denied"),
}


@pytest.mark.parametrize("payload, match", table(SIDECAR_BAD))
def test_sidecar_bad(tmp_path, payload, match):
    path = saved(tmp_path)
    put(tmp_path / "x.pt.sha256", payload)
    msg = fails(lambda: load_checkpoint(path), path, CheckpointError, match)
    if "damaged" in match:
        assert "delete x.pt.sha256" in msg


@pytest.mark.parametrize("payload", [b"\xff\xfe" * 20, b"", b"0" * 64])
def test_damaged_sidecar_falls_back_to_previous(tmp_path, payload, capsys):
    path = saved(tmp_path, prev=True)
    put(tmp_path / "x.pt.sha256", payload)
    assert load_checkpoint(path)["epoch"] == 1
    assert "using the previous good checkpoint" in capsys.readouterr().out


def test_sidecar_odd_but_valid(tmp_path):
    path = saved(tmp_path)
    digest = (tmp_path / "x.pt.sha256").read_text().split()[0]
    for text in (f"{digest.upper()}\r\n", f"{digest}  x.pt\n", f"\n\n  {digest}", f"{'1' * 64}\n{digest}\n"):
        (tmp_path / "x.pt.sha256").write_text(text)
        assert load_checkpoint(path, fallback=False)["epoch"] == 1


# ============================================================== checkpoints

def raw_ckpt(path: Path) -> dict:
    obj = load_checkpoint(path, fallback=False)
    obj.pop("_path")
    return obj


def changed(obj, where: tuple, value):
    """A deep copy of `obj` with the entry at `where` set to `value` (or deleted: DELETE)."""
    obj = {k: v for k, v in obj.items()}
    node = obj
    for key in where[:-1]:
        child = node[key]
        child = dict(child) if isinstance(child, dict) else list(child)
        node[key] = child
        node = child
    if value is DELETE:
        del node[where[-1]]
    else:
        node[where[-1]] = value
    return obj


FILE_BAD = {
    "a tar archive": (tar_bytes(), "corrupt or truncated"),
    "a zip of another thing": (zip_bytes(), "corrupt or truncated|refusing"),
    "a plain pickle": (pickle.dumps({"format": "samlib-checkpoint-v1"}), "corrupt or truncated|refusing"),
    "empty": (b"", "corrupt or truncated"),
    "text": (b"hello\n" * 10, "corrupt or truncated"),
    "a folder": (DIR, "is a folder"),
    "unreadable": (CHMOD, "permission denied"),
}


@pytest.mark.parametrize("payload, match", table(FILE_BAD))
def test_checkpoint_file_bad(runs, tmp_path, payload, match):
    run_dir = copy_run(runs, "finished", tmp_path)
    path = run_dir / "best_regular.pt"
    (run_dir / "best_regular.pt.sha256").unlink()        # so the parser itself meets the bytes
    put(path, payload)
    fails(lambda: load_model(path), path, CheckpointError, match)
    fails(lambda: load_run_models(run_dir), path, CheckpointError, match)
    if payload is not CHMOD:      # (resume: last.pt, with no last.prev.pt)
        last = copy_run(runs, "partial", tmp_path / "p") / "last.pt"
        (last.parent / "last.pt.sha256").unlink()
        put(last, payload)
        fails(lambda: resume(last.parent), last, CheckpointError, match)


MODEL_BAD = {   # best_*.pt -> load_model
    "no arch": (("arch",), DELETE, "'arch' is missing"),
    "arch unknown key": (("arch", "depth"), 18, "unknown setting 'depth'"),
    "arch a list": (("arch",), [1, 2], "'arch' must be a dict"),
    "arch widths text": (("arch", "widths"), "4,8,8", "'arch'.*widths must"),   # config.py's messages
    "arch widths floats": (("arch", "widths"), [4.0, 8.0, 8.0], "'arch'.*widths must"),
    "arch se text": (("arch", "se"), "yes", "'arch'.*se must"),
    "arch norm_std unknown": (("arch", "norm_std"), "imagenet", "'arch'.*norm_std must"),
    "arch blocks huge": (("arch", "blocks"), [10 ** 6, 1, 1], "'arch'.*blocks must"),
    "arch blocks too many for its tensors": (("arch", "blocks"), [1000, 1, 1], "too few"),
    "arch blocks a tensor": (("arch", "blocks"), torch.ones(3, dtype=torch.int64), "'arch'.*blocks must"),
    "arch of another width": (("arch", "widths"), [8, 8, 8], "'model'.*stem"),
    "no model": (("model",), DELETE, "'model' must be a dict"),
    "model a list": (("model",), [1], "'model' must be a dict"),
    "model tensor reshaped": (("model", "head.weight"), torch.zeros(3), "head.weight"),
    "model tensor integer": (("model", "stem.conv.weight"), torch.zeros(4, 3, 3, 3, dtype=torch.int64), "stem.conv"),
    "model tensor complex": (("model", "head.bias"), torch.zeros(10, dtype=torch.complex64), "head.bias"),
    "model tensor sparse": (("model", "head.bias"), torch.zeros(10).to_sparse(), "head.bias"),
    "model a list of floats": (("model", "head.bias"), [0.0] * 10, "head.bias"),
    "model extra tensor": (("model", "extra"), torch.zeros(1), "'extra'"),
    "model missing tensor": (("model", "head.bias"), DELETE, "head.bias"),
    "format marker": (("format",), "samlib-checkpoint-v0", "not a samlib checkpoint"),
}


@pytest.mark.parametrize("where, value, match", table(MODEL_BAD))
def test_model_checkpoint_bad(runs, tmp_path, where, value, match):
    path = copy_run(runs, "finished", tmp_path) / "best_regular.pt"
    save_checkpoint(changed(raw_ckpt(path), where, value), path, keep_previous=False)
    fails(lambda: load_model(path), path, CheckpointError, match)


def test_ema_checkpoint_of_another_config(runs, tmp_path):
    run_dir = copy_run(runs, "finished", tmp_path)
    ema = raw_ckpt(run_dir / "best_ema.pt")
    ema["arch"] = dict(ema["arch"], se_placement="standard")
    save_checkpoint(ema, run_dir / "best_ema.pt", keep_previous=False)
    fails(lambda: load_run_models(run_dir), run_dir / "best_ema.pt", CheckpointError, "another config")


LONG = torch.int64
RESUME_BAD = {   # last.pt -> RunDir.resume (helpers_loop.resume)
    "no ema (EMA config)": (("ema",), DELETE, "'ema' is missing.*EMA"),
    "no rng": (("rng",), DELETE, "'rng' is missing"),
    "no optimizer": (("optimizer",), DELETE, "'optimizer' is missing"),
    "no scheduler": (("scheduler",), DELETE, "'scheduler' is missing"),
    "no model": (("model",), DELETE, "'model' is missing"),
    "no metrics": (("metrics",), DELETE, "'metrics' is missing"),
    "no best": (("best",), DELETE, "'best' is missing"),
    "no epoch": (("epoch",), DELETE, "'epoch' is missing"),
    "rng a list": (("rng",), [1, 2], "'rng'"),
    "rng aug all zeros": (("rng", "aug"), torch.zeros(5056, dtype=torch.uint8), "'rng'.*not a valid"),
    "rng host cuda-sized": (("rng", "host"), torch.zeros(16, dtype=torch.uint8), "'rng'.*16 bytes"),
    "rng host floats": (("rng", "host"), torch.zeros(5056), "'rng'.*'host'"),
    "rng host text": (("rng", "host"), "seed 84", "'rng'"),
    "rng aug missing": (("rng", "aug"), DELETE, "'rng'.*'aug'"),
    "optimizer text": (("optimizer",), "sgd", "'optimizer'"),
    "optimizer no slow": (("optimizer", "slow"), DELETE, "'optimizer'"),
    "optimizer slow empty": (("optimizer", "slow"), [], "'optimizer'"),
    "optimizer no groups": (("optimizer", "base", "param_groups"), [], "'optimizer'"),
    "optimizer lr text": (("optimizer", "base", "param_groups", 0, "lr"), "fast", "'optimizer'"),
    "optimizer k 0": (("optimizer", "k"), 0, "'optimizer'"),
    "optimizer step_count text": (("optimizer", "step_count"), "three", "'optimizer'"),
    "optimizer momentum misshapen": (("optimizer", "base", "state", 0, "momentum_buffer"), torch.zeros(7),
                                     "'optimizer'"),
    "scheduler a list": (("scheduler",), [1], "'scheduler'"),
    "scheduler total_steps text": (("scheduler", "total_steps"), "x", "'scheduler'"),
    "scheduler phases null": (("scheduler", "_schedule_phases"), None, "'scheduler'"),
    "scheduler past its end": (("scheduler", "last_epoch"), 10 ** 6, "'scheduler'"),
    "epoch text": (("epoch",), "1", "'epoch'"),
    "epoch negative": (("epoch",), -1, "'epoch'"),
    "epoch past the end": (("epoch",), 99, "'epoch'"),
    "epoch true": (("epoch",), True, "'epoch'"),
    "metrics a dict": (("metrics",), {}, "'metrics'"),
    "metrics too short": (("metrics",), [], "'metrics'"),
    "metrics row text": (("metrics", 0), "row", "'metrics'"),
    "metrics seconds text": (("metrics", 0, "seconds"), "slow", "'metrics'"),
    "best null": (("best",), None, "'best'"),
    "best regular text": (("best", "regular"), "x", "'best'"),
    "best epoch float": (("best", "ema_epoch"), 1.5, "'best'"),
    "precision fp64": (("precision",), "fp64", "'precision'"),
    "fp16 without scaler state": (("precision",), "fp16", "'scaler'"),
    "scaler a list": (("scaler",), [], "'scaler'"),
    "model tensor reshaped": (("model", "head.weight"), torch.zeros(3), "'model'.*head.weight"),
    "model tensor integer": (("model", "head.weight"), torch.zeros(10, 8, dtype=LONG), "'model'.*head.weight"),
    "model extra tensor": (("model", "extra"), torch.zeros(1), "'model'"),
    "model a list": (("model",), [], "'model'"),
    "ema tensor reshaped": (("ema", "module.head.weight"), torch.zeros(1), "'ema'"),
    "ema no counter": (("ema", "n_averaged"), DELETE, "'ema'.*n_averaged"),
    "ema a number": (("ema",), 0.999, "'ema'"),
    "arch of another config": (("arch", "widths"), [8, 8, 8], "another config"),
    "arch text": (("arch",), "resnet", "'arch'"),
}


@pytest.mark.parametrize("where, value, match", table(RESUME_BAD))
def test_resume_checkpoint_bad(runs, tmp_path, where, value, match):
    run_dir = copy_run(runs, "partial", tmp_path)
    path = run_dir / "last.pt"
    save_checkpoint(changed(raw_ckpt(path), where, value), path, keep_previous=False)
    msg = fails(lambda: resume(run_dir), path, CheckpointError, match)
    assert f"cannot resume {run_dir}" in msg


def resumes(runs, run_dir: Path, cfg=None):
    """RunDir.resume accepts last.pt into a Trainer, and one step works with it."""
    cfg = cfg or runs["cfg"]
    trainer = resume(run_dir, cfg, runs["dataset"])
    if trainer.epoch < cfg.epochs:
        x, y = next(trainer.epoch_batches(0.0))
        trainer.train_step(x, y)
    return trainer


RESUME_ODD = {   # odd but valid
    "no precision (older file)": (("precision",), DELETE),
    "no scaler (fp32)": (("scaler",), DELETE),
    "no config": (("config",), DELETE),
    "no arch": (("arch",), DELETE),
    "an extra metrics column": (("metrics", 0, "note"), "hand-added"),
    "float64 weights": (("model", "head.bias"), torch.zeros(10, dtype=torch.float64)),
    "an extra top-level key": (("comment",), "hello"),
}


@pytest.mark.parametrize("where, value", table(RESUME_ODD))
def test_resume_checkpoint_odd_but_valid(runs, tmp_path, where, value):
    run_dir = copy_run(runs, "partial", tmp_path)
    path = run_dir / "last.pt"
    save_checkpoint(changed(raw_ckpt(path), where, value), path, keep_previous=False)
    assert resumes(runs, run_dir).epoch == 1


def test_resume_of_a_finished_run_and_without_config_json(runs, tmp_path):
    assert resumes(runs, copy_run(runs, "finished", tmp_path)).epoch == 2   # no step left to try
    run_dir = copy_run(runs, "partial", tmp_path / "b")
    (run_dir / "config.json").unlink()                   # the checkpoint's own config is used
    assert resumes(runs, run_dir).epoch == 1
    ckpt = raw_ckpt(run_dir / "last.pt")
    save_checkpoint(dict(ckpt, config=dict(ckpt["config"], epochs="x")), run_dir / "last.pt", keep_previous=False)
    fails(lambda: resume(run_dir, runs["cfg"]), run_dir / "last.pt", CheckpointError, "field 'config'")


def test_resume_without_ema_config(runs, tmp_path):
    """A config without EMA resumes a last.pt whose 'ema' is None, as Trainer writes it."""
    from samlib.run import train
    cfg = resolve("se", "smoke", **dict(TINY, epochs="2"))
    run = train(cfg, dataset=runs["dataset"], out=tmp_path, device="cpu", progress=False, stop_after=1)
    assert raw_ckpt(run / "last.pt")["ema"] is None
    resumes(runs, run, cfg)


# ============================================================== property tests

OPS = st.lists(st.tuples(st.sampled_from(["flip", "truncate", "insert", "delete", "zero"]),
                         st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=8)),
               min_size=1, max_size=4)


def mutate_bytes(data: bytes, ops) -> bytes:
    data = bytearray(data)
    for op, where, chunk in ops:
        i = int(where * len(data)) if data else 0
        if op == "flip" and data:
            data[i] ^= chunk[0] or 0xFF
        elif op == "truncate":
            del data[i:]
        elif op == "insert":
            data[i:i] = chunk
        elif op == "delete":
            del data[i:i + len(chunk)]
        elif op == "zero":
            data[i:i + len(chunk)] = bytes(len(data[i:i + len(chunk)]))
    return bytes(data)


ODD_TEXT = st.sampled_from(["\ud800", "\udfff", "", " ", "\x00", "a\nb", "é", "😀", "NaN", "1e999", "[]"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True),
                    st.text(max_size=8), ODD_TEXT, st.binary(max_size=8))
JSON_VALUES = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70),
                                     st.floats(allow_nan=False), st.text(max_size=8), ODD_TEXT),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                           max_leaves=6)
DTYPES = st.sampled_from([np.uint8, np.int8, np.int64, np.uint64, np.float32, np.bool_, np.complex64, object,
                          "S3", "U2", ">u2"])
SHAPES = st.sampled_from([(), (0,), (2,), (1,), (2, 1), (2, 3072), (3, 3072), (2, 32, 32, 3), (0, 3072)])
ARRAYS = st.builds(lambda shape, dtype: np.zeros(shape, dtype), SHAPES, DTYPES)
TENSORS = st.builds(lambda shape, dtype: torch.zeros(shape, dtype=dtype),
                    st.sampled_from([(), (0,), (1,), (3,), (10,), (10, 32), (5056,), (16,)]),
                    st.sampled_from([torch.float32, torch.float64, torch.int64, torch.uint8, torch.bool]))
PICKLE_VALUES = st.recursive(st.one_of(SCALARS, ARRAYS), lambda c: st.lists(c, max_size=3)
                             | st.dictionaries(st.binary(max_size=4), c, max_size=3)
                             | st.builds(tuple, st.lists(c, max_size=2)), max_leaves=6)
CKPT_VALUES = st.recursive(st.one_of(SCALARS, TENSORS), lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=5)


def paths(obj, prefix=(), depth=4):
    """Every entry of a nested dict/list (lists: their first two items), as key paths."""
    found = []
    items = (obj.items() if isinstance(obj, dict) else enumerate(obj[:2]) if isinstance(obj, list) else ())
    for key, value in items:
        found.append(prefix + (key,))
        if depth > 1:
            found += paths(value, prefix + (key,), depth - 1)
    return found


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory):
    """Valid files to mutate: a CIFAR folder (write_cifar10), a Kaggle pickle."""
    base = tmp_path_factory.mktemp("valid")
    folder = D.write_cifar10(base / "cifar", D.synthetic_cifar10(n_train=20, n_test=10, seed=3))
    kaggle_path = base / "k.pkl"
    x = D.synthetic_cifar10(n_train=10, n_test=4, seed=4).test_images
    kaggle_path.write_bytes(pickle.dumps({b"data": x, b"ids": list(range(4))}))
    return {"cifar": folder, "kaggle": kaggle_path}


@FUZZ
@given(ops=OPS, protocol=st.sampled_from([2, 5]))
def test_kaggle_pickle_byte_mutations(valid_files, tmp_path, ops, protocol):
    path = tmp_path / "k.pkl"
    obj = pickle.loads(valid_files["kaggle"].read_bytes())
    path.write_bytes(mutate_bytes(pickle.dumps(obj, protocol=protocol), ops))
    works_or_fails_cleanly(lambda: D.load_unlabeled(path), path)


@FUZZ
@given(data=st.data())
def test_kaggle_pickle_value_mutations(valid_files, tmp_path, data):
    obj = pickle.loads(valid_files["kaggle"].read_bytes())
    obj[b"ids"] = [int(i) for i in obj[b"ids"]]
    where = data.draw(st.sampled_from(paths(obj, depth=2)))
    path = tmp_path / "k.pkl"
    path.write_bytes(pickle.dumps(changed(obj, where, data.draw(PICKLE_VALUES)), protocol=2))
    works_or_fails_cleanly(lambda: D.load_unlabeled(path), path)


CIFAR_FILES = st.sampled_from([*D.TRAIN_FILES, "test_batch", "batches.meta"])


def _cifar_probe(folder, name, payload: bytes):
    path = folder / name
    valid = path.read_bytes()
    path.write_bytes(payload)
    try:
        ds = works_or_fails_cleanly(lambda: D.load_cifar10(folder), folder)
        if ds is not None:
            assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int64
            assert ds.train_labels.min() >= 0 and ds.train_labels.max() <= 9 and len(ds.classes) == 10
    finally:
        path.write_bytes(valid)


@FUZZ
@given(name=CIFAR_FILES, ops=OPS)
def test_cifar_byte_mutations(valid_files, name, ops):
    folder = valid_files["cifar"]
    _cifar_probe(folder, name, mutate_bytes((folder / name).read_bytes(), ops))


@FUZZ
@given(name=CIFAR_FILES, data=st.data())
def test_cifar_value_mutations(valid_files, name, data):
    folder = valid_files["cifar"]
    obj = pickle.loads((folder / name).read_bytes(), encoding="bytes")
    where = data.draw(st.sampled_from(paths(obj, depth=2)))
    _cifar_probe(folder, name, pickle.dumps(changed(obj, where, data.draw(PICKLE_VALUES)), protocol=2))


RUN_FILES = st.sampled_from(["config.json", "run.json", "final.json", "provenance.json", "metrics.csv"])


def _run_probe(runs, run_dir: Path, name: str, payload: bytes):
    path = run_dir / name
    valid = path.read_bytes()
    path.write_bytes(payload)
    try:
        works_or_fails_cleanly(lambda: load_run(run_dir), path)
        if name == "run.json":
            try:
                RunDir(run_dir).check_data(runs["data_id"])
            except SamlibError as e:   # other data (the fingerprint changed) is not a damaged file
                assert isinstance(e, EXPECTED) or "trained on other data" in str(e), str(e)
        if name == "config.json":   # (a valid config of another model: last.pt is named instead)
            works_or_fails_cleanly(lambda: resume(run_dir), run_dir)
    finally:
        path.write_bytes(valid)


@pytest.fixture(scope="module")
def fuzz_run(runs, tmp_path_factory):
    return copy_run(runs, "finished", tmp_path_factory.mktemp("fuzz"))


@FUZZ
@given(name=RUN_FILES, ops=OPS)
def test_run_file_byte_mutations(runs, fuzz_run, name, ops):
    _run_probe(runs, fuzz_run, name, mutate_bytes((fuzz_run / name).read_bytes(), ops))


@FUZZ
@given(name=RUN_FILES.filter(lambda n: n.endswith(".json")), data=st.data())
def test_run_file_value_mutations(runs, fuzz_run, name, data):
    obj = json.loads((fuzz_run / name).read_text())
    where = data.draw(st.sampled_from(paths(obj, depth=3)))
    new = changed(obj, where, data.draw(st.one_of(JSON_VALUES, st.just(DELETE))))
    _run_probe(runs, fuzz_run, name, json.dumps(new).encode())


@FUZZ
@given(name=st.sampled_from(["best_regular.pt", "best_ema.pt", "last.pt"]), ops=OPS, sidecar=st.booleans())
def test_checkpoint_byte_mutations(runs, fuzz_run, name, ops, sidecar):
    """Mutated checkpoints (sidecar dropped, so torch meets the bytes) or mutated sidecars."""
    path, side = fuzz_run / name, fuzz_run / f"{name}.sha256"
    valid, valid_side = path.read_bytes(), side.read_bytes()
    if sidecar:
        side.write_bytes(mutate_bytes(valid_side, ops))
    else:
        side.unlink()
        path.write_bytes(mutate_bytes(valid, ops))
    try:
        if name == "last.pt":
            works_or_fails_cleanly(lambda: load_checkpoint(path, fallback=False), path)
            works_or_fails_cleanly(lambda: resume(fuzz_run), fuzz_run)  # (.prev)
        else:
            works_or_fails_cleanly(lambda: load_model(path), path)
    finally:
        path.write_bytes(valid)
        side.write_bytes(valid_side)


@pytest.fixture(scope="module")
def fuzz_partial(runs, tmp_path_factory):
    run_dir = copy_run(runs, "partial", tmp_path_factory.mktemp("fuzzp"))
    return run_dir, raw_ckpt(run_dir / "last.pt"), raw_ckpt(run_dir / "best_regular.pt")


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_resume_checkpoint_value_mutations(runs, fuzz_partial, data):
    """A value of last.pt replaced (or deleted): RunDir.resume refuses it, or Trainer really
    continues from it (load_state_dict and a step)."""
    run_dir, ckpt, _ = fuzz_partial
    top = data.draw(st.sampled_from([k for k in ckpt if k not in ("config", "format")]))
    where = data.draw(st.sampled_from([p for p in paths(ckpt, depth=5) if p[0] == top]))
    path = run_dir / "last.pt"
    save_checkpoint(changed(ckpt, where, data.draw(st.one_of(CKPT_VALUES, st.just(DELETE)))), path,
                    keep_previous=False)
    works_or_fails_cleanly(lambda: resumes(runs, run_dir), path)


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_model_checkpoint_value_mutations(runs, fuzz_partial, data):
    run_dir, _, best = fuzz_partial
    where = data.draw(st.sampled_from([p for p in paths(best, depth=2) if p[0] != "format"]))
    path = run_dir / "best_regular.pt"
    save_checkpoint(changed(best, where, data.draw(st.one_of(CKPT_VALUES, st.just(DELETE)))), path,
                    keep_previous=False)
    model = works_or_fails_cleanly(lambda: load_model(path), path)
    if model is not None:
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
