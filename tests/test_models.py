"""Model family: published parameter counts, options, scan layout, dtypes, dropout, gradients."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from reference_vit import vit_logits

from vit_jax.checkpoint.npz import read_npz, save_npz
from vit_jax.models import (
    build_model,
    compute_dtype,
    create_model,
    parse_variant,
    runnable_on,
    stack_blocks,
    unstack_blocks,
)
from vit_jax.models.vit import DropPath

TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=4)


def _count(model, size=224):
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    )
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def _init(model, size=32, batch=2, seed=0):
    images = jax.random.uniform(
        jax.random.key(seed + 1), (batch, size, size, 3), minval=-1, maxval=1
    )
    # Compiled whole: op by op, a hybrid's initialisation compiles hundreds of small programs.
    init = jax.jit(lambda key, x: model.init(key, x, train=False))
    variables = nn.unbox(init(jax.random.key(seed), images))
    return variables, images


def _randomize(params, seed=0):
    """Non-trivial weights everywhere (the head is zero-initialised)."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(
        tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    )


# The paper's models (Dosovitskiy et al. Table 1, AugReg hybrids) at 224 px, 1,000 classes.
@pytest.mark.slow
@pytest.mark.parametrize(
    "name, expected",
    [
        ("Ti/16", 5_717_416),
        ("S/16", 22_050_664),
        ("B/16", 86_567_656),
        ("B/32", 88_224_232),
        ("L/16", 304_326_632),
        ("H/14", 632_045_800),
        ("R50+B/16", 98_659_112),
        ("R26+S/32", 36_431_912),
    ],
)
def test_parameter_counts_match_the_published_models(name, expected):
    assert _count(create_model(name, num_classes=1000)) == expected


# timm's tables give the published R+Ti/16 (vit_tiny_r_s16_p8_224) 6.34M parameters, which
# needs its 7x7-token position embedding, and R50+L/32 (vit_large_r50_s32_224) 328.99M,
# which needs four R50 stages (3, 4, 6, 3).
@pytest.mark.parametrize("name, millions", [("R+Ti/16", 6.34), ("R50+L/32", 328.99)])
def test_parameter_counts_match_timms_tables(name, millions):
    assert round(_count(create_model(name, num_classes=1000)) / 1e6, 2) == millions


def test_variant_table_and_hybrid_patch_arithmetic():
    assert parse_variant("L/14").patch_size == 14
    g = parse_variant("g/14")
    assert (g.width, g.depth, g.mlp_dim, g.num_heads) == (1408, 40, 6144, 16)
    assert parse_variant("R50+B/16").patch_size == 1  # the R50 stem already strides 16
    assert parse_variant("R26+S/32").patch_size == 1
    # The published hybrids (original vit_jax configs/models.py).
    r50_b16, r50_l32 = parse_variant("R50+B/16"), parse_variant("R50+L/32")
    assert (r50_b16.resnet_stages, r50_b16.patch_size) == ((3, 4, 9), 1)
    assert (r50_l32.resnet_stages, r50_l32.patch_size) == ((3, 4, 6, 3), 1)
    r26_s32 = parse_variant("R26+S/32")
    assert (r26_s32.resnet_stages, r26_s32.patch_size, r26_s32.width) == ((2, 2, 2, 2), 1, 384)
    # R+Ti/16 embeds 8x8 patches: its name counts the root conv's stride only.
    assert (parse_variant("R+Ti/16").resnet_stages, parse_variant("R+Ti/16").patch_size) == ((), 8)
    assert parse_variant("R50+B/64").patch_size == 2


@pytest.mark.parametrize("bad", ["X/16", "B16", "B/16/2", "R99+B/16", "R50+B/8", ""])
def test_unknown_variant_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="model (name|size)|stem|multiple"):
        parse_variant(bad)


def test_unknown_override_is_a_clear_error():
    with pytest.raises(TypeError, match="Unknown model option.*'pooling'"):
        create_model("Ti/16", num_classes=10, pooling="gap")


