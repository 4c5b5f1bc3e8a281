"""CIFAR-10 (uint8 (N, 32, 32, 3) images, int64 labels 0..9): the folder on disk (its pickles are read
by samlib.unpickle), the normalisation constants, splits and synthetic data."""
import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from samlib.errors import ConfigError, DataError
from samlib.unpickle import read_batch, read_class_names, read_kaggle

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # reference code and paper
STD_AS_RUN = (0.2023, 0.1994, 0.2010)  # the widely copied std the reference code ran with
STD_TRUE = (0.2470, 0.2435, 0.2616)    # true per-channel std of the training set

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
OFFICIAL_MD5 = dict(zip((*TRAIN_FILES, "test_batch", "batches.meta"), (   # as in torchvision.datasets.CIFAR10
    "c99cafc152244af753f735de768cd75f", "d4bba439e000b95fd0a9bffe97cbabec",
    "54ebc095f3ab1f0389bbae665268c751", "634d18415352ddfa80567beed471001a",
    "482c414d41f54cd18b22e5b47cb7c3cb", "40351d587109b95175f43aff81a1287e",
    "5ff9c542aee3614f3951f8cda6e48888")))


@dataclass(frozen=True, eq=False, repr=False)
class CIFAR10:
    """CIFAR-10-shaped data: uint8 (N, 32, 32, 3) images, int64 labels, class names."""
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple = CLASSES

    def __repr__(self):
        return f"CIFAR10(train={len(self.train_labels)}, test={len(self.test_labels)}, classes={len(self.classes)})"


def fingerprint(dataset: CIFAR10) -> str:
    """A short hash of the data (labels, shapes, strided image sample): a cached run is never reused for other data."""
    h = hashlib.sha256()
    for array in (dataset.train_labels, dataset.test_labels, dataset.train_images[::50], dataset.test_images[::50]):
        h.update(str(array.shape).encode())
        h.update(np.ascontiguousarray(array).tobytes())
    return h.hexdigest()[:12]


def channel_stats(images, chunk=4096):
    """Per-channel mean and (population) std of uint8 HWC images, in [0, 1] units (float64)."""
    images = np.asarray(images)
    s, ss, n = np.zeros(3), np.zeros(3), 0
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].reshape(-1, 3).astype(np.float64)
        s, ss, n = s + x.sum(0), ss + (x * x).sum(0), n + len(x)
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean ** 2, 0.0))
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())


def _guidance(root):
    return (f"put the CIFAR-10 python batches in {Path(root) / FOLDER} (extract {URL} into "
            f"{root}), or pass download=True (CLI: --download) to fetch them, or build the "
            f"offline copy with `python ../shared/data/make_cifar10.py {root}`")


def has_official_md5(root) -> bool:
    """True when every file under root/cifar-10-batches-py (or root itself) has its official MD5."""
    folder = Path(root) if Path(root).name == FOLDER else Path(root) / FOLDER
    try:
        return all(hashlib.md5((folder / f).read_bytes()).hexdigest() == md5 for f, md5 in OFFICIAL_MD5.items())
    except OSError:      # missing, a folder or unreadable: not the official files
        return False


def _kind(path: Path) -> str:
    """"file", "folder", "missing", or why it cannot be looked at."""
    try:
        return "file" if path.is_file() else "folder" if path.is_dir() else "missing"
    except OSError as e:          # e.g. a folder on the way without search permission
        return f"unreadable ({e.strerror or e})"


def describe_source(dataset: CIFAR10, data_dir=None) -> str:
    """The data-source label every reported number carries: official files, JPEG copy, synthetic or in-memory."""
    if data_dir is None:
        return f"in-memory dataset ({len(dataset.train_labels)} train / {len(dataset.test_labels)} test)"
    if has_official_md5(data_dir):
        return "CIFAR-10 (official files)"
    if len(dataset.train_labels) == 50000 and len(dataset.test_labels) == 10000:
        return "CIFAR-10 (JPEG copy)"
    return (f"synthetic CIFAR-shaped data ({len(dataset.train_labels)} train / "
            f"{len(dataset.test_labels)} test), not CIFAR-10")


def load_cifar10(root, download=False):
    """Read root/cifar-10-batches-py (or that folder itself) into a CIFAR10; files without the official
    MD5 sums (the JPEG copy, write_cifar10's) load with a notice."""
    if root is None:
        raise DataError("no CIFAR-10 folder given; " + _guidance("data"))
    folder = Path(root) if Path(root).name == FOLDER else Path(root) / FOLDER
    root = folder.parent
    kind = _kind(folder)
    if kind != "folder":
        if not download or kind != "missing":
            why = {"missing": "not found", "file": "not a folder"}.get(kind, kind)
            raise DataError(f"CIFAR-10 {why} at {folder}: " + _guidance(root))
        try:
            import torchvision
            torchvision.datasets.CIFAR10(str(root), train=True, download=True)
        except Exception as e:
            raise DataError(f"could not download CIFAR-10 ({type(e).__name__}: {e}); " + _guidance(root)) from None
    missing = [f for f in OFFICIAL_MD5 if _kind(folder / f) == "missing"]
    if missing:   # (a folder or an unreadable file in a file's place: safe_pickle_load names it)
        raise DataError(f"{folder} is missing {', '.join(missing)}; " + _guidance(root))
    if not has_official_md5(folder):
        print(f"note: {FOLDER} does not carry the official MD5 sums (e.g. the JPEG copy); loading anyway")
    train = [read_batch(folder / f) for f in TRAIN_FILES]
    test_x, test_y = read_batch(folder / "test_batch")
    classes = read_class_names(folder / "batches.meta")
    train_x = np.concatenate([x for x, _ in train])
    if len(train_x) == 0 or len(test_x) == 0:
        raise DataError(f"{folder}: the training and test batches must each hold images; " + _guidance(root))
    return CIFAR10(train_x, np.concatenate([y for _, y in train]), test_x, test_y, classes)


