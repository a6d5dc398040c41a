"""Few-step sampling nodes: the TCD sampler, Hyper-SD schedules and the one-step schedule.

The math is in ``hypersd_core.samplers`` and ``hypersd_core.schedules``; these nodes wrap
it for ComfyUI and register ``tcd`` (sampler) and ``hypersd_tcd`` / ``hypersd_trailing``
(schedulers) in the stock KSampler lists.
"""
from __future__ import annotations

import logging
from functools import partial

import comfy.k_diffusion.sampling as k_sampling
import comfy.samplers
from comfy_api.latest import io

from ..hypersd_core import samplers as core_samplers
from ..hypersd_core import schedules as core_schedules

CATEGORY = "Hyper-SD/sampling"
DEFAULT_ETA = 0.3

ETA_TOOLTIP = ("TCD's gamma: the share of each step that is re-noised. 0 = deterministic DDIM (sharpest, can "
               "look harsh at 1-2 steps); 1 = LCM-like (smoothest, use it for a single step); 0.3 is the usual "
               "value for 2-8 steps. Lower it for more detail, raise it if the picture is noisy or burnt.")
MODE_TOOLTIP = ("Which timestep grid to use. trailing: the N-step LoRAs (Hyper-SD*-2/4/8/12steps, also the CFG "
                "ones), same as DDIM 'trailing'. tcd: the unified 1-step LoRA sampled at 1-8 steps with the TCD "
                "sampler (diffusers' TCD grid). segments: a LoRA you distilled with this pack's TSCD trainer, "
                "with steps = the number of segments of its last stage.")


def tcd_sampler(eta: float = DEFAULT_ETA) -> comfy.samplers.KSAMPLER:
    """A SAMPLER running ``hypersd_core.samplers.sample_tcd`` with this eta."""
    if not 0.0 <= float(eta) <= 1.0:
        raise ValueError(f"eta must be between 0 and 1, got {eta}")
    return comfy.samplers.KSAMPLER(core_samplers.sample_tcd, extra_options={"eta": float(eta)})


def _tcd_scheduler(model_sampling, steps: int):
    # KSampler asks for int(steps / denoise) steps; past TCD's 50-step origin grid, grow the grid.
    ts = core_schedules.tcd_timesteps(steps, original_steps=max(core_schedules.TCD_ORIGIN_STEPS, steps))
    return core_schedules.sigmas_from_timesteps(model_sampling, ts)


def _trailing_scheduler(model_sampling, steps: int):
    return core_schedules.sigmas_from_timesteps(model_sampling, core_schedules.trailing_timesteps(steps))


def register() -> None:
    """Add ``tcd`` to KSampler's samplers and ``hypersd_tcd``/``hypersd_trailing`` to its schedulers.

    Idempotent, and never replaces a name that is already there (another pack's ``tcd``
    keeps working; ours is then reachable through the HyperSDTCDSampler node).
    """
    if "tcd" not in comfy.samplers.KSAMPLER_NAMES and not hasattr(k_sampling, "sample_tcd"):
        k_sampling.sample_tcd = partial(core_samplers.sample_tcd, eta=DEFAULT_ETA)
        comfy.samplers.KSAMPLER_NAMES.append("tcd")
        if "tcd" not in comfy.samplers.SAMPLER_NAMES:
            comfy.samplers.SAMPLER_NAMES.append("tcd")
    elif getattr(k_sampling, "sample_tcd", None) is None or not _is_ours(k_sampling.sample_tcd):
        logging.info("HyperSD: a 'tcd' sampler is already registered by another pack; kept it. "
                     "Use the HyperSDTCDSampler node for this pack's seeded TCD.")
    for name, fn in (("hypersd_tcd", _tcd_scheduler), ("hypersd_trailing", _trailing_scheduler)):
        if name not in comfy.samplers.SCHEDULER_HANDLERS:
            comfy.samplers.SCHEDULER_HANDLERS[name] = comfy.samplers.SchedulerHandler(fn, use_ms=True)
        if name not in comfy.samplers.SCHEDULER_NAMES:
            comfy.samplers.SCHEDULER_NAMES.append(name)