def test_published_parameter_names():
    model = create_model("B/16", num_classes=1000, representation_size=768)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
    )
    params = nn.unbox(shapes["params"])
    assert set(params) == {"embedding", "cls", "Transformer", "pre_logits", "head"}
    assert params["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 197, 768)
    block = params["Transformer"]["encoderblock_11"]
    assert set(block) == {
        "LayerNorm_0",
        "MultiHeadDotProductAttention_0",
        "LayerNorm_1",
        "MlpBlock_0",
    }
    attn = block["MultiHeadDotProductAttention_0"]
    assert attn["query"]["kernel"].shape == (768, 12, 64)
    assert attn["out"]["kernel"].shape == (12, 64, 768)
    assert set(block["MlpBlock_0"]) == {"Dense_0", "Dense_1"}
    assert "encoder_norm" in params["Transformer"]


def test_hybrid_stem_names_and_feature_map():
    model = create_model("R50+B/16", num_classes=10)
    shapes = nn.unbox(
        jax.eval_shape(
            lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
        )["params"]
    )
    assert {"conv_root", "gn_root", "block1", "block2", "block3"} <= set(shapes)
    assert set(shapes["block3"]) == {f"unit{i}" for i in range(1, 10)}
    assert shapes["block1"]["unit1"]["conv_proj"]["kernel"].shape == (1, 1, 64, 256)
    # 224 / 16 = 14x14 patches + cls; 1x1 patch embedding of the 1024-channel stage-3 map.
    assert shapes["embedding"]["kernel"].shape == (1, 1, 1024, 768)
    assert shapes["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 197, 768)
    r_ti = create_model("R+Ti/16", num_classes=10)
    shapes = nn.unbox(
        jax.eval_shape(
            lambda: r_ti.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
        )["params"]
    )
    # Root conv and max-pool stride 4, 8x8 patches: 7x7 tokens at 224 px, as published.
    assert shapes["embedding"]["kernel"].shape == (8, 8, 64, 192)
    assert shapes["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 50, 192)


def test_hybrid_stem_keys_are_the_published_npz_names():
    model = create_model("R50+B/16", num_classes=10)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
    )
    keys = {
        "/".join(path)
        for path in flatten_dict(nn.unbox(shapes["params"]))
        if path[0] not in ("embedding", "cls", "Transformer", "head")
    }
    # The names of the released R50+ViT-B_16.npz (what timm's loader also reads).
    expected = {"conv_root/kernel", "gn_root/scale", "gn_root/bias"}
    for block, units in enumerate((3, 4, 9), 1):
        for unit in range(1, units + 1):
            prefix = f"block{block}/unit{unit}"
            expected |= {f"{prefix}/conv{i}/kernel" for i in (1, 2, 3)}
            expected |= {f"{prefix}/gn{i}/{p}" for i in (1, 2, 3) for p in ("scale", "bias")}
            if unit == 1:
                expected |= {f"{prefix}/conv_proj/kernel", f"{prefix}/gn_proj/scale"}
                expected |= {f"{prefix}/gn_proj/bias"}
    assert keys == expected


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["token", "gap", "map"])
@pytest.mark.parametrize("posemb", ["learn", "sincos2d"])
def test_output_shapes_for_every_pool_and_posemb(pool, posemb):
    model = create_model("Ti/8", num_classes=7, pool=pool, posemb=posemb, **TINY)
    variables, images = _init(model, size=32, batch=3)
    assert model.apply(variables, images, train=False).shape == (3, 7)
    has_posemb_param = "posembed_input" in variables["params"]["Transformer"]
    assert has_posemb_param == (posemb == "learn")
    assert ("cls" in variables["params"]) == (pool == "token")
    features = create_model("Ti/8", num_classes=0, pool=pool, posemb=posemb, **TINY)
    assert features.apply(variables, images, train=False).shape == (3, 32)


def test_non_square_images():
    model = create_model("Ti/8", num_classes=5, **TINY)
    images = jnp.zeros((2, 24, 40, 3))
    variables = model.init(jax.random.key(0), images, train=False)
    pe = nn.unbox(variables)["params"]["Transformer"]["posembed_input"]["pos_embedding"]
    assert pe.shape == (1, 1 + 3 * 5, 32)
    assert model.apply(variables, images, train=False).shape == (2, 5)


def test_head_is_zero_initialised_with_configurable_bias():
    model = create_model("Ti/8", num_classes=4, head_bias_init=-6.9, **TINY)
    variables, images = _init(model)
    head = variables["params"]["head"]
    np.testing.assert_array_equal(head["kernel"], 0.0)
    np.testing.assert_array_equal(head["bias"], np.float32(-6.9))
    np.testing.assert_allclose(model.apply(variables, images, train=False), -6.9, rtol=1e-6)


@pytest.mark.slow
def test_published_initialisers():
    model = create_model("Ti/8", num_classes=4, **TINY)
    params = nn.unbox(
        model.init(jax.random.key(0), jnp.zeros((1, 256, 256, 3)), train=False)["params"]
    )
    mlp_bias = params["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["bias"]
    assert 0 < np.std(mlp_bias) < 1e-5  # normal(1e-6), not zeros
    pe = params["Transformer"]["posembed_input"]["pos_embedding"]
    assert abs(np.std(pe) - 0.02) < 0.002
    q = params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
    limit = np.sqrt(6 / (32 + 32))  # xavier-uniform over (fan_in=width, fan_out=heads*head_dim)
    assert np.max(np.abs(q)) <= limit and np.max(np.abs(q)) > 0.9 * limit


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["token", "map"])
def test_scanned_and_unrolled_give_the_same_logits(pool):
    unrolled = create_model("Ti/8", num_classes=5, pool=pool, **TINY)
    scanned = create_model("Ti/8", num_classes=5, pool=pool, scan=True, remat_policy="dots", **TINY)
    variables, images = _init(unrolled)
    params = _randomize(variables["params"])
    stacked = stack_blocks(params)
    scanned_shapes = nn.unbox(scanned.init(jax.random.key(0), images, train=False))["params"]
    assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(jnp.shape, scanned_shapes)
    expected = unrolled.apply({"params": params}, images, train=False)
    got = scanned.apply({"params": stacked}, images, train=False)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    back = unstack_blocks(stacked)
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))


