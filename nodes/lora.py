"""Hyper-SD loaders: the LoRA loader that knows the file, and the one-step UNet loader.

The file is inspected from its header (``hypersd_core.lora_file``); the LoRA is applied to
a clone of the model with ComfyUI's own key mapping (``comfy.lora.model_lora_keys_unet`` +
``comfy.lora.load_lora``) and ``ModelPatcher.add_patches``, exactly as core
``LoraLoaderModelOnly`` does, so memory management, offloading and unpatching are core's.
UNet-only files of any size load through ``_unet_file``; ``routes`` serves the same
inspection as JSON (``GET /hypersd/inspect``).
"""
from __future__ import annotations

import logging
import os

import torch
from comfy_api.latest import io

from ..hypersd_core import lora_file
from ..hypersd_core.lora_file import LoraFileError, LoraInfo
from ..hypersd_core.metadata import MODEL_FAMILIES
from ._comfy_model import model_family
from ._errors import HyperSDError
from ._unet_file import load_unet_file

log = logging.getLogger("HyperSD")

AUTO_STRENGTH_TOOLTIP = (
    "How strongly the LoRA is applied. -1 (or any negative value) = automatic: the official strength for the "
    "file's family, 1.0 for SD1.5/SDXL and 0.125 for FLUX/SD3. Any value of 0 or more is used as is "
    "(about 0.8 tames burned or over-sharp pictures on SD1.5/SDXL).")


# ----------------------------------------------------------------------------- helpers


def _lora_modules(sd: dict) -> dict[str, list[str]]:
    """LoRA layer name -> its tensor keys (diffusion-model layers only; text-encoder ones dropped)."""
    mods: dict[str, list[str]] = {}
    for k in sd:
        mod, _part, _fmt = lora_file._split(k)
        if mod is None:
            for suf in (".diff", ".diff_b", ".set_weight", ".w_norm", ".b_norm", ".dora_scale"):
                if k.endswith(suf):
                    mod = k[: -len(suf)]
                    break
        if mod is None or mod.startswith(lora_file._TE_PREFIXES):
            continue
        mods.setdefault(mod, []).append(k)
    return mods


_sd_cache: dict = {}


def _load_state_dict(path: str) -> dict:
    """The LoRA tensors (ComfyUI's safe loader), kept for the last file like core's LoraLoader."""
    import comfy.utils

    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key in _sd_cache:
        return _sd_cache[key]
    try:
        sd = comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as e:  # safetensors/pickle errors: say what to do, keep the server serving
        raise HyperSDError(f"Hyper-SD: could not read '{os.path.basename(path)}' ({str(e).splitlines()[0][:200]}). "
                           "The file is damaged or not a LoRA; download it again.") from e
    _sd_cache.clear()
    _sd_cache[key] = sd
    return sd


def inspect_lora_name(lora_name: str, folder: str = "loras") -> tuple[str, LoraInfo]:
    """(full path, inspection) for a name from a ComfyUI model folder; HyperSDError if unusable."""
    import folder_paths

    path = folder_paths.get_full_path(folder, lora_name) if lora_name else None
    if path is None:
        raise HyperSDError(f"Hyper-SD: '{lora_name}' is not in the {folder} folder (models/{folder}). "
                           "Put the file there and refresh the page.")
    try:
        return path, lora_file.inspect_cached(path, lora_name)
    except LoraFileError as e:
        raise HyperSDError(f"Hyper-SD: {e}") from None
    except OSError as e:
        raise HyperSDError(f"Hyper-SD: cannot read '{lora_name}': {e.strerror or e}") from None


def apply_lora(model, path: str, info: LoraInfo, strength: float):
    """Clone ``model`` and add the LoRA file's patches; see ``apply_lora_sd``."""
    return apply_lora_sd(model, _load_state_dict(path), info, strength)


def apply_lora_sd(model, sd: dict, info: LoraInfo, strength: float):
    """Clone ``model`` and add the LoRA's patches through ComfyUI's own key mapping.

    Returns (patched clone, matched layers, total layers). Raises HyperSDError when the
    LoRA does not fit the model (wrong family or no layer matched); warns once on a
    partial match. ComfyUI's per-key "lora key not loaded" lines are not emitted.
    """
    import comfy.lora
    import comfy.lora_convert

    fam = model_family(model)
    sd = comfy.lora_convert.convert_lora(sd)
    matched, total, key_map = _count_matches(model, sd)
    if info.family != "unknown" and fam in MODEL_FAMILIES and fam != info.family:
        raise HyperSDError(
            f"Hyper-SD: '{info.file_name}' is a {info.family} LoRA but the model is {fam}: "
            f"{matched} of {total} LoRA layers match this model. "
            f"Load a {info.family} checkpoint, or pick the Hyper-SD LoRA made for {fam}.")
    if total == 0:
        raise HyperSDError(f"Hyper-SD: '{info.file_name}' holds no LoRA layers for a diffusion model.")
    if matched == 0:
        raise HyperSDError(
            f"Hyper-SD: '{info.file_name}' ({info.family} LoRA) does not fit this {fam} model: "
            f"0 of {total} LoRA layers match. Use a LoRA made for {fam}.")
    patches = comfy.lora.load_lora(sd, key_map, log_missing=False)
    m = model.clone()
    applied = m.add_patches(patches, strength)
    if matched < total or len(applied) < len(patches):
        log.warning("Hyper-SD: '%s' fits this %s model only partly: %d of %d LoRA layers matched, "
                    "%d of %d patches applied; the rest is ignored.",
                    info.file_name, fam, matched, total, len(applied), len(patches))
    return m, matched, total


