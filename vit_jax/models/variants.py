"""The ViT size table and model-name parsing ("B/16", "R50+B/16", "R+Ti/16")."""

from __future__ import annotations

import dataclasses
import re

# width, depth, mlp_dim, num_heads: ViT (Dosovitskiy et al.), AugReg (Steiner et al.)
# and "Scaling Vision Transformers" (Zhai et al.).
SIZES: dict[str, dict[str, int]] = {
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "M": dict(width=512, depth=12, mlp_dim=2048, num_heads=8),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    "H": dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
    "g": dict(width=1408, depth=40, mlp_dim=6144, num_heads=16),
    "G": dict(width=1664, depth=48, mlp_dim=8192, num_heads=16),
}

# ResNetV2 stages of the hybrid stems. "R" alone is the root convolution only.
RESNET_STAGES: dict[str, tuple[int, ...]] = {
    "R": (),
    "R26": (2, 2, 2, 2),
    "R50": (3, 4, 9),
}

_NAME = re.compile(r"^(?:(?P<resnet>R\d*)\+)?(?P<size>[A-Za-z]+)/(?P<patch>\d+)$")


@dataclasses.dataclass(frozen=True)
class Variant:
    """Architecture hyper-parameters decoded from a model name."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int
    resnet_stages: tuple[int, ...] | None  # None: plain ViT; a tuple: hybrid stem.


def parse_variant(name: str) -> Variant:
    """Decodes "B/16", "L/14", "R50+B/16", "R26+S/32" or "R+Ti/16".

    For hybrids the name's patch size is the total stride of the stem plus the
    patch embedding, as in the published models: the ResNet root halves the image,
    its max-pool and each further stage halve it again, and the remaining factor is
    the patch size applied on the feature map.
    """
    match = _NAME.match(name.strip())
    if not match:
        raise ValueError(
            f"Unknown model name {name!r}: expected 'SIZE/PATCH' such as 'B/16' or a "
            f"hybrid 'R50+B/16'; sizes are {', '.join(SIZES)}; stems are "
            f"{', '.join(RESNET_STAGES)}."
        )
    size, patch = match["size"], int(match["patch"])
    if size not in SIZES:
        raise ValueError(
            f"Unknown model size {size!r} in {name!r}: choose one of "
            f"{', '.join(SIZES)} (case-sensitive: 'g' and 'G' differ)."
        )
    stages = None
    if match["resnet"] is not None:
        if match["resnet"] not in RESNET_STAGES:
            raise ValueError(
                f"Unknown hybrid stem {match['resnet']!r} in {name!r}: "
                f"choose one of {', '.join(RESNET_STAGES)}."
            )
        stages = RESNET_STAGES[match["resnet"]]
        stride = resnet_stride(stages)
        if patch % stride:
            raise ValueError(
                f"{name!r}: the {match['resnet']} stem already downsamples by {stride}, "
                f"so the total patch size must be a multiple of {stride}."
            )
        patch //= stride
    if patch < 1:
        raise ValueError(f"{name!r}: the patch size must be a positive integer.")
    return Variant(patch_size=patch, resnet_stages=stages, **SIZES[size])


def resnet_stride(stages: tuple[int, ...]) -> int:
    """Total downsampling of a ResNetV2 stem with these stage depths."""
    if not stages:
        return 2  # Root convolution only.
    return 4 * 2 ** (len(stages) - 1)  # Root conv + max-pool, then stride 2 per later stage.
