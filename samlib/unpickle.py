"""What samlib.data's restricted unpickler admits (the few numpy globals CIFAR-10 pickles need, each
narrowed to its harmless use), and checks of what those files hold: one DataError naming the entry.
"""
import reprlib

import numpy as np

from samlib.errors import DataError

# Resolved from live objects.  Protocol < 3 writes bytes as _codecs.encode(str, 'latin1') and b''
# as __builtin__.bytes(); numpy arrays use _frombuffer under protocol 5.  numpy.ndarray is only
# _reconstruct's class argument (never called: it would allocate any shape).
_np_reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
_NDARRAY = object()   # what the name numpy.ndarray unpickles to


def _reconstruct(subtype, shape, dtype):
    if subtype is not _NDARRAY or shape != (0,):
        raise ValueError(f"unexpected array reconstruction ({reprlib.repr(shape)})")
    return _np_reconstruct(np.ndarray, (0,), dtype)


def _latin1(text, encoding="latin1", errors="strict"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise ValueError("unexpected _codecs.encode call (only latin1 text -> bytes is allowed)")
    return text.encode("latin1")


def _empty_bytes(*args):
    if args:   # bytes(n) would allocate n zero bytes; pickles write only bytes() for b''
        raise ValueError("unexpected bytes(...) call (only bytes() is allowed)")
    return b""


ALLOWED = {("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): _latin1, ("__builtin__", "bytes"): _empty_bytes}
for _core in ("numpy.core", "numpy._core"):  # numpy 1.x / 2.x spellings
    ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = _reconstruct
    ALLOWED[(f"{_core}.multiarray", "scalar")] = np.float64(0).__reduce__()[0]
    ALLOWED[(f"{_core}.numeric", "_frombuffer")] = np.zeros(1).__reduce_ex__(5)[0]
del _core

REPLACE = "replace it with a complete copy (download or extract it again)"


def as_dict(obj, source, expected):
    if not isinstance(obj, dict):
        raise DataError(f"{source}: expected a pickled dict with {expected}, got {type(obj).__name__}; {REPLACE}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def keys_of(d) -> str:
    return reprlib.repr(sorted(str(k) if isinstance(k, str) else reprlib.repr(k) for k in d))


def describe(v) -> str:
    """A short, safe description of an unpickled value for an error message."""
    if isinstance(v, np.ndarray):
        return f"a {v.dtype} array of shape {v.shape}"
    return f"{type(v).__name__} {reprlib.repr(v)}"


def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def text_value(v, where, source):
    """A text value of a data file: str, or bytes in UTF-8; DataError otherwise."""
    if isinstance(v, bytes):
        try:
            v = v.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{source}: {where} is not UTF-8 text (byte {e.start} of "
                            f"{reprlib.repr(v)}); {REPLACE}") from None
    if not isinstance(v, str):
        raise DataError(f"{source}: {where} must be text, got {describe(v)}; {REPLACE}")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{source}: {where} holds a character that is not valid Unicode text "
                        f"(a lone surrogate) in {v!a}; {REPLACE}") from None
    return str(v)


# ---- what the CIFAR-10 batches and the Kaggle file hold ------------------------------

def images_of(v, path, fix=REPLACE):
    """Pixel data: integer (N, 32, 32, 3) images or (N, 3072) channel-planar rows, 0..255 -> uint8 NHWC."""
    if not isinstance(v, np.ndarray):
        raise DataError(f"{path}: data cannot be read as an array (it is {describe(v)}); expected a numpy "
                        f"uint8 array; {fix}")
    if v.dtype != np.uint8:
        if v.dtype.kind not in "iu" or (v.size and (v.min() < 0 or v.max() > 255)):
            raise DataError(f"{path}: data is {v.dtype}; expected uint8 pixel values 0..255; {fix}")
        v = v.astype(np.uint8)
    if v.ndim == 2 and v.shape[1] == 3072:
        v = v.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    if v.ndim != 4 or v.shape[1:] != (32, 32, 3):
        raise DataError(f"{path}: data has shape {v.shape}; expected 32x32x3 images as (N, 32, 32, 3) or "
                        f"flat (N, 3072) channel-planar rows; {fix}")
    return v


def labels_of(v, n, path):
    """A batch's labels: n integers in 0..9 (a list of ints, or a 1-D integer array)."""
    if isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype.kind in "iu":
        v = v.tolist()
    if not isinstance(v, (list, tuple)):
        raise DataError(f"{path}: labels must be {n} integers, got {describe(v)}; {REPLACE}")
    if len(v) != n:
        raise DataError(f"{path}: labels must be {n} integers (one per data row), got {len(v)}; {REPLACE}")
    for i, label in enumerate(v):
        if not is_int(label):
            raise DataError(f"{path}: labels must be {n} integers; labels[{i}] is {describe(label)}; {REPLACE}")
    if n and (min(v) < 0 or max(v) > 9):
        raise DataError(f"{path}: labels must lie in 0..9, found {min(v)}..{max(v)}; {REPLACE}")
    return np.array(v, dtype=np.int64).reshape(n)


def class_names(meta, path):
    """batches.meta's label_names: 10 non-empty texts (bytes in UTF-8, or str)."""
    names = meta.get("label_names")
    if isinstance(names, np.ndarray) and names.ndim == 1 and names.dtype.kind in "SUO":
        names = names.tolist()
    if not isinstance(names, (list, tuple)) or len(names) != 10:
        got = f"{len(names)} of them" if isinstance(names, (list, tuple)) else describe(names)
        raise DataError(f"{path}: expected 10 label_names (the class names), got {got}; {REPLACE}")
    classes = tuple(text_value(n, f"label_names[{i}]", path) for i, n in enumerate(names))
    empty = [i for i, c in enumerate(classes) if not c.strip()]
    if empty:
        raise DataError(f"{path}: label_names[{empty[0]}] is empty; {REPLACE}")
    return classes


KAGGLE_FIX = "download cifar_test_nolabel.pkl from the Kaggle competition page again and pass its path"


def ids_of(v, n, path):
    """The Kaggle file's ids: n unique integers (-> int64) or texts (-> str; bytes in UTF-8;
    ints mixed with texts become texts).  One id per image, each a usable CSV field."""
    if isinstance(v, np.ndarray):
        if v.ndim != 1 or v.dtype.kind not in "iuSUO":
            raise DataError(f"{path}: ids must be one integer or text per image, got {describe(v)}; {KAGGLE_FIX}")
    elif not isinstance(v, (list, tuple)):
        raise DataError(f"{path}: ids must be a list or 1-D array, got {describe(v)}; {KAGGLE_FIX}")
    if len(v) != n:
        raise DataError(f"{path}: {len(v)} ids for {n} images; need one id per image; {KAGGLE_FIX}")
    items = v.tolist() if isinstance(v, np.ndarray) else list(v)
    if all(is_int(i) and -2**63 <= i < 2**63 for i in items):
        ids = np.array(items, dtype=np.int64).reshape(n)
    else:
        texts = []
        for i, item in enumerate(items):
            if is_int(item):
                texts.append(str(int(item)))
                continue
            if not isinstance(item, (str, bytes)):
                raise DataError(f"{path}: ids[{i}] is {describe(item)}; each id must be an integer "
                                f"or text; {KAGGLE_FIX}")
            text = text_value(item, f"ids[{i}]", path)
            if not text.strip() or any(ord(c) < 32 or ord(c) == 127 for c in text):
                raise DataError(f"{path}: ids[{i}] = {text!a} is empty or holds a control character "
                                f"(line break, tab, NUL), which a submission CSV cannot carry; {KAGGLE_FIX}")
            texts.append(text)
        ids = np.array(texts, dtype=str).reshape(n)
    values, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = values[counts > 1]
        raise DataError(f"{path}: ids must be unique; {len(dup)} repeated, e.g. {dup[0].item()!r}; {KAGGLE_FIX}")
    return ids
