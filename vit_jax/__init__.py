"""vit_jax: Vision Transformers in JAX/Flax, from pretraining to fine-tuning."""

import os

# TensorFlow only ever runs the input pipeline here (decode, crop, resize): its oneDNN
# kernels do no work for it, and turning them off also removes the banner TensorFlow
# prints about them. Set before anything imports TensorFlow; a user's setting wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
