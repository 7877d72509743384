"""Shared by the tests against the real PyTorch libraries (timm, transformers).

Those libraries are the `interop` test extra: without them the interop tests are skipped
with the install command, and fail under CI (a skipped comparison there would look like a
passed one). Test modules therefore take torch, timm and safetensors from here, or import
the libraries after this module.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
from helpers import EXTRAS, require_extra

require_extra("interop", *EXTRAS["interop"])

import safetensors.torch  # noqa: E402, F401  (re-exported to the test modules)
import timm  # noqa: E402, F401  (re-exported)
import torch  # noqa: E402
import transformers  # noqa: E402, F401

from vit_jax import checkpoint  # noqa: E402
from vit_jax.models import abstract_params, create_model  # noqa: E402

# A ViT small enough for CPU tests, in our terms and in timm's.
TINY = dict(width=32, depth=2, mlp_dim=128, num_heads=2, patch_size=8)
TIMM_TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, mlp_ratio=4.0)
IMAGES = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
# Pixels as images arrive (uint8 RGB), for what happens before the model.
PIXELS = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)


def randomize(build: Callable[[], torch.nn.Module], seed: int = 0) -> torch.nn.Module:
    """`build()` initialised from `seed` (torch draws a fresh init from its global generator,
    which other tests advance), then noise on every parameter: a fresh init's zero biases
    and heads would hide mapping errors. The same module whatever ran before."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = build()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return module.eval()


def torch_forward(module: torch.nn.Module, images: np.ndarray = IMAGES, **kwargs) -> np.ndarray:
    """The module's output on our NHWC images (PyTorch takes NCHW)."""
    with torch.no_grad():
        return module(torch.from_numpy(images.transpose(0, 3, 1, 2)), **kwargs)


def import_model(path, num_classes: int | None = None, image_size: int = 32, **overrides):
    """Our model built as `describe_checkpoint` says, with the checkpoint (read once) in it."""
    weights = checkpoint.read_weights(path)
    described = checkpoint.describe_checkpoint(weights)
    fields = {k: v for k, v in described.model.items() if k != "name"} | overrides
    if num_classes is None:
        num_classes = described.num_classes
    model = create_model("Ti/8", num_classes=num_classes, **(TINY | fields))
    init = abstract_params(model, image_size)
    return model, checkpoint.load_pretrained(weights, init_params=init)


def our_logits(model, params, images: np.ndarray = IMAGES) -> np.ndarray:
    return np.asarray(model.apply({"params": params}, images, train=False))


def assert_same_logits(ours: np.ndarray, theirs: np.ndarray) -> None:
    """fp32 agreement: within 1e-5 of the logits' scale (observed errors are ~1e-6 of it)."""
    theirs = np.asarray(theirs)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())


def write_run(workdir, model_fields: dict, params, num_classes: int) -> str:
    """A vit-train workdir holding `params` at step 1, as `vit-export` reads it."""
    checkpointer = checkpoint.Checkpointer(str(workdir), keep=1, async_save=False)
    metadata = {
        "class_names": [f"class {i}" for i in range(num_classes)],
        "model": {"name": "Ti/8", **TINY, **model_fields},
        "num_classes": num_classes,
        "image_size": 32,
        "dataset": "synthetic",
    }
    checkpointer.save(1, {"step": 1, "params": params}, metadata)
    checkpointer.close()
    (workdir / "config.json").write_text(json.dumps({"loss": "softmax_xent"}))
    return str(workdir)
