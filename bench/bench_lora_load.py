"""Load-and-apply time of a full-size SDXL-layout Hyper-SD LoRA: HyperSDLoraLoader vs core LoraLoaderModelOnly.

Writes a real 787 MB fp32 LoRA in the released Hyper-SDXL layout (kohya names over the whole
SDXL UNet, rank 64, alpha) with random values to a temporary folder, then times, in one run
and alternating, core ``LoraLoaderModelOnly`` (a fresh node each time, so its per-node cache
is cold) and ``HyperSDLoraLoader`` (its one-file cache cleared each time) on the same SDXL
model. The model is built on the meta device: applying a LoRA only records patches, so the
model's weights are never touched by either loader. Both read the file from the page cache
after the first round (the first round is reported apart).

Usage: python -m bench.bench_lora_load [--rounds 5]   (ComfyUI: HYPERSD_COMFYUI, else the set-up's)
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import hypersd_dev


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="also write the figures here (bench/results.py; scripts/bench.sh does)")
    ap.add_argument("--quick", action="store_true", help="3 rounds (scripts/bench.sh --quick)")
    args = ap.parse_args()
    if args.quick:
        args.rounds = min(args.rounds, 3)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    hypersd_dev.load_pack()
    import folder_paths
    import nodes

    from ComfyUI_HyperSD.nodes import lora as ours
    from hypersd_dev import layouts
    from toy import arch

    tmp = Path(tempfile.mkdtemp(prefix="hypersd-bench-"))
    try:
        folder_paths.add_model_folder_path("loras", str(tmp), is_default=True)
        import comfy.model_base

        model = layouts.build_model("SDXL", layouts.sdxl_config(), device="meta")
        # the schedule (SIGMAS output) needs real sigma buffers; the weights can stay on meta
        model.model_sampling = comfy.model_base.model_sampling(model.model_config, model.model_type)
        patcher = arch.wrap_patcher(model)
        layout = layouts.kohya_layout(model)
        name = "Hyper-SDXL-4steps-lora.safetensors"
        t0 = time.perf_counter()
        layouts.write_lora(str(tmp / name), layout, rank=64, alpha=64.0, seed=0)
        size = os.path.getsize(tmp / name)
        print(f"wrote {name}: {size / 1e6:.1f} MB, {len(layout)} layers, in {time.perf_counter() - t0:.1f} s")

        def run_core():
            t = time.perf_counter()
            (m,) = nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, name, 1.0)
            dt = time.perf_counter() - t
            return dt, len(m.patches)

        def run_ours():
            ours._sd_cache.clear()
            t = time.perf_counter()
            out = ours.HyperSDLoraLoader.execute(patcher, name, -1.0).result
            dt = time.perf_counter() - t
            return dt, len(out[0].patches)

        core_t, our_t = [], []
        first = {}
        for r in range(args.rounds + 1):
            order = (("core", run_core), ("ours", run_ours)) if r % 2 == 0 else (("ours", run_ours), ("core", run_core))
            for label, fn in order:
                dt, n = fn()
                if r == 0:
                    first[label] = dt
                else:
                    (core_t if label == "core" else our_t).append(dt)
                assert n == len(layout), f"{label} patched {n} of {len(layout)} layers"
        c, o = statistics.median(core_t), statistics.median(our_t)
        print()
        print(f"| loader (SDXL layout, {size / 1e6:.0f} MB fp32, {len(layout)} layers) | first round s | "
              f"median s ({args.rounds} rounds) | min s | ratio to core |")
        print("|---|---|---|---|---|")
        print(f"| core LoraLoaderModelOnly | {first['core']:.3f} | {c:.3f} | {min(core_t):.3f} | 1.000 |")
        print(f"| HyperSDLoraLoader | {first['ours']:.3f} | {o:.3f} | {min(our_t):.3f} | {o / c:.3f} |")
        print()
        print(f"ratio (median): {o / c:.3f}x  target <= 1.05x: {'met' if o / c <= 1.05 else 'NOT met'}")
        if args.json:
            from bench import results

            ratios = sorted(a / b for a, b in zip(our_t, core_t))
            results.save(args.json, "lora_load", {
                "core_s": core_t, "ours_s": our_t, "median_core_s": c, "median_ours_s": o, "ratio": o / c,
                "ratio_min": ratios[0], "ratio_max": ratios[-1], "mb": size / 1e6, "layers": len(layout)},
                {"rounds": args.rounds, "layout": "SDXL", "rank": 64}, args.quick)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
