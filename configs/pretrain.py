"""Pretraining as in "An Image is Worth 16x16 Words" (Dosovitskiy et al.), Table 3.

    vit-train --config configs/pretrain.py:variant=B/16,dataset=imagenet21k --workdir DIR

Arguments: variant (any model name, e.g. "L/16", "R50+B/16"); dataset, which picks the
paper's settings:
  imagenet21k  90 epochs, lr 1e-3, linear decay, weight decay 0.03, dropout 0.1
  imagenet2012 300 epochs, lr 3e-3, cosine decay, weight decay 0.3, dropout 0.1
  jft          JFT-style large data: 7 epochs (14 for L/16, H/14), lr by size, wd 0.1
All: Adam (0.9, 0.999), batch 4096, 10k warmup steps, global-norm clip 1.0, 224 px,
representation layer on. `local=true` runs the same recipe on the embedded mnist5k data
for a few steps (a smoke test on any laptop).
The paper's weight decay is decoupled and scaled by the learning rate (AdamW).
"""

from vit_jax.config import base_config, parse_args
from vit_jax.models import parse_variant

# dataset -> (tfds name, train split, eval split, epochs, lr, decay, weight decay, dropout)
DATASETS = {
    "imagenet21k": ("imagenet21k", "full[51200:]", "full[:51200]", 90, 1e-3, "linear", 0.03, 0.1),
    "imagenet2012": ("imagenet2012", "train[:99%]", "train[99%:]", 300, 3e-3, "cosine", 0.3, 0.1),
    "jft": ("jft", "train", "test", 7, 8e-4, "linear", 0.1, 0.0),
}
JFT_LR = {"L/32": 6e-4, "L/16": 4e-4, "H/14": 3e-4}  # Table 3; B and smaller use 8e-4.
JFT_LONG = ("L/16", "H/14")  # Trained for 14 epochs.


def get_config(arg: str | None = None):
    args = parse_args(arg, {"variant": "B/16", "dataset": "imagenet21k", "local": False})
    if args.dataset not in DATASETS:
        raise ValueError(f"dataset={args.dataset!r}: choose one of {sorted(DATASETS)}.")
    name, train_split, eval_split, epochs, lr, decay, wd, dropout = DATASETS[args.dataset]
    c = base_config()
    c.dataset, c.train_split, c.eval_split = name, train_split, eval_split
    c.image_size = 224
    c.batch_size = 4096
    c.num_epochs = epochs
    # Multi-label sources (21k, JFT) train with per-class sigmoids, ImageNet-1k with softmax.
    c.loss = "softmax_xent" if args.dataset == "imagenet2012" else "sigmoid_xent"

    c.model.name = args.variant
    c.model.representation_size = parse_variant(args.variant).width
    c.model.dropout = dropout

    c.optim.name = "adamw"
    c.optim.lr = lr
    c.optim.decay = decay
    c.optim.weight_decay = wd
    c.optim.warmup_steps = 10_000
    c.optim.grad_clip_norm = 1.0
    if args.dataset == "jft":
        c.optim.lr = JFT_LR.get(args.variant, lr)
        c.num_epochs = 14 if args.variant in JFT_LONG else epochs

    c.log_every = 100
    c.eval_every = 5000
    c.checkpoint_every = 1000
    if args.local:
        c.dataset, c.train_split, c.eval_split = "mnist5k", "train", "test"
        c.image_size, c.batch_size, c.eval_batch_size = 32, 64, 256
        c.num_epochs, c.total_steps = None, 20
        c.optim.warmup_steps = 5
        c.log_every = c.eval_every = c.checkpoint_every = 10
    return c
