"""Reads and writes `.npz` parameter files in the published ViT layouts.

Every layout stores one array per parameter under its '/'-joined path; they differ in
names and conventions:

- original ViT release and AugReg (Steiner et al.): written with Flax's pre-Linen
  module names inside each block (`LayerNorm_0`, `MultiHeadDotProductAttention_1`,
  `LayerNorm_2`, `MlpBlock_3`), the position embedding at
  `Transformer/posembed_input/pos_embedding` including the class token's position,
  hybrid GroupNorm parameters stored as (1, 1, 1, C); the original i21k files carry
  a `pre_logits` representation layer, the AugReg ones none;
- big_vision: Linen names, a top-level `pos_embedding` without a class-token position
  (its class token is appended after the embedding is added), blocks often stacked
  under a scanned `Transformer/encoderblock`, everything under a prefix such as
  `params/` (`params/img/` for two-tower models) next to optimizer state, and
  bfloat16 arrays stored as raw 2-byte void because numpy has no such type;
- our own tree (Linen names, `posembed_input`), possibly under `opt/target/`.

`canonicalize` maps any of them onto our unrolled parameter tree; `save_npz` writes the
original layout, which the original code, the AugReg colabs and timm all read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import zipfile
import zlib
from collections.abc import Collection, Iterator
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from vit_jax.models import unstack_blocks

POSEMB = "Transformer/posembed_input/pos_embedding"
_BIG_VISION_POSEMB = "pos_embedding"
_PATCH_EMBEDDING = "embedding/kernel"
# Where the published files and training checkpoints keep the parameters, most common first.
_PARAMETER_ROOTS = ("", "params/", "params/img/", "opt/target/")

# Block modules whose names differ between the original release and our (Linen) tree.
_LINEN_NAMES = {
    "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
    "LayerNorm_2": "LayerNorm_1",
    "MlpBlock_3": "MlpBlock_0",
}
_PRE_LINEN_NAMES = {linen: old for old, linen in _LINEN_NAMES.items()}
_BLOCK_MODULE = re.compile(r"^Transformer/encoderblock(?:_\d+)?/([^/]+)/")
_GROUPNORM = re.compile(r"(?:^|/)gn(?:\d+|_root|_proj)/(?:scale|bias)$")
_SCANNED = "Transformer/encoderblock/"


@dataclasses.dataclass(frozen=True)
class Layout:
    """The conventions `detect_layout` found in a file; `str()` names them in messages."""

    prefix: str  # Path of the model's parameters inside the file: "", "params/", ...
    pre_linen: bool  # Blocks use the original release's pre-Linen module names.
    top_level_posemb: bool  # big_vision's `pos_embedding`, without class-token position.
    scanned: bool  # Blocks stacked along a leading axis under `Transformer/encoderblock`.
    bfloat16: bool  # Some arrays are bfloat16 stored as 2-byte void.
    old_groupnorm: bool  # GroupNorm scale/bias stored as (1, 1, 1, C).

    def __str__(self) -> str:
        if self.pre_linen:
            family = "original ViT/AugReg"
        elif self.top_level_posemb or self.prefix.startswith("params/"):
            family = "big_vision"
        else:
            family = "Linen"
        traits = [f"prefix {self.prefix!r}"] if self.prefix else []
        traits += [
            name
            for name, present in (
                ("scanned", self.scanned),
                ("bfloat16", self.bfloat16),
                ("(1, 1, 1, C) GroupNorm", self.old_groupnorm),
            )
            if present
        ]
        return f"{family} layout" + (f" ({', '.join(traits)})" if traits else "")


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads every array of an `.npz` file (local or `gs://`), never unpickling.

    Raises:
      ValueError: not an .npz archive, or a damaged one (truncated, corrupt), named.
    """
    with _open_npz(path) as loaded:
        try:
            return {key: loaded[key] for key in loaded.files}
        except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as e:
            raise _damaged(path, e) from None


@contextlib.contextmanager
def _open_npz(path: str | os.PathLike) -> Iterator[np.lib.npyio.NpzFile]:
    """The archive, whose arrays are read only when indexed."""
    with epath.Path(path).open("rb") as f:
        try:
            loaded = np.load(f, allow_pickle=False)
        except zipfile.BadZipFile as e:  # A zip cut short (an interrupted download).
            raise _damaged(path, e) from None
        except (ValueError, EOFError):  # Not a NumPy file: text, a pickle, empty, ...
            f.seek(0)
            if f.read(1) == _PICKLE_PROTOCOL:  # PyTorch's legacy format is a bare pickle.
                raise _pytorch_pickle(path) from None
            raise ValueError(
                f"{path} is not an .npz archive: a checkpoint is an .npz or .safetensors file "
                "or a vit_jax workdir."
            ) from None
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError(f"{path} holds a single array, not an .npz archive of parameters.")
        with loaded:
            if any(name.endswith("data.pkl") for name in loaded.zip.namelist()):
                raise _pytorch_pickle(path)  # torch.save's zip: a pickle and its tensors.
            yield loaded


_PICKLE_PROTOCOL = b"\x80"  # The first byte of a pickle of protocol 2 or later.


