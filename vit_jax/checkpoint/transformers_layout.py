"""Hugging Face transformers' `ViTModel` / `ViTForImageClassification` state dicts -> our tree.

`ViTForImageClassification` keeps the backbone under `vit.` and the classifier under
`classifier`; a bare `ViTModel` has no prefix and may carry a `pooler` (dense + tanh on
the class token), which is exactly our `pre_logits` representation layer. Query, key and
value are separate (out, in) linears; the class token always has a position.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vit_jax.checkpoint.npz import POSEMB

_PATCH = "embeddings.patch_embeddings.projection.weight"


def is_transformers(keys: Any) -> bool:
    return any(k == _PATCH or k == "vit." + _PATCH for k in keys)


# transformers' `hidden_act` names -> ours. "gelu" is PyTorch's exact GELU (the default).
_ACTIVATIONS = {
    "gelu": "gelu_exact",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
}


def model_fields(hidden_act: str | None) -> dict[str, Any]:
    """The `VisionTransformer` fields that compute what transformers computes on these weights.

    `hidden_act` is the `config.json` entry saved beside the weights (None: the default).
    """
    activation = _ACTIVATIONS.get(hidden_act or "gelu")
    if activation is None:
        raise ValueError(
            f"This transformers ViT uses hidden_act={hidden_act!r}; vit_jax's ViT computes "
            f"only {', '.join(sorted(_ACTIVATIONS))}."
        )
    return {
        "activation": activation,
        "pool": "token",
        "fc_norm": False,
        "num_registers": 0,
        "posemb": "learn",
    }


def from_transformers(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Maps a transformers ViT state dict onto our unrolled tree, attention heads fused into one.

    As in `timm_layout.from_timm`: `load_pretrained` splits them into the model's heads.
    """
    prefix = "vit." if "vit." + _PATCH in state else ""
    state = dict(state)
    out: dict[str, np.ndarray] = {}

    def take(name: str) -> np.ndarray:
        return np.asarray(state.pop(prefix + name))

    def linear(name: str, ours: str, kernel_shape: tuple[int, ...] | None = None) -> None:
        kernel = take(f"{name}.weight").T
        # qkv_bias=False computes as a zero bias.
        bias = take(f"{name}.bias") if prefix + f"{name}.bias" in state else kernel[0] * 0
        out[f"{ours}/kernel"] = kernel if kernel_shape is None else kernel.reshape(kernel_shape)
        out[f"{ours}/bias"] = bias if kernel_shape is None else bias.reshape(kernel_shape[1:])

    def norm(name: str, ours: str) -> None:
        out[f"{ours}/scale"] = take(f"{name}.weight")
        out[f"{ours}/bias"] = take(f"{name}.bias")

    state.pop(prefix + "embeddings.mask_token", None)  # Only masked-image pretraining uses it.
    out["embedding/kernel"] = take(_PATCH).transpose(2, 3, 1, 0)
    out["embedding/bias"] = take("embeddings.patch_embeddings.projection.bias")
    out["cls"] = take("embeddings.cls_token")
    out[POSEMB] = take("embeddings.position_embeddings")
    width = out["cls"].shape[-1]
    layers = {int(k[len(prefix) :].split(".")[2]) for k in state if "encoder.layer." in k}
    for i in range(max(layers) + 1):
        layer, ours = f"encoder.layer.{i}", f"Transformer/encoderblock_{i}"
        attention = f"{ours}/MultiHeadDotProductAttention_0"
        norm(f"{layer}.layernorm_before", f"{ours}/LayerNorm_0")
        for name in ("query", "key", "value"):
            linear(
                f"{layer}.attention.attention.{name}",
                f"{attention}/{name}",
                (width, 1, width),
            )
        out[f"{attention}/out/kernel"] = take(f"{layer}.attention.output.dense.weight").T.reshape(
            1, width, width
        )
        out[f"{attention}/out/bias"] = take(f"{layer}.attention.output.dense.bias")
        norm(f"{layer}.layernorm_after", f"{ours}/LayerNorm_1")
        linear(f"{layer}.intermediate.dense", f"{ours}/MlpBlock_0/Dense_0")
        linear(f"{layer}.output.dense", f"{ours}/MlpBlock_0/Dense_1")
    norm("layernorm", "Transformer/encoder_norm")
    if prefix + "pooler.dense.weight" in state:
        linear("pooler.dense", "pre_logits")
    if "classifier.weight" in state:  # Outside the `vit.` prefix.
        out["head/kernel"] = np.asarray(state.pop("classifier.weight")).T
        out["head/bias"] = np.asarray(state.pop("classifier.bias"))
    if state:
        raise ValueError(
            "This transformers checkpoint has parameters our ViT has no counterpart for: "
            + ", ".join(sorted(state)[:10])
        )
    return out