@pytest.mark.slow
def test_bfloat16_compute_is_finite_and_close_to_float32():
    f32 = create_model("Ti/8", num_classes=5, **TINY)
    bf16 = create_model("Ti/8", num_classes=5, dtype=jnp.bfloat16, **TINY)
    variables, images = _init(f32)
    params = _randomize(variables["params"])
    ref = f32.apply({"params": params}, images, train=False)
    out = bf16.apply({"params": params}, images, train=False)
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(out, ref, atol=0.05 * float(jnp.max(jnp.abs(ref))))
    bf16_params = bf16.init(jax.random.key(0), images, train=False)["params"]
    assert {x.dtype for x in jax.tree.leaves(nn.unbox(bf16_params))} == {jnp.dtype(jnp.float32)}


def test_model_dtype_names_a_dtype_the_platform_computes_in():
    assert compute_dtype("bfloat16", "tpu") == jnp.bfloat16
    assert compute_dtype("float16", "gpu") == jnp.float16
    with pytest.raises(ValueError, match=r"^model.dtype='fp16' is not a dtype: choose one of "):
        compute_dtype("fp16")
    with pytest.raises(ValueError, match=r"^model.dtype='int8' cannot compute a ViT: choose "):
        compute_dtype("int8")
    # Without 64-bit JAX a float64 model would compute in float32, named float64.
    assert not jax.config.jax_enable_x64
    with pytest.raises(ValueError, match=r"needs 64-bit JAX \(JAX_ENABLE_X64=1"):
        compute_dtype("float64")
    with jax.enable_x64(True):
        assert compute_dtype("float64") == jnp.float64
    with pytest.raises(ValueError, match=r"TPU compiler has no float16 matmul; .*bfloat16"):
        compute_dtype("float16", "tpu")
    with pytest.raises(ValueError, match=r"CPU backend has no float16 matmul that sums in "):
        compute_dtype("float16", "cpu")


def test_cudnn_attention_is_refused_where_there_is_no_cudnn():
    model = {"name": "Ti/16", "dtype": "bfloat16", "attention_impl": "cudnn"}
    assert build_model(model, 5, "gpu").attention_impl == "cudnn"
    for platform in ("tpu", "cpu"):
        with pytest.raises(
            ValueError, match=rf"runs on NVIDIA GPUs only; on a {platform.upper()} "
        ):
            build_model(model, 5, platform)


