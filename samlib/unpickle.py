"""Reading the untrusted CIFAR-10 and Kaggle pickles: a restricted unpickler (only the numpy globals these files
need, each narrowed to its harmless use) and checks of what they hold, each a DataError naming file and entry."""
import io
import pickle
import reprlib

import numpy as np

from samlib.errors import DataError, read_bytes

REPLACE = "replace it with a complete copy (download or extract it again)"
KAGGLE_FIX = "download cifar_test_nolabel.pkl from the Kaggle competition page again and pass its path"
# Protocol < 3 writes bytes as _codecs.encode(str, 'latin1') and b'' as __builtin__.bytes(); numpy arrays
# use _frombuffer under protocol 5.  numpy.ndarray is only _reconstruct's class argument (never called).
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


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only the globals in ALLOWED."""
    def __init__(self, file, source):
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module, name):
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        raise DataError(f"refusing to unpickle {module}.{name} from {self.source}: CIFAR/Kaggle "
                        "files contain only dicts, lists, strings, ints and numpy arrays; "
                        "this file may be malicious: delete it and download the original again")


def safe_pickle_load(path_or_fileobj):
    """pickle.load(f, encoding="bytes") admitting only ALLOWED; any problem is a DataError naming the file."""
    own = not hasattr(path_or_fileobj, "read")
    source = str(path_or_fileobj) if own else getattr(path_or_fileobj, "name", "<stream>")
    f = io.BytesIO(read_bytes(path_or_fileobj, DataError, REPLACE)) if own else path_or_fileobj
    try:
        return _RestrictedUnpickler(f, source).load()
    except DataError:
        raise
    except Exception as e:  # EOFError, UnpicklingError, ValueError from numpy, MemoryError, ...
        raise _bad(source, f"truncated or not a pickle ({type(e).__name__}: {str(e)[:200]})") from None


def _bad(path, problem, fix=REPLACE) -> DataError:
    return DataError(f"{path}: {problem}; {fix}")


def _load_dict(path, required, what, fix=REPLACE) -> dict:
    """The dict a data file holds (bytes keys as str), with its `required` entries."""
    d = safe_pickle_load(path)
    if not isinstance(d, dict):
        raise _bad(path, f"expected a pickled dict ({what}), got {type(d).__name__}", fix)
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
    missing = [f"b'{k}'" for k in required if k not in d]
    if missing:
        keys = reprlib.repr(sorted(str(k) if isinstance(k, str) else reprlib.repr(k) for k in d))
        raise _bad(path, f"no {' or '.join(missing)} entry (keys: {keys}); expected {what}", fix)
    return d


def describe(v) -> str:
    """A short, safe description of an unpickled value for an error message."""
    if isinstance(v, np.ndarray):
        return f"a {v.dtype} array of shape {v.shape}"
    return f"{type(v).__name__} {reprlib.repr(v)}"


def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def text_value(v, where, path):
    """A text value of a data file: str, or bytes in UTF-8."""
    if isinstance(v, bytes):
        try:
            v = v.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _bad(path, f"{where} is not UTF-8 text (byte {e.start} of {reprlib.repr(v)})") from None
    if not isinstance(v, str):
        raise _bad(path, f"{where} must be text, got {describe(v)}")
    if any("\ud800" <= c <= "\udfff" for c in v):     # what UTF-8 cannot encode
        raise _bad(path, f"{where} holds a character that is not valid Unicode text (a lone surrogate) in {v!a}")
    return str(v)


def images_of(v, path, fix=REPLACE):
    """Pixel data: integer (N, 32, 32, 3) images or flat (N, 3072) channel-planar rows (2024 Kaggle file) -> uint8."""
    if not isinstance(v, np.ndarray):
        raise _bad(path, f"data cannot be read as an array (it is {describe(v)}); expected a uint8 array", fix)
    if v.dtype != np.uint8:
        if v.dtype.kind not in "iu" or (v.size and (v.min() < 0 or v.max() > 255)):
            raise _bad(path, f"data is {v.dtype}; expected uint8 pixel values 0..255", fix)
        v = v.astype(np.uint8)
    if v.ndim == 2 and v.shape[1] == 3072:
        v = v.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    if v.ndim != 4 or v.shape[1:] != (32, 32, 3):
        raise _bad(path, f"data has shape {v.shape}; expected 32x32x3 images as (N, 32, 32, 3) or flat "
                   "(N, 3072) channel-planar rows", fix)
    return v


def labels_of(v, n, path):
    """A batch's labels: n integers in 0..9 (a list of ints, or a 1-D integer array)."""
    if isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype.kind in "iu":
        v = v.tolist()
    if not isinstance(v, (list, tuple)):
        raise _bad(path, f"labels must be {n} integers, got {describe(v)}")
    if len(v) != n:
        raise _bad(path, f"labels must be {n} integers (one per data row), got {len(v)}")
    for i, label in enumerate(v):
        if not is_int(label):
            raise _bad(path, f"labels must be {n} integers; labels[{i}] is {describe(label)}")
    if n and (min(v) < 0 or max(v) > 9):
        raise _bad(path, f"labels must lie in 0..9, found {min(v)}..{max(v)}")
    return np.array(v, dtype=np.int64).reshape(n)


