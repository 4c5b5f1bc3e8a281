"""Tests for samlib.data: expected values are built by hand, not captured from the code."""
import importlib.util
import io
import os
import pickle
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from samlib import data as D
from samlib.config import resolve
from samlib.errors import ConfigError, DataError
from samlib.unpickle import safe_pickle_load

REAL = Path(__file__).resolve().parents[1] / "data" / "cifar-10-batches-py"


def batch(n, label=0, value=0):
    """A hand-built python batch: n channel-planar rows, all pixels `value`."""
    return {b"batch_label": b"x", b"labels": [label] * n,
            b"data": np.full((n, 3072), value, np.uint8)}


def write_folder(root, train=None, test=None, meta=None, skip=()):
    """Write a cifar-10-batches-py folder by hand (independent of write_cifar10)."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    files = {f"data_batch_{i}": batch(2, label=i) for i in range(1, 6)}
    files.update(train or {})
    files["test_batch"] = test if test is not None else batch(3, label=9)
    files["batches.meta"] = meta if meta is not None else {
        b"label_names": [c.encode() for c in D.CLASSES]}
    for name, obj in files.items():
        if name not in skip:
            payload = obj if isinstance(obj, bytes) else pickle.dumps(obj, protocol=2)
            (folder / name).write_bytes(payload)
    return folder


class Evil:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


# ---- constants and statistics -------------------------------------------------------

def test_constants():
    assert D.CLASSES == ("airplane", "automobile", "bird", "cat", "deer",
                         "dog", "frog", "horse", "ship", "truck")
    assert D.CIFAR_MEAN == (0.4914, 0.4822, 0.4465)
    assert D.STD_AS_RUN == (0.2023, 0.1994, 0.2010)
    assert D.STD_TRUE == (0.2470, 0.2435, 0.2616)


def test_official_md5s_match_torchvision_source():
    spec = importlib.util.find_spec("torchvision")  # locates without importing torch
    if spec is None:
        pytest.skip("torchvision not installed")
    src = (Path(spec.origin).parent / "datasets" / "cifar.py").read_text()
    for name, md5 in D.OFFICIAL_MD5.items():
        assert re.search(rf"{re.escape(name)}.{{0,80}}{md5}", src, re.S), name


def test_channel_stats_by_hand():
    x = np.zeros((3, 32, 32, 3), np.uint8)
    x[1, ..., 0] = 255          # red: 0, 255, 0 -> mean 1/3, std sqrt(2)/3
    x[..., 1] = 51              # green constant 0.2
    x[2, :16, :, 2] = 255       # blue: half of one image of three -> mean 1/6
    for chunk in (1, 2, 4096):
        mean, std = D.channel_stats(x, chunk=chunk)
        np.testing.assert_allclose(mean, (1 / 3, 0.2, 1 / 6), atol=1e-12)
        np.testing.assert_allclose(std, (np.sqrt(2) / 3, 0.0, np.sqrt(1 / 6 * 5 / 6)), atol=1e-6)


# ---- CIFAR-10 python batches ----------------------------------------------------------

def test_round_trip(tmp_path, capsys):
    ds = D.synthetic_cifar10(n_train=103, n_test=21, seed=3)
    folder = D.write_cifar10(tmp_path, ds)
    assert folder == tmp_path / "cifar-10-batches-py"
    sizes = [len(pickle.loads((folder / f"data_batch_{i}").read_bytes())[b"labels"])
             for i in range(1, 6)]
    assert sizes == [21, 21, 21, 20, 20]
    for where in (tmp_path, folder, str(tmp_path)):
        got = D.load_cifar10(where)
        for name in ("train_images", "train_labels", "test_images", "test_labels"):
            a, b = getattr(got, name), getattr(ds, name)
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), name
        assert got.classes == D.CLASSES
        assert got.train_images.dtype == np.uint8 and got.train_labels.dtype == np.int64
    assert "CIFAR10(train=103, test=21" in repr(got)


def test_round_trip_with_empty_batches(tmp_path, capsys):
    ds = D.synthetic_cifar10(n_train=3, n_test=2)
    got = D.load_cifar10(D.write_cifar10(tmp_path, ds))  # data_batch_4, 5 hold no images
    assert np.array_equal(got.train_images, ds.train_images)
    assert np.array_equal(got.train_labels, ds.train_labels)
    with pytest.raises(ConfigError, match="batches"):
        D.write_cifar10(tmp_path, ds, batches=0)


def test_planar_rows_become_hwc(tmp_path):
    row = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.full(1024, 30)])
    row[:1024] = np.arange(1024) // 32 * 7 % 256     # red value = 7 * row index
    test = {b"labels": [4], b"data": row.astype(np.uint8)[None]}
    write_folder(tmp_path, test=test)
    img = D.load_cifar10(tmp_path).test_images[0]
    assert img.shape == (32, 32, 3)
    assert (img[..., 1] == 20).all() and (img[..., 2] == 30).all()
    assert img[5, 17, 0] == 35 and img[31, 0, 0] == 7 * 31 and (img[3, :, 0] == 21).all()


def test_md5_notice_printed_once(tmp_path, capsys):
    write_folder(tmp_path)
    ds = D.load_cifar10(tmp_path)
    out = capsys.readouterr().out
    assert out.count("note:") == 1 and "MD5" in out
    assert len(ds.train_labels) == 10 and list(ds.train_labels) == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert list(ds.test_labels) == [9, 9, 9]


def test_numpy1_global_and_str_keys_accepted(tmp_path):
    """The official files name numpy.core.multiarray._reconstruct (numpy 1.x spelling)."""
    blob = pickle.dumps({"data": np.arange(6, dtype=np.uint8), "labels": [1]}, protocol=2)
    blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray\n_reconstruct" in blob
    got = safe_pickle_load(io.BytesIO(blob))
    assert np.array_equal(got["data"], np.arange(6))
    for protocol in (2, 3, 4, 5):
        obj = {b"x": np.arange(4, dtype=np.int64).reshape(2, 2), b"s": np.int64(3)}
        got = safe_pickle_load(io.BytesIO(pickle.dumps(obj, protocol=protocol)))
        assert np.array_equal(got[b"x"], [[0, 1], [2, 3]]) and got[b"s"] == 3


def test_missing_folder_explains_download(tmp_path):
    with pytest.raises(DataError) as e:
        D.load_cifar10(tmp_path / "nowhere")
    msg = str(e.value)
    assert "download=True" in msg and "--download" in msg and D.URL in msg
    assert "cifar-10-batches-py" in msg and "make_cifar10.py" in msg


def test_download_failure_and_success(tmp_path, monkeypatch):
    def offline(root, train, download):
        raise OSError("no network")
    fake = types.SimpleNamespace(datasets=types.SimpleNamespace(CIFAR10=offline))
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    with pytest.raises(DataError, match="could not download.*no network.*make_cifar10"):
        D.load_cifar10(tmp_path, download=True)

    def fetch(root, train, download):
        D.write_cifar10(root, D.synthetic_cifar10(n_train=20, n_test=10))
    fake.datasets.CIFAR10 = fetch
    assert len(D.load_cifar10(tmp_path, download=True).train_labels) == 20


def test_missing_batch_named(tmp_path):
    write_folder(tmp_path, skip=("data_batch_3",))
    with pytest.raises(DataError, match="missing data_batch_3;"):
        D.load_cifar10(tmp_path)


@pytest.mark.parametrize("bad, match", [
    ({b"labels": [10, 0], b"data": np.zeros((2, 3072), np.uint8)}, "0..9"),
    ({b"labels": [-1, 0], b"data": np.zeros((2, 3072), np.uint8)}, "0..9"),
    ({b"labels": [0], b"data": np.zeros((2, 3072), np.uint8)}, "labels must be 2 integers"),
    ({b"labels": [0.5, 1.0], b"data": np.zeros((2, 3072), np.uint8)}, "integers"),
    ({b"labels": [0, 0], b"data": np.zeros((2, 3072), np.float32)}, "float32.*uint8"),
    ({b"labels": [0, 0], b"data": np.zeros((2, 1024), np.uint8)}, r"\(2, 1024\).*3072"),
    ({b"labels": [0, 0], b"data": [[0] * 3072] * 2}, "list.*uint8"),
    ({b"data": np.zeros((2, 3072), np.uint8)}, "labels"),
    ([1, 2, 3], "expected a pickled dict"),
])
def test_bad_batch_contents(tmp_path, bad, match):
    write_folder(tmp_path, train={"data_batch_2": bad})
    with pytest.raises(DataError, match=match) as e:
        D.load_cifar10(tmp_path)
    assert "data_batch_2" in str(e.value)


def test_bad_meta_and_empty_splits(tmp_path):
    write_folder(tmp_path / "a", meta={b"label_names": [b"cat"]})
    with pytest.raises(DataError, match="batches.meta.*10 label_names"):
        D.load_cifar10(tmp_path / "a")
    write_folder(tmp_path / "b", test=batch(0))
    with pytest.raises(DataError, match="must each hold images"):
        D.load_cifar10(tmp_path / "b")


@pytest.mark.parametrize("payload", [b"", pickle.dumps(batch(4), protocol=2)[:500],
                                     b"not a pickle at all"])
def test_empty_or_truncated_batch(tmp_path, payload):
    write_folder(tmp_path, train={"data_batch_4": payload})
    with pytest.raises(DataError, match="data_batch_4: truncated or not a pickle"):
        D.load_cifar10(tmp_path)


@pytest.mark.parametrize("func, arg", [(os.system, "touch {m}"),
                                       (exec, "open('{m}', 'w').close()"),
                                       (eval, "open('{m}', 'w').close()")])
def test_malicious_batch_refused(tmp_path, func, arg):
    marker = tmp_path / "MARKER"
    evil = {b"labels": [0], b"data": Evil(func, arg.format(m=marker))}
    write_folder(tmp_path / "root", train={"data_batch_1": evil})
    with pytest.raises(DataError, match="refusing to unpickle .* may be malicious") as e:
        D.load_cifar10(tmp_path / "root")
    assert "data_batch_1" in str(e.value)
    assert not marker.exists()


# ---- Kaggle unlabeled file ---------------------------------------------------------------

def dump(path, obj):
    path.write_bytes(pickle.dumps(obj))
    return path


def test_unlabeled_hwc_layout(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    images, ids = D.load_unlabeled(dump(tmp_path / "k.pkl", {b"data": x, b"ids": [7, 3, 9, 1, 0]}))
    assert images.dtype == np.uint8 and np.array_equal(images, x)
    assert list(ids) == [7, 3, 9, 1, 0]


def test_unlabeled_flat_layout_and_str_keys(tmp_path):
    row = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.full(1024, 30)])
    flat = np.stack([row, row + 1]).astype(np.int64)        # int64 within 0..255: converted
    images, ids = D.load_unlabeled(dump(tmp_path / "k.pkl", {"data": flat, "ids": ["a", "b"]}))
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert (images[0, ..., 0] == 10).all() and (images[1, ..., 2] == 31).all()
    assert list(ids) == ["a", "b"]


def test_unlabeled_without_ids(tmp_path, capsys):
    x = np.zeros((4, 32, 32, 3), np.uint8)
    _, ids = D.load_unlabeled(dump(tmp_path / "k.pkl", {b"data": x}))
    assert list(ids) == [0, 1, 2, 3]
    assert capsys.readouterr().out.count("note:") == 1


@pytest.mark.parametrize("obj, match", [
    ([np.zeros((2, 32, 32, 3), np.uint8)], "expected a pickled dict"),
    ({b"ids": [1, 2]}, "no b'data'.*cifar_test_nolabel"),
    ({b"data": np.zeros((2, 28, 28, 3), np.uint8)}, r"\(2, 28, 28, 3\).*32x32x3"),
    ({b"data": np.zeros((2, 3, 32, 32), np.uint8)}, "32x32x3"),
    ({b"data": np.zeros((0, 32, 32, 3), np.uint8)}, "N >= 1"),
    ({b"data": np.zeros((2, 32, 32, 3), np.float32)}, "float32.*uint8 pixel values 0..255"),
    ({b"data": np.full((2, 32, 32, 3), 256, np.int64)}, "uint8 pixel values 0..255"),
    ({b"data": np.zeros((3, 32, 32, 3), np.uint8), b"ids": [1, 2]}, "one id per image"),
    ({b"data": np.zeros((3, 32, 32, 3), np.uint8), b"ids": [4, 5, 4]}, "unique.*e.g. 4"),
    ({b"data": [[1, 2], [3]]}, "cannot be read as an array"),
])
def test_unlabeled_errors(tmp_path, obj, match):
    with pytest.raises(DataError, match=match):
        D.load_unlabeled(dump(tmp_path / "k.pkl", obj))


def test_unlabeled_missing_empty_truncated(tmp_path):
    with pytest.raises(DataError, match="not found.*Kaggle"):
        D.load_unlabeled(tmp_path / "absent.pkl")
    (tmp_path / "empty.pkl").write_bytes(b"")
    with pytest.raises(DataError, match="empty.pkl: truncated or not a pickle"):
        D.load_unlabeled(tmp_path / "empty.pkl")
    blob = pickle.dumps({b"data": np.zeros((9, 32, 32, 3), np.uint8)})
    (tmp_path / "cut.pkl").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="cut.pkl: truncated or not a pickle"):
        D.load_unlabeled(tmp_path / "cut.pkl")


@pytest.mark.parametrize("func", [os.system, exec, __import__("subprocess").Popen])
def test_malicious_kaggle_file_refused(tmp_path, func):
    marker = tmp_path / "MARKER"
    arg = f"touch {marker}" if func is os.system else (
        f"open('{marker}', 'w').close()" if func is exec else ["touch", str(marker)])
    path = dump(tmp_path / "k.pkl", {b"data": Evil(func, arg), b"ids": [0]})
    with pytest.raises(DataError, match=r"refusing to unpickle \S+ from .*k\.pkl.*malicious"):
        D.load_unlabeled(path)
    assert not marker.exists()


# ---- splits, subsets, synthetic data -------------------------------------------------

def test_split_stratified_by_hand():
    labels = np.repeat(np.arange(10), 10)
    train, val = D.split_train_val(labels, val_size=20, seed=0)
    assert np.bincount(labels[val], minlength=10).tolist() == [2] * 10
    assert train.dtype == val.dtype == np.int64
    assert (np.diff(train) > 0).all() and (np.diff(val) > 0).all()
    assert not set(train) & set(val) and sorted({*train, *val}) == list(range(100))
    # unbalanced: 50/30/20 of 100 with val 10 -> exactly 5/3/2
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    _, val = D.split_train_val(labels, val_size=10, seed=1)
    assert np.bincount(labels[val]).tolist() == [5, 3, 2]
    # 3 classes of 1/3 each, val 2: rounding still gives exactly 2
    assert len(D.split_train_val([0, 1, 2], val_size=2)[1]) == 2


def test_split_seeds():
    labels = np.repeat(np.arange(10), 50)
    a = D.split_train_val(labels, 50, seed=5)
    b = D.split_train_val(labels, 50, seed=5)
    c = D.split_train_val(labels, 50, seed=6)
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])
    assert not np.array_equal(a[1], c[1])


def test_split_edges():
    train, val = D.split_train_val([3, 1, 2], val_size=0)
    assert train.tolist() == [0, 1, 2] and val.size == 0 and val.dtype == np.int64
    for bad in (3, 4, -1, 0.5):
        with pytest.raises(ConfigError, match="val_size"):
            D.split_train_val([3, 1, 2], val_size=bad)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=2, max_size=200), st.data())
def test_split_properties(labels, data):
    labels = np.array(labels)
    k = data.draw(st.integers(1, len(labels) - 1))
    train, val = D.split_train_val(labels, val_size=k, seed=data.draw(st.integers(0, 9)))
    assert len(val) == k and len(train) + k == len(labels)
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(labels)))
    for c in np.unique(labels):  # each class within one of its exact share
        exact = k * (labels == c).sum() / len(labels)
        assert abs((labels[val] == c).sum() - exact) < 1


def test_subset_stratified_and_consistent():
    rng = np.random.default_rng(0)
    y = rng.permutation(np.repeat(np.arange(10), 30)).astype(np.int64)
    x = np.broadcast_to((y * 20).astype(np.uint8)[:, None, None, None], (300, 32, 32, 3)).copy()
    ds = D.CIFAR10(x, y, x[:100], y[:100], D.CLASSES)
    s = D.subset(ds, n_train=50, n_test=None, seed=2)
    assert np.bincount(s.train_labels).tolist() == [5] * 10
    assert (s.train_images[:, 0, 0, 0] == s.train_labels * 20).all()
    assert s.test_images is ds.test_images
    assert np.array_equal(D.subset(ds, 50, seed=2).train_labels, s.train_labels)
    assert len(D.subset(ds, 1000, 1000).train_labels) == 300
    with pytest.raises(ConfigError):    # samlib.config validates the subset sizes
        resolve("final", "smoke", train_subset=0)


def test_synthetic_is_balanced_deterministic_and_learnable():
    ds = D.synthetic_cifar10(n_train=200, n_test=100, seed=1)
    assert ds.train_images.shape == (200, 32, 32, 3) and ds.train_images.dtype == np.uint8
    assert ds.test_images.shape == (100, 32, 32, 3) and ds.test_labels.dtype == np.int64
    assert np.bincount(ds.train_labels).tolist() == [20] * 10
    assert np.array_equal(D.synthetic_cifar10(200, 100, seed=1).train_images, ds.train_images)
    assert not np.array_equal(D.synthetic_cifar10(200, 100, seed=2).train_images, ds.train_images)
    # a nearest-class-mean classifier already separates the classes
    flat = ds.train_images.reshape(200, -1).astype(np.float64)
    means = np.stack([flat[ds.train_labels == c].mean(0) for c in range(10)])
    test = ds.test_images.reshape(100, -1).astype(np.float64)
    pred = ((test[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (pred == ds.test_labels).mean() > 0.9


# ---- the real copy, when built ---------------------------------------------------------

@pytest.mark.skipif(not REAL.is_dir(), reason=f"no real CIFAR-10 copy at {REAL} "
                    "(build it with python ../shared/data/make_cifar10.py data/)")
def test_real_copy():
    ds = D.load_cifar10(REAL.parent)
    assert ds.train_images.shape == (50000, 32, 32, 3)
    assert ds.test_images.shape == (10000, 32, 32, 3)
    assert np.bincount(ds.train_labels).tolist() == [5000] * 10
    assert np.bincount(ds.test_labels).tolist() == [1000] * 10
    assert ds.classes == D.CLASSES
    mean, std = D.channel_stats(ds.train_images)
    np.testing.assert_allclose(mean, D.CIFAR_MEAN, atol=0.01)
    np.testing.assert_allclose(std, D.STD_TRUE, atol=0.01)