def test_a_trained_model_runs_where_its_platform_cannot_with_float32_and_xla_attention(caplog):
    trained = {"name": "Ti/16", "dtype": "float16", "attention_impl": "cudnn", "pool": "gap"}
    assert runnable_on(trained, "gpu") == trained and not caplog.records
    for platform in ("cpu", "tpu"):
        assert runnable_on(trained, platform) == trained | {
            "dtype": "float32",
            "attention_impl": "xla",
        }
        assert caplog.records[-1].getMessage() == (
            f"A {platform.upper()} cannot run this model as it was trained: replaced its dtype "
            "float16 by float32 and cuDNN attention by XLA's."
        )
    assert runnable_on({"dtype": "bfloat16"}, "cpu") == {"dtype": "bfloat16"}  # CPUs run it.
    assert runnable_on({"dtype": "float64"}, "gpu") == {"dtype": "float32"}  # No 64-bit JAX.
    with pytest.raises(ValueError, match=r"^model.dtype='fp16' is not a dtype"):
        runnable_on({"dtype": "fp16"}, "gpu")


def test_dropout_is_off_in_eval_and_deterministic_given_rng():
    model = create_model(
        "Ti/8", num_classes=5, dropout=0.2, attention_dropout=0.2, stochastic_depth=0.3, **TINY
    )
    variables, images = _init(model)
    params = {"params": _randomize(variables["params"])}
    eval_a = model.apply(params, images, train=False)
    eval_b = model.apply(params, images, train=False)
    np.testing.assert_array_equal(eval_a, eval_b)
    plain = create_model("Ti/8", num_classes=5, **TINY).apply(params, images, train=False)
    np.testing.assert_array_equal(eval_a, plain)

    def train(seed):
        return model.apply(params, images, train=True, rngs={"dropout": jax.random.key(seed)})

    np.testing.assert_array_equal(train(1), train(1))
    assert not np.allclose(train(1), train(2))
    assert not np.allclose(train(1), eval_a)


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
def test_stochastic_depth_drops_each_block_at_its_own_linear_rate(scan):
    depth, batch = 4, 2048
    rates = np.linspace(0.0, 0.6, depth)  # The paper's schedule: 0 at the first block.
    model = create_model(
        "Ti/8", num_classes=5, stochastic_depth=0.6, scan=scan, **(TINY | dict(depth=depth))
    )
    variables, images = _init(model, batch=batch)
    _, state = model.apply(
        variables,
        images,
        train=True,
        rngs={"dropout": jax.random.key(0)},
        capture_intermediates=lambda module, _: isinstance(module, DropPath),
        mutable=["intermediates"],
    )
    # Each block's two residual branches (attention, MLP), as DropPath returned them.
    outputs = {
        path: np.asarray(x) for path, x in flatten_dict(state["intermediates"], sep="/").items()
    }
    if scan:
        branches = [
            [outputs[f"Transformer/encoderblock/DropPath_{j}/__call__"][0][i] for j in (0, 1)]
            for i in range(depth)
        ]
    else:
        branches = [
            [outputs[f"Transformer/encoderblock_{i}/DropPath_{j}/__call__"][0] for j in (0, 1)]
            for i in range(depth)
        ]
    # dropped[block, branch, example]: the whole branch is zero for that example.
    dropped = np.array([[~b.any(axis=(1, 2)) for b in block] for block in branches])
    np.testing.assert_allclose(dropped.mean(axis=(1, 2)), rates, atol=0.05)
    # Independent draws per block and per branch (not one mask shared by all of them).
    both = (dropped[2, 0] & dropped[3, 0]).mean()
    assert both == pytest.approx(rates[2] * rates[3], abs=0.05)
    assert (dropped[3, 0] & dropped[3, 1]).mean() == pytest.approx(rates[3] ** 2, abs=0.05)


