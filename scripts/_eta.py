import hypersd_dev, sys, json, time
from pathlib import Path
hypersd_dev.load_pack(1)
import comfy.sample, comfy.samplers, comfy.sd, comfy.utils, torch
from ComfyUI_HyperSD.hypersd_core import schedules
from ComfyUI_HyperSD.nodes import sampling
from toy import data, install, quality as toy_quality
from hypersd_dev import comfy_dir
ckpt = install.install(comfy_dir() / "models")["checkpoint"]
model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=True, output_clip=True)[:3]
pos = [clip.encode_from_tokens_scheduled(clip.tokenize(data.PROMPT.format(d))) for d in range(10)]
neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
ms = model.get_model_object("model_sampling")
n = 50
latent = torch.zeros(n, 4, data.LATENT, data.LATENT)
labels = torch.arange(10).repeat_interleave(n)
seeds = [0, 1000, 2000]
def run(m, cfg, eta, steps, grid):
    sigmas = schedules.hypersd_sigmas(ms, steps, grid)
    fids = []; accs = []
    for s0 in seeds:
        imgs = []
        for d in range(10):
            noise = comfy.sample.prepare_noise(latent, s0 + d)
            with torch.inference_mode():
                out = comfy.sample.sample_custom(m, noise, cfg, sampling.tcd_sampler(eta), sigmas, pos[d], neg, latent, disable_pbar=True, seed=s0 + d)
                imgs.append(vae.decode(out))
        r = toy_quality.measure(torch.cat(imgs)[..., :3], labels)
        fids.append(round(r["fid"], 1)); accs.append(r["accuracy"])
    return fids, sum(fids) / 3, sum(accs) / 3
spec = json.loads(sys.argv[1])
for lora, cfg, eta, steps, grid in spec:
    m = model
    if lora:
        m = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(lora, safe_load=True), 1.0, 0)[0]
    t = time.time()
    f, mf, a = run(m, cfg, eta, steps, grid)
    print(json.dumps({"lora": Path(lora).name if lora else None, "cfg": cfg, "eta": eta, "steps": steps, "grid": grid, "fids": f, "fid": round(mf, 2), "acc": round(a, 3), "s": round(time.time() - t)}), flush=True)
