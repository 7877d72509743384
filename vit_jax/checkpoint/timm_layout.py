"""timm's `VisionTransformer` state dict <-> our parameter tree ('/'-joined keys).

timm stores PyTorch conventions: linear weights as (out, in), the patch embedding as
(D, 3, p, p), query/key/value fused into one `attn.qkv` linear, and position embeddings
that cover the class token unless the model was built with `no_embed_class=True`.
Everything timm's ViT can hold that our model cannot compute (distillation token,
LayerScale, qk-norm, SwiGLU, ...) is refused by name rather than dropped.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from vit_jax.checkpoint.npz import POSEMB

# timm parameter patterns that name a feature our ViT lacks.
_UNSUPPORTED = (
    (r"^dist_token$|^head_dist\.", "a distillation token (DeiT distilled models)"),
    (r"\.ls[12]\.|\.gamma_[12]$", "LayerScale (timm's init_values)"),
    (r"\.attn\.(q_norm|k_norm)\.", "query/key normalisation (qk_norm)"),
    (r"\.mlp\.(fc1_g|fc1_x|w12|w3)\.", "a gated (SwiGLU) MLP"),
    (r"\.mlp\.norm\.", "a LayerNorm inside the MLP (scale_mlp_norm)"),
    (r"\.attn\.norm\.", "a LayerNorm inside attention (scale_attn_norm)"),
    (r"^norm_pre\.", "a LayerNorm before the blocks (pre_norm, as in CLIP)"),
    (r"^patch_embed\.norm\.", "a LayerNorm in the patch embedding"),
    (r"^patch_embed\.backbone\.", "timm's hybrid CNN backbone (load Google's hybrid .npz instead)"),
    (r"\.attn\.(q_bias|v_bias|relative_position)", "BEiT-style attention biases"),
    (r"^attn_pool\.(q_norm|k_norm|pos_embed)", "a MAP head with extra norms or positions"),
)
# The timm ViT definitions (timm 1.0.31) built with `act_layer="gelu_tanh"`, all SigLIP (2)
# models; every other ViT we can express uses PyTorch's exact `nn.GELU`, SigLIP's
# `vit_base_patch16_siglip_224` included. Weights cannot tell; the saved `architecture` can.
_GELU_TANH_ARCHITECTURES = frozenset(
    (
        "vit_base_patch32_siglip_256",
        "vit_large_patch16_siglip_512",
        "vit_so400m_patch16_siglip_256",
        "vit_so400m_patch16_siglip_384",
        "vit_so400m_patch16_siglip_512",
        "vit_giantopt_patch16_siglip_256",
        "vit_giantopt_patch16_siglip_384",
        "vit_base_patch32_siglip_gap_256",
        "vit_large_patch16_siglip_gap_512",
        "vit_so400m_patch16_siglip_gap_256",
        "vit_so400m_patch16_siglip_gap_384",
        "vit_so400m_patch16_siglip_gap_512",
        "vit_giantopt_patch16_siglip_gap_256",
        "vit_giantopt_patch16_siglip_gap_384",
    )
)


def is_timm(keys: Any) -> bool:
    return "patch_embed.proj.weight" in keys and any(k.startswith("blocks.") for k in keys)


def model_fields(state: dict[str, Any], hub_config: dict[str, Any]) -> dict[str, Any]:
    """The `VisionTransformer` fields that compute what timm computes on these weights.

    `state` maps names to anything with a `.shape` (arrays or header entries);
    `hub_config` is the `config.json` timm saves beside them ({} when there is none): its
    `global_pool` and `architecture` say what the weights cannot.
    """
    _refuse_unsupported(state)
    pool = "map" if "attn_pool.latent" in state else "token" if "cls_token" in state else "gap"
    global_pool = hub_config.get("global_pool", {"gap": "avg"}.get(pool, pool))
    if global_pool != {"gap": "avg"}.get(pool, pool):
        raise ValueError(
            f"This timm ViT pools with global_pool={global_pool!r}"
            + (" beside a class token" if "cls_token" in state else "")
            + ": vit_jax's ViT pools by class token, by average without a class token, or by "
            "a MAP head without one."
        )
    tanh = hub_config.get("architecture") in _GELU_TANH_ARCHITECTURES
    return {
        "activation": "gelu_tanh" if tanh else "gelu_exact",
        "pool": pool,
        "fc_norm": "fc_norm.weight" in state,
        "num_registers": int(_shape(state["reg_token"])[1]) if "reg_token" in state else 0,
    }


def from_timm(state: dict[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
    """Maps a timm state dict onto our unrolled tree, with `num_heads` attention heads."""
    _refuse_unsupported(state)
    state = dict(state)
    out: dict[str, np.ndarray] = {}

    def take(name: str) -> np.ndarray:
        return np.asarray(state.pop(name))

    def linear(prefix: str, ours: str) -> None:
        out[f"{ours}/kernel"] = take(f"{prefix}.weight").T
        out[f"{ours}/bias"] = take(f"{prefix}.bias")

    def norm(prefix: str, ours: str) -> None:
        out[f"{ours}/scale"] = take(f"{prefix}.weight")
        out[f"{ours}/bias"] = take(f"{prefix}.bias")

    def attention(q: np.ndarray, qb, kv: np.ndarray, kvb, proj: str, ours: str) -> None:
        """`q` (D, D) and `kv` (2D or more, D) torch weights; biases may be None."""
        width = q.shape[1]
        head_dim = width // num_heads
        weights = {"query": q} | dict(zip(("key", "value"), np.split(kv, 2), strict=True))
        biases = [qb] + (list(np.split(kvb, 2)) if kvb is not None else [None, None])
        for (name, w), b in zip(weights.items(), biases, strict=True):
            out[f"{ours}/{name}/kernel"] = w.T.reshape(width, num_heads, head_dim)
            bias = np.zeros(width, w.dtype) if b is None else b  # No bias computes as zero bias.
            out[f"{ours}/{name}/bias"] = bias.reshape(num_heads, head_dim)
        out[f"{ours}/out/kernel"] = take(f"{proj}.weight").T.reshape(num_heads, head_dim, width)
        out[f"{ours}/out/bias"] = take(f"{proj}.bias")

    out["embedding/kernel"] = take("patch_embed.proj.weight").transpose(2, 3, 1, 0)
    out["embedding/bias"] = take("patch_embed.proj.bias")
    if "pos_embed" not in state:
        raise ValueError("This timm ViT has no learned position embedding (pos_embed).")
    posemb = take("pos_embed")
    if "cls_token" in state:
        out["cls"] = take("cls_token")
    if "reg_token" in state:
        out["registers"] = take("reg_token")
    out[POSEMB] = _posemb_with_class_row(posemb, out.get("cls"), out.get("registers"))

    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        block, ours = f"blocks.{i}", f"Transformer/encoderblock_{i}"
        norm(f"{block}.norm1", f"{ours}/LayerNorm_0")
        qkv = take(f"{block}.attn.qkv.weight")
        qkv_bias = state.pop(f"{block}.attn.qkv.bias", None)
        width = qkv.shape[1]
        attention(
            qkv[:width],
            None if qkv_bias is None else np.asarray(qkv_bias)[:width],
            qkv[width:],
            None if qkv_bias is None else np.asarray(qkv_bias)[width:],
            f"{block}.attn.proj",
            f"{ours}/MultiHeadDotProductAttention_0",
        )
        norm(f"{block}.norm2", f"{ours}/LayerNorm_1")
        linear(f"{block}.mlp.fc1", f"{ours}/MlpBlock_0/Dense_0")
        linear(f"{block}.mlp.fc2", f"{ours}/MlpBlock_0/Dense_1")
    if "norm.weight" in state:
        norm("norm", "Transformer/encoder_norm")
    if "fc_norm.weight" in state:
        norm("fc_norm", "fc_norm")
    if "attn_pool.latent" in state:
        out["MAPHead_0/probe"] = take("attn_pool.latent")
        q_bias = state.pop("attn_pool.q.bias", None)
        kv_bias = state.pop("attn_pool.kv.bias", None)
        attention(
            take("attn_pool.q.weight"),
            None if q_bias is None else np.asarray(q_bias),
            take("attn_pool.kv.weight"),
            None if kv_bias is None else np.asarray(kv_bias),
            "attn_pool.proj",
            "MAPHead_0/MultiHeadDotProductAttention_0",
        )
        norm("attn_pool.norm", "MAPHead_0/LayerNorm_0")
        linear("attn_pool.mlp.fc1", "MAPHead_0/MlpBlock_0/Dense_0")
        linear("attn_pool.mlp.fc2", "MAPHead_0/MlpBlock_0/Dense_1")
    if "head.weight" in state:
        linear("head", "head")
    if state:
        raise ValueError(
            "This timm checkpoint has parameters our ViT has no counterpart for: "
            + ", ".join(sorted(state)[:10])
        )
    return out


def to_timm(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our unrolled tree (float32 numpy, '/'-joined) as a timm state dict.

    The model options timm must be built with are given by `timm_model_args`.
    """
    out: dict[str, np.ndarray] = {}

    def linear(ours: str, prefix: str) -> None:
        kernel = params[f"{ours}/kernel"]
        out[f"{prefix}.weight"] = kernel.reshape(-1, kernel.shape[-1]).T
        out[f"{prefix}.bias"] = params[f"{ours}/bias"].reshape(-1)

    def norm(ours: str, prefix: str) -> None:
        out[f"{prefix}.weight"] = params[f"{ours}/scale"]
        out[f"{prefix}.bias"] = params[f"{ours}/bias"]

    def heads_in(ours: str) -> tuple[np.ndarray, np.ndarray]:
        """A (D, H, hd) projection as a torch (H*hd, D) weight and its bias."""
        kernel = params[f"{ours}/kernel"]
        return kernel.reshape(kernel.shape[0], -1).T, params[f"{ours}/bias"].reshape(-1)

    def attention(ours: str, q_name: str, kv_name: str, proj: str) -> None:
        q, k, v = (heads_in(f"{ours}/{n}") for n in ("query", "key", "value"))
        if q_name == kv_name:
            out[f"{q_name}.weight"] = np.concatenate([q[0], k[0], v[0]])
            out[f"{q_name}.bias"] = np.concatenate([q[1], k[1], v[1]])
        else:
            out[f"{q_name}.weight"], out[f"{q_name}.bias"] = q
            out[f"{kv_name}.weight"] = np.concatenate([k[0], v[0]])
            out[f"{kv_name}.bias"] = np.concatenate([k[1], v[1]])
        linear(f"{ours}/out", proj)

    out["patch_embed.proj.weight"] = params["embedding/kernel"].transpose(3, 2, 0, 1)
    out["patch_embed.proj.bias"] = params["embedding/bias"]
    posemb = params[POSEMB]
    if "cls" in params and "registers" in params:
        # timm's register models (no_embed_class) give the class token no position: ours
        # adds a constant row to it, which folds into the token itself.
        out["cls_token"] = params["cls"] + posemb[:, :1]
        posemb = posemb[:, 1:]
    elif "cls" in params:
        out["cls_token"] = params["cls"]
    if "registers" in params:
        out["reg_token"] = params["registers"]
    out["pos_embed"] = posemb
    depth = 1 + max(
        int(m[1]) for k in params if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))
    )
    for i in range(depth):
        ours, block = f"Transformer/encoderblock_{i}", f"blocks.{i}"
        norm(f"{ours}/LayerNorm_0", f"{block}.norm1")
        attention(
            f"{ours}/MultiHeadDotProductAttention_0",
            f"{block}.attn.qkv",
            f"{block}.attn.qkv",
            f"{block}.attn.proj",
        )
        norm(f"{ours}/LayerNorm_1", f"{block}.norm2")
        linear(f"{ours}/MlpBlock_0/Dense_0", f"{block}.mlp.fc1")
        linear(f"{ours}/MlpBlock_0/Dense_1", f"{block}.mlp.fc2")
    if "Transformer/encoder_norm/scale" in params:
        norm("Transformer/encoder_norm", "norm")
    if "fc_norm/scale" in params:
        norm("fc_norm", "fc_norm")
    if "MAPHead_0/probe" in params:
        out["attn_pool.latent"] = params["MAPHead_0/probe"]
        attention(
            "MAPHead_0/MultiHeadDotProductAttention_0",
            "attn_pool.q",
            "attn_pool.kv",
            "attn_pool.proj",
        )
        norm("MAPHead_0/LayerNorm_0", "attn_pool.norm")
        linear("MAPHead_0/MlpBlock_0/Dense_0", "attn_pool.mlp.fc1")
        linear("MAPHead_0/MlpBlock_0/Dense_1", "attn_pool.mlp.fc2")
    if "head/kernel" in params:
        linear("head", "head")
    return {key: np.ascontiguousarray(value, np.float32) for key, value in out.items()}