@pytest.mark.slow
def test_gradients_reach_every_parameter():
    model = create_model(
        "Ti/8", num_classes=5, pool="map", representation_size=16, stochastic_depth=0.1, **TINY
    )
    variables, images = _init(model)
    params = _randomize(variables["params"])
    labels = jax.nn.one_hot(jnp.arange(images.shape[0]) % 5, 5)

    def loss(p):
        logits = model.apply({"params": p}, images, train=True, rngs={"dropout": jax.random.key(0)})
        return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), -1))

    grads = jax.jit(jax.grad(loss))(params)
    zero = [
        jax.tree_util.keystr(path)
        for path, g in jax.tree_util.tree_leaves_with_path(grads)
        if not np.any(np.asarray(g))
    ]
    assert not zero, f"parameters without gradient: {zero}"


@pytest.mark.parametrize("remat_policy", ["none", "selective", "full"])
def test_ordered_backward_barriers_each_layer_and_gives_the_same_gradients(remat_policy):
    """Unrolled, each block and, without block remat, its attention and MLP layer (the MLP
    unless `ordered_mlp` is off) hand their input's gradient on through one optimization
    barrier with their parameters'."""
    variables, images = _init(create_model("Ti/8", num_classes=5, **TINY))
    params = _randomize(variables["params"])

    def gradient(ordered_backward, ordered_mlp=True):
        model = create_model(
            "Ti/8",
            num_classes=5,
            remat_policy=remat_policy,
            ordered_backward=ordered_backward,
            ordered_mlp=ordered_mlp,
            dropout=0.1,
            attention_dropout=0.1,
            stochastic_depth=0.2,
            **TINY,
        )

        def loss(p):
            logits = model.apply(
                {"params": p}, images, train=True, rngs={"dropout": jax.random.key(3)}
            )
            return jnp.sum(logits**2)

        grad = jax.grad(loss)
        barriers = str(jax.make_jaxpr(grad)(params)).count("optimization_barrier")
        return barriers, jax.jit(grad)(params)

    barriers, expected = gradient(False)
    ordered_barriers, grads = gradient(True)
    mlp_unordered_barriers, mlp_unordered_grads = gradient(True, ordered_mlp=False)
    per_block = 1 if remat_policy == "full" else 3  # The block; its attention and MLP.
    assert ordered_barriers - barriers == per_block * TINY["depth"]
    layers = 0 if remat_policy == "full" else 1  # The MLP's barrier, where layers have one.
    assert ordered_barriers - mlp_unordered_barriers == layers * TINY["depth"]
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
    jax.tree.map(close, grads, expected)
    jax.tree.map(close, mlp_unordered_grads, expected)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("attention_dropout", [0.0, 0.1])
def test_selective_remat_keeps_no_attention_weights_and_gives_the_same_gradients(
    scan, attention_dropout
):
    tokens = 17  # 4 x 4 patches of 8 px and the class token
    variables, images = _init(create_model("Ti/8", num_classes=5, **TINY))
    params = _randomize(variables["params"])

    def backward(policy):
        model = create_model(
            "Ti/8",
            num_classes=5,
            scan=scan,
            remat_policy=policy,
            attention_dropout=attention_dropout,
            **TINY,
        )
        params_in_layout = stack_blocks(params) if scan else params

        def forward(p):
            rngs = {"dropout": jax.random.key(3)}
            return model.apply({"params": p}, images, train=True, rngs=rngs)

        logits, vjp = jax.vjp(forward, params_in_layout)
        (grads,) = vjp(jnp.ones_like(logits))
        # What the backward pass keeps from the forward one: the vjp's residual arrays.
        kept = [x.shape for x in jax.tree.leaves(vjp) if x.shape[-2:] == (tokens, tokens)]
        return kept, unstack_blocks(grads) if scan else grads

    weights_kept, expected = backward("none")
    assert weights_kept, "without remat the backward pass keeps the attention weights"
    weights_kept, grads = backward("selective")
    assert weights_kept == []
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
    jax.tree.map(close, grads, expected)


@pytest.mark.slow
def test_hybrid_forward_and_gradients():
    model = create_model("R+Ti/8", num_classes=3, **TINY)
    variables, images = _init(model, size=32)
    apply = jax.jit(lambda p: model.apply({"params": p}, images, train=False))
    assert apply(variables["params"]).shape == (2, 3)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(apply(p) ** 2)))(_randomize(variables["params"]))
    assert all(np.any(np.asarray(g)) for g in jax.tree.leaves(grads))


