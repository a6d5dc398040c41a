"""The benchmarks' results page: rendered from small fixed result files, it names every figure
and every PNG it names opens."""
from __future__ import annotations

import json
import re

import pytest

from hypersd_dev import REPO

MACHINE = {"cpu": "Test CPU", "cores": 2, "gpu": "none", "torch": "2.14.1", "python": "3.11", "comfyui": "0.3.75",
           "system": "Linux"}


def _doc(name, figures, settings):
    return {"benchmark": name, "date": "2026-12-03T12:00:00+00:00", "quick": True, "machine": MACHINE,
            "settings": settings, "figures": figures}


def _q(group, name, steps, sampler, fid, acc, best=False):
    return {"group": group, "name": name, "steps": steps, "cfg": 1.0, "sampler": sampler, "trained": "",
            "best_bare": best, "accuracy": acc, "fid": fid, "fids": [fid], "fid_spread": 2.0, "s_per_image": 0.1,
            "reward_logp": None}


FIXED = {
    "quality": _doc("quality", {
        "rows": [_q("teacher", "teacher", 50, "euler normal", 60.4, 0.89),
                 _q("bare teacher", "teacher", 4, "tcd eta 0.3", 116.2, 0.79, best=True),
                 _q("bare teacher", "teacher", 4, "ddim trailing", 183.4, 0.7),
                 _q("bare teacher", "teacher", 8, "tcd eta 0.3", 52.2, 0.92, best=True),
                 _q("N-step", "TSCD 8-4", 4, "ddim trailing", 128.8, 0.82),
                 _q("N-step", "TSCD 8-4", 4, "tcd eta 0.3", 97.9, 0.74),
                 _q("unified", "unified LoRA", 1, "tcd eta 1", 102.7, 0.81),
                 _q("unified", "unified LoRA", 4, "tcd eta 1", 41.7, 0.95),
                 _q("unified", "unified LoRA", 8, "tcd eta 0.6", 46.6, 0.92)],
        "teacher50_fid": 60.4, "real": {"accuracy": 0.98, "fid": 24.7, "n": 500},
        "feedback": [{"lora": "fb", "steps": 4, "ratio": r, "accuracy": 0.9, "fid": f, "fid_spread": 1.0,
                      "before_fid": 128.8, "reward_logp": -0.2} for r, f in ((0.0, 128.8), (0.5, 51.1), (1.0, 111.7))],
        "checks": [{"what": "k4 beats the bare teacher at 4 steps", "met": True}]},
        {"per_digit": 5, "repeats": 1, "seed": 0, "eta": 0.3, "few_steps": [4, 8], "teacher_cfg": 2.0}),
    "sampling": _doc("sampling", {"rows": [
        {"steps": n, "sampler": s, "ratio": r, "p25": r - 0.01, "p75": r + 0.01, "ms_per_sample": 10.0 * n}
        for n in (1, 4) for s, r in (("tcd (this pack)", 1.01), ("euler (core)", 1.03))], "worst": {}},
        {"repeats": 5, "size": 64, "threads": 1}),
    "lora_load": _doc("lora_load", {"core_s": [1.0, 1.1], "ours_s": [1.0, 1.05], "median_core_s": 1.05,
                                    "median_ours_s": 1.03, "ratio": 0.98, "ratio_min": 0.95, "ratio_max": 1.0,
                                    "mb": 787.0, "layers": 722}, {"rounds": 2, "layout": "SDXL", "rank": 64}),
    "training_cost": _doc("training_cost", {"rows": [
        {"method": m, "trainer": t, "gradient_checkpointing": gc, "step_s": s, "peak_mib": p, "time_vs_core": s,
         "memory_vs_core": p / 100} for gc in (False, True)
        for m, t, s, p in (("core", "core TrainLoraNode", 1.0, 100.0), ("tscd", "HyperSDTrainTSCD", 0.9, 40.0))]},
        {"device": "cpu", "steps": 2}),
    "preference": _doc("preference", {
        "ratings": {"like": 80, "dislike": 80, "prefer": 20}, "stored_ratings": 180,
        "preference": {"report": "660 pairs ...", "agreement": 0.902, "pairs": 660, "held_out_pairs": 132},
        "feedback_seconds": 80.0, "before": {"ink_mass": 0.039, "accuracy": 0.946, "fid": 53.7, "n": 500},
        "after": {"0.5": {"ink_mass": 0.0463, "accuracy": 0.952, "fid": 65.9, "n": 500},
                  "1": {"ink_mass": 0.0548, "accuracy": 0.94, "fid": 81.5, "n": 500}},
        "seconds": 300.0, "grid": "preference_grid.png"}, {"per_digit": 20}),
    "soak": _doc("soak", {"prompts": 45, "valid": 31, "valid_ok": 31, "invalid": 14, "invalid_refused_cleanly": 14,
                          "route_calls": 258, "route_failures": 0, "ratings_stored": 33, "rss_after_warmup_mb": 1420.0,
                          "rss_end_mb": 1430.0, "rss_growth": 0.007, "rss_peak_mb": 1500.0, "kinds": [
                              {"kind": "TSCD training (2 steps)", "valid": True, "prompts": 3, "as_expected": 3,
                               "how": {"success": 3}, "median_s": 1.5, "median_cpu_s": 1.4, "drift": 1.02,
                               "wall_drift": 1.1, "rss_delta_mb": 0.3, "refusal": ""},
                              {"kind": "invalid: corrupt LoRA file", "valid": False, "prompts": 2, "as_expected": 2,
                               "how": {"pack error": 2}, "median_s": 0.1, "median_cpu_s": 0.08, "drift": None,
                               "refusal": "Hyper-SD: 'x' has a corrupt safetensors header"}]}, {"prompts": 45}),
    "crash": _doc("crash", {"summary": {
        "trials": 3, "killed_in_a_write": 1, "killed_in_a_save": 1, "killed_between_saves": 1, "files_checked": 9,
        "partial_files": 0, "temp_files_left": 1, "temp_files_listed": 0, "lora_a_complete_version": 3,
        "states_load": 3, "resumes_ok": 3, "equal_to_uninterrupted": 3, "replayed": 2, "replayed_resumes_ok": 2,
        "replayed_equal": 2, "ratings_trials": 2, "ratings_acknowledged": 300, "ratings_kept": 300,
        "ratings_integrity_ok": 2}}, {"trials": 3}),
    "demo": _doc("demo", {"grid": "demo/grid.png", "results": {"meta": {}, "rows": [
        {"name": "teacher euler 25 steps cfg 2", "steps": 25, "cfg": 2.0, "seconds_per_image": 0.29,
         "accuracy": 0.875, "fid": 128.6}]}}, {"per_digit": 2}),
}