def export_problems(model: dict[str, Any], file_format: str) -> list[str]:
    """Why timm could not compute what `model` (our model fields) computes, loading `file_format`.

    `file_format` is "npz" (timm's loader of the original ViT layout) or "safetensors"
    (timm's own state dict). Empty when the export is faithful.
    """
    problems = []
    if model.get("representation_size"):
        problems.append(
            "it has a representation layer (pre_logits), which timm's ViT lacks and its loader "
            "ignores"
        )
    if model.get("resnet_stages") is not None or "+" in model.get("name", ""):
        problems.append("it has a ResNet stem, which timm builds differently")
    if model.get("posemb", "learn") != "learn":
        problems.append(f"its position embedding is {model['posemb']!r}, timm's is a stored table")
    if file_format == "npz" and model.get("fc_norm"):
        problems.append("it normalises after pooling (fc_norm), which timm's .npz loader skips")
    if file_format == "npz" and model.get("num_registers"):
        problems.append("it has register tokens, which timm's .npz loader skips")
    return problems


def timm_model_args(model: dict[str, Any], num_heads: int) -> dict[str, Any]:
    """`timm.create_model(..., **args)` options that rebuild `model` (our model fields) in timm."""
    pool = model.get("pool", "token")
    registers = model.get("num_registers") or 0
    args = {
        "num_heads": num_heads,
        "class_token": pool == "token",
        "global_pool": {"token": "token", "gap": "avg", "map": "map"}[pool],
        "fc_norm": bool(model.get("fc_norm", False)),
        "act_layer": "gelu" if model.get("activation") == "gelu_exact" else "gelu_tanh",
    }
    if registers:
        args |= {"reg_tokens": registers, "no_embed_class": True}
    return args


