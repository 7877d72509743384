"""`vit-export`: a training run's parameters as a file other code loads.

    vit-export --workdir /tmp/vit_local --out model.npz
    vit-export --workdir /tmp/vit_local --out model.safetensors --format timm_safetensors

Formats (--format):
  npz               the original ViT release layout: vit_jax, the original code and the
                    AugReg colabs load it; any of our models.
  timm_npz          the same file, for timm's `VisionTransformer.load_pretrained(path)`: refused
                    for models that loader cannot rebuild (representation layer, fc_norm,
                    registers, ...).
  timm_safetensors  timm's ViT state dict, for `timm.create_model(...,
                    pretrained_cfg_overlay=dict(file=...))` or `load_state_dict`; refused for
                    models timm's ViT cannot compute (representation layer, ResNet stem, ...).

A refusal says why and which format to use instead: never a file that loads and computes
something else. Next to the file, `FILE.json` describes the run (class names, model
options, image size, evaluation crop, loss) for `vit-predict`, and for the timm formats the
`timm.create_model` arguments that rebuild the model (`timm_model_args`; timm's default
activation is the exact GELU, a Google-style model needs `act_layer="gelu_tanh"`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from etils import epath

from vit_jax import checkpoint
from vit_jax.checkpoint import hub, timm_layout
from vit_jax.checkpoint.npz import unrolled_float32
from vit_jax.checkpoint.safetensors_file import write_safetensors

FORMATS = ("npz", "timm_npz", "timm_safetensors")


def export(workdir: str, out: str | os.PathLike, file_format: str = "npz") -> epath.Path:
    """Writes the latest parameters of `workdir` to `out` and its description next to it.

    Raises ValueError, before writing anything, when `file_format` cannot represent the model.
    """
    if file_format not in FORMATS:
        raise ValueError(f"--format {file_format!r} is not one of {', '.join(FORMATS)}.")
    description = checkpoint.run_description(workdir)
    model = description.get("model", {})
    if file_format.startswith("timm_"):
        problems = timm_layout.export_problems(model, file_format.removeprefix("timm_"))
        if problems:
            instead = (
                "--format timm_safetensors"
                if not timm_layout.export_problems(model, "safetensors")
                else "--format npz (for vit_jax and the original code)"
            )
            raise ValueError(
                f"timm cannot compute what this model computes: {'; '.join(problems)}. "
                f"Export with {instead}, or train a model without it."
            )
    params = checkpoint.load_params(workdir)
    out = epath.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if file_format == "npz":
        checkpoint.save_npz(params, out)
    else:
        flat = unrolled_float32(params)
        heads = flat["Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/kernel"]
        description["timm_model_args"] = timm_layout.timm_model_args(model, heads.shape[0])
        if file_format == "timm_npz":
            checkpoint.save_npz(params, out)
        else:
            fields = {k: model[k] for k in checkpoint.WEIGHT_BOUND_FIELDS if k in model}
            metadata = {"format": "pt", hub.MODEL_METADATA: json.dumps(fields)}
            write_safetensors(timm_layout.to_timm(flat), out, metadata)
    json_path = checkpoint.description_path(out)
    json_path.write_text(json.dumps(description, indent=2))
    return json_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vit-export",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("--workdir", required=True, help="A vit-train workdir.")
    parser.add_argument("--out", required=True, help="The file to write (local or gs://).")
    parser.add_argument("--format", default="npz", choices=FORMATS, help="See below.")
    args = parser.parse_args(argv)
    try:
        json_path = export(args.workdir, args.out, args.format)
    except (FileNotFoundError, ValueError) as e:
        print(f"vit-export: {e}", file=sys.stderr)
        return 1
    print(f"Wrote {args.out} and {json_path}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
