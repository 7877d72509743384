"""vit_jax: Vision Transformers in JAX/Flax, from pretraining to fine-tuning."""
