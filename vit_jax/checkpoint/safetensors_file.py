"""Reads and writes the safetensors file format (the Hugging Face hub's weight files).

The format is an 8-byte little-endian header length, a JSON header naming each tensor's
dtype, shape and byte range, then the raw little-endian bytes. It is small enough to read
directly, which keeps torch and the `safetensors` package out of our dependencies and
handles bfloat16 (via ml_dtypes), which `safetensors.numpy` cannot.

A checkpoint too large for one file (transformers' `save_pretrained` splits those above
its `max_shard_size`) is shards `model-00001-of-0000N.safetensors` and an index,
`model.safetensors.index.json`, whose `weight_map` names each tensor's shard: the readers
take the index and read the whole checkpoint.
"""

from __future__ import annotations

import json
import os
import re
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
INDEX_SUFFIX = ".safetensors.index.json"
_SHARD_NAME = re.compile(r"-(\d+)-of-(\d+)\.safetensors$")


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor entries (dtype, shape, data_offsets within their file) and the string
    metadata of a `.safetensors` file or a sharded checkpoint's index, no data read.

    Raises:
      FileNotFoundError: a shard the index names is missing.
      ValueError: not a safetensors file, one shard of a sharded checkpoint, or an index
        whose shards lack a tensor it names.
    """
    return _merged(path, _read_one_header)


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor of a `.safetensors` file (local or `gs://`), or of every shard a sharded
    checkpoint's index names, as numpy arrays, and the metadata (`read_header`'s errors)."""
    return _merged(path, _read_one)


def _merged(path: str | os.PathLike, read) -> tuple[dict, dict[str, str]]:
    """`read(file)` of one file, or merged over the shards a sharded checkpoint's index
    names, each checked to hold the tensors the index places in it."""
    if not str(path).endswith(INDEX_SUFFIX):
        _refuse_lone_shard(path)
        return read(path)
    index = epath.Path(path)
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{index} is no sharded checkpoint's index: not JSON ({e}).") from e
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} is no sharded checkpoint's index: it has no weight_map.")
    tensors, metadata = {}, {}
    for shard in dict.fromkeys(weight_map.values()):
        if not (index.parent / shard).exists():
            raise FileNotFoundError(
                f"{index.parent / shard} is missing: the index {index.name} places tensors "
                "in it. Download every shard the index names into its folder."
            )
        shard_tensors, shard_metadata = read(index.parent / shard)
        lacking = sorted(n for n, s in weight_map.items() if s == shard and n not in shard_tensors)
        if lacking:
            raise ValueError(
                f"{index.parent / shard} lacks {lacking[:3]} ({len(lacking)} tensors) that the "
                f"index {index.name} places there: a shard of another checkpoint, or cut short."
            )
        tensors |= {n: t for n, t in shard_tensors.items() if weight_map.get(n) == shard}
        metadata |= shard_metadata
    return tensors, metadata


def _refuse_lone_shard(path: str | os.PathLike) -> None:
    """Raises ValueError for one shard of a sharded checkpoint, naming the index to give."""
    match = _SHARD_NAME.search(str(path))
    if match is None or int(match.group(2)) < 2:
        return
    indexes = sorted(str(p) for p in epath.Path(path).parent.glob(f"*{INDEX_SUFFIX}"))
    give = indexes[0] if indexes else f"the *{INDEX_SUFFIX} file that came with it"
    raise ValueError(
        f"{path} is shard {int(match.group(1))} of {int(match.group(2))} of a sharded "
        f"checkpoint: give its index, {give}, which names every shard."
    )


def _read_one_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    with epath.Path(path).open("rb") as f:
        return _parse_header(f, path)


def _read_one(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
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