def read_batch(path):
    """A CIFAR-10 python batch -> (uint8 (N, 32, 32, 3) images, int64 labels)."""
    d = _load_dict(path, ("data", "labels"), "a CIFAR-10 python batch")
    x = images_of(d["data"], path)
    return x, labels_of(d["labels"], len(x), path)


def read_class_names(path) -> tuple:
    """batches.meta's label_names: 10 non-empty texts (bytes in UTF-8, or str)."""
    names = _load_dict(path, (), "CIFAR-10's batches.meta").get("label_names")
    if isinstance(names, np.ndarray) and names.ndim == 1 and names.dtype.kind in "SUO":
        names = names.tolist()
    if not isinstance(names, (list, tuple)) or len(names) != 10:
        got = f"{len(names)} of them" if isinstance(names, (list, tuple)) else describe(names)
        raise _bad(path, f"expected 10 label_names (the class names), got {got}")
    classes = tuple(text_value(n, f"label_names[{i}]", path) for i, n in enumerate(names))
    empty = [i for i, c in enumerate(classes) if not c.strip()]
    if empty:
        raise _bad(path, f"label_names[{empty[0]}] is empty")
    return classes


def ids_of(v, n, path):
    """The Kaggle file's ids: n unique integers (-> int64) or texts (-> str; bytes in UTF-8; ints mixed
    with texts become texts), each a usable CSV field."""
    if not isinstance(v, (list, tuple)) and not (isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype.kind in "iuSUO"):
        raise _bad(path, f"ids must be a list or 1-D array of one integer or text per image, got {describe(v)}",
                   KAGGLE_FIX)
    if len(v) != n:
        raise _bad(path, f"{len(v)} ids for {n} images; need one id per image", KAGGLE_FIX)
    items = v.tolist() if isinstance(v, np.ndarray) else list(v)
    if all(is_int(i) and -2**63 <= i < 2**63 for i in items):
        ids = np.array(items, dtype=np.int64).reshape(n)
    else:
        texts = []
        for i, item in enumerate(items):
            if not is_int(item) and not isinstance(item, (str, bytes)):
                raise _bad(path, f"ids[{i}] is {describe(item)}; each id must be an integer or text", KAGGLE_FIX)
            text = str(int(item)) if is_int(item) else text_value(item, f"ids[{i}]", path)
            if not text.strip() or any(ord(c) < 32 or ord(c) == 127 for c in text):
                raise _bad(path, f"ids[{i}] = {text!a} is empty or holds a control character (line break, "
                           "tab, NUL), which a submission CSV cannot carry", KAGGLE_FIX)
            texts.append(text)
        ids = np.array(texts, dtype=str).reshape(n)
    values, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = values[counts > 1]
        raise _bad(path, f"ids must be unique; {len(dup)} repeated, e.g. {dup[0].item()!r}", KAGGLE_FIX)
    return ids


def read_kaggle(path):
    """The Kaggle cifar_test_nolabel.pkl -> (uint8 (N, 32, 32, 3) images, ids; 0..N-1 when it has none)."""
    d = _load_dict(path, ("data",), "the Kaggle cifar_test_nolabel.pkl", KAGGLE_FIX)
    x = images_of(d["data"], path, KAGGLE_FIX)
    if len(x) == 0:
        raise _bad(path, "data holds no images; expected N >= 1 images", KAGGLE_FIX)
    if "ids" not in d:
        print(f"note: {path} has no b'ids'; using ids 0..{len(x) - 1}")
    return np.ascontiguousarray(x), ids_of(d["ids"], len(x), path) if "ids" in d else np.arange(len(x))
