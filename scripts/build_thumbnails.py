#!/usr/bin/env python3
"""Write the thumbnail of every example workflow: ``example_workflows/<name>.jpg``.

    OMP_NUM_THREADS=1 .venv/bin/python -m scripts.build_thumbnails      (from the repository root)

ComfyUI's template browser shows ``<name>.jpg`` beside ``<name>.json`` (a grey box without
one). Each picture is drawn here, in this process, by the repository's toy model family (the
tiny SD1.5-format model of handwritten digits, ``toy/``; nothing is downloaded) with the
recipe closest to what the workflow does:

* unified / one-step workflows and FLUX: the toy unified LoRA, TCD sampler, 1 step;
* N-step and CFG LoRA workflows: the toy 8-step LoRA (TSCD stage 1), TCD eta 0.3, 8 trailing steps;
* training workflows: the toy unified LoRA at 2 steps;
* feedback, rating and preference workflows: the toy feedback LoRA at 4 steps.

A thumbnail is the digits 0 to 7 (one fixed seed each, so a rerun writes the same pictures)
in a 4x2 grid, each scaled up nearest-neighbour to 96x96 px on a dark background, and a
caption with the workflow's title and the recipe; JPEG quality 85, 426x266 px. A
thumbnail whose workflow is gone is removed. ``tests/test_thumbnails.py`` checks that every
workflow has one.
"""
from __future__ import annotations

import io
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import hypersd_dev
from hypersd_dev import REPO

WEIGHTS = REPO / "toy" / "weights"
DIGITS = range(8)  # the digits drawn, one tile each
COLUMNS = 4
TILE = 96  # px of one digit (the toy draws 64x64 pages)
GAP = 6
MARGIN = 12
CAPTION = 56  # px of the caption strip under the grid
BACKGROUND = (28, 30, 36)
TITLE_COLOUR = (236, 238, 242)
RECIPE_COLOUR = (150, 190, 255)
QUALITY = 85



@dataclass(frozen=True)
class Recipe:
    lora: str  # file in toy/weights
    steps: int
    eta_given: float | None  # None: the file's own eta at ``steps`` (its recommended_eta_by_steps)
    grid: str  # schedules.hypersd_sigmas grid: "tcd" or "trailing"
    cfg: float = 1.0

    @property
    def eta(self) -> float:
        if self.eta_given is not None:
            return self.eta_given
        from ComfyUI_HyperSD.hypersd_core import lora_file, metadata

        table = lora_file.inspect_file(str(WEIGHTS / self.lora)).eta_by_steps
        return metadata.tcd_eta(self.steps, tuple((int(n), float(e)) for n, e in table))

    def line(self) -> str:
        steps = f"{self.steps} step" + ("s" if self.steps > 1 else "")
        eta = "" if self.eta == 1.0 else f" eta {self.eta:g}"
        grid = "" if self.grid == "tcd" else f" · {self.grid}"
        lora = {"hypersd_toy_tscd_lora.safetensors": "unified LoRA",
                "hypersd_toy_tscd_lora_stage1_k8.safetensors": "8-step LoRA",
                "hypersd_toy_feedback_lora_unified.safetensors": "feedback LoRA"}.get(self.lora, self.lora)
        return f"toy · {lora} · {steps} · TCD{eta}{grid}"


UNIFIED = Recipe("hypersd_toy_tscd_lora.safetensors", 1, None, "tcd")
NSTEP = Recipe("hypersd_toy_tscd_lora_stage1_k8.safetensors", 8, 0.3, "trailing")
TRAINING = Recipe("hypersd_toy_tscd_lora.safetensors", 2, None, "tcd")
FEEDBACK = Recipe("hypersd_toy_feedback_lora_unified.safetensors", 4, None, "tcd")


def recipe_for(name: str) -> Recipe:
    """The toy recipe closest to the workflow ``name`` (its key in ``example_graphs.TEMPLATES``)."""
    if any(k in name for k in ("train_feedback", "rate_images", "train_preference")):
        return FEEDBACK
    if "train_" in name:
        return TRAINING
    if any(k in name for k in ("8step", "nstep", "cfg_lora")):
        return NSTEP
    if any(k in name for k in ("unified", "onestep", "flux")):
        return UNIFIED
    raise SystemExit(f"no toy recipe for the example workflow {name}: add it to recipe_for() "
                     f"in scripts/build_thumbnails.py")


def title_for(name: str) -> str:
    """The workflow's title in the template browser (``example_graphs.TEMPLATES``)."""
    from hypersd_dev import example_graphs

    return example_graphs.TEMPLATES[name][0]


def seeds_for(name: str) -> list[int]:
    """Fixed seeds (one per digit) that differ between workflows, so the cards differ."""
    base = zlib.crc32(name.encode()) % 100_000 * 10
    return [base + d for d in DIGITS]


