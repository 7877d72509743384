"""Every configuration field with its default, the checks of the fields no module that uses
them makes, and the parser for recipe arguments.

Recipes in `configs/` start from `base_config()` and change what their recipe needs;
`--config configs/pretrain.py:variant=B/16,dataset=imagenet21k` passes the text after
the colon to the recipe's `get_config`, which reads it with `parse_args`.
"""

from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

from vit_jax.cli import is_local_file


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # Data (see vit_jax/data): a tfds name, "digits", "mnist5k" or "folder:/path/to/root".
    c.dataset = "imagenet2012"
    c.data_dir = placeholder(str)  # tfds data_dir, local or gs://; None: tfds' default.
    c.train_split = "train"
    c.eval_split = "validation"
    c.train_examples_per_class = placeholder(int)  # Few-shot: first N per class.
    c.image_size = 224
    c.batch_size = 4096  # Global, over all processes.
    c.eval_batch_size = 1024
    c.accum_steps = 1  # Gradient accumulation: same update as the full batch at once.
    c.shuffle_buffer = 250_000
    c.seed = 0
    c.pp = ml_collections.ConfigDict()
    c.pp.train_crop = "inception"  # "inception" | "shift" | "resize"
    c.pp.crop_area_min = 0.05
    c.pp.shift_pixels = 0
    c.pp.flip = True
    c.pp.randaugment_layers = 0  # 0 = off.
    c.pp.randaugment_magnitude = 10
    c.pp.mixup_alpha = 0.0  # 0 = off; applied on the device, one Beta(a, a) ratio per step.
    c.pp.eval_crop_fraction = 0.875  # Central square of this fraction of the shorter side.
    c.pp.antialias = False  # Antialiased resizing: slower, off as in the original ViT code.

    # Model: `name` is parsed by vit_jax.models.create_model; the rest are its overrides.
    c.model = ml_collections.ConfigDict()
    c.model.name = "B/16"
    # What the name decodes, set to build another size (None: the name's).
    c.model.patch_size = placeholder(int)
    c.model.width = placeholder(int)
    c.model.depth = placeholder(int)
    c.model.mlp_dim = placeholder(int)
    c.model.num_heads = placeholder(int)
    c.model.pool = "token"  # "token" | "gap" | "map"
    c.model.posemb = "learn"  # "learn" | "sincos2d"
    c.model.num_registers = 0  # Learned register tokens (Darcet et al., 2023); 0: none.
    c.model.representation_size = placeholder(int)
    c.model.dropout = 0.0
    c.model.attention_dropout = 0.0
    c.model.stochastic_depth = 0.0
    c.model.head_bias_init = 0.0
    c.model.dtype = "float32"  # Compute: float32, bfloat16, float16 (GPU); params float32.
    c.model.attention_impl = "xla"  # "xla" | "cudnn" (GPU, bf16)
    c.model.scan = False
    c.model.remat_policy = "none"  # "none" | "selective" | "dots" | "dots_no_batch" | "full"
    c.model.activation = "gelu_tanh"  # "gelu_tanh" (Google checkpoints) | "gelu_exact" (timm, HF)
    c.model.fc_norm = False  # LayerNorm after pooling instead of before it (timm gap models).
    # A checkpoint to start from (.npz, .safetensors or vit_jax workdir). Its architecture
    # replaces the model's: name, sizes and WEIGHT_BOUND_FIELDS (vit_jax.checkpoint.describe).
    c.model_init = placeholder(str)
    c.model_init_reset_head = False  # Zero head even when the class count matches.

    # Objective and optimizer (see vit_jax/optim.py).
    c.loss = "softmax_xent"  # "softmax_xent" | "sigmoid_xent"
    c.label_smoothing = 0.0
    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"  # "adam" | "adamw" | "sgd"
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 10_000
    c.optim.decay = "linear"  # "cosine" | "linear" | "constant"
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.mu_dtype = placeholder(str)  # "bfloat16": Adam's first moment / SGD momentum.
    c.optim.weight_decay = 0.0
    c.optim.grad_clip_norm = 1.0
    c.optim.frozen = ""  # Regex over "/"-joined parameter paths.
    c.total_steps = placeholder(int)  # Or num_epochs over the train split.
    c.num_epochs = placeholder(float)

    # Parallelism (see vit_jax/parallel.py make_mesh). `mesh`: each axis's size inside one
    # TPU slice or GPU node (fast ICI / NVLink); `dcn_mesh`: how many slices or nodes it
    # spans (data-center network). One axis of each may be -1 (all that the others leave).
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.dcn_mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.sharding_rules = "dp"  # "dp" | "fsdp" | "tp"

    # Periodic evaluations (see vit_jax/evaluators), run in this order at their steps and at
    # the last: a kind ("classification": every eval_every on eval_split; "fewshot": every
    # fewshot.every, when fewshot.datasets is set) or "package.module:factory".
    c.evaluators = ("classification", "fewshot")

    # Few-shot linear evaluation during training (see vit_jax/evaluators/fewshot.py): metric
    # name -> (dataset, train_split, test_split), e.g. {"digits": ("digits", "train", "test")};
    # metrics `fewshot/<name>_<n>shot`. Empty: off.
    c.fewshot = ml_collections.ConfigDict()
    c.fewshot.datasets = ml_collections.ConfigDict()
    c.fewshot.shots = (1, 5, 10, 25)
    c.fewshot.holdout_per_class = 5  # Train-split images per class that choose the L2 strength.
    c.fewshot.every = 1000  # Steps between evaluations (and at the last step).

    # Non-finite loss or gradients stop the run with an error (no bad state is ever saved);
    # True skips such updates on the device instead and counts them (train/nonfinite_updates).
    c.skip_nonfinite_updates = False

    # Bookkeeping: free to change between restarts (vit_jax/workdir.py BOOKKEEPING).
    c.log_every = 50
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    # JAX's persistent compilation cache (vit_jax/workdir.py use_compilation_cache): "workdir"
    # keeps compiled programs in <workdir>/compilation_cache so a restart skips compiling;
    # a path (local or gs://) shares them between runs; "" leaves JAX's own setting.
    c.compilation_cache_dir = "workdir"
    # A jax.profiler trace of steps first_step.. (0: off) into <workdir>/tensorboard, for
    # TensorBoard's profile plugin and Perfetto (vit_jax/profiling.py).
    c.profile = ml_collections.ConfigDict({"first_step": 0, "steps": 5, "all_processes": False})
    # jax.transfer_guard level for the loop: "disallow" makes an implicit host<->device copy
    # an error (the tests run so); "log" reports them; "allow" is free.
    c.transfer_guard = "allow"
    # Resuming checks that the fields deciding the trajectory are unchanged; name the ones
    # you change deliberately, e.g. "batch_size,optim.lr" ("process_count", "batch_shares" too).
    c.allow_config_change = ""
    return c