def _pytorch_pickle(path: str | os.PathLike) -> ValueError:
    """The refusal of a `torch.save` file (`.pth`, `.bin`, `.pt`: the official MAE, DINO and
    DeiT releases): unpickling runs code from the file, and such a file does not say how
    its inputs were normalised (MAE's, DINO's and DeiT's: ImageNet's mean and std)."""
    return ValueError(
        f"{path} is a PyTorch pickle (torch.save), which vit_jax does not read: unpickling "
        "runs code from the file, and it does not say how the model's inputs were "
        "normalised. Download the weights as .safetensors with the config.json that says "
        "so, e.g. `hf download timm/vit_base_patch16_224.mae model.safetensors config.json "
        "--local-dir mae` (timm publishes MAE, DINO and DeiT weights so), and pass "
        "mae/model.safetensors."
    )


def _damaged(path: str | os.PathLike, error: Exception) -> ValueError:
    return ValueError(
        f"{path} is a damaged .npz archive ({error}): truncated or corrupt, as an interrupted "
        "download leaves it. Download or export it again."
    )


def detect_layout(flat: dict[str, np.ndarray]) -> Layout:
    """Recognises a file's layout from its keys, shapes and dtypes."""
    prefix = _model_prefix(flat)
    params = {key[len(prefix) :]: value for key, value in flat.items() if key.startswith(prefix)}
    return Layout(
        prefix=prefix,
        pre_linen=any((m := _BLOCK_MODULE.match(key)) and m[1] in _LINEN_NAMES for key in params),
        top_level_posemb=_BIG_VISION_POSEMB in params,
        scanned=any(key.startswith(_SCANNED) for key in params),
        bfloat16=any(_is_raw_bfloat16(value) for value in params.values()),
        old_groupnorm=any(_GROUPNORM.search(k) and v.ndim == 4 for k, v in params.items()),
    )


def canonicalize(flat: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Layout]:
    """Maps a file's arrays onto our unrolled tree ('/'-joined keys); returns them and the layout.

    Everything outside the model's prefix (optimizer state, other towers) is left out.
    """
    layout = detect_layout(flat)
    params = {}
    for key, value in flat.items():
        if not key.startswith(layout.prefix):
            continue
        key = key[len(layout.prefix) :]
        if _is_raw_bfloat16(value):
            value = value.view(jnp.bfloat16)
        elif value.dtype.type is np.void:
            raise ValueError(f"{key} has raw dtype {value.dtype} that no known layout writes.")
        if _GROUPNORM.search(key) and value.ndim == 4:
            value = value.reshape(-1)
        params[_rename_block_module(key, _LINEN_NAMES)] = value

    if layout.top_level_posemb:
        posemb = params.pop(_BIG_VISION_POSEMB)
        if "cls" in params:  # Our class token has a position: zero is what big_vision added.
            posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
        params[POSEMB] = posemb
    if layout.scanned:
        nested = unstack_blocks(traverse_util.unflatten_dict(params, sep="/"))
        params = traverse_util.flatten_dict(nested, sep="/")
    return params, layout


def save_npz(params: Any, path: str | os.PathLike) -> None:
    """Writes parameters as an `.npz` in the original ViT release layout, in float32.

    Scanned or unrolled, boxed or not, any float dtype: the file is what the original
    code and timm's ViT loader read. A `posemb="sincos2d"` model has no stored position
    embedding, so its file loads only into a sincos2d model.
    """
    flat = {
        _rename_block_module(key, _PRE_LINEN_NAMES): value
        for key, value in unrolled_float32(params).items()
    }
    # A file object keeps numpy from appending ".npz" to a path that lacks it.
    with epath.Path(path).open("wb") as f:
        np.savez(f, **flat)


def unrolled_float32(params: Any) -> dict[str, np.ndarray]:
    """Our tree ('/'-joined, Linen names) unrolled and float32, from any boxed/scanned tree."""
    tree = nn.unbox(params)
    if "encoderblock" in tree.get("Transformer", {}):
        tree = unstack_blocks(tree)
    return {
        key: np.asarray(value, dtype=np.float32)
        for key, value in traverse_util.flatten_dict(tree, sep="/").items()
    }


def _model_prefix(keys: Collection[str]) -> str:
    """Where the model's parameters are: the path in front of the patch embedding.

    Training checkpoints also hold optimizer moments with the same paths, so the
    known parameter roots win over any other candidate.
    """
    candidates = {
        key[: -len(_PATCH_EMBEDDING)]
        for key in keys
        if key == _PATCH_EMBEDDING or key.endswith("/" + _PATCH_EMBEDDING)
    }
    known = [prefix for prefix in _PARAMETER_ROOTS if prefix in candidates]
    if known or len(candidates) == 1:
        return (known or list(candidates))[0]
    found = f"under the prefixes {sorted(candidates)}" if candidates else "none"
    raise ValueError(
        f"Expected the ViT patch embedding '{_PATCH_EMBEDDING}' once in the file, found "
        f"{found}; the file's first keys are {sorted(keys)[:8]}."
    )


def _is_raw_bfloat16(value: np.ndarray) -> bool:
    # Saving an ml_dtypes bfloat16 array leaves a typeless 2-byte void ("|V2") in the file.
    return value.dtype.type is np.void and value.dtype.itemsize == 2


def _rename_block_module(key: str, names: dict[str, str]) -> str:
    match = _BLOCK_MODULE.match(key)
    if match and match[1] in names:
        return key[: match.start(1)] + names[match[1]] + key[match.end(1) :]
    return key
