"""Sampler settings held against a Hyper-SD file (``hypersd_core.advice``) and the route the
page asks (``POST /hypersd/check``): each contradiction the issue names gets a sentence that
says what to change, matching settings get none, and "Apply" values follow the file."""
from __future__ import annotations

import pytest

from ComfyUI_HyperSD.hypersd_core import advice, metadata
from ComfyUI_HyperSD.hypersd_core.advice import Settings

UNIFIED = metadata.recipe_for("unified", "SD1.5", 1)
NSTEP8 = metadata.recipe_for("nsteps", "SD1.5", 8)
CFG8 = metadata.recipe_for("cfg", "SD1.5", 8)
FLUX8 = metadata.recipe_for("nsteps", "FLUX", 8)
SCORED = metadata.recipe_for("hypersd_trained_score", "SD1.5")


def test_the_issues_contradictions_each_get_what_to_change():
    # a unified LoRA under euler at 30 steps (normal schedule, cfg 7)
    w = advice.check(UNIFIED, "unified", Settings(steps=30, cfg=7.0, sampler="euler", scheduler="normal"))
    assert len(w) == 4
    assert "set sampler to 'tcd'" in w[0] and "set scheduler to 'hypersd_tcd'" in w[1]
    assert "1 to 8 steps" in w[2] and "set cfg to 1" in w[3]
    # a CFG LoRA at cfg 1
    (w,) = advice.check(CFG8, "cfg", Settings(steps=8, cfg=1.0, sampler="ddim", scheduler="sgm_uniform"))
    assert "keeps classifier-free guidance" in w and "set cfg to 5" in w
    # an N-step LoRA at another step count
    (w,) = advice.check(NSTEP8, "nsteps", Settings(steps=4, cfg=1.0, sampler="ddim", scheduler="hypersd_trailing"))
    assert "made for exactly 8" in w and "set steps to 8" in w
    # a FLUX LoRA at strength 1
    (w,) = advice.check(FLUX8, "nsteps", Settings(strength=1.0))
    assert "FLUX/SD3" in w and "strength to 0.125" in w


@pytest.mark.parametrize("recipe, variant, s", [
    (UNIFIED, "unified", Settings(steps=1, cfg=1.0, sampler="tcd", scheduler="hypersd_tcd", eta=1.0, strength=1.0)),
    (UNIFIED, "unified", Settings(steps=4, cfg=1.0, sampler="tcd", scheduler="sgm_uniform", eta=0.3)),
    (UNIFIED, "unified", Settings(steps=1, sampler="lcm", scheduler="simple")),  # LCM at eta 1, one step
    (NSTEP8, "nsteps", Settings(steps=8, cfg=1.0, sampler="ddim", scheduler="hypersd_trailing", strength=0.8)),
    (NSTEP8, "nsteps", Settings(steps=8, cfg=1.5, sampler="euler", scheduler="simple")),
    (CFG8, "cfg", Settings(steps=8, cfg=5.0, sampler="ddim", scheduler="sgm_uniform")),
    (FLUX8, "nsteps", Settings(steps=8, cfg=1.0, sampler="euler", scheduler="simple", strength=0.125)),
    (NSTEP8, "nsteps", Settings(strength=-1.0)),  # the pack loader's automatic strength
    (UNIFIED, "unified", Settings()),  # nothing known: nothing to say
])
def test_settings_that_follow_the_file_get_no_warning(recipe, variant, s):
    assert advice.check(recipe, variant, s) == []


def test_eta_is_checked_against_the_files_own_table():
    # a score-distilled (unified) file recommends eta 1 at 2 steps (SCORE_ETA_BY_STEPS)
    assert advice.check(SCORED, "hypersd_trained", Settings(steps=2, sampler="tcd", eta=1.0)) == []
    (w,) = advice.check(SCORED, "hypersd_trained", Settings(steps=2, sampler="tcd", eta=0.3))
    assert "set eta to 1" in w
    assert advice.check(SCORED, "hypersd_trained", Settings(steps=1, sampler="tcd", eta=0.0)) == []  # one step: x0


