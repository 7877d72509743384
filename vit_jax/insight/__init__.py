"""What a model learned: the paper's figures (the few-shot probe is `vit_jax.evaluators`).

`maps` computes the figures' numbers (attention rollout, position-embedding similarity,
attention distance, embedding-filter components), `plots` draws them, `loading` builds a
model from any checkpoint, `figures` and `cli` hold the `vit-fewshot` and `vit-visualize`
commands.
"""
