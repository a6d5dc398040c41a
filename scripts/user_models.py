#!/usr/bin/env python3
"""Write an ``extra_model_paths.yaml`` that serves a user's own models folder in ComfyUI.

    python -m scripts.user_models /path/to/models /path/to/out.yaml      (from the repository root)

Understands a ComfyUI ``models/`` folder (``checkpoints/``, ``loras/``, ``vae/``, ...), an
AUTOMATIC1111 one (``Stable-diffusion/``, ``Lora/``, ``VAE/``), and a flat folder of
``.safetensors`` files (then served as both checkpoints and LoRAs). Prints what it found.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import hypersd_dev  # noqa: F401  (registers the pack's package)
from ComfyUI_HyperSD.hypersd_core import files

KINDS = {
    "checkpoints": ["checkpoints", "Stable-diffusion"],
    "loras": ["loras", "Lora", "LoRA"],
    "vae": ["vae", "VAE"],
    "diffusion_models": ["diffusion_models", "unet"],
    "text_encoders": ["text_encoders", "clip"],
    "embeddings": ["embeddings"],
    "upscale_models": ["upscale_models", "ESRGAN"],
    "controlnet": ["controlnet", "ControlNet"],
}


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    base, out = Path(sys.argv[1]).expanduser().resolve(), Path(sys.argv[2])
    if not base.is_dir():
        print(f"HYPERSD_MODELS_DIR={base} is not a folder.", file=sys.stderr)
        return 1
    lines = ["hypersd_user_models:", f"    base_path: {json.dumps(str(base))}"]
    found = []
    for kind, names in KINDS.items():
        present = [n for n in names if (base / n).is_dir()]
        if present:
            lines.append(f"    {kind}: |")
            lines += [f"        {n}" for n in present]
            found.append(f"{kind} ({', '.join(present)})")
    if not found:
        if not any(p.suffix in (".safetensors", ".ckpt", ".pt") for p in base.iterdir()):
            print(f"{base} has no model subfolders (checkpoints/, loras/, ...) and no model files.", file=sys.stderr)
            return 1
        lines += ["    checkpoints: .", "    loras: ."]
        found.append("checkpoints and loras (flat folder)")
    files.write_text(out, "\n".join(lines) + "\n")
    print(f"[hypersd] serving models from {base}: {'; '.join(found)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
