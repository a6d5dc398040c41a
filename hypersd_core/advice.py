"""A graph's sampler settings held against a Hyper-SD file: what contradicts the file, and
the values that follow it.

The page sends what it reads from the sampler a LoRA's model flows into (``KSampler``,
``KSamplerAdvanced``, or ``SamplerCustom(Advanced)`` with its sampler, sigmas and guider
nodes) as a :class:`Settings`; :func:`check` answers one sentence per contradiction, each
saying what to change, and :func:`apply_values` the values one click sets. The rules are
the official model card's (``metadata.recipe_for``, ../shared notes "What users struggle
with": the wrong sampler, schedule, cfg or strength for a file):

* sampler: a unified (TCD) file wants ``tcd`` (``lcm`` does at eta 1); an N-step or CFG file
  DDIM (``ddim``; ``euler``, ``tcd`` and ``lcm`` take the same first-order step); SD3/FLUX
  files ``euler``; an ancestral, SDE or multistep sampler is none of these;
* schedule: the few-step grid the file was made on: DDIM trailing or TCD's grid (ComfyUI's
  ``hypersd_trailing``, ``hypersd_tcd``, ``sgm_uniform`` and ``simple`` land there); ``normal``,
  ``karras`` and the other many-step schedules put steps where the file was not trained;
* steps: an N-step (or CFG) file at its N; a unified one at 1 to 8;
* cfg: a file with guidance distilled in at cfg 1 (2 at most); a CFG-preserving one at its cfg;
* strength: 1 on SD1.5/SDXL (0.5 to 1.5 is fine), 0.125 on SD3/FLUX (above 0.5 burns);
* eta (TCD above one step): the file's own eta for the step count, within 0.3.
Plain Python; nothing here imports torch or ComfyUI.
"""
from __future__ import annotations

from dataclasses import dataclass

from .metadata import Recipe, tcd_eta

# ComfyUI's names for the recipe's sampler and schedule (the pack registers "tcd",
# "hypersd_tcd" and "hypersd_trailing" into ComfyUI's lists).
KSAMPLER_NAME = {"tcd": "tcd", "ddim": "ddim", "euler": "euler", "lcm": "lcm"}
KSCHEDULER_NAME = {"trailing": "hypersd_trailing", "tcd": "hypersd_tcd", "segments": "hypersd_trailing",
                   "simple": "simple", "one_step": "hypersd_trailing"}
MODE_NAME = {"trailing": "trailing", "tcd": "tcd", "segments": "segments", "simple": "trailing",
             "one_step": "trailing"}

FIRST_ORDER = ("ddim", "euler", "tcd", "lcm")  # the same one-step update on an eps model at few steps
FEW_STEP_SCHEDULES = ("hypersd_trailing", "hypersd_tcd", "hypersd_segments", "hypersd_one_step", "sgm_uniform",
                      "simple")
UNIFIED_MAX_STEPS = 8
ETA_TOLERANCE = 0.3
CFG_DISTILLED_MAX = 2.0


@dataclass
class Settings:
    """What the graph sets. ``None``: the graph does not say (an input linked from elsewhere,
    or no such node). ``sampler``/``scheduler`` use ComfyUI's names; a Hyper-SD Scheduler's
    mode is given as ``hypersd_<mode>``, a Hyper-SD TCD Sampler as ``tcd`` with its ``eta``."""

    steps: int | None = None
    cfg: float | None = None
    sampler: str | None = None
    scheduler: str | None = None
    eta: float | None = None
    strength: float | None = None  # the LoRA's; negative = the pack loader's automatic strength

    @classmethod
    def from_json(cls, d: dict) -> "Settings":
        """From the page's JSON; a value of the wrong type is a ValueError naming it."""
        if not isinstance(d, dict):
            raise ValueError("settings must be an object")
        out = {}
        for name, cast in (("steps", int), ("cfg", float), ("eta", float), ("strength", float),
                           ("sampler", str), ("scheduler", str)):
            v = d.get(name)
            if v is None:
                continue
            if cast is str:
                if not isinstance(v, str) or len(v) > 200:
                    raise ValueError(f"{name} must be a name (text)")
                out[name] = v
            else:
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ValueError(f"{name} must be a number, not {v!r}")
                out[name] = cast(v)
        return cls(**out)


def is_unified(recipe: Recipe) -> bool:
    return recipe.sampler == "tcd" and recipe.schedule == "tcd"


def target_steps(recipe: Recipe, steps: int | None) -> int:
    """The steps a click sets: a unified file keeps the graph's 1-8, other files their own."""
    if is_unified(recipe) and steps is not None and 1 <= steps <= UNIFIED_MAX_STEPS:
        return int(steps)
    return int(recipe.steps)


def apply_values(recipe: Recipe, steps: int | None = None) -> dict:
    """The values one click sets, by the widget names of the nodes they go to: KSampler(Advanced)
    ``steps``/``cfg``/``sampler_name``/``scheduler``; Hyper-SD TCD Sampler ``eta``; Hyper-SD
    Scheduler ``steps``/``mode``; KSamplerSelect ``sampler_name``; BasicScheduler
    ``scheduler``/``steps``; CFGGuider ``cfg``; the LoRA's ``strength``; FLUX ``guidance``."""
    n = target_steps(recipe, steps)
    r = recipe.with_steps(n)
    return {"steps": n, "cfg": float(r.cfg), "sampler_name": KSAMPLER_NAME.get(r.sampler, r.sampler),
            "scheduler": KSCHEDULER_NAME.get(r.schedule, "hypersd_trailing"),
            "mode": MODE_NAME.get(r.schedule, "trailing"), "eta": float(r.eta), "strength": float(r.strength),
            "guidance": r.guidance}


