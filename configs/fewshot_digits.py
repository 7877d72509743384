"""The paper's claim in miniature: pretraining makes a ViT strong where target data is scarce.

    vit-train --config configs/local.py --workdir /tmp/vit_local          # pretrain: mnist5k
    vit-train --config configs/fewshot_digits.py:init=/tmp/vit_local --workdir /tmp/ft
    vit-train --config configs/fewshot_digits.py --workdir /tmp/scratch   # baseline

Both runs train the main job's model (configs/local.py) on 10 images per class of the
8x8 `digits` (100 images), upsampled to 35 px, and evaluate on its whole test split
(364 images). The pretrained model saw 28 px MNIST, a 4x4 grid of 7x7 patches; here the
grid is 5x5, so the position embedding is resampled when the checkpoint is loaded, as
when the paper fine-tunes at 384 px. With `init` the run fine-tunes with the fine-tune
recipe's optimizer (configs/finetune.py: SGD momentum, cosine, clip 1, no weight decay);
without, the same model trains from scratch on the same images for the same number of
steps with Adam, the optimizer that trains ViTs from scratch best (the paper pretrains
with it), so the baseline is not handicapped by an optimizer chosen for fine-tuning.
The learning rates are the best of a small sweep for each mode (fine-tuning: 0.01, 0.03,
0.1; scratch: 3e-4 to 1e-2). As in the paper, fine-tuning starts from a zero head.

What the two runs reach, with the commands, hardware and date: docs/insight.md.

Arguments: init (a vit_jax workdir or `.npz` of the main job's model; empty: from
scratch), shots (training images per class), image_size, steps, batch, lr (0: the
mode's default), seed.
"""

import importlib.util
import pathlib

import ml_collections

from vit_jax.config import parse_args

FINETUNE_LR = 0.03
SCRATCH_LR = 3e-3


def _recipe(name: str):
    """Another recipe of this directory as a module (configs/ is not a package)."""
    spec = importlib.util.spec_from_file_location(
        f"vit_recipe_{name}", pathlib.Path(__file__).with_name(f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_args(
        arg,
        {
            "init": "",
            "shots": 10,
            "image_size": 35,
            "steps": 500,
            "batch": 64,
            "lr": 0.0,
            "seed": 0,
        },
    )
    # The pretraining recipe's model, data handling and evaluation, on the few-shot digits.
    c = _recipe("local").get_config()
    c.dataset = "digits"
    c.train_examples_per_class = args.shots
    c.image_size = args.image_size
    c.batch_size = args.batch
    c.seed = args.seed
    c.model_init = args.init or None
    if args.init:
        _recipe("finetune").set_finetune_optim(c, lr=args.lr or FINETUNE_LR, steps=args.steps)
    else:
        c.optim.lr = args.lr or SCRATCH_LR
        c.optim.warmup_steps = args.steps // 10
        c.total_steps = args.steps
    c.log_every = 50
    c.eval_every = args.steps
    c.checkpoint_every = args.steps
    return c
