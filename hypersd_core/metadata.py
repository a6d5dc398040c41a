"""The vocabulary of a Hyper-SD file: what it is, and how to sample it.

One definition, used both ways: the trainer writes a LoRA's metadata through
:func:`trained_metadata`, the inspector (``lora_file``) reads it through
:func:`read_trained`, and both take the sampling settings of every kind of file from
:func:`recipe_for`. Plain Python; nothing here imports torch or ComfyUI.

Keys written by this pack's trainer (safetensors ``__metadata__``, all strings):

================================  ================================================
``hypersd.trained_by``            ``"ComfyUI-HyperSD"``: marks the file as ours
``hypersd.method``                the training method (``tscd``)
``hypersd.family``                ``SD1.5`` / ``SD2`` / ``SDXL`` / ... (:func:`model_family`)
``hypersd.stages``                segment counts trained so far, e.g. ``"8,4,2,1"``
``hypersd.run_stages``            a stage file's whole run (the stages the run went on to)
``hypersd.step``                  optimizer steps done
``hypersd.total_steps``           optimizer steps of the run (of the stage, for a stage file)
``hypersd.complete``              ``"false"`` on an intermediate save (read as a warning)
``hypersd.last_loss``             the loss of the last step
``hypersd.<setting>``             the run's settings (:data:`SETTINGS`)
``hypersd.recommended_steps``     integer
``hypersd.recommended_cfg``       float
``hypersd.recommended_sampler``   one of :data:`SAMPLERS`
``hypersd.recommended_eta``       float (TCD's gamma)
``hypersd.recommended_schedule``  one of :data:`SCHEDULES`
``hypersd.recommended_strength``  optional float
``hypersd.recommended_eta_by_steps`` optional ``steps:eta`` pairs (``1:1.0,2:1.0,4:1.0,8:0.6``):
                                  TCD's eta at other step counts (score-distilled files)
================================  ================================================

plus kohya's ``ss_network_module``, ``ss_network_dim`` and ``ss_network_alpha``, which
other LoRA tools read.

Recommended settings (:func:`recipe_for`), from the official Hyper-SD model card:

* ``unified`` (Hyper-SD15/SDXL-1step-lora): TCD sampler on TCD's grid, cfg 1; eta 1 at
  one step, 0.3 at 2-8 steps;
* ``nsteps`` (2/4/8/16-step LoRAs) and ``cfg`` (CFG-preserving LoRAs): the file's steps,
  DDIM on the trailing grid (SD1.5/SDXL) or euler on ComfyUI's ``simple`` schedule
  (SD3/FLUX); cfg 1, or 5 for CFG LoRAs (SD3: 3/5/7 at 4/8/16 steps); FLUX guidance 3.5;
* ``onestep_unet``: one LCM step from timestep 800, cfg 1;
* ``hypersd_trained`` (this pack's TSCD): a last stage of k > 1 segments gives a k-step
  LoRA (k steps, TCD eta 0.3 on the DDIM trailing grid, cfg 1: :data:`TRAINED_NSTEP_ETA`,
  decided by measurement, see there); a last stage of one segment gives a unified LoRA
  (:data:`ONE_SEGMENT_STEPS`: one TCD step at eta 1, decided by measurement, see there);
* LoRAs are applied at strength 1 on SD1.5/SDXL and 0.125 on SD3/FLUX.
"""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

NUM_TRAIN_TIMESTEPS = 1000  # the discrete training schedule of SD1.x/SD2.x/SDXL: every grid is on it

PREFIX = "hypersd."
PACK_NAME = "ComfyUI-HyperSD"

TRAINED_BY = PREFIX + "trained_by"
METHOD = PREFIX + "method"
FAMILY = PREFIX + "family"
STAGES = PREFIX + "stages"
RUN_STAGES = PREFIX + "run_stages"
STEP = PREFIX + "step"
TOTAL_STEPS = PREFIX + "total_steps"
COMPLETE = PREFIX + "complete"
LAST_LOSS = PREFIX + "last_loss"
RECOMMENDED = PREFIX + "recommended_"  # + steps, cfg, sampler, eta, schedule, strength

# The run's settings, each written as hypersd.<name>.
SETTINGS = ("steps_per_stage", "rank", "alpha", "teacher_cfg", "learning_rate", "seed", "lora_scope",
            "lr_schedule", "score_steps", "generator_t", "fake_updates", "regression_weight",
            "score_tscd_weight", "score_feedback_weight", "feedback_rewards")

