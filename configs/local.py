"""The main job: a small ViT on the embedded `mnist5k` data, on a laptop CPU in minutes.

    vit-train --config configs/local.py --workdir /tmp/vit_local

Arguments (after a colon): steps, dataset ("mnist5k" or "digits"), batch.
A 64-wide, 4-deep ViT with 7x7 patches (16 tokens + cls) and +-2 px random shifts.
"""

from vit_jax.config import base_config, parse_args


def get_config(arg: str | None = None):
    args = parse_args(arg, {"steps": 3000, "dataset": "mnist5k", "batch": 128})
    c = base_config()
    c.dataset = args.dataset
    c.eval_split = "test"
    c.image_size = 28
    c.batch_size = args.batch
    c.eval_batch_size = 256
    c.shuffle_buffer = 5000
    c.pp.train_crop = "shift"
    c.pp.shift_pixels = 2
    c.pp.flip = False  # Digits are not mirror-symmetric.
    c.pp.eval_crop_fraction = 1.0

    c.model.name = "Ti/7"
    c.model.update(width=64, depth=4, mlp_dim=256, num_heads=4)

    c.optim.name = "adamw"
    c.optim.lr = 1e-3
    c.optim.warmup_steps = min(200, args.steps // 10)
    c.optim.decay = "cosine"
    c.total_steps = args.steps

    # Few-shot linear accuracy on the embedded digits, as the paper tracks pretraining
    # (docs/insight.md follows the 10-shot number).
    c.fewshot.datasets = {"digits": ("digits", "train", "test")}
    c.fewshot.shots = (1, 5, 10, 25)
    c.fewshot.every = 250

    c.log_every = 100
    c.eval_every = 1000
    c.checkpoint_every = 1000
    return c
