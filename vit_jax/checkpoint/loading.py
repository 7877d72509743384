"""A model and its parameters from any checkpoint: what prediction, the figures and the
few-shot tool start from.

The checkpoint is a vit-train workdir (its latest step), a file with the `.json` that
vit-export writes next to it, or a bare published file (`.npz` in any Google layout,
`.safetensors` in timm's or transformers' ViT layout), whose model is what its weights
imply (`describe_checkpoint`).
"""

from __future__ import annotations

import json
from typing import Any

import jax
from etils import epath

from vit_jax.checkpoint import hub
from vit_jax.checkpoint.describe import describe_checkpoint, description_path, read_weights
from vit_jax.checkpoint.fit import load_pretrained
from vit_jax.checkpoint.manager import load_metadata
from vit_jax.models import VisionTransformer, abstract_params, build_model, runnable_on

_REQUIRED = ("num_classes", "image_size")
_ARCHITECTURE = ("patch_size", "width", "depth", "mlp_dim", "num_heads")


def run_description(workdir: str) -> dict[str, Any]:
    """The latest checkpoint's metadata plus the evaluation settings from `config.json`.

    Fields: class_names, model, num_classes, image_size, dataset, and eval_crop_fraction
    and loss when the workdir has a config.json.
    """
    description = dict(load_metadata(workdir))
    config_file = epath.Path(workdir) / "config.json"
    if config_file.exists():
        config = json.loads(config_file.read_text())
        if "eval_crop_fraction" in config.get("pp", {}):
            description["eval_crop_fraction"] = config["pp"]["eval_crop_fraction"]
        if "loss" in config:
            description["loss"] = config["loss"]
    return description


def load_model(path: str, **overrides: Any) -> tuple[VisionTransformer, Any, dict[str, Any]]:
    """(model, its parameters as numpy arrays, run description) of the checkpoint at `path`.

    A workdir or an exported file's `.json` describes the run. A bare file is described by
    what its weights imply (`describe_checkpoint`: sizes, pooling, representation layer,
    activation of hub layouts, class count, and for plain ViTs resolution), read once for
    both, and a hub file's class names and evaluation crop by the `config.json` beside it
    (`hub.described_run`).
    `overrides` (None: keep) replace the description's fields; `model` the model's name
    only, keeping those implied fields. What this machine's platform cannot compute is
    replaced (`runnable_on`: float16 by float32, cuDNN attention by XLA's).

    Raises:
      ValueError: the checkpoint does not say its model, class count or image size and
        `overrides` do not either (the message names the flags), or its weights do not fit
        the model so described.
      FileNotFoundError: nothing at `path`.
    """
    weights = None
    if epath.Path(path).is_dir():
        run = run_description(path)
    elif (json_path := description_path(path)).exists():
        run = json.loads(json_path.read_text())
    else:
        weights = read_weights(path)
        implied = describe_checkpoint(weights)
        run = {"model": implied.model}
        if implied.num_classes:
            run["num_classes"] = implied.num_classes
        if implied.image_size:
            run["image_size"] = implied.image_size
        if hub.is_safetensors(path):
            run |= hub.described_run(path, implied.num_classes)
    if overrides.get("model"):
        overrides["model"] = run.get("model", {}) | {"name": overrides["model"]}
    run |= {key: value for key, value in overrides.items() if value is not None}
    model = run.get("model", {})
    named = model.get("name") or all(model.get(key) for key in _ARCHITECTURE)
    missing = [] if named else ["model"]
    missing += [key for key in _REQUIRED if key not in run]
    if missing:
        raise ValueError(
            f"{path} does not say its {', '.join(missing)}: pass "
            + " ".join(f"--{key}" for key in missing)
            + " (a vit-train workdir, or a file exported with vit-export, needs none)."
        )
    model = build_model(runnable_on(run["model"], jax.default_backend()), run["num_classes"])
    init = abstract_params(model, run["image_size"])
    return model, load_pretrained(weights or path, init_params=init), run
