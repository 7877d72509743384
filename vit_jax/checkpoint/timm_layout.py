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

from vit_jax.checkpoint.input_normalization import INCEPTION_MEAN, INCEPTION_STD
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
        "posemb": "learn",  # A file without `pos_embed` is refused.
    }


def from_timm(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Maps a timm state dict onto our unrolled tree, attention heads fused into one.

    timm does not store the head count (the model's `num_heads` does): each attention
    array holds one head of the full width, which `load_pretrained` splits into the
    heads of the model that loads it.
    """
    _refuse_unsupported(state)
    state = dict(state)
    if "pos_embed" not in state:
        raise ValueError("This timm ViT has no learned position embedding (pos_embed).")
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    out: dict[str, np.ndarray] = {}
    for theirs, ours, kind in _modules(depth):
        if any(k == theirs or k.startswith(theirs + ".") for k in state):
            out |= _module_from_timm(state, theirs, ours, kind)
    if "cls_token" in state:
        out["cls"] = np.asarray(state.pop("cls_token"))
    if "reg_token" in state:
        out["registers"] = np.asarray(state.pop("reg_token"))
    posemb = np.asarray(state.pop("pos_embed"))
    out[POSEMB] = _posemb_with_class_row(posemb, out.get("cls"), out.get("registers"))
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
    depth = 1 + max(
        int(m[1]) for k in params if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))
    )
    out: dict[str, np.ndarray] = {}
    for theirs, ours, kind in _modules(depth):
        if any(k == ours or k.startswith(ours + "/") for k in params):
            out |= _module_to_timm(params, theirs, ours, kind)
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
    return {key: np.ascontiguousarray(value, np.float32) for key, value in out.items()}


def _modules(depth: int) -> list[tuple[str, str, str]]:
    """(timm module, our module, kind) of every module besides the tokens and positions.

    Both directions read this one table; a module absent from the source is left out.
    Kinds: "tensor" (one array as it is), "conv", "linear", "norm", "attention" (timm's
    fused `qkv` and `proj`) and "pool_attention" (the MAP head's `q`, `kv` and `proj`).
    """
    modules = [
        ("patch_embed.proj", "embedding", "conv"),
        ("attn_pool.latent", "MAPHead_0/probe", "tensor"),
    ]
    for i in range(depth):
        block, ours = f"blocks.{i}", f"Transformer/encoderblock_{i}"
        modules += [
            (f"{block}.norm1", f"{ours}/LayerNorm_0", "norm"),
            (f"{block}.attn", f"{ours}/MultiHeadDotProductAttention_0", "attention"),
            (f"{block}.norm2", f"{ours}/LayerNorm_1", "norm"),
            (f"{block}.mlp.fc1", f"{ours}/MlpBlock_0/Dense_0", "linear"),
            (f"{block}.mlp.fc2", f"{ours}/MlpBlock_0/Dense_1", "linear"),
        ]
    return modules + [
        ("norm", "Transformer/encoder_norm", "norm"),
        ("fc_norm", "fc_norm", "norm"),
        ("attn_pool", "MAPHead_0/MultiHeadDotProductAttention_0", "pool_attention"),
        ("attn_pool.norm", "MAPHead_0/LayerNorm_0", "norm"),
        ("attn_pool.mlp.fc1", "MAPHead_0/MlpBlock_0/Dense_0", "linear"),
        ("attn_pool.mlp.fc2", "MAPHead_0/MlpBlock_0/Dense_1", "linear"),
        ("head", "head", "linear"),
    ]


# The input projections of timm's attention modules: (name, rows in units of the width).
_ATTENTION_INPUTS = {"attention": (("qkv", 3),), "pool_attention": (("q", 1), ("kv", 2))}


def _module_from_timm(
    state: dict[str, Any], theirs: str, ours: str, kind: str
) -> dict[str, np.ndarray]:
    """Pops one module's arrays from `state`, as our arrays."""

    def take(name: str) -> np.ndarray:
        return np.asarray(state.pop(name))

    if kind == "tensor":
        return {ours: take(theirs)}
    if kind == "norm":
        return {f"{ours}/scale": take(f"{theirs}.weight"), f"{ours}/bias": take(f"{theirs}.bias")}
    if kind == "conv":
        kernel = take(f"{theirs}.weight").transpose(2, 3, 1, 0)
        return {f"{ours}/kernel": kernel, f"{ours}/bias": take(f"{theirs}.bias")}
    if kind == "linear":
        return {
            f"{ours}/kernel": take(f"{theirs}.weight").T,
            f"{ours}/bias": take(f"{theirs}.bias"),
        }
    weights, biases = [], []
    for name, _ in _ATTENTION_INPUTS[kind]:
        weights.append(take(f"{theirs}.{name}.weight"))
        bias = state.pop(f"{theirs}.{name}.bias", None)  # No bias computes as zero bias.
        biases.append(np.zeros(len(weights[-1]), weights[-1].dtype) if bias is None else bias)
    weight, bias = np.concatenate(weights), np.concatenate(biases)  # (3 * width, width)
    width = weight.shape[1]
    out = {}
    for name, w, b in zip(
        ("query", "key", "value"), np.split(weight, 3), np.split(bias, 3), strict=True
    ):
        out[f"{ours}/{name}/kernel"] = w.T.reshape(width, 1, width)
        out[f"{ours}/{name}/bias"] = b.reshape(1, width)
    proj = take(f"{theirs}.proj.weight").T.reshape(1, width, width)
    return out | {f"{ours}/out/kernel": proj, f"{ours}/out/bias": take(f"{theirs}.proj.bias")}


def _module_to_timm(
    params: dict[str, np.ndarray], theirs: str, ours: str, kind: str
) -> dict[str, np.ndarray]:
    """One module of our tree as timm's arrays."""
    if kind == "tensor":
        return {theirs: params[ours]}
    if kind == "norm":
        return {
            f"{theirs}.weight": params[f"{ours}/scale"],
            f"{theirs}.bias": params[f"{ours}/bias"],
        }
    if kind == "conv":
        kernel = params[f"{ours}/kernel"].transpose(3, 2, 0, 1)
        return {f"{theirs}.weight": kernel, f"{theirs}.bias": params[f"{ours}/bias"]}
    if kind == "linear":
        kernel = params[f"{ours}/kernel"]  # (in, out), or (heads, head_dim, out) for `out`.
        return {
            f"{theirs}.weight": kernel.reshape(-1, kernel.shape[-1]).T,
            f"{theirs}.bias": params[f"{ours}/bias"].reshape(-1),
        }
    # Our (width, heads, head_dim) projections as rows of timm's (3 * width, width) one.
    names = ("query", "key", "value")
    kernels = [params[f"{ours}/{name}/kernel"] for name in names]
    width = kernels[0].shape[0]
    weight = np.concatenate([k.reshape(width, -1).T for k in kernels])
    bias = np.concatenate([params[f"{ours}/{name}/bias"].reshape(-1) for name in names])
    inputs = _ATTENTION_INPUTS[kind]
    bounds = width * np.cumsum([rows for _, rows in inputs])[:-1]
    out = {}
    for (name, _), w, b in zip(
        inputs, np.split(weight, bounds), np.split(bias, bounds), strict=True
    ):
        out |= {f"{theirs}.{name}.weight": w, f"{theirs}.{name}.bias": b}
    return out | _module_to_timm(params, f"{theirs}.proj", f"{ours}/out", "linear")


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
    """`timm.create_model(..., **args)` options that rebuild `model` (our model fields) in timm.

    Its `pretrained_cfg_overlay` gives the model the input normalisation ours take (mean
    and std 0.5), so timm's `resolve_data_config(model=...)` normalises pixels for it
    whichever ViT name builds it (DeiT's would say ImageNet's mean and std).
    """
    pool = model.get("pool", "token")
    registers = model.get("num_registers") or 0
    args = {
        "num_heads": num_heads,
        "class_token": pool == "token",
        "global_pool": {"token": "token", "gap": "avg", "map": "map"}[pool],
        "fc_norm": bool(model.get("fc_norm", False)),
        "act_layer": "gelu" if model.get("activation") == "gelu_exact" else "gelu_tanh",
        "pretrained_cfg_overlay": {"mean": list(INCEPTION_MEAN), "std": list(INCEPTION_STD)},
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
