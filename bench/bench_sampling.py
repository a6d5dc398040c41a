"""Sampler overhead: how much an N-step sample costs beyond its N denoiser calls.

For each sampler (this pack's TCD, core euler, core lcm) and N = 1, 4, 8, the wall time
of ``comfy.sample.sample_custom`` with N steps is divided by the wall time of the same
call with a "null" sampler that makes exactly the same N denoiser calls and nothing
else. Everything else (condition set-up, noise, model wrapper) is the same in both, so
the ratio is the sampler's own overhead. Runs are interleaved in rotating order and
the median of the per-round ratios is kept, since this machine is noisy. Target: TCD's ratio <= 1.02 and no larger
than core's.

    .venv/bin/python -m bench.bench_sampling [--repeats 7] [--size 64]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import hypersd_dev


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--size", type=int, default=64, help="image size in pixels (latent = size/8)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the figures here (bench/results.py; scripts/bench.sh does)")
    ap.add_argument("--quick", action="store_true", help="a few rounds (scripts/bench.sh --quick)")
    args = ap.parse_args()
    if args.quick:
        args.repeats = min(args.repeats, 5)
    hypersd_dev.load_pack(args.threads)
    import comfy.sample
    import comfy.samplers

    from ComfyUI_HyperSD.hypersd_core import schedules
    from ComfyUI_HyperSD.nodes import sampling
    from toy import arch

    model = arch.wrap_patcher(arch.build_sd15_model(arch.sd15_unet_config(320), seed=0))
    ms = model.get_model_object("model_sampling")
    lat = torch.zeros(1, 4, args.size // 8, args.size // 8)
    cond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(0)), {}]]

    @torch.no_grad()
    def null_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None):
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            x = model(x, sigmas[i] * s_in, **(extra_args or {}))
        return x

    samplers = {"tcd (this pack)": sampling.tcd_sampler(0.3), "euler (core)": comfy.samplers.sampler_object("euler"),
                "lcm (core)": comfy.samplers.sampler_object("lcm"), "null": comfy.samplers.KSAMPLER(null_sampler)}

    def once(sampler, sigmas) -> float:
        noise = comfy.sample.prepare_noise(lat, 0)
        t0 = time.perf_counter()
        comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, cond, cond, lat, disable_pbar=True, seed=0)
        return time.perf_counter() - t0

    rows, bands = [], []
    for n in (1, 4, 8):
        sigmas = schedules.hypersd_sigmas(ms, n, "tcd")
        names = list(samplers)
        for s in samplers.values():  # warm-up
            once(s, sigmas)
        times = {k: [] for k in names}
        ratios = {k: [] for k in names}
        for r in range(args.repeats):
            order = names[r % len(names):] + names[:r % len(names)]  # rotate, so no sampler always runs first
            t = {k: once(samplers[k], sigmas) for k in order}
            for k in names:
                times[k].append(t[k])
                ratios[k].append(t[k] / t["null"])
        null = statistics.median(times["null"])
        for k in names:
            if k != "null":
                rows.append([n, k, statistics.median(times[k]) * 1000, null * 1000, statistics.median(ratios[k])])
                q = statistics.quantiles(ratios[k], n=4) if len(ratios[k]) > 1 else [ratios[k][0]] * 3
                bands.append({"steps": n, "sampler": k, "ratio": statistics.median(ratios[k]), "p25": q[0],
                              "p75": q[2], "ms_per_sample": statistics.median(times[k]) * 1000})
    print(f"Sampler overhead on a {sum(p.numel() for p in model.model.parameters()) / 1e6:.1f} M-parameter SD1.5-format "
          f"UNet, {args.size}x{args.size} px, batch 1, CPU, {args.threads} thread(s), median of {args.repeats}")
    print(hypersd_dev.table(["steps", "sampler", "ms / sample", "ms, N calls only", "ratio (median per round)"], rows))
    worst = {k: max(r[4] for r in rows if r[1] == k) for k in {r[1] for r in rows}}
    print("worst ratio: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(worst.items())))
    if args.json:
        from bench import results

        results.save(args.json, "sampling", {"rows": bands, "worst": worst},
                     {"repeats": args.repeats, "size": args.size, "threads": args.threads}, args.quick)


if __name__ == "__main__":
    main()