def describe(recipe: Recipe) -> str:
    """The recipe in one line, as the badge shows it."""
    r = recipe
    steps = f"1-{UNIFIED_MAX_STEPS} steps" if is_unified(r) else f"{r.steps} step{'s' if r.steps != 1 else ''}"
    sampler = KSAMPLER_NAME.get(r.sampler, r.sampler)
    if r.sampler == "tcd" and is_unified(r):
        table = r.eta_by_steps or ((1, 1.0), (2, tcd_eta(2)))
        sampler += " eta " + ", ".join(f"{e:g}@{k}" for k, e in sorted(table))
    elif r.sampler == "tcd":
        sampler += f" eta {r.eta:g}"
    parts = [steps, sampler, KSCHEDULER_NAME.get(r.schedule, r.schedule), f"cfg {r.cfg:g}", f"strength {r.strength:g}"]
    if r.guidance is not None:
        parts.append(f"guidance {r.guidance:g}")
    return " · ".join(parts)


def check(recipe: Recipe, variant: str, s: Settings) -> list[str]:
    """One sentence per setting of ``s`` that contradicts ``recipe`` (a file of ``variant``)."""
    out = []
    unified = is_unified(recipe)
    want_sampler = KSAMPLER_NAME.get(recipe.sampler, recipe.sampler)
    want_schedule = KSCHEDULER_NAME.get(recipe.schedule, "hypersd_trailing")
    kind = ("a unified Hyper-SD LoRA" if unified else "a CFG Hyper-SD LoRA" if variant == "cfg"
            else f"a {recipe.steps}-step Hyper-SD LoRA" if recipe.sampler != "lcm" else "a one-step Hyper-SD model")

    if s.sampler is not None:
        ok = ({"tcd"} | ({"lcm"} if recipe.eta >= 0.99 else set()) if unified
              else {"euler", "ddim"} if recipe.sampler == "euler"
              else {"lcm", "tcd"} if recipe.sampler == "lcm" else set(FIRST_ORDER))
        if s.sampler not in ok:
            out.append(f"sampler '{s.sampler}' does not suit {kind}: set sampler to '{want_sampler}'"
                       + (" (or use Hyper-SD TCD Sampler)" if want_sampler == "tcd" else ""))
    if s.scheduler is not None and recipe.schedule != "one_step":
        ok = FEW_STEP_SCHEDULES if recipe.schedule != "simple" else ("simple", "sgm_uniform", "beta", "hypersd_trailing")
        if s.scheduler not in ok:
            out.append(f"scheduler '{s.scheduler}' puts the few steps where {kind} was not trained: "
                       f"set scheduler to '{want_schedule}'")
    if s.steps is not None:
        if unified and not 1 <= s.steps <= UNIFIED_MAX_STEPS:
            out.append(f"{s.steps} steps: {kind} is made for 1 to {UNIFIED_MAX_STEPS} steps; set steps to "
                       f"{recipe.steps} (or up to {UNIFIED_MAX_STEPS})")
        elif not unified and s.steps != recipe.steps:
            out.append(f"{s.steps} steps: {kind} is made for exactly {recipe.steps}; set steps to {recipe.steps} "
                       f"(or load the Hyper-SD file made for {s.steps} steps)")
    if s.cfg is not None:
        if recipe.cfg <= 1.0 and s.cfg > CFG_DISTILLED_MAX:
            out.append(f"cfg {s.cfg:g} over-saturates {kind}, which has the guidance distilled in: set cfg to "
                       f"{recipe.cfg:g} (at most {CFG_DISTILLED_MAX:g})")
        elif recipe.cfg > CFG_DISTILLED_MAX and s.cfg < CFG_DISTILLED_MAX:
            out.append(f"cfg {s.cfg:g}: {kind} keeps classifier-free guidance (and the negative prompt) only "
                       f"with it on: set cfg to {recipe.cfg:g}")
    if s.strength is not None and s.strength >= 0:
        rec = recipe.strength
        if s.strength > 4 * rec or s.strength < 0.5 * rec or (rec >= 1 and s.strength > 1.5 * rec):
            out.append(f"strength {s.strength:g}: this {'FLUX/SD3 ' if rec < 1 else ''}file is used at "
                       f"{rec:g}; set the LoRA's strength to {rec:g}")
    if (unified and s.eta is not None and s.sampler in (None, "tcd") and s.steps is not None and s.steps > 1
            and abs(s.eta - tcd_eta(s.steps, recipe.eta_by_steps)) > ETA_TOLERANCE):
        want = tcd_eta(s.steps, recipe.eta_by_steps)
        out.append(f"eta {s.eta:g}: this file is sampled with eta {want:g} at {s.steps} steps; set eta to {want:g}")
    return out