def _posemb_with_class_row(
    posemb: np.ndarray, cls: np.ndarray | None, registers: np.ndarray | None
) -> np.ndarray:
    """Our position embedding: one row for the class token, none for registers.

    timm's tables cover the patches only (`no_embed_class=True`: zero is what the class
    token gets) or the class token, registers and patches; a position for a register has
    no place in our model.
    """
    num_registers = 0 if registers is None else registers.shape[1]
    num_patches = _square_part(posemb.shape[1])
    extra = posemb.shape[1] - num_patches
    if cls is None and num_registers == 0:
        if extra:
            raise ValueError(f"pos_embed has {extra} rows beyond a square patch grid.")
        return posemb
    if extra == 0:  # no_embed_class
        if cls is None:
            return posemb
        return np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
    if num_registers:
        raise ValueError(
            "This timm ViT gives its register tokens position embeddings "
            "(no_embed_class=False): our registers have none."
        )
    return posemb


def _square_part(length: int) -> int:
    """The largest square <= length that leaves at most a few prefix rows: the patch grid."""
    side = int(np.sqrt(length))
    return side * side


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value["shape"]) if isinstance(value, dict) else tuple(value.shape)


def _refuse_unsupported(state: Any) -> None:
    lacking = {what for pattern, what in _UNSUPPORTED for k in state if re.search(pattern, k)}
    fc1, fc2 = state.get("blocks.0.mlp.fc1.weight"), state.get("blocks.0.mlp.fc2.weight")
    if fc1 is not None and fc2 is not None and _shape(fc1)[0] != _shape(fc2)[1]:
        lacking.add("a gated (SwiGLU, packed) MLP")
    lacking = sorted(lacking)
    if lacking:
        raise ValueError(
            "This timm ViT uses " + "; ".join(lacking) + ", which vit_jax's ViT does not have, "
            "so it would compute something else. Use a timm ViT without them (AugReg, DeiT "
            "without distillation, gap/fc_norm and register variants load)."
        )