FAMILIES = ("SD1.5", "SDXL", "SD3", "FLUX", "unknown")  # what a file's keys can tell apart
MODEL_FAMILIES = FAMILIES[:-1] + ("SD2", "SDXL-refiner", "FLUX.2")  # what a loaded model can be
SAMPLERS = ("tcd", "ddim", "euler", "lcm")
SCHEDULES = ("trailing", "tcd", "segments", "one_step", "simple")

# ComfyUI's model-config class names (comfy.supported_models) -> family. Subclasses (SSD-1B,
# FLUX schnell, ...) take their base's family: model_family walks the class hierarchy.
_CONFIG_FAMILIES = {"Flux2": "FLUX.2", "SDXLRefiner": "SDXL-refiner", "SDXL": "SDXL", "SD15": "SD1.5",
                    "SD20": "SD2", "SD3": "SD3", "Flux": "FLUX"}


def model_family(model_config) -> str:
    """The family of a loaded model from its config object (``ModelPatcher.model.model_config``).

    Found by class name along the class hierarchy, so it needs no import of the host; a
    config of another kind gives its class name, ``None`` gives ``"unknown"``.
    """
    if model_config is None:
        return "unknown"
    for cls in type(model_config).__mro__:
        fam = _CONFIG_FAMILIES.get(cls.__name__)
        if fam is not None:
            return fam
    return type(model_config).__name__


