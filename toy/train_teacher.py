#!/usr/bin/env python3
"""Train the toy family: digits classifier, TAESD-layout VAE, SD1.5-format teacher UNet.

Run with the host's Python (ComfyUI must be set up), from the repository root; the
committed weights are two rounds of the UNet (the second continues the first at a lower
learning rate with another seed)::

    OMP_NUM_THREADS=1 .venv/bin/python -m toy.train_teacher
    OMP_NUM_THREADS=1 .venv/bin/python -m toy.train_teacher --phases unet --init-unet toy/weights/toy_unet.safetensors \
        --seed 1 --unet-steps 1200 --lr 3e-4

On the 2-core machine, one core each: classifier 34 minutes, VAE 12 + 7 (decoder round) + 6
(latent statistics), UNet 76 + 23 (1.0-1.1 s a step at batch 32 on 8x8 latents), see
``weights/training.json``. One thread is the default: on a shared 2-core machine two threads
ran several times slower (threads spinning against other processes). Everything is seeded
(``torch.manual_seed``, and the digits' sizes and positions in ``data``), single-process,
with a fixed number of threads. A rerun of the VAE phase gave a VAE of the same quality but
not the same bytes as the committed one (``training.json``, ``vae.rerun_check``), so a full
rerun gives a toy family of the same kind, not necessarily the same files. The phases:

1. classifier (``digits_classifier.safetensors``, fp32, about 0.1 M parameters): the judge
   of ``quality.py``, trained on other sizes and positions of the training digits than the
   UNet sees, evaluated on the 500 held-out digits. No training method uses it;
2. VAE in TAESD layout (``taesd_encoder.*``/``taesd_decoder.*`` plus ``vae_scale`` and
   ``vae_shift`` chosen so the latents ComfyUI hands the UNet have zero mean and unit
   variance), 64x64 pixels -> 8x8x4 latents (``toy_vae.safetensors``, fp16), in two rounds:
   encoder and decoder on 48x48 pages of 30-40 px digits (``data.VAE_LAYOUT``; both are
   convolutional, so they work on any page size), then the decoder alone on the toy's 64x64
   pages of 20-40 px digits (``--decoder-steps``; the encoder, so the latent space, stays).
   The decoder round took the held-out round trip from FID 67.6 (accuracy 0.89) to 25.7
   (0.92) on the judge;
3. the teacher UNet (``toy_unet.safetensors``, fp16, ``diffusion_model`` keys without
   prefix): one level, 320 channels, context 768, cross-attention in the input block, no
   middle block, which ComfyUI detects as SD1.5 (13.6 M parameters). Eps prediction on
   SD1.5's scaled-linear schedule, conditioned on the embeddings that the generated CLIP-L
   (``clip``, seed 0) gives through ComfyUI for "a handwritten digit N" (10% empty prompt,
   for cfg), EMA weights, on every training digit at 4 sizes and positions.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import hypersd_dev
from ComfyUI_HyperSD.hypersd_core import files
from ComfyUI_HyperSD.hypersd_core.schedules import DiscreteSchedule
from ComfyUI_HyperSD.hypersd_core.train import learning_rate_at
from ComfyUI_HyperSD.hypersd_core.tscd import ddim_jump

from . import arch, clip, data, quality

UNET_FILE = "toy_unet.safetensors"
VAE_FILE = "toy_vae.safetensors"
CLF_FILE = "digits_classifier.safetensors"
SD15_LATENT_SCALE = 0.18215
CLIP_SEED = 0  # toy.clip.generate_clip_l seed: the checkpoint is assembled with the same


def unet_config() -> dict:
    cfg = arch.sd15_unet_config(320, num_res_blocks=1, transformer_depth=1)
    cfg["transformer_depth_output"] = [0, 0]  # cross-attention in the input block only
    cfg["transformer_depth_middle"] = -2  # no middle block: 0.6x the compute, still detected as SD1.5
    return cfg


def say(msg: str) -> None:
    print(f"[train {time.strftime('%H:%M:%S')}] {msg}", flush=True)


ZERO_AT_START = ("out_layers.3.weight", "out_layers.3.bias", "proj_out.weight", "proj_out.bias", "out.2.weight",
                 "out.2.bias")  # the UNet's residual outputs and final conv start silent


# ----------------------------------------------------------------------------- classifier


def train_classifier(split: dict, seed: int, steps: int, copies: int) -> tuple[quality.DigitsClassifier, float]:
    torch.manual_seed(seed)
    x, y = data.training_pages(copies, seed=100 + seed)  # other sizes and positions than the UNet's
    clf = quality.DigitsClassifier()
    opt = torch.optim.Adam(clf.parameters(), 3e-3)
    n = len(x)
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = learning_rate_at(3e-3, "cosine", step, steps, warmup=20)
        idx = torch.randint(0, n, (128,))
        xb = x[idx]
        xb = (xb + 0.05 * torch.randn_like(xb)).clamp(0, 1)  # robustness to generator noise
        loss = F.cross_entropy(clf(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    clf.eval()
    with torch.no_grad():
        acc = float((clf(split["test_x"]).argmax(1) == split["test_y"]).float().mean())
    return clf, acc


# ----------------------------------------------------------------------------- VAE


def new_vae():
    import comfy.taesd.taesd

    vae = comfy.taesd.taesd.TAESD(latent_channels=4)
    arch.init_weights_(vae, scheme="torch_default")
    return vae


def optimizer_step(opt, loss: torch.Tensor, params: list) -> None:
    """One update: gradients of ``loss``, clipped to norm 1, then the optimizer's step."""
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()


