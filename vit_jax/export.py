"""`vit-export`: a training run's parameters as a file other code loads.

    vit-export --workdir /tmp/vit_local --out model.npz            # the original ViT layout
    vit-export --workdir /tmp/vit_local --out model.safetensors    # timm's ViT state dict

Formats (--format; without it the extension of --out decides: .npz is npz, .safetensors is
timm_safetensors; a --format that the extension contradicts is refused):
  npz               the original ViT release layout: vit_jax, the original code and the
                    AugReg colabs load it; any of our models.
  timm_npz          the same file, for timm's `model.load_pretrained(path)`: refused for
                    models that loader cannot rebuild (representation layer, fc_norm,
                    registers, ...).
  timm_safetensors  timm's ViT state dict; refused for models timm's ViT cannot compute
                    (representation layer, ResNet stem, sincos2d position embedding).

A refusal says why and which format to use instead: never a file that loads and computes
something else. Next to the file, `FILE.json` describes the run (class names, model
options, image size, evaluation crop, loss) for `vit-predict` and fine-tuning; for the timm
formats it also holds `timm_model_args`, every `timm.create_model` argument that rebuilds
the model at its size: embed_dim, depth, num_heads, mlp_ratio, patch_size, img_size,
num_classes, pooling, fc_norm, registers and activation (Google-style models use
`act_layer="gelu_tanh"`; timm's default is the exact GELU), and the input normalisation
(`pretrained_cfg_overlay`, for timm's `resolve_data_config`).

Loading an export into timm (any size; the model name only picks the ViT class, the
arguments set every dimension):

    import json, safetensors.torch, timm
    args = json.load(open("model.json"))["timm_model_args"]
    model = timm.create_model("vit_base_patch16_224", pretrained=False, **args).eval()
    model.load_state_dict(safetensors.torch.load_file("model.safetensors"))

For --format timm_npz the last line is `model.load_pretrained("model.npz")`. Keep the
.json's num_classes: load_state_dict refuses a head of another size, while timm's .npz
loader would keep a random head without a word. The model takes NCHW float32 images in
[-1, 1] (mean and std 0.5), resized and cropped as the .json's eval_crop_fraction says.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from vit_jax import cli

FORMATS = ("npz", "timm_npz", "timm_safetensors")
_EXTENSIONS = {".npz": ("npz", "timm_npz"), ".safetensors": ("timm_safetensors",)}


def choose_format(out: str | os.PathLike, requested: str | None = None) -> str:
    """The format `out` is written in: `requested`, or the one its extension names.

    Raises ValueError for an unknown format, an extension that contradicts `requested`,
    or, without `requested`, an extension that names no format.
    """
    if requested is not None and requested not in FORMATS:
        raise ValueError(f"--format {requested!r} is not one of {', '.join(FORMATS)}.")
    extension = os.path.splitext(os.fspath(out))[1].lower()
    formats = _EXTENSIONS.get(extension)
    if requested is None:
        if formats is None:
            raise ValueError(
                f"--out {os.fspath(out)}: its extension names no format: end it in .npz or "
                f".safetensors, or pass --format ({', '.join(FORMATS)})."
            )
        return formats[0]
    if formats is not None and requested not in formats:
        written = ".safetensors" if requested == "timm_safetensors" else ".npz"
        raise ValueError(
            f"--format {requested} writes a {written} file, but --out ends in {extension}: "
            f"rename --out, or pass --format {' or '.join(formats)}."
        )
    return requested


def export(workdir: str, out: str | os.PathLike, file_format: str | None = None) -> str:
    """Writes the latest parameters of `workdir` to `out` and its description next to it.

    `file_format`: one of FORMATS; None takes it from `out`'s extension (`choose_format`).
    Returns the description's path. Raises ValueError, before writing anything, when the
    format cannot represent the model or contradicts the extension, or when the description
    `out` would get (X.json) describes another export (X.npz beside X.safetensors);
    FileNotFoundError when `workdir` holds no checkpoint.
    """
    file_format = choose_format(out, file_format)
    from etils import epath

    from vit_jax import checkpoint
    from vit_jax.checkpoint import hub, timm_layout
    from vit_jax.checkpoint.npz import unrolled_float32
    from vit_jax.checkpoint.safetensors_file import write_safetensors

    json_path = checkpoint.description_path(out)
    if json_path.exists():  # X.npz and X.safetensors would share X.json.
        described = [
            json_path.with_suffix(suffix)
            for suffix in (".npz", hub.SUFFIX)
            if json_path.with_suffix(suffix) != epath.Path(out)
        ]
        for other in (path for path in described if path.exists()):
            raise ValueError(
                f"--out {out}: {json_path} describes {other} already, and would describe this "
                f"file instead. Name the export otherwise (e.g. {json_path.stem}_"
                f"{file_format}{epath.Path(out).suffix})."
            )
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
    if file_format.startswith("timm_"):
        flat = unrolled_float32(params)
        description["timm_model_args"] = timm_layout.timm_model_args(
            model, flat[_ATTENTION_OUT].shape[0]
        ) | _timm_size(flat, description["image_size"])
    out = epath.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if file_format == "timm_safetensors":
        fields = {k: model[k] for k in checkpoint.WEIGHT_BOUND_FIELDS if k in model}
        # timm fuses the heads into one matrix: the count travels in the metadata.
        fields["num_heads"] = flat[_ATTENTION_OUT].shape[0]
        metadata = {"format": "pt", hub.MODEL_METADATA: json.dumps(fields)}
        write_safetensors(timm_layout.to_timm(flat), out, metadata)
    else:
        checkpoint.save_npz(params, out)
    json_path.write_text(json.dumps(description, indent=2))
    return str(json_path)


_ATTENTION_OUT = "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/out/kernel"
_MLP_IN = "MlpBlock_0/Dense_0/kernel"


def _timm_size(flat: dict[str, Any], image_size: int) -> dict[str, Any]:
    """The `timm.create_model` arguments that fix the model's dimensions, read off its weights.

    Raises ValueError when timm cannot express the MLP width (it builds
    `int(embed_dim * mlp_ratio)` hidden units).
    """
    patch, _, _, width = flat["embedding/kernel"].shape  # [patch, patch, 3, width]
    mlp_dim = flat[f"Transformer/encoderblock_0/{_MLP_IN}"].shape[1]
    if int(width * (mlp_dim / width)) != mlp_dim:
        raise ValueError(
            f"timm builds int(embed_dim * mlp_ratio) MLP units and cannot make {mlp_dim} "
            f"from width {width}: export with --format npz."
        )
    depth = sum(k.startswith("Transformer/encoderblock_") and k.endswith(_MLP_IN) for k in flat)
    return {
        "img_size": image_size,
        "patch_size": patch,
        "embed_dim": width,
        "depth": depth,
        "mlp_ratio": mlp_dim / width,
        "num_classes": flat["head/kernel"].shape[-1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser("vit-export", __doc__)
    parser.add_argument(
        "--workdir", required=True, type=cli.absolute_path, help="A vit-train workdir."
    )
    parser.add_argument("--out", required=True, help="The file to write (local or gs://).")
    parser.add_argument("--format", choices=FORMATS, help="See above; default: by extension.")
    args = parser.parse_args(argv)
    out = cli.absolute_path(args.out)

    def write() -> int:
        from etils import epath

        if epath.Path(out).is_dir():
            raise ValueError(f"--out {out} is a directory: name the file, e.g. {out}/model.npz.")
        json_path = export(args.workdir, out, args.format)
        print(f"Wrote {out} and {json_path}.")
        return 0

    return cli.run("vit-export", write)


if __name__ == "__main__":
    sys.exit(main())