def test_apply_values_follow_the_file():
    v = advice.apply_values(UNIFIED, steps=4)  # a unified file keeps the graph's 1-8 steps
    assert (v["steps"], v["sampler_name"], v["scheduler"], v["mode"], v["cfg"], v["eta"]) == (
        4, "tcd", "hypersd_tcd", "tcd", 1.0, 0.3)
    assert advice.apply_values(UNIFIED, steps=30)["steps"] == 1
    v = advice.apply_values(NSTEP8, steps=30)
    assert (v["steps"], v["sampler_name"], v["scheduler"], v["mode"]) == (8, "ddim", "hypersd_trailing", "trailing")
    assert advice.apply_values(CFG8)["cfg"] == 5.0
    v = advice.apply_values(FLUX8)
    assert (v["sampler_name"], v["scheduler"], v["strength"], v["guidance"]) == ("euler", "simple", 0.125, 3.5)
    assert advice.apply_values(SCORED, steps=2)["eta"] == 1.0
    # what Apply sets raises no warning
    for recipe, variant in ((UNIFIED, "unified"), (NSTEP8, "nsteps"), (CFG8, "cfg"), (FLUX8, "nsteps")):
        v = advice.apply_values(recipe, steps=30)
        s = Settings(steps=v["steps"], cfg=v["cfg"], sampler=v["sampler_name"], scheduler=v["scheduler"],
                     eta=v["eta"], strength=v["strength"])
        assert advice.check(recipe, variant, s) == [], recipe


def test_the_badge_line_names_the_recipe():
    assert advice.describe(UNIFIED) == "1-8 steps · tcd eta 1@1, 0.3@2 · hypersd_tcd · cfg 1 · strength 1"
    assert advice.describe(NSTEP8) == "8 steps · ddim · hypersd_trailing · cfg 1 · strength 1"
    assert advice.describe(FLUX8).endswith("strength 0.125 · guidance 3.5")


def test_settings_of_the_wrong_type_are_refused():
    with pytest.raises(ValueError, match="steps must be a number"):
        Settings.from_json({"steps": "eight"})
    with pytest.raises(ValueError, match="sampler must be a name"):
        Settings.from_json({"sampler": 3})
    assert Settings.from_json({"steps": 4, "cfg": 1, "sampler": "tcd"}) == Settings(steps=4, cfg=1.0, sampler="tcd")


def test_check_route(server, example_parts):
    body = {"lora": "Hyper-SD15-1step-lora.safetensors", "strength": 1.0,
            "samplers": [{"id": 3, "steps": 30, "cfg": 7.0, "sampler": "euler", "scheduler": "normal"},
                         {"id": 4, "steps": 1, "cfg": 1.0, "sampler": "tcd", "scheduler": "hypersd_tcd"}]}
    st, out = server.request("POST", "/hypersd/check", body)
    assert st == 200 and out["hypersd"], out
    assert out["badge"].startswith("Hyper-SD SD1.5 unified 1-step LoRA") and "tcd" in out["badge"]
    assert len(out["warnings"]["3"]) == 4 and out["warnings"]["4"] == [] and out["strength_warnings"] == []
    assert (out["apply"]["steps"], out["apply"]["sampler_name"], out["apply"]["scheduler"]) == (1, "tcd", "hypersd_tcd")
    st, out = server.request("POST", "/hypersd/check", {"lora": "Hyper-SD15-8steps-CFG-lora.safetensors",
                                                          "samplers": [{"id": 1, "cfg": 1.0, "steps": 8}]})
    assert st == 200 and any("set cfg to 5" in w for w in out["warnings"]["1"]) and out["apply"]["cfg"] == 5.0
    st, inspected = server.get_status("/hypersd/inspect?lora=Hyper-SD15-8steps-lora.safetensors")
    assert inspected["hypersd"] and inspected["badge"].startswith("Hyper-SD SD1.5 8-step LoRA: 8 steps · ddim")
    # refused: a path, an unknown file, settings of the wrong type; the server keeps serving
    for bad, status in (({"lora": "../x.safetensors", "samplers": []}, 400), ({"lora": "nope.safetensors"}, 404),
                        ({"lora": "Hyper-SD15-1step-lora.safetensors", "samplers": [{"id": 1, "steps": "x"}]}, 400),
                        ([1], 400)):
        st, out = server.request("POST", "/hypersd/check", bad)
        assert st == status and out["error"], (bad, st, out)
    assert server.get("/system_stats")["system"]