def parse_stages(text: str | int | Sequence[int], T: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """Segment counts of the progressive stages: ``"8,4,2,1"`` -> ``[8, 4, 2, 1]``.

    Accepts commas, semicolons or spaces between the numbers, a JSON list (``"[8, 4]"``),
    an integer or a sequence. Each count must be a whole number in ``[1, T]``; anything
    else raises ``ValueError`` with a sentence that says what to write.
    """
    if isinstance(text, bool):
        raise ValueError(f"stages must be whole numbers like '8,4,2,1'; got {text!r}")
    if isinstance(text, int):
        parts: list = [text]
    elif isinstance(text, str):
        raw = text.strip()
        if raw.startswith("["):
            try:
                parts = json.loads(raw)
            except ValueError:
                raise ValueError(f"stages must be whole numbers like '8,4,2,1'; got {text!r}") from None
            if not isinstance(parts, list):
                parts = [parts]
        else:
            parts = [p for p in re.split(r"[,;\s]+", raw) if p]
    else:
        parts = list(text)
    ks = []
    for p in parts:
        if isinstance(p, bool) or isinstance(p, float) and not p.is_integer():
            raise ValueError(f"stages must be whole numbers separated by commas, like '8,4,2,1'; got {text!r}")
        try:
            ks.append(int(p))
        except (TypeError, ValueError):
            raise ValueError(f"stages must be whole numbers separated by commas, like '8,4,2,1'; got {text!r}") from None
    if not ks:
        raise ValueError("stages is empty: give segment counts such as '8,4,2,1'")
    for k in ks:
        if not 1 <= k <= T:
            raise ValueError(f"a stage's segment count must be between 1 and {T}; got {k}")
    return ks


def format_stages(stages: Sequence[int]) -> str:
    return ",".join(str(int(k)) for k in stages)


# ----------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class Recipe:
    """How to sample a model with a Hyper-SD file applied."""

    steps: int
    cfg: float
    sampler: str
    schedule: str
    eta: float = 0.0
    strength: float = 1.0
    guidance: float | None = None  # FLUX's distilled guidance (FluxGuidance)
    eta_by_steps: tuple[tuple[int, float], ...] = ()  # a TCD file's own eta per step count, if it has one

    def with_steps(self, steps: int) -> "Recipe":
        """The recipe at another step count; a TCD recipe's eta follows: the file's own
        ``eta_by_steps`` where it has one, else :func:`tcd_eta` (1 at one step, 0.3 above)."""
        steps = max(1, int(steps))
        if self.sampler == "tcd" and self.schedule == "tcd":
            return replace(self, steps=steps, eta=tcd_eta(steps, self.eta_by_steps))
        return replace(self, steps=steps)

    def to_metadata(self) -> dict[str, str]:
        """The ``hypersd.recommended_*`` keys (strength only where it is not 1)."""
        md = {RECOMMENDED + "steps": str(self.steps), RECOMMENDED + "cfg": str(float(self.cfg)),
              RECOMMENDED + "sampler": self.sampler, RECOMMENDED + "eta": str(float(self.eta)),
              RECOMMENDED + "schedule": self.schedule}
        if self.strength != 1.0:
            md[RECOMMENDED + "strength"] = str(float(self.strength))
        if self.eta_by_steps:
            md[RECOMMENDED + "eta_by_steps"] = format_eta_by_steps(self.eta_by_steps)
        return md


def tcd_eta(steps: int, table: Sequence[tuple[int, float]] = ()) -> float:
    """TCD's gamma at ``steps``: from ``table`` (``(steps, eta)`` pairs; the entry of the largest
    step count not above ``steps``, or the smallest one), else the unified LoRA's rule: 1 at one
    step (LCM-like), 0.3 at 2-8 steps."""
    if table:
        rows = sorted(table)
        below = [eta for n, eta in rows if n <= int(steps)]
        return float(below[-1] if below else rows[0][1])
    return 1.0 if int(steps) == 1 else 0.3


def format_eta_by_steps(table: Sequence[tuple[int, float]]) -> str:
    """``((1, 1.0), (8, 0.3))`` -> ``"1:1.0,8:0.3"`` (the metadata form)."""
    return ",".join(f"{int(n)}:{float(eta)}" for n, eta in sorted(table))


def parse_eta_by_steps(text: str) -> tuple[tuple[int, float], ...]:
    """``"1:1.0,8:0.3"`` -> ``((1, 1.0), (8, 0.3))``; ValueError unless every step count is 1 or
    more and every eta in [0, 1]."""
    rows = []
    for part in str(text).split(","):
        n, sep, eta = part.strip().partition(":")
        if not sep:
            raise ValueError(f"{part!r} is not steps:eta")
        n_i, eta_f = int(n), float(eta)
        if n_i < 1 or not 0.0 <= eta_f <= 1.0:
            raise ValueError(f"{part!r}: steps must be 1 or more and eta in [0, 1]")
        rows.append((n_i, eta_f))
    if not rows:
        raise ValueError("empty")
    return tuple(sorted(rows))


# TCD's eta per step count of a LoRA made by score distillation (unified): measured on the 64x64
# toy (its unified LoRA: TSCD 8,4,2,1 x 250, then 100 score steps; bench_tscd --quality
# --unified-etas 0.3,0.6,1, 500 images x 3 seed sets, cfg 1, the judge's FID; the 50-step teacher
# 60.4): 2 steps eta 0.3 / 0.6 / 1.0: 97.2 / 89.2 / 75.5; 4 steps: 71.8 / 52.2 / 38.5; 8 steps:
# 49.2 / 39.9 / 42.0. Such a generator is best used LCM-like (each step a fresh one-step sample
# from a noisier start) up to 4 steps, and with a little less noise at 8.
SCORE_ETA_BY_STEPS: tuple[tuple[int, float], ...] = ((1, 1.0), (2, 1.0), (4, 1.0), (8, 0.6))
# The same with the feedback term in the score stage (``score_feedback_weight``): the toy's unified
# LoRA (TSCD 8,4,2,1 x 250, then 300 score steps with feedback 0.5 and the toy reward; same bench):
# 2 steps eta 0.3 / 0.6 / 1.0: 39.2 / 39.2 / 43.0; 4 steps: 39.7 / 39.5 / 44.3; 8 steps: 37.6 /
# 44.9 / 59.8. Its one-step pictures are already near the data, so less fresh noise serves better.
SCORE_FEEDBACK_ETA_BY_STEPS: tuple[tuple[int, float], ...] = ((1, 1.0), (2, 0.3), (4, 0.6), (8, 0.3))


def family_strength(family: str) -> float:
    return 0.125 if family in ("FLUX", "SD3") else 1.0


def _few_step(family: str, steps: int, cfg: float) -> Recipe:
    if family in ("FLUX", "SD3"):
        return Recipe(steps, cfg, "euler", "simple", 0.0, family_strength(family), 3.5 if family == "FLUX" else None)
    return Recipe(steps, cfg, "ddim", "trailing", 0.0, family_strength(family))


# A TSCD LoRA whose last stage had one segment is recommended as the unified LoRA at its own
# step count: one TCD step at eta 1. Measured on the toy's committed final LoRA (8,4,2,1 x 300;
# python -m bench.bench_tscd --quality --repeats 3: 500 images a row, 3 seed sets; the teacher
# it was distilled from scores accuracy 0.88, FID 20.5 at 50 steps):
#   1 step,  eta 1.0: accuracy 0.948, FID 60.7 +- 0.8
#   2 steps, eta 0.3: accuracy 0.690, FID 42.5 +- 3.7
#   4 steps, eta 0.3: accuracy 0.676, FID 41.6 +- 7.3
# At 2-4 steps a third of the digits are not the prompted one (below the bare teacher's 0.88),
# which a lower FID does not make up for; one step keeps the prompt and costs a half to a
# quarter of the time. (That was the old 32x32 toy. On the 64x64 toy of issue 11, whose 50-step
# teacher scores accuracy 0.89, FID 60.4, the final LoRA of 8,4,2,1 x 250 scores accuracy 0.59 /
# FID 455.6 at 1 step, 0.66 / 119.6 at 2, 0.69 / 69.5 at 4 and 0.82 / 49.5 at 8 steps (eta 0.3):
# score distillation (issue 12) gives the unified LoRA its one step: SCORE_ETA_BY_STEPS below.)
ONE_SEGMENT_STEPS = 1

# A k-segment TSCD LoRA of this pack (k > 1) is sampled at its k steps with TCD (eta 0.3) on the
# DDIM trailing grid, the times its stages train at (tscd.stage_timesteps). Measured on the 64x64
# toy's stage LoRAs (500 images x 3 seed sets, cfg 1, the judge's FID; the bare teacher's best
# few-step sampler at the same step count beside it): DDIM trailing / TCD 0.3 on TCD's grid / TCD
# 0.3 on the trailing grid: k8 at 8 steps 78.0 / 52.7 / 50.1 (bare 52.0), k4 at 4 steps 128.8 /
# 97.9 / 93.0 (bare 115.4), k2 at 2 steps 197.6 / 171.5 / 171.5 (bare 503.7); eta 0.2 / 0.5 at 8
# steps: 53.3 / 56.5. Accuracy moves the other way at 2 and 4 steps (k2 0.75 -> 0.65, k4 0.82 ->
# 0.74; k8 0.86 -> 0.90). The official N-step LoRAs keep the model card's DDIM trailing.
TRAINED_NSTEP_ETA = 0.3
ONE_STEP_TIMESTEP = 800  # the official one-step UNet's timestep, the "one_step" schedule's start


def recipe_for(variant: str, family: str, steps: int | None = None, last_segments: int | None = None) -> Recipe:
    """The recommended settings for a file of ``variant`` and ``family`` (see the module docstring).

    ``steps``: the step count the file announces (its name), for N-step, CFG and unified
    files. ``last_segments``: for ``hypersd_trained``, the segment count of the last stage.
    """
    if variant == "unified":
        n = steps or 1
        return Recipe(n, 1.0, "tcd", "tcd", tcd_eta(n), family_strength(family))
    if variant == "onestep_unet":
        return Recipe(1, 1.0, "lcm", "one_step", 1.0, family_strength(family))
    if variant == "hypersd_trained_score":  # TSCD, then score distillation: a unified generator
        return replace(recipe_for("unified", family, steps or 1), eta_by_steps=SCORE_ETA_BY_STEPS)
    if variant == "hypersd_trained":
        if last_segments == 1:
            return recipe_for("unified", family, ONE_SEGMENT_STEPS)
        if family in ("FLUX", "SD3"):
            return _few_step(family, last_segments or 4, 1.0)
        return Recipe(last_segments or 4, 1.0, "tcd", "trailing", TRAINED_NSTEP_ETA, family_strength(family))
    n = steps or 4
    if variant == "cfg":
        cfg = {4: 3.0, 8: 5.0, 16: 7.0}.get(n, 5.0) if family == "SD3" else 5.0
        return _few_step(family, n, cfg)
    return _few_step(family, n, 1.0)  # nsteps, or unknown: the most common kind


# ----------------------------------------------------------------------------- writing


def trained_metadata(*, method: str, family: str, stages: Sequence[int], settings: Mapping[str, object],
                     step: int, total_steps: int, complete: bool, rank: int, run_stages: Sequence[int] | None = None,
                     last_loss: float | None = None, recipe_segments: int | None = None) -> dict[str, str]:
    """The metadata of a LoRA trained by this pack, with the recipe of its last stage (of a stage
    with ``recipe_segments`` segments where given: 1 after score distillation, a one-step generator)."""
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise ValueError(f"not a setting of the file vocabulary: {sorted(unknown)}")
    md = {TRAINED_BY: PACK_NAME, METHOD: method, FAMILY: family, STAGES: format_stages(stages),
          STEP: str(int(step)), TOTAL_STEPS: str(int(total_steps)), COMPLETE: "true" if complete else "false"}
    md.update({PREFIX + k: str(v) for k, v in settings.items()})
    last = int(recipe_segments if recipe_segments is not None else stages[-1])
    scored = int(settings.get("score_steps", 0) or 0) > 0 and recipe_segments == 1
    variant = "hypersd_trained_score" if scored else "hypersd_trained"
    if scored and int(settings.get("generator_t", 999)) == ONE_STEP_TIMESTEP:
        variant = "onestep_unet"  # a dedicated one-step generator: sampled as it was trained, one step from t 800
    recipe = recipe_for(variant, family, last_segments=last)
    if variant == "hypersd_trained_score" and float(settings.get("score_feedback_weight", 0) or 0) > 0:
        recipe = replace(recipe, eta_by_steps=SCORE_FEEDBACK_ETA_BY_STEPS)
    md.update(recipe.to_metadata())
    md.update({"ss_network_module": "networks.lora", "ss_network_dim": str(int(rank)),
               "ss_network_alpha": str(float(settings.get("alpha", rank)))})
    if run_stages is not None:
        md[RUN_STAGES] = format_stages(run_stages)
    if last_loss is not None:
        md[LAST_LOSS] = f"{last_loss:.6g}"
    return md


# ----------------------------------------------------------------------------- reading


@dataclass
class TrainedFile:
    """What this pack's metadata says of a file (:func:`read_trained`)."""

    stages: list[int]
    family: str  # the keys' family, or the metadata's where the keys do not tell
    family_from_metadata: bool
    recipe: Recipe
    warnings: list[str]


_RECIPE_FIELDS = (("steps", int), ("cfg", float), ("eta", float), ("sampler", str), ("schedule", str),
                  ("strength", float))


def is_trained_by_pack(meta: Mapping[str, str]) -> bool:
    return bool(meta.get(TRAINED_BY))


def read_trained(meta: Mapping[str, str], key_family: str) -> TrainedFile:
    """Read a trained file's metadata: its stages, family and recipe, and what is wrong with it.

    ``key_family``: the family the file's keys show. It wins over the metadata's, which is
    used only when the keys cannot tell (and is one of :data:`FAMILIES`); a disagreement is a
    warning. A recommended value the metadata leaves out comes from the last stage
    (:func:`recipe_for`); a value that cannot be read is ignored with a warning.
    """
    warnings: list[str] = []
    stages: list[int] = []
    if meta.get(STAGES):
        try:
            stages = parse_stages(meta[STAGES])
        except ValueError:
            warnings.append(f"unreadable {STAGES}={meta[STAGES]!r}")
    if meta.get(COMPLETE, "").lower() == "false":
        warnings.append(f"training was not finished (step {meta.get(STEP, '?')} of {meta.get(TOTAL_STEPS, '?')}): "
                        f"this is an intermediate save")
    meta_family = meta.get(FAMILY) or None
    family, from_meta = key_family, False
    if meta_family and key_family == "unknown" and meta_family in FAMILIES:
        family, from_meta = meta_family, True
    elif meta_family and meta_family != key_family:
        warnings.append(f"metadata says {meta_family} but the keys are {key_family}")
    recipe = recipe_for("hypersd_trained", family, last_segments=stages[-1] if stages else None)
    values = {}
    for name, conv in _RECIPE_FIELDS:
        raw = meta.get(RECOMMENDED + name)
        if raw is None or raw == "":
            continue
        try:
            values[name] = conv(raw)
        except ValueError:
            warnings.append(f"metadata {RECOMMENDED}{name}={raw!r} is not a valid {conv.__name__}; ignored")
    if values.get("sampler", recipe.sampler) not in SAMPLERS:
        warnings.append(f"unknown recommended sampler {values['sampler']!r}; using {recipe.sampler}")
        values.pop("sampler")
    if values.get("schedule", recipe.schedule) not in SCHEDULES:
        warnings.append(f"unknown recommended schedule {values['schedule']!r}; using {recipe.schedule}")
        values.pop("schedule")
    raw = meta.get(RECOMMENDED + "eta_by_steps")
    if raw:
        try:
            values["eta_by_steps"] = parse_eta_by_steps(raw)
        except ValueError as e:
            warnings.append(f"metadata {RECOMMENDED}eta_by_steps={raw!r} is not steps:eta pairs ({e}); ignored")
    recipe = replace(recipe, **values)
    return TrainedFile(stages, family, from_meta, replace(recipe, steps=max(1, recipe.steps)), warnings)
