"""transformers -> vit_jax, against the real transformers: `save_pretrained` output imports exactly.

Random `ViTForImageClassification` / `ViTModel`s are written with `save_pretrained` (a
`model.safetensors` and a `config.json`), imported, and compared with transformers'
own forward pass.
"""

from __future__ import annotations

import numpy as np
import pytest
from interop_support import (
    TINY,
    assert_same_logits,
    import_model,
    our_logits,
    randomize,
    torch_forward,
)
from transformers import ViTConfig, ViTForImageClassification, ViTModel

from vit_jax import checkpoint

pytestmark = pytest.mark.interop


def save_hf(module_class, directory, **config) -> tuple:
    options = dict(
        hidden_size=TINY["width"],
        num_hidden_layers=TINY["depth"],
        num_attention_heads=TINY["num_heads"],
        intermediate_size=TINY["mlp_dim"],
        image_size=32,
        patch_size=TINY["patch_size"],
        num_labels=10,
    )
    module = randomize(lambda: module_class(ViTConfig(**(options | config))))
    module.save_pretrained(str(directory))
    return module, str(directory / "model.safetensors")


@pytest.mark.parametrize("config", [{}, {"qkv_bias": False}], ids=["default", "no_qkv_bias"])
def test_vit_for_image_classification_imports_with_its_logits(config, tmp_path):
    """transformers' defaults, layer_norm_eps=1e-12 included (ours is 1e-6: far below 1e-5)."""
    source, path = save_hf(ViTForImageClassification, tmp_path, **config)
    described = checkpoint.describe_checkpoint(path)
    assert described.source == "transformers ViT layout"
    assert described.model["activation"] == "gelu_exact" and described.num_classes == 10
    model, params = import_model(path)
    assert_same_logits(our_logits(model, params), torch_forward(source).logits)

    tanh_model, _ = import_model(path, activation="gelu_tanh")
    with pytest.raises(AssertionError):
        assert_same_logits(our_logits(tanh_model, params), torch_forward(source).logits)


def test_vit_model_pooler_is_the_representation_layer(tmp_path):
    source, path = save_hf(ViTModel, tmp_path)
    described = checkpoint.describe_checkpoint(path)
    assert described.model["representation_size"] == TINY["width"] and described.num_classes == 0
    model, params = import_model(path)
    assert_same_logits(our_logits(model, params), torch_forward(source).pooler_output)

    # Fine-tuning from it: a zero head of the target's classes, the pooler dropped or kept.
    _, finetune = import_model(path, num_classes=7, representation_size=None)
    assert "pre_logits" not in finetune and not np.any(finetune["head"]["kernel"])


def test_hidden_act_in_config_sets_the_activation(tmp_path):
    source, path = save_hf(ViTForImageClassification, tmp_path, hidden_act="gelu_pytorch_tanh")
    assert checkpoint.describe_checkpoint(path).model["activation"] == "gelu_tanh"
    model, params = import_model(path)
    assert_same_logits(our_logits(model, params), torch_forward(source).logits)


def test_an_activation_our_vit_lacks_is_refused(tmp_path):
    _, path = save_hf(ViTForImageClassification, tmp_path, hidden_act="relu")
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        checkpoint.describe_checkpoint(path)
