"""An independent float64 numpy ViT forward pass, written from the paper's equations.

It reads the flat parameter dict of the ORIGINAL release layout (what `save_npz`
writes: pre-Linen block names, position embedding including the class token's), so
agreement with our Flax model checks the model and the exported layout at once.
Equations (Dosovitskiy et al., 2020, eqs. 1-4):

    z0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos
    z'_l = MSA(LN(z_{l-1})) + z_{l-1}
    z_l = MLP(LN(z'_l)) + z'_l
    y = LN(z_L^0)             (or the mean over patch tokens without a class token)

Hybrids (files with `conv_root/kernel`) first run the ResNetV2 stem of the published
R+ / R26+ / R50+ models (Kolesnikov et al., 2020, "Big Transfer"; the names are those
of the released R50+ViT-B/16 `.npz`), and the patches are cut from its feature map:

    root:  x = maxpool_3x3/2(relu(GN(WSConv_7x7/2(image))))
    unit:  y = relu(GN1(WSConv_1x1(x))); y = relu(GN2(WSConv_3x3/s(y)));
           y = GN3(WSConv_1x1(y)) ; out = relu(proj(x) + y)
    stage i >= 2 strides 2 in its first unit (s = 2), which also projects
    proj(x) = GN(WSConv_1x1/s(x)) when the shape changes, else x
    WSConv: the kernel standardised per output filter, (w - mean) / (std + 1e-5)
    GN: 32 groups, epsilon 1e-6
    padding "SAME": ceil(size / stride) outputs, the deficit split low = total // 2,
    high = the rest (zeros for convolutions, -inf for the max-pool)

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


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _windows(x: np.ndarray, kernel: int, stride: int, fill: float):
    """Pads NHWC `x` as "SAME" does and yields (i, j, strided view) per kernel offset."""
    (top, bottom), (left, right) = (_same_padding(d, kernel, stride) for d in x.shape[1:3])
    x = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=fill)
    out_h, out_w = (x.shape[1] - kernel) // stride + 1, (x.shape[2] - kernel) // stride + 1
    for i in range(kernel):
        for j in range(kernel):
            yield i, j, x[:, i : i + stride * out_h : stride, j : j + stride * out_w : stride]


def _std_conv(x: np.ndarray, w: Mapping[str, np.ndarray], name: str, stride: int) -> np.ndarray:
    kernel = w[f"{name}/kernel"]  # (k, k, in, out)
    centred = kernel - kernel.mean(axis=(0, 1, 2))
    kernel = centred / (np.sqrt((centred**2).mean(axis=(0, 1, 2))) + 1e-5)
    return sum(v @ kernel[i, j] for i, j, v in _windows(x, kernel.shape[0], stride, 0.0))


def _group_norm(x: np.ndarray, w: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    n, h, wd, c = x.shape
    groups = x.reshape(n, h, wd, 32, c // 32)
    mean = groups.mean(axis=(1, 2, 4), keepdims=True)
    var = ((groups - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
    x = ((groups - mean) / np.sqrt(var + 1e-6)).reshape(x.shape)
    # The original release stores GroupNorm parameters as (1, 1, 1, C).
    return x * w[f"{name}/scale"].reshape(-1) + w[f"{name}/bias"].reshape(-1)


def _bottleneck(x: np.ndarray, w: Mapping[str, np.ndarray], unit: str, stride: int) -> np.ndarray:
    residual = x
    if f"{unit}/conv_proj/kernel" in w:
        residual = _group_norm(_std_conv(x, w, f"{unit}/conv_proj", stride), w, f"{unit}/gn_proj")
    y = np.maximum(_group_norm(_std_conv(x, w, f"{unit}/conv1", 1), w, f"{unit}/gn1"), 0)
    y = np.maximum(_group_norm(_std_conv(y, w, f"{unit}/conv2", stride), w, f"{unit}/gn2"), 0)
    y = _group_norm(_std_conv(y, w, f"{unit}/conv3", 1), w, f"{unit}/gn3")
    return np.maximum(residual + y, 0)


def _resnet_stem(x: np.ndarray, w: Mapping[str, np.ndarray]) -> np.ndarray:
    x = np.maximum(_group_norm(_std_conv(x, w, "conv_root", 2), w, "gn_root"), 0)
    x = np.max([v for _, _, v in _windows(x, 3, 2, -np.inf)], axis=0)
    stage = 1
    while f"block{stage}/unit1/conv1/kernel" in w:
        unit = 1
        while f"block{stage}/unit{unit}/conv1/kernel" in w:
            stride = 2 if stage > 1 and unit == 1 else 1
            x = _bottleneck(x, w, f"block{stage}/unit{unit}", stride)
            unit += 1
        stage += 1
    return x


def vit_logits(weights: Mapping[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    """Logits of a plain or hybrid ViT (token or global-average pooling) for NHWC `images`."""
    w = {key: np.asarray(value, np.float64) for key, value in weights.items()}
    x = np.asarray(images, np.float64)
    if "conv_root/kernel" in w:
        x = _resnet_stem(x, w)
    kernel = w["embedding/kernel"]  # (patch, patch, channels, width)
    p = kernel.shape[0]
    n, height, width, channels = x.shape
    patches = x.reshape(n, height // p, p, width // p, p, channels)
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