def _count_matches(model, sd: dict):
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    mods = _lora_modules(sd)
    matched = sum(1 for mod in mods if mod in key_map)
    return matched, len(mods), key_map


def make_sampler(name: str, eta: float):
    import comfy.samplers

    if name == "tcd":
        from .sampling import tcd_sampler

        return tcd_sampler(float(eta))
    return comfy.samplers.sampler_object(name)


def make_sigmas(model, schedule: str, steps: int, timestep: int = 800) -> torch.Tensor:
    import comfy.samplers

    ms = model.get_model_object("model_sampling")
    if schedule == "one_step":
        from ..hypersd_core import schedules

        return schedules.one_step_sigmas(ms, timestep=timestep).cpu()
    if schedule in ("trailing", "tcd", "segments"):
        from ..hypersd_core import schedules

        return schedules.hypersd_sigmas(ms, steps, schedule).cpu()
    return comfy.samplers.calculate_sigmas(ms, schedule, steps).cpu()


def _strength_value(strength: float, info: LoraInfo) -> tuple[float, str]:
    if strength < 0:
        return info.strength, "automatic"
    note = "manual"
    if info.family in ("SD1.5", "SDXL") and abs(strength - 0.125) < 1e-6:
        log.warning("Hyper-SD: strength 0.125 is the FLUX/SD3 value; %s LoRAs are meant for 1.0 (set -1 for automatic).",
                    info.family)
        note = "manual; 0.125 is the FLUX/SD3 value"
    elif info.family in ("FLUX", "SD3") and strength > 0.5:
        log.warning("Hyper-SD: strength %.3g is high for a %s Hyper-SD LoRA; the official value is 0.125 "
                    "(set -1 for automatic).", strength, info.family)
        note = f"manual; {info.family} wants 0.125"
    return float(strength), note


# ----------------------------------------------------------------------------- nodes


class HyperSDLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths

        return io.Schema(
            node_id="HyperSDLoraLoader",
            display_name="Hyper-SD LoRA Loader",
            category="Hyper-SD/loaders",
            description=(
                "Loads a Hyper-SD LoRA (SD1.5, SDXL, SD3, FLUX; unified 1-step, 2/4/8-step, CFG, or trained with this "
                "pack), recognises which one it is from the file itself, applies it to a copy of the model the way "
                "core LoRA loaders do, and outputs the settings it needs: steps, cfg, eta, a ready SAMPLER and SIGMAS. "
                "Wire MODEL, SAMPLER and SIGMAS into SamplerCustom (set its cfg to the cfg output) and the picture "
                "comes out right with no guessing. A LoRA made for another model family is refused with one clear "
                "message."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to apply the Hyper-SD LoRA to. It is not changed; "
                                                "a patched copy is output."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A Hyper-SD LoRA from your models/loras folder, e.g. "
                                       "Hyper-SDXL-4steps-lora.safetensors. Which variant it is (unified, N-step, CFG) "
                                       "is read from the file."),
                io.Float.Input("strength", default=-1.0, min=-1.0, max=4.0, step=0.005,
                               tooltip=AUTO_STRENGTH_TOOLTIP),
                io.Int.Input("steps", default=0, min=0, max=100, optional=True,
                             tooltip="0 = the file's own number of steps (1 for the unified LoRA, 2/4/8/12/16 for "
                                     "N-step files). Set it to run the unified LoRA at 2-8 steps; eta then "
                                     "follows the file's recommendation for that many steps (0.3 for the "
                                     "official files)."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the LoRA applied (a patched copy)."),
                io.Int.Output(display_name="steps", tooltip="Recommended number of sampling steps for this file."),
                io.Float.Output(display_name="cfg", tooltip="Recommended CFG scale: 1.0 for most Hyper-SD LoRAs, "
                                                            "5.0 for the CFG LoRAs (SD3: 3/5/7)."),
                io.Float.Output(display_name="eta", tooltip="Recommended TCD eta (gamma) for the unified LoRA: "
                                                            "1.0 at one step, 0.3 at more (or the file's own eta per step "
                                                            "count); 0.3 for k-step LoRAs trained with this pack; 0 for DDIM files."),
                io.Sampler.Output(display_name="SAMPLER", tooltip="The matching sampler: TCD for the unified LoRA "
                                                                  "and for k-step LoRAs trained with this pack, DDIM for "
                                                                  "the official N-step and CFG LoRAs, Euler for FLUX/SD3."),
                io.Sigmas.Output(display_name="SIGMAS", tooltip="The matching schedule for the recommended steps "
                                                                "(DDIM trailing, TCD grid, or ComfyUI 'simple' for "
                                                                "FLUX/SD3)."),
                io.String.Output(display_name="summary", tooltip="One line: what the file is and the settings used."),
            ],
        )

    @classmethod
    def execute(cls, model, lora_name, strength, steps=0) -> io.NodeOutput:
        path, info = inspect_lora_name(lora_name)
        if info.kind in ("unet", "checkpoint"):
            where = ("models/diffusion_models and load it with 'Hyper-SD UNet Loader' (HyperSDUNetLoader) or "
                     "'Load Diffusion Model'") if info.kind == "unet" else "models/checkpoints and load it with 'Load Checkpoint'"
            raise HyperSDError(f"Hyper-SD: '{lora_name}' is a whole {info.family} {info.kind}, not a LoRA. "
                               f"Move it to {where}.")
        if info.kind != "lora":
            raise HyperSDError(f"Hyper-SD: '{lora_name}' holds no LoRA layers ({info.tensors} tensors of unknown "
                               "kind). Is it a LoRA?")
        if steps and steps != info.steps:
            info = lora_file.with_steps(info, steps)
        value, how = _strength_value(float(strength), info)
        for w in info.warnings:
            log.warning("Hyper-SD: %s: %s", lora_name, w)
        if value == 0:
            m, matched, total = model, 0, info.modules
        else:
            m, matched, total = apply_lora(model, path, info, value)
        sampler = make_sampler(info.sampler, info.eta)
        sigmas = make_sigmas(m, info.schedule, info.steps)
        summary = f"{info.summary()}; strength {value:g} ({how}); {matched}/{total} layers applied"
        log.info("Hyper-SD: %s", summary)
        return io.NodeOutput(m, int(info.steps), float(info.cfg), float(info.eta), sampler, sigmas, summary)


class HyperSDUNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        import folder_paths

        return io.Schema(
            node_id="HyperSDUNetLoader",
            display_name="Hyper-SD UNet Loader (one-step)",
            category="Hyper-SD/loaders",
            description=(
                "Loads the Hyper-SDXL one-step UNet (Hyper-SDXL-1step-Unet.safetensors, diffusers format; the file "
                "'Load Checkpoint' cannot read) or any UNet-only file from models/diffusion_models, and outputs the "
                "one-step settings: 1 step from timestep 800 with the LCM sampler, cfg 1. Take CLIP and VAE from your "
                "SDXL base checkpoint. The ComfyUI one-step checkpoint (...-Comfyui.fp16.safetensors) loads with "
                "'Load Checkpoint' and 'Hyper-SD One-Step Scheduler' instead."),
            inputs=[
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="The UNet file in models/diffusion_models (or models/unet), e.g. "
                                       "Hyper-SDXL-1step-Unet.safetensors."),
                io.Int.Input("timestep", default=800, min=1, max=999,
                             tooltip="The timestep the single step starts from. The official one-step UNet was "
                                     "trained for 800; 999 gives flatter pictures."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The loaded diffusion model."),
                io.Int.Output(display_name="steps", tooltip="Recommended steps (1)."),
                io.Float.Output(display_name="cfg", tooltip="Recommended CFG scale (1.0)."),
                io.Sampler.Output(display_name="SAMPLER", tooltip="The LCM sampler (one step: the model's x0 "
                                                                  "prediction)."),
                io.Sigmas.Output(display_name="SIGMAS", tooltip="[sigma(timestep), 0]: the one-step schedule."),
                io.String.Output(display_name="summary", tooltip="One line: what the file is and the settings used."),
            ],
        )

    @classmethod
    def execute(cls, unet_name, timestep=800) -> io.NodeOutput:
        path, info = inspect_lora_name(unet_name, "diffusion_models")
        if info.kind == "lora":
            raise HyperSDError(f"Hyper-SD: '{unet_name}' is a LoRA, not a UNet. Move it to models/loras and use "
                               "'Hyper-SD LoRA Loader'.")
        m = load_unet_file(path, unet_name)
        sigmas = make_sigmas(m, "one_step", 1, timestep=int(timestep))
        fam = model_family(m)
        summary = (f"{unet_name}: {fam} {info.key_format} UNet; 1 step from timestep {int(timestep)}, lcm, cfg 1")
        log.info("Hyper-SD: %s", summary)
        return io.NodeOutput(m, 1, 1.0, make_sampler("lcm", 1.0), sigmas, summary)


NODES = [HyperSDLoraLoader, HyperSDUNetLoader]