def train_vae(x_train: torch.Tensor, seed: int, steps: int, batch: int) -> object:
    """Autoencoder on ``x_train`` pages (the VAE layout's 48x48: 6x6x4 latents); returns the TAESD module."""
    torch.manual_seed(seed + 1)
    vae = new_vae()
    enc, dec = vae.taesd_encoder, vae.taesd_decoder
    params = list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.Adam(params, 1e-3)
    rgb = x_train.unsqueeze(1).expand(-1, 3, -1, -1)
    n = len(rgb)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = learning_rate_at(1e-3, "cosine", step, steps, warmup=50)
        idx = torch.randint(0, n, (batch,))
        xb = rgb[idx]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = enc(xb)
            zn = z.float() + 0.1 * torch.randn_like(z, dtype=torch.float32)
            out = dec(zn)
        rec = F.mse_loss(out.float(), xb)
        reg = z.float().pow(2).mean()
        loss = rec + 1e-3 * reg
        optimizer_step(opt, loss, params)
        if step % 100 == 0 or step == steps - 1:
            say(f"vae step {step}/{steps} rec {rec.item():.5f} z^2 {reg.item():.3f} ({time.time() - t0:.0f}s)")
    return vae


def finetune_decoder(vae, x_pages: torch.Tensor, seed: int, steps: int, batch: int, lr: float = 3e-4) -> None:
    """Second VAE round: the decoder alone on the toy's own pages (``data.SIZE``), encoder frozen.

    The encoder defines the latent space the UNet and every LoRA live in, so this round
    changes no latent: it only teaches the decoder the smaller digits of the 64x64 layout."""
    torch.manual_seed(seed + 4)
    enc, dec = vae.taesd_encoder, vae.taesd_decoder
    params = list(dec.parameters())
    opt = torch.optim.Adam(params, lr)
    rgb = x_pages.unsqueeze(1).expand(-1, 3, -1, -1)
    n = len(rgb)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = learning_rate_at(lr, "cosine", step, steps, warmup=20)
        xb = rgb[torch.randint(0, n, (batch,))]
        with torch.no_grad():
            z = enc(xb)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = dec(z + 0.1 * torch.randn_like(z))
        rec = F.mse_loss(out.float(), xb)
        optimizer_step(opt, rec, params)
        if step % 100 == 0 or step == steps - 1:
            say(f"decoder step {step}/{steps} rec {rec.item():.5f} ({time.time() - t0:.0f}s)")