def write_cifar10(root, dataset, batches=5):
    """Write `dataset` as root/cifar-10-batches-py (protocol 2), the training set split over `batches` files."""
    n = len(dataset.train_labels)
    if batches < 1:
        raise ConfigError(f"batches={batches}: need at least one training batch")
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name, label, x, y):
        planar = np.asarray(x, np.uint8).transpose(0, 3, 1, 2).reshape(-1, 3072)  # a C copy
        obj = {b"batch_label": label.encode(), b"labels": [int(v) for v in y], b"data": planar}
        (folder / name).write_bytes(pickle.dumps(obj, protocol=2))

    for b, idx in enumerate(np.array_split(np.arange(n), batches)):
        dump(f"data_batch_{b + 1}", f"training batch {b + 1} of {batches}",
             dataset.train_images[idx], dataset.train_labels[idx])
    dump("test_batch", "testing batch 1 of 1", dataset.test_images, dataset.test_labels)
    meta = {b"num_cases_per_batch": -(-n // batches), b"num_vis": 3072,
            b"label_names": [c.encode() for c in dataset.classes]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def load_unlabeled(path):
    """The Kaggle test file cifar_test_nolabel.pkl -> (uint8 (N, 32, 32, 3) images, ids)."""
    if _kind(Path(path)) == "missing":
        raise DataError(f"unlabeled test file {path} not found; download cifar_test_nolabel.pkl "
                        "from the Kaggle competition page and pass its path")
    return read_kaggle(Path(path))


def _stratified_pick(labels, k, rng):
    """Sorted indices of k items, each class k * its fraction (largest remainders round up: exactly k in all)."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = k * counts / len(labels)
    quota = np.floor(exact).astype(np.int64)
    quota[np.argsort(quota - exact, kind="stable")[:k - quota.sum()]] += 1
    picked = [rng.choice(np.flatnonzero(labels == c), q, replace=False)
              for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked)).astype(np.int64)


def split_train_val(labels, val_size=5000, seed=0):
    """Seeded stratified split -> (train_idx, val_idx), sorted int64, disjoint, covering all (the
    reference code selected checkpoints on the test set; a held-out split avoids that)."""
    labels = np.asarray(labels)
    n = len(labels)
    if not isinstance(val_size, (int, np.integer)) or not 0 <= val_size < n:
        raise ConfigError(f"val_size={val_size!r} must be an integer in 0..{n - 1} (there are {n} labels)")
    val = _stratified_pick(labels, int(val_size), np.random.default_rng(seed))
    return np.setdiff1d(np.arange(n, dtype=np.int64), val), val


def subset(dataset, n_train=None, n_test=None, seed=0):
    """Seeded stratified subset (None keeps a split whole) for small profiles."""
    rng = np.random.default_rng(seed)

    def pick(x, y, k):
        if k is None or k >= len(y):
            return x, y
        idx = _stratified_pick(y, int(k), rng)
        return x[idx], y[idx]

    return CIFAR10(*pick(dataset.train_images, dataset.train_labels, n_train),
                   *pick(dataset.test_images, dataset.test_labels, n_test), dataset.classes)


def split_data(cfg, dataset: CIFAR10) -> dict:
    """A config's data: its profile subset, then the stratified validation split
    -> {"train" | "val" | "test": (images NHWC uint8, labels)}."""
    if cfg.train_subset or cfg.test_subset:
        dataset = subset(dataset, cfg.train_subset, cfg.test_subset, seed=cfg.split_seed)
    train_idx, val_idx = split_train_val(dataset.train_labels, cfg.val_size, cfg.split_seed)
    x, y = dataset.train_images, dataset.train_labels
    return {"train": (x[train_idx], y[train_idx]), "val": (x[val_idx], y[val_idx]),
            "test": (dataset.test_images, dataset.test_labels)}


def synthetic_cifar10(n_train=512, n_test=256, seed=0):
    """Tiny learnable CIFAR-shaped data: per class a mean colour and a stripe pattern
    (class-specific orientation/frequency) plus Gaussian noise; balanced labels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 32.0
    protos = []
    for c in range(10):
        colour = rng.uniform(0.25, 0.75, 3)
        angle, freq = np.pi * c / 10, 1 + c % 3
        wave = np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)))
        protos.append(colour + 0.2 * wave[..., None] * np.array([1, -1, 1]))
    protos = np.stack(protos).astype(np.float32)

    def make(n):
        y = rng.permutation(np.arange(n) % 10).astype(np.int64)
        x = protos[y] + 0.08 * rng.standard_normal((n, 32, 32, 3), dtype=np.float32)
        return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8), y

    return CIFAR10(*make(n_train), *make(n_test), CLASSES)
