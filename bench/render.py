#!/usr/bin/env python3
"""Render the benchmarks' result files into one page with plots.

    .venv/bin/python -m bench.render [bench/results]     (scripts/bench.sh runs it last)

Reads every ``<benchmark>.json`` that ``bench/results.py`` wrote in the folder and writes,
beside them, ``README.md`` (dated, with the machine, the tables and the plots) and one PNG per
figure (matplotlib, no display needed):

* ``quality_vs_steps.png``: FID and judge accuracy against steps (1, 2, 4, 8, 50) for the
  teacher without LoRA (its best few-step sampler; euler at 50), the TSCD stage LoRAs at their
  own step counts, and each unified LoRA, with the seed sets' spread as error bars;
* the main job's grid (the demo: the same seeds in every row) beside its table;
* ``sampler_overhead.png`` and ``lora_load.png``: ours beside core, with the noise band;
* ``training_cost.png``: time and peak memory per step of each trainer over core's
  ``TrainLoraNode``;
* ``preference_curve.png``: the rater's measure, the judge's FID and accuracy against the
  feedback merge ratio (the ratings loop), and ``feedback_curve.png`` for the quality bench's
  feedback rows when it measured them.

A benchmark that did not run is left out of the page (with a line saying so).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from bench import results as bench_results

FIGURES = ("quality_vs_steps.png", "sampler_overhead.png", "lora_load.png", "training_cost.png",
           "preference_curve.png", "feedback_curve.png")
ORDER = ("quality", "demo", "sampling", "lora_load", "training_cost", "distributed", "preference", "soak", "crash")
# Measured only where there is a GPU (a machine lent for it, or yours): shown when present, each
# with the machine it ran on.
GPU_ORDER = ("training_cost_gpu", "distributed_gpu")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    from ComfyUI_HyperSD.hypersd_core import files

    files.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    _plt().close(fig)


def _table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def _num(v, fmt=".1f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


# ---------------------------------------------------------------------- one section per benchmark


def _short(name: str, width: int = 48) -> str:
    """A legend label: a long row name becomes the file named in its last brackets, if any."""
    if len(name) <= width:
        return name
    inner = name.rsplit("(", 1)[-1].rstrip(")") if name.endswith(")") else ""
    return (inner or name)[:width]


def quality_section(doc: dict, out: Path) -> list[str]:
    f = doc["figures"]
    rows = [r for r in f["rows"] if r.get("fid") is not None and not math.isnan(r["fid"])]
    series: dict[str, list[dict]] = {}
    for r in rows:
        if r["group"] == "bare teacher" and r["best_bare"]:
            series.setdefault("teacher, no LoRA (best few-step sampler)", []).append(r)
        elif r["group"] == "teacher":
            series.setdefault("teacher, no LoRA (best few-step sampler)", []).append(r)
        elif r["group"] == "N-step":
            label = f"TSCD stage LoRAs ({'TCD' if r['sampler'].startswith('tcd') else 'own recipe'})"
            series.setdefault(label, []).append(r)
        elif r["group"] == "unified":
            series.setdefault(_short(r["name"]), []).append(r)
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, pts in series.items():
        pts = sorted(pts, key=lambda r: r["steps"])
        xs = [r["steps"] for r in pts]
        ax1.errorbar(xs, [r["fid"] for r in pts], yerr=[r.get("fid_spread") or 0 for r in pts], marker="o",
                     capsize=3, label=label[:60])
        ax2.plot(xs, [r["accuracy"] for r in pts], marker="o", label=label[:60])
    for ax, name in ((ax1, "FID (lower is better)"), (ax2, "judge accuracy")):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8, 16, 32, 50])
        ax.set_xticklabels(["1", "2", "4", "8", "16", "32", "50"])
        ax.set_xlabel("steps")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    ax1.set_yscale("log")
    ax2.legend(fontsize=7, loc="lower right")
    fig.suptitle("Toy family: quality against steps (FID error bars: half range over the seed sets)")
    _save(fig, out / "quality_vs_steps.png")
    s = doc["settings"]
    lines = ["## Quality against steps (`bench_tscd --quality`)", "",
             f"{s['per_digit']} images per digit and row, {s['repeats']} seed set(s), the teacher at cfg "
             f"{s['teacher_cfg']:g}, the LoRAs at cfg 1; the judge is the toy's classifier (accuracy, FID against "
             f"the held-out digits). 50-step teacher: FID {f['teacher50_fid']:.1f}.", "",
             "![quality against steps](quality_vs_steps.png)", ""]
    lines += _table(["use", "model", "steps", "sampler", "accuracy", "FID", "± (half range)"],
                    [[r["group"] + (" (best)" if r.get("best_bare") else ""), r["name"], r["steps"], r["sampler"],
                      _num(r["accuracy"], ".3f"), _num(r["fid"]), _num(r.get("fid_spread"))] for r in rows])
    if f.get("checks"):
        lines += [""] + [f"- {'met' if c['met'] else 'NOT met'}: {c['what']}" for c in f["checks"]]
    if f.get("feedback"):
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for key in sorted({(r["lora"], r["steps"]) for r in f["feedback"]}):
            pts = sorted([r for r in f["feedback"] if (r["lora"], r["steps"]) == key], key=lambda r: r["ratio"])
            ax.plot([r["ratio"] for r in pts], [r["fid"] for r in pts], marker="o", label=f"{key[0]} at {key[1]} steps")
        ax.set_xlabel("merge ratio")
        ax.set_ylabel("FID")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        _save(fig, out / "feedback_curve.png")
        lines += ["", "![feedback merge-ratio curve](feedback_curve.png)"]
    return lines


def demo_section(doc: dict, out: Path) -> list[str]:
    f = doc["figures"]
    rows = f["results"]["rows"]
    lines = ["## The main job's grid (`bench_demo`: the demo `scripts/run.sh` runs)", "",
             f"{doc['settings']['per_digit']} pictures of each digit per row, the same seeds in every row.", "",
             f"![the demo's grid]({f['grid']})", ""]
    lines += _table(["variant", "steps", "cfg", "s/image", "accuracy", "FID"],
                    [[r["name"], r["steps"], f"{r['cfg']:g}", _num(r["seconds_per_image"], ".4f"),
                      _num(r["accuracy"], ".3f"), _num(r["fid"])] for r in rows])
    return lines


def sampling_section(doc: dict, out: Path) -> list[str]:
    rows = doc["figures"]["rows"]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    samplers = sorted({r["sampler"] for r in rows})
    steps = sorted({r["steps"] for r in rows})
    w = 0.8 / max(len(samplers), 1)
    for i, smp in enumerate(samplers):
        pts = [next((r for r in rows if r["steps"] == n and r["sampler"] == smp), None) for n in steps]
        xs = [j + i * w for j in range(len(steps))]
        ys = [p["ratio"] if p else math.nan for p in pts]
        err = [[(p["ratio"] - p["p25"]) if p else 0 for p in pts], [(p["p75"] - p["ratio"]) if p else 0 for p in pts]]
        ax.bar(xs, ys, width=w, yerr=err, capsize=3, label=smp)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([j + w * (len(samplers) - 1) / 2 for j in range(len(steps))])
    ax.set_xticklabels([f"{n} steps" for n in steps])
    ax.set_ylim(0.95, max([r["p75"] for r in rows] + [1.06]) + 0.01)
    ax.set_ylabel("time / the same denoiser calls alone")
    ax.legend(fontsize=8)
    ax.set_title("Sampler overhead (median, bars: quartiles of the rounds)")
    _save(fig, out / "sampler_overhead.png")
    lines = ["## Sampler overhead (`bench_sampling`)", "", "![sampler overhead](sampler_overhead.png)", ""]
    lines += _table(["steps", "sampler", "ms / sample", "ratio", "quartiles"],
                    [[r["steps"], r["sampler"], _num(r["ms_per_sample"], ".2f"), _num(r["ratio"], ".4f"),
                      f"{r['p25']:.4f} - {r['p75']:.4f}"] for r in rows])
    return lines


def lora_load_section(doc: dict, out: Path) -> list[str]:
    f = doc["figures"]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(["core LoraLoaderModelOnly", "HyperSDLoraLoader"], [1.0, f["ratio"]],
           yerr=[[0, f["ratio"] - f["ratio_min"]], [0, f["ratio_max"] - f["ratio"]]], capsize=4,
           color=["#999999", "#3a7"])
    ax.axhline(1.05, color="red", lw=0.8, ls="--", label="target 1.05x")
    ax.set_ylabel("load time / core's (median)")
    ax.legend(fontsize=8)
    ax.set_title(f"LoRA load, {f['mb']:.0f} MB SDXL layout")
    _save(fig, out / "lora_load.png")
    return ["## LoRA load time (`bench_lora_load`)", "", "![LoRA load time](lora_load.png)", "",
            f"Median over {doc['settings']['rounds']} rounds: core {f['median_core_s']:.3f} s, this pack "
            f"{f['median_ours_s']:.3f} s, ratio {f['ratio']:.3f}x (rounds {f['ratio_min']:.3f}-{f['ratio_max']:.3f}x)."]


def training_cost_section(doc: dict, out: Path) -> list[str]:
    rows = doc["figures"]["rows"]
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
    labels = [f"{r['trainer']}{' (gc)' if r['gradient_checkpointing'] else ''}" for r in rows]
    for ax, key, name in ((axes[0], "time_vs_core", "time per step / core"),
                          (axes[1], "memory_vs_core", "peak memory / core")):
        ax.barh(labels, [r[key] for r in rows], color=["#999999" if r["method"] == "core" else "#3a7" for r in rows])
        ax.axvline(1.0, color="grey", lw=0.8)
        ax.set_xlabel(name)
        ax.tick_params(axis="y", labelsize=7)
    fig.suptitle("Training cost per step over core's TrainLoraNode (gc: gradient checkpointing)")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    gpu = doc["benchmark"].endswith("_gpu")
    _save(fig, out / ("training_cost_gpu.png" if gpu else "training_cost.png"))
    lines = ([f"## Training cost on CUDA (`bench_tscd --device cuda --json {doc['benchmark']}.json`)", "",
              _on_machine(doc), "", "![training cost on CUDA](training_cost_gpu.png)", ""] if gpu else
             ["## Training cost (`bench_tscd`)", "", "![training cost](training_cost.png)", ""])
    lines += _table(["trainer", "grad ckpt", "step s", "peak MiB", "time / core", "memory / core"],
                    [[r["trainer"], "on" if r["gradient_checkpointing"] else "off", _num(r["step_s"], ".3f"),
                      _num(r["peak_mib"]), _num(r["time_vs_core"], ".2f") + "x", _num(r["memory_vs_core"], ".2f") + "x"]
                     for r in rows])
    return lines


def preference_section(doc: dict, out: Path) -> list[str]:
    f = doc["figures"]
    b = f["before"]
    after = sorted(((float(k), v) for k, v in f["after"].items()))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = [0.0] + [k for k, _ in after]
    ax.plot(xs, [1.0] + [v["ink_mass"] / b["ink_mass"] for _, v in after], marker="o", label="ink mass / before")
    ax.plot(xs, [1.0] + [v["fid"] / b["fid"] for _, v in after], marker="o", label="judge FID / before")
    ax.plot(xs, [b["accuracy"]] + [v["accuracy"] for _, v in after], marker="o", label="judge accuracy")
    ax.axhline(1.2, color="grey", lw=0.6, ls=":")
    ax.axhline(1.3, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("feedback merge ratio")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title("Your own ratings: a bold-strokes preference steering the unified LoRA")
    _save(fig, out / "preference_curve.png")
    p = f["preference"]
    lines = ["## Your own ratings, end to end (`bench_preference`)", "", p["report"], "",
             "![preference curve](preference_curve.png)", ""]
    lines += _table(["", "ink mass", "/ before", "accuracy", "FID", "/ before"],
                    [["before feedback", _num(b["ink_mass"], ".4f"), "1", _num(b["accuracy"], ".3f"), _num(b["fid"]), "1"]]
                    + [[f"merged at {k:g}", _num(v["ink_mass"], ".4f"), f"{v['ink_mass'] / b['ink_mass']:.2f}x",
                        _num(v["accuracy"], ".3f"), _num(v["fid"]), f"{v['fid'] / b['fid']:.2f}x"] for k, v in after])
    if f.get("grid"):
        lines += ["", f"![before and after]({Path(f['grid']).name})"]
    return lines


def _machine(m: dict) -> str:
    return (f"{m['cpu']} ({m['cores']} cores; GPU: {m['gpu']}), torch {m['torch']}, ComfyUI {m['comfyui']}, "
            f"Python {m['python']}")


def _on_machine(doc: dict) -> str:
    return f"Measured {doc['date'][:10]} on {_machine(doc['machine'])}."


def distributed_section(doc: dict, out: Path) -> list[str]:
    rows = doc["figures"]["rows"]
    s = doc["settings"]
    gpu = doc["benchmark"].endswith("_gpu")
    lines = [f"## Training on several processes{' (CUDA beside the CPU)' if gpu else ''} (`bench_distributed`)", ""]
    if gpu:
        lines += [_on_machine(doc), ""]
    lines += [f"`scripts.train` on the toy under torchrun (gloo on the CPU, one thread per process; nccl on CUDA, one "
              f"process per GPU), global batch {s['batch']}, {s['steps']} steps; the time is the training alone. "
              "Ratios and the LoRA difference are against the first row."
              + (" Between devices the LoRAs differ by about the learning rate times the steps (1e-3 x 20): the "
                 "kernels round differently, and Adam turns gradient differences that small into steps of the "
                 "learning rate's size; on one device the process counts agree to float tolerance." if gpu else ""),
              ""]
    lines += _table(["device", "processes", "base", "base MiB / process", "steps/s", "images/s", "speed / first row",
                     "LoRA max abs diff vs first"],
                    [[r.get("device", "cpu"), r["processes"], r.get("base", "whole (DDP)"),
                      _num(r["base_mib_per_process"], ".1f") if "base_mib_per_process" in r else "-",
                      _num(r["steps_per_second"], ".2f"), _num(r["images_per_second"], ".1f"),
                      _num(r["speed_vs_1"], ".2f") + "x", f"{r['max_lora_difference_vs_1']:.1e}"] for r in rows])
    return lines


def soak_section(doc: dict, out: Path) -> list[str]:
    from bench import soak

    f = doc["figures"]
    lines = ["## Soak: many prompts on one server (`bench.soak`)", "",
             f"{f['prompts']} prompts on one server, valid and invalid ones interleaved ({f['valid']} valid: "
             f"{f['valid_ok']} succeeded; {f['invalid']} invalid: {f['invalid_refused_cleanly']} refused with a "
             f"message), {f['route_calls']} route calls between them ({f['route_failures']} unexpected answers, "
             f"{f['ratings_stored']} ratings stored). Resident memory (median over a quarter of the run): "
             f"{_num(f['rss_after_warmup_mb'])} MB after warm-up, {_num(f['rss_end_mb'])} MB at the end "
             f"({100 * f['rss_growth']:+.1f} %); peak {_num(f['rss_peak_mb'])} MB. Drift: a kind's median time in "
             "the second half of the run against the first.", ""]
    return lines + soak.markdown_rows(f["kinds"])


def crash_section(doc: dict, out: Path) -> list[str]:
    s = doc["figures"]["summary"]
    lines = ["## Crash safety: SIGKILL during saves (`bench.crash`)", "",
             f"A real server killed {s['trials']} times in a training run that saves every step "
             f"({s['killed_in_a_write']} kills inside a write, {s['killed_in_a_save']} between a save's files, "
             f"{s['killed_between_saves']} between saves), then resumed; and {s['ratings_trials']} times in a "
             "stream of ratings.", ""]
    return lines + _table(
        ["files checked", "partial files", "temporary files listed as LoRAs", "LoRA = a complete version",
         "resumed", "= the uninterrupted run", "replayed kills: resumed / equal", "ratings acknowledged / kept",
         "database integrity"],
        [[s["files_checked"], s["partial_files"], s["temp_files_listed"], f"{s['lora_a_complete_version']}/{s['trials']}",
          f"{s['resumes_ok']}/{s['trials']}", f"{s['equal_to_uninterrupted']}/{s['trials']}",
          f"{s['replayed_resumes_ok']} / {s['replayed_equal']} of {s['replayed']}",
          f"{s['ratings_acknowledged']} / {s['ratings_kept']}", f"{s['ratings_integrity_ok']}/{s['ratings_trials']}"]])


SECTIONS = {"training_cost_gpu": training_cost_section, "distributed_gpu": distributed_section,
            "crash": crash_section, "soak": soak_section, "distributed": distributed_section, "quality": quality_section, "demo": demo_section, "sampling": sampling_section,
            "lora_load": lora_load_section, "training_cost": training_cost_section, "preference": preference_section}


def render(folder) -> Path:
    """Write ``README.md`` and the plots in ``folder`` from its result files; returns the page."""
    from ComfyUI_HyperSD.hypersd_core import files

    folder = Path(folder)
    docs = bench_results.load_all(folder)
    if not docs:
        raise SystemExit(f"no benchmark results in {folder}: run bash scripts/bench.sh first")
    main = {k: d for k, d in docs.items() if k not in GPU_ORDER} or docs  # the GPU sections name their own machine
    m = main[next(iter(main))]["machine"]
    dates = sorted(d["date"] for d in main.values())
    quick = any(d.get("quick") for d in docs.values())
    lines = [f"# Benchmark results{' (quick run)' if quick else ''}", "",
             f"Measured {dates[0][:10]}{' to ' + dates[-1][:10] if dates[-1][:10] != dates[0][:10] else ''} on "
             f"{_machine(m)}. Reproduce with `bash scripts/bench.sh{' --quick' if quick else ''}` "
             f"(after set-up; from the repository root).", ""]
    for name in ORDER:
        if name not in docs:
            lines += [f"(`{name}`: not measured in this run)", ""]
            continue
        lines += SECTIONS[name](docs[name], folder) + [""]
    for name in GPU_ORDER:
        if name in docs:
            lines += SECTIONS[name](docs[name], folder) + [""]
    page = folder / "README.md"
    files.write_text(page, "\n".join(lines))
    return page


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    folder = Path(argv[0]) if argv else bench_results.RESULTS
    print(f"wrote {render(folder)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
