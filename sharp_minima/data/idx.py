"""Reader (and writer, for tests) of MNIST-format IDX files, plain or gzipped."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09}

# File names of the MNIST / Fashion-MNIST distributions (also used by Debian's packages).
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: str) -> np.ndarray:
    """Reads one IDX file (``.gz`` or plain).

    Raises:
      ValueError: the file is not a valid IDX file (the message names the file).
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"{path} is not an IDX file: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtype, ndim = np.dtype(_DTYPES[data[2]]), data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{path}: header says shape {shape} but the file has {len(body)} bytes")
    return np.frombuffer(body, dtype).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str, array: np.ndarray) -> None:
    """Writes ``array`` (uint8 or int8) as an IDX file (gzipped when ``path`` ends in .gz)."""
    array = np.asarray(array)
    header = bytes([0, 0, _CODES[array.dtype], array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def find_split(directory: str, split: str):
    """Paths of the (images, labels) files of ``split`` in ``directory``, or None."""
    found = []
    for stem in SPLIT_FILES[split]:
        candidates = [os.path.join(directory, stem + ext) for ext in (".gz", "")]
        candidates += [
            os.path.join(directory, stem.replace("-idx", ".idx") + ext) for ext in (".gz", "")
        ]
        path = next((c for c in candidates if os.path.exists(c)), None)
        if path is None:
            return None
        found.append(path)
    return tuple(found)


def load_idx_dir(directory: str):
    """Loads ``{"train": (x, y), "test": (x, y)}`` from an MNIST-format folder, or None."""
    out = {}
    for split in ("train", "test"):
        paths = find_split(directory, split)
        if paths is None:
            return None
        x, y = (read_idx(p) for p in paths)
        if len(x) != len(y):
            raise ValueError(f"{directory}: {len(x)} {split} images but {len(y)} labels")
        out[split] = (x, y)
    return out
