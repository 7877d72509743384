"""What a model learned: the paper's few-shot linear evaluation and its figures.

`fewshot` is the evaluator (during pretraining and for any checkpoint), `maps` computes the
figures' numbers (attention rollout, position-embedding similarity, attention distance,
embedding-filter components), `plots` draws them, `loading` builds a model from any
checkpoint, and `cli` holds the `vit-fewshot` and `vit-visualize` commands.
"""
