"""Reads and writes the safetensors file format (the Hugging Face hub's weight files).

The format is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the raw little-endian bytes. It is small enough to read
directly, which keeps torch and the `safetensors` package out of our dependencies and
handles bfloat16 (via ml_dtypes), which `safetensors.numpy` cannot.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
from etils import epath

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
METADATA = "__metadata__"


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor entries (dtype, shape, data_offsets) and the string metadata, no data read."""
    with epath.Path(path).open("rb") as f:
        return _parse_header(f, path)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of a `.safetensors` file (local or `gs://`) as numpy arrays, and metadata."""
    with epath.Path(path).open("rb") as f:
        entries, metadata = _parse_header(f, path)
        data = f.read()
    arrays = {}
    for name, entry in entries.items():
        if entry["dtype"] not in _DTYPES:
            raise ValueError(
                f"{path}: tensor {name} has dtype {entry['dtype']}, which vit_jax cannot read "
                f"(supported: {', '.join(_DTYPES)})."
            )
        begin, end = entry["data_offsets"]
        dtype = _DTYPES[entry["dtype"]]
        count = (end - begin) // dtype.itemsize
        arrays[name] = np.frombuffer(data, dtype, count, begin).reshape(entry["shape"])
    return arrays, metadata


def write_safetensors(
    arrays: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Writes `arrays` (C-contiguous copies, in sorted name order) and string `metadata`."""
    header: dict[str, object] = {METADATA: dict(metadata or {})} if metadata else {}
    offset = 0
    blobs = []
    for name in sorted(arrays):
        value = np.ascontiguousarray(arrays[name])
        dtype = value.dtype.newbyteorder("<") if value.dtype.itemsize > 1 else value.dtype
        if dtype not in _NAMES:
            raise ValueError(f"Cannot write {name} of dtype {value.dtype} to safetensors.")
        blob = value.astype(dtype, copy=False).tobytes()
        header[name] = {
            "dtype": _NAMES[dtype],
            "shape": list(value.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # Aligns the data, as the reference writer does.
    with epath.Path(path).open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for blob in blobs:
            f.write(blob)


def _parse_header(f, path) -> tuple[dict[str, dict], dict[str, str]]:
    size_bytes = f.read(8)
    if len(size_bytes) != 8:
        raise ValueError(f"{path} is too short to be a safetensors file.")
    (size,) = struct.unpack("<Q", size_bytes)
    raw = f.read(size) if size < 1 << 30 else b""
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({e}).") from e
    metadata = header.pop(METADATA, None) or {}
    return header, metadata
