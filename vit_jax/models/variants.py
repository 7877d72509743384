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

# ResNetV2 stage layouts of the hybrid stems, each with the stride its names count.
# The published configurations (original vit_jax `configs/models.py`):
#   R+Ti/16   stages ()            patch 8 (the name counts the root conv's 2x only)
#   R26+S/32  stages (2, 2, 2, 2)  patch 1
#   R50+B/16  stages (3, 4, 9)     patch 1
#   R50+L/32  stages (3, 4, 6, 3)  patch 1
# "R50" is 16 bottleneck units: three stages (stride 16) for /16 names, four (stride
# 32) for /32 names; the layout with the largest stride dividing the name's patch wins.
HYBRID_STEMS: dict[str, tuple[tuple[tuple[int, ...], int], ...]] = {
    "R": (((), 2),),
    "R26": (((2, 2, 2, 2), 32),),
    "R50": (((3, 4, 6, 3), 32), ((3, 4, 9), 16)),
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

    A hybrid's name gives the published model (see `HYBRID_STEMS`): its patch size
    divided by the stem's named stride is the patch applied on the feature map. That
    makes the name the total stride for R26 and R50 stems; for the root-only "R"
    stem the published names count only the root conv, while its max-pool strides
    2 more: "R+Ti/16" embeds 8x8 patches of a 4x downsampled map, 7x7 tokens at 224.
    """
    match = _NAME.match(name.strip())
    if not match:
        raise ValueError(
            f"Unknown model name {name!r}: expected 'SIZE/PATCH' such as 'B/16' or a "
            f"hybrid 'R50+B/16'; sizes are {', '.join(SIZES)}; stems are "
            f"{', '.join(HYBRID_STEMS)}."
        )
    size, patch = match["size"], int(match["patch"])
    if size not in SIZES:
        raise ValueError(
            f"Unknown model size {size!r} in {name!r}: choose one of "
            f"{', '.join(SIZES)} (case-sensitive: 'g' and 'G' differ)."
        )
    stages = None
    if match["resnet"] is not None:
        stem = match["resnet"]
        if stem not in HYBRID_STEMS:
            raise ValueError(
                f"Unknown hybrid stem {stem!r} in {name!r}: "
                f"choose one of {', '.join(HYBRID_STEMS)}."
            )
        fitting = [(s, stride) for s, stride in HYBRID_STEMS[stem] if patch % stride == 0]
        if not fitting:
            strides = sorted(stride for _, stride in HYBRID_STEMS[stem])
            raise ValueError(
                f"{name!r}: {stem} stem names count a stride of "
                f"{' or '.join(map(str, strides))}, so the patch size in the name must be "
                f"a multiple of {strides[0]}."
            )
        stages, named_stride = max(fitting, key=lambda layout: layout[1])
        patch //= named_stride
    if patch < 1:
        raise ValueError(f"{name!r}: the patch size must be a positive integer.")
    return Variant(patch_size=patch, resnet_stages=stages, **SIZES[size])
