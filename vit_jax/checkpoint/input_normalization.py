"""A hub checkpoint's input normalisation, folded into its patch embedding.

vit_jax models take images scaled to [-1, 1] (`vit_jax.models.scale_images`: mean and std
0.5 of pixels in [0, 1]), as Google's checkpoints were trained. Many hub checkpoints were
trained on other inputs: timm's DeiT, MAE and DINO weights on ImageNet's mean and std
(0.485, 0.456, 0.406) and (0.229, 0.224, 0.225), which their files state (timm's
`config.json`: `pretrained_cfg.mean` and `.std`; transformers' `preprocessor_config.json`:
`image_mean`, `image_std`, `rescale_factor`). Fed [-1, 1] images, such weights would see
inputs about half the scale they were trained on.

The patch embedding is the first thing applied to the pixels, and it is linear and sees
whole patches (a VALID convolution whose stride is the patch), so a per-channel affine
normalisation folds into it exactly. With y = pixels / 255 in [0, 1], the source computes
t_c = (y_c - mean_c) / std_c, and our model is given u = 2 y - 1, so
t_c = u_c / (2 std_c) + (0.5 - mean_c) / std_c, and for kernel W and bias b:

    conv(W, t) + b = conv(W', u) + b', with
    W'[i, j, c, :] = W[i, j, c, :] / (2 std_c)  and
    b' = b + sum over i, j, c of W[i, j, c, :] (0.5 - mean_c) / std_c.

The imported model then computes what the source computed on its own inputs, and every
vit_jax command keeps one input contract.
"""

from __future__ import annotations

from typing import Any

import numpy as np

INCEPTION_MEAN = (0.5, 0.5, 0.5)  # What `scale_images` computes: pixels / 127.5 - 1.
INCEPTION_STD = (0.5, 0.5, 0.5)


def stated_normalization(
    folder: str, timm_config: dict[str, Any], preprocessor: dict[str, Any] | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """The (mean, std) per RGB channel, of pixels in [0, 1], that the hub files in `folder`
    beside a checkpoint state its inputs were normalised with; None when they state none.

    `preprocessor`: transformers' `preprocessor_config.json` (None: there is none), read
    with its `do_rescale`, `rescale_factor` and `do_normalize` as `ViTImageProcessor`
    applies them; else `timm_config`, timm's `config.json` ({}: none), its `pretrained_cfg`.

    Raises:
      ValueError: a mean or std that is not three numbers, or a std that is not positive.
    """
    if preprocessor is not None:
        mean, std = INCEPTION_MEAN, INCEPTION_STD  # ViTImageProcessor's defaults.
        if preprocessor.get("do_normalize", True):
            mean = preprocessor.get("image_mean", mean)
            std = preprocessor.get("image_std", std)
        else:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        # Pixels reach the normalisation as 255 y * rescale_factor (unscaled: 255 y).
        rescale = (
            255.0 * preprocessor.get("rescale_factor", 1 / 255)
            if preprocessor.get("do_rescale", True)
            else 255.0
        )
        return _checked(f"{folder}/preprocessor_config.json", mean, std, rescale)
    pretrained = timm_config.get("pretrained_cfg", {})
    if "mean" in pretrained or "std" in pretrained:
        mean = pretrained.get("mean", INCEPTION_MEAN)
        std = pretrained.get("std", INCEPTION_STD)
        return _checked(f"{folder}/config.json", mean, std)
    return None


def fold_into_patch_embedding(
    params: dict[str, Any], mean: np.ndarray, std: np.ndarray
) -> dict[str, Any]:
    """`params` (our unrolled tree, '/'-joined) changed to take [-1, 1] images where the
    source took (pixels / 255 - mean) / std; the formula is the module's docstring.

    Returns a new dict: `embedding/kernel` ([patch, patch, 3, width]) and `embedding/bias`
    ([width]) in float32, the rest as given.
    """
    kernel = np.asarray(params["embedding/kernel"], np.float32)
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    shift = np.einsum("ijcw,c->w", kernel.astype(np.float64), (0.5 - mean) / std)
    return params | {
        "embedding/kernel": (kernel / (2.0 * std)[:, None]).astype(np.float32),
        "embedding/bias": (np.asarray(params["embedding/bias"], np.float64) + shift).astype(
            np.float32
        ),
    }


def is_inception(mean: np.ndarray, std: np.ndarray) -> bool:
    """Whether (mean, std) is what our models take already, within float32 rounding."""
    return bool(
        np.allclose(mean, INCEPTION_MEAN, atol=1e-6) and np.allclose(std, INCEPTION_STD, atol=1e-6)
    )


def _checked(
    source: str, mean: Any, std: Any, rescale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """`mean` and `std` as float64 arrays on the [0, 1] scale (stated on the scale of
    pixels times `rescale` / 255)."""
    checked = []
    for name, values in (("mean", mean), ("std", std)):
        try:
            array = np.asarray(values, np.float64) / rescale
        except (TypeError, ValueError):
            array = None
        if array is None or array.shape != (3,) or not np.all(np.isfinite(array)):
            raise ValueError(
                f"{source} states an input {name} of {values!r}: expected three numbers, one "
                "per RGB channel."
            )
        checked.append(array)
    if np.any(checked[1] <= 0):
        raise ValueError(f"{source} states an input std of {std!r}: each must be positive.")
    return checked[0], checked[1]
