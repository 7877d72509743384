"""`vit-bench`: step, input and compile figures from the real code paths of any recipe
(docs/performance.md, docs/scale.md).

    vit-bench train --config configs/pretrain.py:variant=B/16 --config.batch_size=256
    vit-bench infer --config configs/pretrain.py:variant=B/16 --json
    vit-bench input --config configs/pretrain.py --config.dataset=folder:/tmp/photos
    vit-bench compile --target v5e-256 --config configs/pretrain.py:variant=B/16 --sweep

`train` and `infer` time the sharded steps on synthetic data and need no TensorFlow;
`input` times the real input pipeline alone. `photos` writes a folder of JPEG photos for
input benchmarks on machines without a dataset. `compile` compiles the train and eval
steps for a TPU slice or GPU node this machine does not have (`targets`, `compile`,
`hlo`) and, with `--sweep`, finds the fastest setting that fits (`sweep`).
"""