class Toy:
    """The toy checkpoint loaded once in this process, and its LoRAs on demand."""

    def __init__(self):
        hypersd_dev.load_pack(1)
        import comfy.sd
        from toy import data, install

        ckpt = install.install(hypersd_dev.comfy_dir() / "models")["checkpoint"]
        self.model, self.clip, self.vae = comfy.sd.load_checkpoint_guess_config(
            str(ckpt), output_vae=True, output_clip=True)[:3]
        self.data = data
        self.pos = {d: self._encode(data.PROMPT.format(d)) for d in DIGITS}
        self.neg = self._encode("")
        self._loras: dict[str, object] = {}

    def _encode(self, text: str):
        return self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))

    def patched(self, lora: str):
        if lora not in self._loras:
            import comfy.sd
            import comfy.utils

            sd = comfy.utils.load_torch_file(str(WEIGHTS / lora), safe_load=True)
            self._loras[lora] = comfy.sd.load_lora_for_models(self.model, None, sd, 1.0, 0)[0]
        return self._loras[lora]

    def digits(self, recipe: Recipe, seeds: list[int]):
        """``[len(DIGITS), 64, 64]`` grey pages in [0, 1] (white page, dark ink)."""
        import comfy.sample
        import torch
        from ComfyUI_HyperSD.hypersd_core import schedules
        from ComfyUI_HyperSD.nodes import sampling

        model = self.patched(recipe.lora)
        sigmas = schedules.hypersd_sigmas(model.get_model_object("model_sampling"), recipe.steps, recipe.grid)
        latent = torch.zeros(1, 4, self.data.LATENT, self.data.LATENT)
        sampler = sampling.tcd_sampler(recipe.eta)  # the eta may come from the file's header: read once
        pages = []
        for d, seed in zip(DIGITS, seeds):
            noise = comfy.sample.prepare_noise(latent, seed)
            with torch.inference_mode():
                out = comfy.sample.sample_custom(model, noise, recipe.cfg, sampler, sigmas,
                                                 self.pos[d], self.neg, latent, disable_pbar=True, seed=seed)
                img = self.vae.decode(out)  # [1, 64, 64, 3] in [0, 1]
            pages.append(img[0, ..., :3].mean(-1).clamp(0, 1))
        return torch.stack(pages)


def picture(pages, title: str, recipe_line: str):
    """The thumbnail (a PIL image) of ``pages`` with its caption."""
    from PIL import Image, ImageDraw, ImageFont

    rows = -(-len(pages) // COLUMNS)
    width = 2 * MARGIN + COLUMNS * TILE + (COLUMNS - 1) * GAP
    grid_h = rows * TILE + (rows - 1) * GAP
    height = MARGIN + grid_h + CAPTION
    im = Image.new("RGB", (width, height), BACKGROUND)
    for i, page in enumerate(pages):
        tile = Image.fromarray((page.numpy() * 255).round().astype("uint8"), "L")
        tile = tile.resize((TILE, TILE), Image.NEAREST).convert("RGB")
        r, c = divmod(i, COLUMNS)
        im.paste(tile, (MARGIN + c * (TILE + GAP), MARGIN + r * (TILE + GAP)))
    draw = ImageDraw.Draw(im)
    try:  # Pillow >= 10.1 with FreeType: the default font at a given size
        big, small = ImageFont.load_default(size=17), ImageFont.load_default(size=13)
    except TypeError:  # older Pillow: the one bitmap size
        big = small = ImageFont.load_default()
    y = MARGIN + grid_h + 10
    draw.text((MARGIN, y), _fit(draw, title, big, width - 2 * MARGIN), fill=TITLE_COLOUR, font=big)
    draw.text((MARGIN, y + 24), _fit(draw, recipe_line, small, width - 2 * MARGIN), fill=RECIPE_COLOUR, font=small)
    return im


def _fit(draw, text: str, font, room: int) -> str:
    """``text``, cut with an ellipsis where it is wider than ``room`` px."""
    if draw.textlength(text, font=font) <= room:
        return text
    while text and draw.textlength(text + "…", font=font) > room:
        text = text[:-1]
    return text.rstrip() + "…"


def jpeg(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=QUALITY, optimize=True)
    return buf.getvalue()


def main() -> int:
    from ComfyUI_HyperSD.hypersd_core import files

    start = time.time()
    from hypersd_dev import example_graphs

    names = sorted(example_graphs.FILES)  # the workflows' keys (their files are named by their titles)
    plans = {name: recipe_for(name) for name in names}  # fails before loading anything on an unknown name
    toy = Toy()
    for name in names:
        recipe = plans[name]
        im = picture(toy.digits(recipe, seeds_for(name)), title_for(name), recipe.line())
        data = jpeg(im)
        path = files.atomic_write(example_graphs.example_path(name, ".jpg"), lambda tmp: Path(tmp).write_bytes(data))
        print(f"wrote {path.relative_to(REPO)} ({im.width}x{im.height}, {recipe.line()})")
    for stale in example_graphs.stale_files(".jpg"):
        stale.unlink()
        print(f"removed {stale.relative_to(REPO)} (no {stale.stem}.json)")
    print(f"{len(names)} thumbnails in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
