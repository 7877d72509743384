"""transformers -> vit_jax, against the real transformers: `save_pretrained` output imports exactly.

Random `ViTForImageClassification` / `ViTModel`s are written with `save_pretrained` (a
`model.safetensors` and a `config.json`), imported, and compared with transformers'
own forward pass.
"""

from __future__ import annotations

import numpy as np
import pytest
from interop_support import (
    PIXELS,
    TINY,
    assert_same_logits,
    import_model,
    our_logits,
    randomize,
    torch_forward,
)
from transformers import (
    AutoImageProcessor,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    ViTModel,
)

from vit_jax import checkpoint
from vit_jax.checkpoint import hub
from vit_jax.models import scale_images

pytestmark = pytest.mark.interop


def save_hf(module_class, directory, max_shard_size="5GB", **config) -> tuple:
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
    module.save_pretrained(str(directory), max_shard_size=max_shard_size)
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


def test_a_sharded_checkpoint_imports_through_its_index_with_its_logits(tmp_path):
    """transformers splits a checkpoint above its max_shard_size (ViT-g's 4 GB of float32
    weights, say) into shards and an index naming each tensor's shard. One shard read
    alone failed with a KeyError for the tensors in the others."""
    source, _ = save_hf(ViTForImageClassification, tmp_path, max_shard_size="40KB")
    index = tmp_path / "model.safetensors.index.json"
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert index.exists() and len(shards) >= 3, sorted(tmp_path.iterdir())
    assert checkpoint.describe_checkpoint(str(index)).source == "transformers ViT layout"
    model, params = import_model(str(index))
    assert_same_logits(our_logits(model, params), torch_forward(source).logits)

    with pytest.raises(ValueError, match=f"is shard 2 of {len(shards)} of a sharded checkpoint: "
                       f"give its index, {index}, which names every shard"):  # fmt: skip
        checkpoint.read_weights(str(shards[1]))
    with pytest.raises(FileNotFoundError, match=f"No checkpoint found in '{tmp_path}'.*name the "
                       f"file: {index}\\.$"):  # fmt: skip
        checkpoint.read_weights(str(tmp_path))
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=f"{shards[-1]} is missing: the index"):
        checkpoint.read_weights(str(index))


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


IMAGENET = dict(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])


@pytest.mark.parametrize(
    "processor",
    [IMAGENET, IMAGENET | dict(rescale_factor=1 / 127.5), dict(do_normalize=False)],
    ids=["imagenet", "imagenet_rescaled_otherwise", "unnormalised"],
)
def test_weights_trained_on_other_pixels_take_ours(processor, tmp_path):
    """The preprocessor_config.json beside the weights says what pixels they were trained
    on: imported, they take pixels as `scale_images` gives them to every vit_jax model and
    compute what transformers computes on the same pixels through its own image processor."""
    source, path = save_hf(ViTForImageClassification, tmp_path)
    ViTImageProcessor(**processor).save_pretrained(str(tmp_path))
    pixel_values = AutoImageProcessor.from_pretrained(str(tmp_path))(
        images=list(PIXELS), do_resize=False, return_tensors="pt"
    )["pixel_values"]
    theirs = torch_forward(source, pixel_values.numpy().transpose(0, 2, 3, 1)).logits

    model, params = import_model(path)
    assert_same_logits(our_logits(model, params, np.asarray(scale_images(PIXELS))), theirs)


def test_a_stated_normalisation_that_cannot_be_is_refused_naming_the_file(tmp_path):
    _, path = save_hf(ViTForImageClassification, tmp_path)
    ViTImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.0, 0.5]).save_pretrained(
        str(tmp_path)
    )
    with pytest.raises(ValueError, match="preprocessor_config.json states an input std of"):
        checkpoint.read_weights(path)


def test_class_names_come_from_the_saved_id2label(tmp_path):
    names = {i: f"name {i}" for i in range(10)}
    _, path = save_hf(ViTForImageClassification, tmp_path, id2label=names)
    assert hub.described_run(path, 10)["class_names"] == [names[i] for i in range(10)]