def test_intermediates_expose_block_outputs_and_attention_weights():
    for scan in (False, True):
        model = create_model("Ti/8", num_classes=5, scan=scan, **TINY)
        variables, images = _init(model)
        logits, state = model.apply(variables, images, train=False, mutable=["intermediates"])
        inter = state["intermediates"]["Transformer"]
        if scan:
            (weights,) = inter["encoderblock"]["MultiHeadDotProductAttention_0"][
                "attention_weights"
            ]
            assert weights.shape == (2, 2, 4, 17, 17)  # layers, batch, heads, q, k
        else:
            (weights,) = inter["encoderblock_1"]["MultiHeadDotProductAttention_0"][
                "attention_weights"
            ]
            assert weights.shape == (2, 4, 17, 17)
            (out,) = inter["encoderblock_1"]["out"]
            assert out.shape == (2, 17, 32)
        np.testing.assert_allclose(np.sum(weights, axis=-1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(logits, model.apply(variables, images, train=False), atol=1e-6)


def test_invalid_options_are_clear_errors():
    with pytest.raises(ValueError, match="pool='avg'.*token"):
        create_model("Ti/16", num_classes=5, pool="avg")
    with pytest.raises(ValueError, match="cudnn.*bfloat16"):
        create_model("Ti/16", num_classes=5, attention_impl="cudnn")
    with pytest.raises(ValueError, match="remat_policy"):
        create_model("Ti/16", num_classes=5, remat_policy="some")


def _with_registers(params, registers):
    return {**params, "registers": registers}


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("posemb", ["learn", "sincos2d"])
def test_registers_sit_after_the_class_token_without_a_position(scan, posemb):
    plain = create_model("Ti/8", num_classes=5, posemb=posemb, scan=scan, **TINY)
    model = create_model("Ti/8", num_classes=5, num_registers=3, posemb=posemb, scan=scan, **TINY)
    variables, images = _init(model)
    params = _randomize(variables["params"])
    assert params["registers"].shape == (1, 3, 32)
    # Everything else (the position embedding included) is what the plain model has.
    without = {k: v for k, v in params.items() if k != "registers"}
    plain_shapes = nn.unbox(plain.init(jax.random.key(0), images, train=False))["params"]
    assert jax.tree.map(jnp.shape, without) == jax.tree.map(jnp.shape, plain_shapes)
    _, state = model.apply({"params": params}, images, train=False, mutable=["intermediates"])
    (out,) = state["intermediates"]["Transformer"]["encoderblock" if scan else "encoderblock_1"][
        "out"
    ]
    assert out.shape[-2:] == (1 + 3 + 16, 32)  # [cls, 3 registers, 4x4 patches]

    logits = model.apply({"params": params}, images, train=False)
    # No position: permuting the registers leaves the output unchanged ...
    permuted = _with_registers(params, params["registers"][:, ::-1])
    np.testing.assert_allclose(
        model.apply({"params": permuted}, images, train=False), logits, rtol=1e-5, atol=1e-6
    )
    # ... yet attention uses them.
    changed = _with_registers(params, params["registers"] + 1.0)
    assert not np.allclose(model.apply({"params": changed}, images, train=False), logits)


@pytest.mark.parametrize("pool", ["token", "gap", "map"])
def test_pooling_ignores_the_registers(pool):
    # Without blocks no token mixes with another, so only pooling could read a register.
    model = create_model(
        "Ti/8", num_classes=5, pool=pool, num_registers=2, **(TINY | dict(depth=0))
    )
    variables, images = _init(model)
    params = _randomize(variables["params"])
    logits = model.apply({"params": params}, images, train=False)
    assert np.abs(logits).max() > 0.01
    changed = _with_registers(params, 10.0 * jax.random.normal(jax.random.key(5), (1, 2, 32)))
    np.testing.assert_array_equal(model.apply({"params": changed}, images, train=False), logits)


@pytest.mark.slow
def test_registers_start_distinct_and_learn():
    model = create_model("Ti/8", num_classes=5, num_registers=4, pool="gap", **TINY)
    variables, images = _init(model)
    registers = variables["params"]["registers"]
    # Identical registers would get identical updates forever: the init must break symmetry.
    assert abs(float(np.std(registers)) - 0.02) < 0.006
    params = _randomize(variables["params"])

    def loss(p):
        return jnp.sum(model.apply({"params": p}, images, train=False) ** 2)

    grads = jax.jit(jax.grad(loss))(params)["registers"][0]
    assert np.all(np.abs(grads).max(axis=-1) > 0)
    assert not np.allclose(grads[0], grads[1])


def test_negative_registers_are_a_clear_error():
    with pytest.raises(ValueError, match="num_registers=-1"):
        create_model("Ti/16", num_classes=5, num_registers=-1)


# Small instances of every family, sized so that the token grid is whole: (model, image size).
FAMILIES = {
    "plain": (dict(name="Ti/8"), 32),
    # R50's three stages (3, 4, 9) shortened: stride 16, a unit without projection.
    "R50+": (dict(name="R50+Ti/16", resnet_stages=(2, 1, 1)), 32),
    # R26's four stages (2, 2, 2, 2) shortened: stride 32.
    "R26+": (dict(name="R26+Ti/32", resnet_stages=(1, 1, 1, 1)), 64),
    # Root only, 3x3 patches: 36 px pads the root conv (2, 3) and the max-pool (0, 1).
    "R+": (dict(name="R+Ti/16", patch_size=3), 36),
    # Registers after the class token, left out of the pooling.
    "registers": (dict(name="Ti/8", num_registers=4), 32),
}


# Each family with both heads; the two deeper ResNet stems with one each (the head reads
# the blocks' output, whatever stem made their tokens).
HEADS = [("token", None), ("gap", 16)]
DEEP_STEMS = {"R50+": ("token", None), "R26+": ("gap", 16)}


@pytest.mark.parametrize(
    "family, pool, representation_size",
    [(f, *head) for f in FAMILIES if f not in DEEP_STEMS for head in HEADS]
    + [pytest.param(f, *head, marks=pytest.mark.slow) for f, head in DEEP_STEMS.items()],
)
def test_logits_match_the_float64_reference(tmp_path, family, pool, representation_size):
    """Every family against the independent numpy model on the same exported weights."""
    options, size = FAMILIES[family]
    model = create_model(
        options["name"],
        num_classes=5,
        pool=pool,
        representation_size=representation_size,
        **(TINY | {k: v for k, v in options.items() if k != "name"}),
    )
    variables, images = _init(model, size=size)
    params = _randomize(variables["params"], seed=4)
    path = tmp_path / "model.npz"
    save_npz(params, path)

    expected = vit_logits(read_npz(path), np.asarray(images))
    assert np.abs(expected).max() > 0.1  # Non-trivial logits.
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
    got = np.asarray(apply(params, images), np.float64)
    assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def _cudnn_error(num_registers: int, train: bool) -> str:
    """The error applying a cuDNN-attention model gives on this CPU: ours, or the backend's."""
    model = create_model(
        "Ti/16", num_classes=5, attention_impl="cudnn", dtype=jnp.bfloat16,
        num_registers=num_registers,
    )  # fmt: skip
    images = jnp.zeros((2, 32, 32, 3))  # 4 patches + the class token.
    try:
        variables = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
        jax.eval_shape(lambda v: model.apply(v, images, train=train), variables)
    except Exception as e:  # noqa: BLE001 - any failure is reported for the assertions.
        return str(e)
    return ""


def test_cudnn_attention_with_an_odd_token_count_is_refused_in_training_with_the_fix():
    assert re.search(
        r"attention_impl='cudnn' trains only on an even number of tokens; this model has 5 "
        r"\(4 patches \+ 1 class token \+ 0 registers\)\. Add a register token "
        r"\(num_registers=1\)",
        _cudnn_error(num_registers=0, train=True),
    )
    assert "even number of tokens" not in _cudnn_error(num_registers=1, train=True)
    assert "even number of tokens" not in _cudnn_error(num_registers=0, train=False)
