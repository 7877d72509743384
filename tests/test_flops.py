"""FLOPs counted from a jaxpr, against hand counts (2 per multiply-add)."""

import jax
import jax.numpy as jnp

from vit_jax.flops import matmul_flops


def sds(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_a_matmul_and_a_convolution_against_hand_counts():
    assert matmul_flops(lambda a, b: a @ b, sds(8, 16), sds(16, 4)) == 2 * 8 * 16 * 4

    def conv(x, w):  # NHWC input, HWIO kernel, stride 2: a 4x4 output of 5 features.
        return jax.lax.conv_general_dilated(
            x, w, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

    # Each of 2x4x4x5 outputs sums 3x3x3 products.
    assert matmul_flops(conv, sds(2, 9, 9, 3), sds(3, 3, 3, 5)) == 2 * (2 * 4 * 4 * 5) * (3 * 3 * 3)


def test_a_scan_counts_its_body_once_per_step_and_a_cond_its_dearer_branch():
    def scanned(x, ws):
        return jax.lax.scan(lambda h, w: (h @ w, None), x, ws)[0]

    assert matmul_flops(scanned, sds(4, 8), sds(6, 8, 8)) == 6 * 2 * 4 * 8 * 8

    def branches(p, x):
        return jax.lax.cond(p, lambda x: x @ x @ x, lambda x: x @ x, x)

    assert matmul_flops(branches, jax.ShapeDtypeStruct((), jnp.bool_), sds(8, 8)) == 2 * 2 * 8**3


def test_equations_without_outputs_are_passed_over():
    def logged(x):
        jax.debug.callback(lambda: None)  # An equation with no outputs.
        return x @ x

    assert matmul_flops(logged, sds(8, 8)) == 2 * 8**3