def _is_ours(fn) -> bool:
    return getattr(fn, "func", None) is core_samplers.sample_tcd


class HyperSDTCDSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperSDTCDSampler",
            display_name="Hyper-SD TCD Sampler",
            category=CATEGORY,
            description=("Trajectory Consistency Distillation sampler for the Hyper-SD unified LoRA (1-8 steps) and "
                         "other TCD/consistency LoRAs. Noise comes from the graph's seed, so a fixed seed gives the "
                         "same picture. Use with SamplerCustom/SamplerCustomAdvanced and the Hyper-SD Scheduler "
                         "(mode tcd), cfg 1. Works with img2img (denoise < 1) and inpainting masks."),
            inputs=[io.Float.Input("eta", default=DEFAULT_ETA, min=0.0, max=1.0, step=0.01, tooltip=ETA_TOOLTIP)],
            outputs=[io.Sampler.Output(tooltip="The TCD sampler, for SamplerCustom or SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, eta) -> io.NodeOutput:
        return io.NodeOutput(tcd_sampler(eta))


class HyperSDScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperSDScheduler",
            display_name="Hyper-SD Scheduler",
            category=CATEGORY,
            description=("The exact timesteps of the official Hyper-SD recipes as SIGMAS: 'trailing' for the N-step "
                         "LoRAs (2/4/8/12 steps), 'tcd' for the unified 1-step LoRA run at 1-8 steps, 'segments' "
                         "for LoRAs trained with this pack's TSCD node. Same timesteps as diffusers' DDIM "
                         "(trailing) and TCD schedulers."),
            inputs=[
                io.Model.Input("model", tooltip="The model (with its Hyper-SD LoRA); its noise schedule turns "
                                                "timesteps into sigmas."),
                io.Int.Input("steps", default=4, min=1, max=1000,
                             tooltip="Number of steps. Match the LoRA: 2/4/8 for the N-step files, 1-8 for the "
                                     "unified file, the segment count for a TSCD LoRA of this pack."),
                io.Combo.Input("mode", options=list(core_schedules.MODES), default="trailing", tooltip=MODE_TOOLTIP),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="1.0 for text-to-image. Lower for img2img: the share of the schedule that is "
                                       "run, starting from the input latent."),
            ],
            outputs=[io.Sigmas.Output(tooltip="The sigmas of the chosen timesteps, ending with 0.")],
        )

    @classmethod
    def execute(cls, model, steps, mode, denoise) -> io.NodeOutput:
        ms = model.get_model_object("model_sampling")
        return io.NodeOutput(core_schedules.hypersd_sigmas(ms, steps, mode, denoise))


class HyperSDOneStepScheduler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperSDOneStepScheduler",
            display_name="Hyper-SD One-Step Scheduler",
            category=CATEGORY,
            description=("SIGMAS [sigma(t), 0] for one-step generation. The official Hyper-SDXL one-step UNet "
                         "starts at timestep 800, not 999. Use with the TCD sampler (eta 1) or lcm, cfg 1."),
            inputs=[
                io.Model.Input("model", tooltip="The one-step model; its noise schedule turns the timestep into a sigma."),
                io.Int.Input("timestep", default=800, min=1, max=999,
                             tooltip="The timestep the single step starts from. 800 for the official one-step UNet; "
                                     "999 for the 1-step LoRAs."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="1.0 for text-to-image; lower for img2img (starts at timestep x denoise)."),
            ],
            outputs=[io.Sigmas.Output(tooltip="[sigma(timestep x denoise), 0].")],
        )

    @classmethod
    def execute(cls, model, timestep, denoise) -> io.NodeOutput:
        ms = model.get_model_object("model_sampling")
        return io.NodeOutput(core_schedules.one_step_sigmas(ms, timestep, denoise))


NODES = [HyperSDTCDSampler, HyperSDScheduler, HyperSDOneStepScheduler]
