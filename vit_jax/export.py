"""`vit-export`: a training run's latest parameters as a portable `.npz`.

    vit-export --workdir /tmp/vit_local --out /tmp/vit_local.npz

The `.npz` has the original ViT release layout, so the original code, timm and
`vit_jax.checkpoint.load_pretrained` read it. Next to it, `FILE.json` describes the run
(class names, model options, image size, evaluation crop, loss): what `vit-predict` needs
to use the file without the workdir, and what a `.npz` cannot say about itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from etils import epath

from vit_jax import checkpoint


def run_description(workdir: str) -> dict[str, Any]:
    """The latest checkpoint's metadata plus the evaluation settings from `config.json`.

    Fields: class_names, model, num_classes, image_size, dataset, and eval_crop_fraction
    and loss when the workdir has a config.json.
    """
    description = dict(checkpoint.load_metadata(workdir))
    config_file = epath.Path(workdir) / "config.json"
    if config_file.exists():
        config = json.loads(config_file.read_text())
        if "eval_crop_fraction" in config.get("pp", {}):
            description["eval_crop_fraction"] = config["pp"]["eval_crop_fraction"]
        if "loss" in config:
            description["loss"] = config["loss"]
    return description


def description_path(npz_path: str | os.PathLike) -> epath.Path:
    """Where the description of an exported `.npz` lives: same name, `.json`."""
    path = epath.Path(npz_path)
    return path.with_suffix(".json") if path.suffix == ".npz" else epath.Path(f"{path}.json")


def export(workdir: str, out: str | os.PathLike) -> epath.Path:
    """Writes the latest parameters of `workdir` to `out` and its description next to it."""
    params = checkpoint.load_params(workdir)
    out = epath.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.save_npz(params, out)
    json_path = description_path(out)
    json_path.write_text(json.dumps(run_description(workdir), indent=2))
    return json_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vit-export", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="A vit-train workdir.")
    parser.add_argument("--out", required=True, help="The .npz file to write (local or gs://).")
    args = parser.parse_args(argv)
    try:
        json_path = export(args.workdir, args.out)
    except FileNotFoundError as e:
        print(f"vit-export: {e}", file=sys.stderr)
        return 1
    print(f"Wrote {args.out} and {json_path}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