def normalise_vae(vae, x_pages: torch.Tensor) -> dict:
    """Set ``vae_scale``/``vae_shift`` from the latents of the toy's own pages (``data.SIZE``):
    ComfyUI encodes as ``enc(x) / vae_scale + vae_shift`` and the UNet sees that * 0.18215,
    which then has zero mean and unit variance."""
    rgb = x_pages.unsqueeze(1).expand(-1, 3, -1, -1)
    with torch.no_grad():
        z = encode_raw(vae, x_pages)
        mu, sigma = float(z.mean()), float(z.std())
        vae.vae_scale.fill_(SD15_LATENT_SCALE * sigma)
        vae.vae_shift.fill_(-mu / (sigma * SD15_LATENT_SCALE))
        recon = vae.taesd_decoder(z[:512])  # the error on a sample: decoding every page takes minutes
        err = float(F.mse_loss(recon, rgb[:512]))
    return {"latent_mean": mu, "latent_std": sigma, "recon_mse": err}


def encode_raw(vae, x: torch.Tensor) -> torch.Tensor:
    """Pages -> the encoder's own latents (before ``vae_scale``/``vae_shift``), 512 pages at a time."""
    with torch.no_grad():
        rgb = x.unsqueeze(1).expand(-1, 3, -1, -1)
        return torch.cat([vae.taesd_encoder(rgb[i:i + 512]) for i in range(0, len(rgb), 512)])


def encode_model_space(vae, x: torch.Tensor) -> torch.Tensor:
    """Pages -> latents as the UNet sees them in ComfyUI (zero mean, unit variance)."""
    with torch.no_grad():
        return (encode_raw(vae, x) / vae.vae_scale + vae.vae_shift) * SD15_LATENT_SCALE