def test_the_page_names_every_figure_and_every_png_opens(tmp_path, pack):
    from PIL import Image

    from bench import render

    for name, doc in FIXED.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    (tmp_path / "demo").mkdir()
    Image.new("L", (40, 20), 255).save(tmp_path / "demo" / "grid.png")
    Image.new("L", (40, 20), 255).save(tmp_path / "preference_grid.png")
    page = render.render(tmp_path)
    text = page.read_text()
    named = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    for fig in render.FIGURES:
        assert fig in named, f"the page does not show {fig}"
    assert "demo/grid.png" in named and "preference_grid.png" in named
    for rel in named:
        with Image.open(tmp_path / rel) as im:
            im.verify()
    assert "Test CPU (2 cores" in text and "2026-12-03" in text and "quick run" in text
    assert "| invalid: corrupt LoRA file | no | 2 | 2 | pack error (2) | 0.10 / 0.08 | - / - | - | Hyper-SD: 'x' has" in text
    assert "| TSCD training (2 steps) | yes | 3 | 3 | success (3) | 1.50 / 1.40 | 1.02x / 1.10x | +0.3 MB |" in text
    assert "| 9 | 0 | 0 | 3/3 | 3/3 | 3/3 | 2 / 2 of 2 | 300 / 300 | 2/2 |" in text
    assert "45 prompts on one server" in text and "(+0.7 %)" in text
    assert "merged at 0.5" in text and "660 pairs" in text and "| TSCD 8-4 | 4 | tcd eta 0.3 | 0.740 | 97.9 |" in text


def test_a_missing_benchmark_is_named_not_fatal(tmp_path, pack):
    from bench import render

    (tmp_path / "lora_load.json").write_text(json.dumps(FIXED["lora_load"]))
    text = render.render(tmp_path).read_text()
    assert "![LoRA load time](lora_load.png)" in text and "(`quality`: not measured in this run)" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no benchmark results"):
        render.render(empty)


def test_the_committed_page_shows_figures_that_exist():
    page = REPO / "bench" / "results" / "README.md"
    if not page.exists():
        pytest.skip("no committed results page yet")
    named = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text())
    assert named and all((page.parent / rel).is_file() for rel in named)
