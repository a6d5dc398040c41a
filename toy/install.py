#!/usr/bin/env python3
"""Install the toy model family into a ComfyUI models folder.

    python -m toy.install --models-dir <ComfyUI>/models [--force]      (from the repository root)

Writes ``checkpoints/hypersd_toy_digits.safetensors``: a full SD1.5-format checkpoint
(``model.diffusion_model.*`` from ``weights/toy_unet.safetensors``,
``first_stage_model.*`` from ``weights/toy_vae.safetensors`` and
``cond_stage_model.transformer.text_model.*``, the CLIP-L that ``clip`` generates, seed 0),
and ``vae/hypersd_toy_vae.safetensors`` (the VAE alone, for ``VAELoader``), and copies
the toy's distilled LoRAs (``weights/hypersd_toy*lora*.safetensors``) into ``loras/``. The
checkpoint and VAE carry a stamp of what they were built from (in their safetensors
metadata), LoRAs are compared by content: a second run writes nothing. Writes are atomic
(``hypersd_core.files``), with the permissions a plain write gives. Needs only torch, numpy and
safetensors (no ComfyUI).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from pathlib import Path

import hypersd_dev  # noqa: F401  (registers the pack's package)
from ComfyUI_HyperSD.hypersd_core import files

from . import clip, data

log = logging.getLogger(__name__)

WEIGHTS = Path(__file__).resolve().parent / "weights"
CHECKPOINT_NAME = "hypersd_toy_digits.safetensors"
VAE_NAME = "hypersd_toy_vae.safetensors"
FORMAT_VERSION = "1"
CLIP_SEED = 0  # the seed train_teacher.py trained the UNet against
DATASET_PER_DIGIT = 50  # captioned training digits per class written into ComfyUI's input/ (--input-dir)
# sha256 over the sorted names and fp16 bytes of clip.generate_clip_l(CLIP_SEED): the toy UNet
# was trained on this encoder's embeddings, so the generator must keep giving these bytes.
CLIP_SHA256 = "6cacb61d9d89873645100ac4697a847899b20c01a218f06f1047cd9cbfc7bfc8"


def file_hash(path: Path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(sd: dict) -> str:
    import torch

    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def stamp(weights: Path = WEIGHTS) -> str:
    parts = [FORMAT_VERSION, f"clip={CLIP_SEED}:{CLIP_SHA256}", file_hash(weights / "toy_unet.safetensors"),
             file_hash(weights / "toy_vae.safetensors")]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _existing_stamp(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("hypersd_toy_stamp")
    except Exception:  # a truncated or foreign file: rebuild it
        return None


def checkpoint_state_dict(weights: Path = WEIGHTS) -> dict:
    from safetensors.torch import load_file

    sd = {}
    for k, v in load_file(str(weights / "toy_unet.safetensors")).items():
        sd["model.diffusion_model." + k] = v
    for k, v in load_file(str(weights / "toy_vae.safetensors")).items():
        sd["first_stage_model." + k] = v
    text = clip.generate_clip_l(CLIP_SEED)
    if fingerprint(text) != CLIP_SHA256:
        log.warning("the generated CLIP-L differs from the one the toy UNet was trained with (toy/clip.py "
                    "changed?): prompts will not steer the toy teacher until it is retrained")
    sd.update({"cond_stage_model.transformer." + k: v for k, v in text.items()})
    return sd


def install(models_dir: Path, force: bool = False, weights: Path = WEIGHTS) -> dict:
    """Install into ``models_dir``; returns ``{"checkpoint": path, "vae": path, "written": [...]}``."""
    models_dir = Path(models_dir)
    st = stamp(weights)
    meta = {"hypersd_toy_stamp": st, "modelspec.title": "Hyper-SD toy digits (SD1.5 format)",
            "modelspec.architecture": "stable-diffusion-v1"}
    ckpt = models_dir / "checkpoints" / CHECKPOINT_NAME
    vae = models_dir / "vae" / VAE_NAME
    written = []
    if force or _existing_stamp(ckpt) != st:
        log.info("writing %s", ckpt)
        files.save_safetensors(ckpt, checkpoint_state_dict(weights), meta)
        written.append(str(ckpt))
    if force or _existing_stamp(vae) != st:
        from safetensors.torch import load_file

        log.info("writing %s", vae)
        files.save_safetensors(vae, load_file(str(weights / "toy_vae.safetensors")), meta)
        written.append(str(vae))
    loras = []
    for src in sorted(weights.glob("hypersd_toy*lora*.safetensors")):
        dest = models_dir / "loras" / src.name
        loras.append(dest)
        if force or not dest.is_file() or dest.stat().st_size != src.stat().st_size or file_hash(dest) != file_hash(src):
            log.info("writing %s", dest)
            files.copy_file(src, dest)
            written.append(str(dest))
    rewards = []  # the toy's reward model for feedback learning (toy/train_reward.py), not the judge
    for src in sorted(weights.glob("hypersd_toy_reward*.safetensors")):
        dest = models_dir / "hypersd_rewards" / src.name
        rewards.append(dest)
        if force or not dest.is_file() or dest.stat().st_size != src.stat().st_size or file_hash(dest) != file_hash(src):
            log.info("writing %s", dest)
            files.copy_file(src, dest)
            written.append(str(dest))
    for path in (ckpt, vae, *loras, *rewards):  # earlier versions wrote 0600 files that another user cannot read
        if path.is_file() and path.stat().st_mode & 0o777 == 0o600 != files.new_file_mode():
            path.chmod(files.new_file_mode())
    return {"checkpoint": ckpt, "vae": vae, "loras": loras, "rewards": rewards, "written": written}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", type=Path, required=True, help="ComfyUI's models folder")
    ap.add_argument("--force", action="store_true", help="rebuild even when the stamps match")
    ap.add_argument("--input-dir", type=Path,
                    help="ComfyUI's input folder: also write the captioned training digits of the toy's training "
                         f"examples there ({data.DATASET_FOLDER}, {DATASET_PER_DIGIT} per digit)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="[hypersd toy] %(message)s")
    if args.input_dir is not None:
        data.write_dataset(args.input_dir / data.DATASET_FOLDER, DATASET_PER_DIGIT)
    res = install(args.models_dir, force=args.force)
    if res["written"]:
        names = ", ".join(Path(p).name for p in res["written"])
        print(f"[hypersd toy] installed {names} in {args.models_dir}", file=sys.stderr)
    else:
        print("[hypersd toy] toy models already installed and up to date", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