# `jax.transfer_guard`'s levels, for `config.transfer_guard`.
TRANSFER_GUARDS = ("allow", "log", "disallow", "log_explicit", "disallow_explicit")
# `config.pp.train_crop`'s kinds (vit_jax/data/preprocess.py).
TRAIN_CROPS = ("inception", "shift", "resize")


def field_default(key: str) -> Any:
    """The default of the field `key` ("model.representation_size") in `base_config`.

    Raises:
      KeyError: `key` names no field.
    """
    field = base_config()
    for name in key.split("."):
        if not isinstance(field, ml_collections.ConfigDict) or name not in field:
            raise KeyError(f"config.{key} is no field of vit_jax/config.py.")
        field = field[name]
    return field


def check_run_fields(config: ml_collections.ConfigDict) -> None:
    """Refuses the fields of a run that neither the model, the optimizer nor the `Trainer`
    checks: its step intervals and length, the few-shot subset, the compilation cache, the
    transfer guard and preprocessing. `vit-train` calls it before the workdir is touched,
    `vit-bench compile` before it compiles, so that a plan that fits is one `vit-train`
    starts.

    Raises:
      ValueError: naming the field, its value and what it may be.
    """
    check_intervals(config)
    for field in ("total_steps", "train_examples_per_class"):
        if config[field] is not None and config[field] < 1:
            raise ValueError(f"config.{field}={config[field]} must be >= 1 (or None).")
    if config.num_epochs is not None and not config.num_epochs > 0:
        raise ValueError(f"config.num_epochs={config.num_epochs} must be > 0 (or None).")
    cache = config.compilation_cache_dir
    if is_local_file(cache):
        raise ValueError(
            f"config.compilation_cache_dir={cache!r} is a file: name a directory, 'workdir' "
            "(<workdir>/compilation_cache) or '' (JAX's own setting)."
        )
    if config.transfer_guard not in TRANSFER_GUARDS:
        raise ValueError(
            f"config.transfer_guard={config.transfer_guard!r}: choose one of {TRANSFER_GUARDS}."
        )
    check_preprocessing(config.pp)