def decode_model_space(vae, lat: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return vae.taesd_decoder((lat / SD15_LATENT_SCALE - vae.vae_shift) * vae.vae_scale).clamp(0, 1).mean(1)


# ----------------------------------------------------------------------------- CLIP


def prompt_embeddings() -> torch.Tensor:
    """[11, 77, 768]: "a handwritten digit 0..9" and the empty prompt, as CLIPTextEncode gives them."""
    import comfy.sd

    enc = comfy.sd.load_text_encoder_state_dicts([clip.generate_clip_l(CLIP_SEED)],
                                                 clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    embs = [enc.encode_from_tokens(enc.tokenize(text)).float() for text in data.PROMPTS + [""]]
    return torch.cat(embs)


# ----------------------------------------------------------------------------- UNet


class SharedContext:
    """Training-only speed-up: the context has 11 distinct values, so the cross-attention
    K/V projections are computed on those and gathered (same maths, same weights)."""

    def __init__(self, unet: nn.Module):
        self.uniq = None
        self.idx = None
        for name, m in unet.named_modules():
            if name.endswith("attn2"):
                for lin in (m.to_k, m.to_v):
                    lin.forward = self._wrap(lin)

    def _wrap(self, lin):
        orig = lin.forward

        def forward(ctx):
            if self.uniq is None:
                return orig(ctx)
            return F.linear(self.uniq, lin.weight, lin.bias)[self.idx]
        return forward


def new_unet(seed: int):
    torch.manual_seed(seed + 2)
    model = arch.build_sd15_model(unet_config(), seed=seed + 2)
    unet = model.diffusion_model
    arch.init_weights_(unet, scheme="torch_default", zero=ZERO_AT_START)
    return unet


def train_unet(lat: torch.Tensor, labels: torch.Tensor, ctx: torch.Tensor, seed: int, steps: int, batch: int,
               lr: float, ema_decay: float, p_uncond: float = 0.1, init: dict | None = None) -> tuple[dict, dict]:
    """Eps-prediction training; ``init``: continue from these weights (a second round, which draws
    its batches from ``seed`` again, so give it another seed) instead of a fresh UNet."""
    unet = new_unet(seed)
    if init is not None:
        unet.load_state_dict(init)
    shared = SharedContext(unet)
    torch.manual_seed(seed + 3)
    params = [p for p in unet.parameters()]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr, betas=(0.9, 0.999), weight_decay=0.0)
    ab = DiscreteSchedule().alphas_cumprod
    n = len(lat)
    t0 = time.time()
    avg = 0.0
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = learning_rate_at(lr, "cosine", step, steps, warmup=100)
        idx = torch.randint(0, n, (batch,))
        x0 = lat[idx]
        cls = labels[idx].clone()
        cls[torch.rand(batch) < p_uncond] = 10
        t = torch.randint(0, 1000, (batch,))
        eps = torch.randn_like(x0)
        a = ab[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        shared.uniq, shared.idx = ctx, cls
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(xt, timesteps=t.float(), context=ctx[cls])
        loss = F.mse_loss(out.float(), eps)
        optimizer_step(opt, loss, params)
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
        avg = 0.98 * avg + 0.02 * loss.item() if step else loss.item()
        if step % 100 == 0 or step == steps - 1:
            el = time.time() - t0
            say(f"unet step {step}/{steps} loss {avg:.4f} ({el:.0f}s, {el / (step + 1):.2f}s/step)")
    shared.uniq = None
    names = [n for n, _ in unet.named_parameters()]
    sd = dict(unet.state_dict())
    for nm, e in zip(names, ema):
        sd[nm] = e
    return sd, {"final_loss": avg, "seconds": time.time() - t0}


# ----------------------------------------------------------------------------- sample check


@torch.no_grad()
def sample_check(unet_sd: dict, vae, ctx: torch.Tensor, per_digit: int = 10, steps: int = 25, cfg: float = 3.0,
                 seed: int = 123) -> dict:
    """DDIM sampling in-process with the EMA weights (a quick check; the tests use ComfyUI)."""
    unet = new_unet(0)
    unet.load_state_dict(unet_sd)
    unet.eval()
    ab = DiscreteSchedule().alphas_cumprod
    ts = torch.linspace(999, 0, steps).round().long()
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(per_digit)
    x = torch.randn(len(labels), 4, data.LATENT, data.LATENT, generator=g)
    c = torch.cat([ctx[labels], ctx[torch.full_like(labels, 10)]])
    for i, t in enumerate(ts):
        a = ab[t]
        e = unet(torch.cat([x, x]), timesteps=torch.full((2 * len(x),), float(t)), context=c)
        ec, eu = e.chunk(2)
        eps = eu + cfg * (ec - eu)
        a_next = ab[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        x = ddim_jump(x, eps, a, a_next)
    pages = decode_model_space(vae, x)
    m = quality.measure(pages, labels)
    return m


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clf-steps", type=int, default=2000)
    ap.add_argument("--clf-copies", type=int, default=8, help="sizes and positions of each digit for the classifier")
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--decoder-steps", type=int, default=400,
                    help="second VAE round: the decoder alone on the toy's own pages (the encoder, so the latents, unchanged)")
    ap.add_argument("--unet-steps", type=int, default=4500)
    ap.add_argument("--copies", type=int, default=4, help="sizes and positions of each training digit for the UNet")
    ap.add_argument("--unet-batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--init-unet", type=Path, help="continue the UNet from this file (a second training round)")
    ap.add_argument("--phases", default="clf,vae,unet", help="comma list; missing phases load from --out")
    args = ap.parse_args()
    hypersd_dev.comfy_on_path()
    from safetensors.torch import load_file

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    args.out.mkdir(parents=True, exist_ok=True)
    phases = set(args.phases.split(","))
    t_start = time.time()
    info = {"seed": args.seed, "torch": torch.__version__,
            "args": {k: (v.name if isinstance(v, Path) else str(v)) for k, v in vars(args).items() if k != "out"}}
    split = data.split()
    say(f"data: {len(split['train_x'])} train / {len(split['test_x'])} held-out digits")

    if "clf" in phases:
        t0 = time.time()
        clf, acc = train_classifier(split, args.seed, args.clf_steps, args.clf_copies)
        files.save_safetensors(args.out / CLF_FILE, clf.state_dict())
        info["classifier_heldout_accuracy"] = acc
        say(f"classifier: held-out accuracy {acc:.4f} ({time.time() - t0:.0f}s)")
    quality._cache.clear()
    quality.WEIGHTS = args.out / CLF_FILE

    if "vae" in phases:
        t0 = time.time()
        vae = train_vae(data.training_pages(2, layout=data.VAE_LAYOUT)[0], args.seed, args.vae_steps, args.vae_batch)
        vae.load_state_dict({k: v.detach().half().float() for k, v in vae.state_dict().items()})  # as saved
        pages = data.training_pages(2)[0]
        if args.decoder_steps:
            finetune_decoder(vae, pages, args.seed, args.decoder_steps, args.vae_batch)
        vinfo = normalise_vae(vae, pages)
        vsd = {k: v.detach().to(torch.float16) for k, v in vae.state_dict().items()}
        files.save_safetensors(args.out / VAE_FILE, vsd)
        vinfo["seconds"] = time.time() - t0
        info["vae"] = vinfo
        say(f"vae: {vinfo}")
    vae = new_vae()
    vae.load_state_dict({k: v.float() for k, v in load_file(str(args.out / VAE_FILE)).items()})
    vae.eval()
    rec = decode_model_space(vae, encode_model_space(vae, split["test_x"]))
    info["vae_heldout_recon"] = quality.measure(rec, split["test_y"])
    info["real_train_sample"] = quality.measure(split["train_x"][::4], split["train_y"][::4])
    say(f"vae round trip on held-out digits: {info['vae_heldout_recon']}; real train digits: {info['real_train_sample']}")

    if "unet" in phases:
        t0 = time.time()
        ctx = prompt_embeddings()
        say(f"prompt embeddings {tuple(ctx.shape)} ({time.time() - t0:.0f}s)")
        x_aug, y_aug = data.training_pages(args.copies)
        lat = encode_model_space(vae, x_aug)
        say(f"latents {tuple(lat.shape)} mean {lat.mean():.3f} std {lat.std():.3f}")
        init = None
        if args.init_unet:
            init = {k: v.float() for k, v in load_file(str(args.init_unet)).items()}
            info.setdefault("unet_rounds", []).append({"from": args.init_unet.name, "steps": args.unet_steps,
                                                       "lr": args.lr, "seed": args.seed})
        usd, uinfo = train_unet(lat, y_aug, ctx, args.seed, args.unet_steps, args.unet_batch, args.lr, args.ema,
                                init=init)
        files.save_safetensors(args.out / UNET_FILE, {k: v.detach().to(torch.float16) for k, v in usd.items()})
        info["unet"] = uinfo
        usd16 = {k: v.float() for k, v in load_file(str(args.out / UNET_FILE)).items()}
        info["inprocess_ddim25_cfg3"] = sample_check(usd16, vae, ctx)
        say(f"in-process check, 25 DDIM steps cfg 3: {info['inprocess_ddim25_cfg3']}")
    info["total_seconds"] = time.time() - t_start
    old = json.loads((args.out / "training.json").read_text()) if (args.out / "training.json").exists() else {}
    old.update(info)
    files.write_text(args.out / "training.json", json.dumps(old, indent=1, sort_keys=True) + "\n")
    say(f"done in {info['total_seconds']:.0f}s; weights in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
