"""An independent float64 numpy ViT forward pass, written from the paper's equations.

It reads the flat parameter dict of the ORIGINAL release layout (what `save_npz`
writes: pre-Linen block names, position embedding including the class token's), so
agreement with our Flax model checks the model and the exported layout at once.
Equations (Dosovitskiy et al., 2020, eqs. 1-4):

    z0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos
    z'_l = MSA(LN(z_{l-1})) + z_{l-1}
    z_l = MLP(LN(z'_l)) + z'_l
    y = LN(z_L^0)             (or the mean over patch tokens without a class token)

Registers (Darcet et al., 2023), when the file has `registers`, are learned tokens
placed after the class token once the position embedding is added (they have no
position), attended to by every block and left out of the pooling.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def _layer_norm(x: np.ndarray, w: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * w[f"{name}/scale"] + w[f"{name}/bias"]


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _self_attention(x: np.ndarray, w: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    def project(part: str) -> np.ndarray:  # (n, tokens, heads, head_dim)
        return np.einsum("ntd,dhk->nthk", x, w[f"{name}/{part}/kernel"]) + w[f"{name}/{part}/bias"]

    q, k, v = project("query"), project("key"), project("value")
    scores = np.einsum("nqhk,nthk->nhqt", q, k) / np.sqrt(q.shape[-1])
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    weights = scores / scores.sum(-1, keepdims=True)
    heads = np.einsum("nhqt,nthk->nqhk", weights, v)
    return np.einsum("nqhk,hkd->nqd", heads, w[f"{name}/out/kernel"]) + w[f"{name}/out/bias"]


def _mlp(x: np.ndarray, w: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    hidden = _gelu(x @ w[f"{name}/Dense_0/kernel"] + w[f"{name}/Dense_0/bias"])
    return hidden @ w[f"{name}/Dense_1/kernel"] + w[f"{name}/Dense_1/bias"]


def vit_logits(weights: Mapping[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    """Logits of a plain ViT (token or global-average pooling) for NHWC `images`."""
    w = {key: np.asarray(value, np.float64) for key, value in weights.items()}
    kernel = w["embedding/kernel"]  # (patch, patch, channels, width)
    p = kernel.shape[0]
    n, height, width, channels = images.shape
    patches = np.asarray(images, np.float64).reshape(n, height // p, p, width // p, p, channels)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(n, -1, p * p * channels)
    z = patches @ kernel.reshape(p * p * channels, -1) + w["embedding/bias"]
    if "cls" in w:
        z = np.concatenate([np.broadcast_to(w["cls"], (n, 1, z.shape[-1])), z], axis=1)
    z = z + w["Transformer/posembed_input/pos_embedding"]
    num_prefix = int("cls" in w)
    num_registers = w["registers"].shape[1] if "registers" in w else 0
    if num_registers:
        registers = np.broadcast_to(w["registers"], (n, num_registers, z.shape[-1]))
        z = np.concatenate([z[:, :num_prefix], registers, z[:, num_prefix:]], axis=1)

    depth = len({key.split("/")[1] for key in w if key.startswith("Transformer/encoderblock_")})
    for i in range(depth):
        block = f"Transformer/encoderblock_{i}"
        z = z + _self_attention(
            _layer_norm(z, w, f"{block}/LayerNorm_0"), w, f"{block}/MultiHeadDotProductAttention_1"
        )
        z = z + _mlp(_layer_norm(z, w, f"{block}/LayerNorm_2"), w, f"{block}/MlpBlock_3")
    z = _layer_norm(z, w, "Transformer/encoder_norm")

    y = z[:, 0] if "cls" in w else z[:, num_registers:].mean(axis=1)
    if "pre_logits/kernel" in w:
        y = np.tanh(y @ w["pre_logits/kernel"] + w["pre_logits/bias"])
    return y @ w["head/kernel"] + w["head/bias"]