def check_intervals(config: ml_collections.ConfigDict) -> None:
    """Every step interval and the checkpoint count must be positive integers."""
    fields = ["log_every", "eval_every", "checkpoint_every", "keep_checkpoints"]
    if config.fewshot.datasets:
        fields.append("fewshot.every")
    for field in fields:
        value = config[field]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"config.{field}={value!r}: must be a whole number >= 1 (a step interval or "
                "a count); to do something rarely, use a large value such as total_steps."
            )


def check_preprocessing(pp: ml_collections.ConfigDict) -> None:
    """Refuses a `config.pp` the streams cannot follow.

    Raises:
      ValueError: an unknown train crop, its parameter out of range (crop_area_min outside
        (0, 1], negative shift_pixels), negative randaugment_layers, or eval_crop_fraction
        outside (0, 1].
    """
    if pp.train_crop not in TRAIN_CROPS:
        raise ValueError(f"config.pp.train_crop={pp.train_crop!r}; expected one of {TRAIN_CROPS}")
    if pp.train_crop == "inception" and not 0 < pp.crop_area_min <= 1:
        raise ValueError(
            "config.pp.crop_area_min must be in (0, 1], the smallest fraction of the image a "
            f"crop covers, got {pp.crop_area_min}"
        )
    if pp.train_crop == "shift" and pp.shift_pixels < 0:
        raise ValueError(f"config.pp.shift_pixels must be >= 0, got {pp.shift_pixels}")
    if pp.randaugment_layers < 0:
        raise ValueError(
            f"config.pp.randaugment_layers must be >= 0 (0 = off), got {pp.randaugment_layers}"
        )
    if not 0 < pp.eval_crop_fraction <= 1:
        raise ValueError(
            f"config.pp.eval_crop_fraction must be in (0, 1], got {pp.eval_crop_fraction}"
        )


def parse_args(arg: str | None, defaults: dict[str, Any]) -> ml_collections.ConfigDict:
    """Parses "key=value,key=value" against `defaults`, casting each value to the default's type.

    Unknown keys are errors, so a typo never silently falls back to a default.
    """
    args = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in defaults:
            raise ValueError(
                f"Bad recipe argument {item!r}: expected key=value with key in {sorted(defaults)}."
            )
        default = defaults[key]
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"Recipe argument {key}={value!r}: expected true or false.")
            args[key] = value.lower() in ("true", "1")
        else:
            try:
                args[key] = type(default)(value)
            except ValueError as e:
                kind = "an integer" if isinstance(default, int) else "a number"  # str never fails.
                raise ValueError(f"Recipe argument {key}={value!r}: expected {kind}.") from e
    return args
