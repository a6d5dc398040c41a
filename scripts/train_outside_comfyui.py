#!/usr/bin/env python3
"""A few TSCD steps on the toy teacher through the core's run object, outside any ComfyUI node.

    .venv/bin/python -m scripts.train_outside_comfyui [--stages 2,1] [--steps-per-stage 2] [--out DIR]

ComfyUI is used as a library only to load the toy checkpoint (``load_checkpoint_guess_config``)
and to encode its prompts and digits with the loaded text encoder and VAE. Everything the
training does is the pack's core in plain torch: the noise schedule
(``schedules.DiscreteSchedule``), the run (``pipeline.TrainingRun``: LoRA adapters in the
bare UNet module, TSCD loss terms and stages, checkpoints, a LoRA per stage) and an
``eps_fn`` that calls the UNet module directly with classifier-free guidance. The LoRA it
writes into ``--out`` uses ComfyUI's own module paths as kohya names (``lora_unet_<path>``),
which every LoRA loader maps back. Prints a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

import hypersd_dev
from ComfyUI_HyperSD.hypersd_core import metadata, schedules
from ComfyUI_HyperSD.hypersd_core.data import LatentData
from ComfyUI_HyperSD.hypersd_core.pipeline import RunFiles, TrainingRun, TrainSettings


def load_toy(models_dir: Path):
    """(model, clip, vae) of the toy checkpoint, installed into ``models_dir`` when needed."""
    import comfy.sd

    from toy import install

    ckpt = install.install(models_dir)["checkpoint"]
    model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=True)[:3]
    return model, clip, vae


def toy_dataset(model, clip, vae, per_digit: int) -> tuple[LatentData, torch.Tensor, torch.Tensor]:
    """The first ``per_digit`` training digits of each class as latents, one group per digit;
    the prompt contexts ("a handwritten digit N") and the empty prompt's."""
    from toy import data

    split = data.split()
    groups = []
    with torch.no_grad():
        for d in range(10):
            pages = split["train_x"][split["train_y"] == d][:per_digit]
            pixels = pages.unsqueeze(-1).expand(-1, -1, -1, 3).contiguous()  # ComfyUI IMAGE layout
            groups.append((model.model.process_latent_in(vae.encode(pixels)).float(), d))
        contexts = torch.cat([clip.encode_from_tokens(clip.tokenize(data.PROMPT.format(d))) for d in range(10)])
        empty = clip.encode_from_tokens(clip.tokenize(""))
    return LatentData(groups), contexts.float(), empty.float()


class UNetEps:
    """``eps_fn(x_t, t, cfg, cond)`` on the bare SD1.5 UNet module: it takes the variance-preserving
    ``x_t`` and the timestep and predicts eps; ``cond`` is the digit, whose prompt context is used."""

    def __init__(self, unet: torch.nn.Module, contexts: torch.Tensor, empty: torch.Tensor):
        self.unet, self.contexts, self.empty = unet, contexts, empty

    def __call__(self, x_t, t, cfg, cond):
        B = x_t.shape[0]
        ctx = self.contexts[int(cond)].expand(B, -1, -1)
        eps = self.unet(x_t, timesteps=t.float(), context=ctx)
        if cfg == 1.0:
            return eps
        eps_u = self.unet(x_t, timesteps=t.float(), context=self.empty.expand(B, -1, -1))
        return eps_u + cfg * (eps - eps_u)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", default="2,1")
    ap.add_argument("--steps-per-stage", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--cfg", type=float, default=1.5, help="teacher guidance baked into the LoRA")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--score-steps", type=int, default=0,
                    help="score-distillation steps after the TSCD stages (0: none), giving a unified LoRA")
    ap.add_argument("--fake-updates", type=int, default=5, help="fake-score updates per score-distillation step")
    ap.add_argument("--per-digit", type=int, default=4)
    ap.add_argument("--name", default="hypersd_toy_outside_comfyui")
    ap.add_argument("--out", type=Path, help="folder of the LoRA (default: a new temporary folder)")
    ap.add_argument("--models-dir", type=Path, default=hypersd_dev.comfy_dir() / "models")
    args = ap.parse_args(argv)
    hypersd_dev.import_comfy()  # as a library: the checkpoint loader
    model, clip, vae = load_toy(args.models_dir)
    data, contexts, empty = toy_dataset(model, clip, vae, args.per_digit)
    unet = model.model.diffusion_model

    settings = TrainSettings(stages=args.stages, steps_per_stage=args.steps_per_stage, learning_rate=args.lr,
                             rank=args.rank, teacher_cfg=args.cfg, seed=args.seed, batch_size=args.batch,
                             lora_scope="all", checkpoint_every=0, lr_schedule="cosine",
                             score_steps=args.score_steps, fake_updates=args.fake_updates)
    out = args.out or Path(tempfile.mkdtemp(prefix="hypersd-outside-"))
    run = TrainingRun(settings, RunFiles.create(out, args.name), resume=False,
                      family=metadata.model_family(model.model.model_config),
                      alphas_cumprod=schedules.DiscreteSchedule().alphas_cumprod, prompts=10)
    trainer = run.train(unet, UNetEps(unet, contexts, empty), data, device="cpu")
    summary = {"lora": str(run.files.lora), "stage_loras": sorted(str(p) for p in out.glob(f"{args.name}_stage*")),
               "steps": trainer.step, "losses": [round(x, 6) for x in trainer.history],
               "lora_tensors": len(run.lora), "family": run.family}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
