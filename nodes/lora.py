"""Hyper-SD loaders: the LoRA loader that knows the file, and the one-step UNet loader.

The file is inspected from its header (``hypersd_core.lora_file``); the LoRA is applied to
a clone of the model with ComfyUI's own key mapping (``comfy.lora.model_lora_keys_unet`` +
``comfy.lora.load_lora``) and ``ModelPatcher.add_patches``, exactly as core
``LoraLoaderModelOnly`` does, so memory management, offloading and unpatching are core's.
The server route ``GET /hypersd/inspect`` serves the same inspection as JSON.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re

import torch
from comfy_api.latest import io

from ..hypersd_core import lora_file
from ..hypersd_core.lora_file import LoraFileError, LoraInfo

log = logging.getLogger("HyperSD")

AUTO_STRENGTH_TOOLTIP = (
    "How strongly the LoRA is applied. -1 (or any negative value) = automatic: the official strength for the "
    "file's family, 1.0 for SD1.5/SDXL and 0.125 for FLUX/SD3. Any value of 0 or more is used as is "
    "(about 0.8 tames burned or over-sharp pictures on SD1.5/SDXL).")


class HyperSDError(RuntimeError):
    """An error meant for the artist: one sentence that says what is wrong and what to do."""


# ----------------------------------------------------------------------------- helpers


def model_family(model) -> str:
    """The family of a ComfyUI ModelPatcher's model, in lora_file's vocabulary."""
    import comfy.supported_models as sm

    cfg = getattr(getattr(model, "model", None), "model_config", None)
    checks = [("Flux2", "FLUX.2"), ("SDXLRefiner", "SDXL-refiner"), ("SDXL", "SDXL"), ("SD15", "SD1.5"),
              ("SD20", "SD2"), ("SD3", "SD3"), ("Flux", "FLUX")]
    for cls_name, fam in checks:
        cls = getattr(sm, cls_name, None)
        if cls is not None and isinstance(cfg, cls):
            return fam
    return type(cfg).__name__ if cfg is not None else "unknown"


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


_KNOWN_MODEL_FAMILIES = lora_file.FAMILIES + ("SD2", "SDXL-refiner", "FLUX.2")


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
    if info.family != "unknown" and fam in _KNOWN_MODEL_FAMILIES and fam != info.family:
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
                                     "N-step files). Set it to run the unified LoRA at 2-8 steps; eta then drops "
                                     "to 0.3."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the LoRA applied (a patched copy)."),
                io.Int.Output(display_name="steps", tooltip="Recommended number of sampling steps for this file."),
                io.Float.Output(display_name="cfg", tooltip="Recommended CFG scale: 1.0 for most Hyper-SD LoRAs, "
                                                            "5.0 for the CFG LoRAs (SD3: 3/5/7)."),
                io.Float.Output(display_name="eta", tooltip="Recommended TCD eta (gamma) for the unified LoRA: "
                                                            "1.0 at one step, 0.3 at more; 0 for DDIM files."),
                io.Sampler.Output(display_name="SAMPLER", tooltip="The matching sampler: TCD for the unified LoRA, "
                                                                  "DDIM for N-step and CFG LoRAs, Euler for FLUX/SD3."),
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


# ----------------------------------------------------------------------------- UNet loading


def diffusers_unet_config(sd: dict) -> dict | None:
    """A ComfyUI ``unet_config`` read off a diffusers-format UNet state dict, for any size.

    Core's ``model_detection.unet_config_from_diffusers_unet`` only knows the released
    sizes; this reads levels, blocks and widths from the keys so smaller models of the same
    layout load too.
    """
    if "conv_in.weight" not in sd:
        return None

    def count(fmt):
        i = 0
        while any(k.startswith(fmt.format(i) + ".") for k in sd):
            i += 1
        return i

    mc = int(sd["conv_in.weight"].shape[0])
    levels = count("down_blocks.{}")
    res = count("down_blocks.0.resnets.{}")
    mult, depth, depth_out = [], [], []
    context_dim, linear = None, False
    for i in range(levels):
        mult.append(int(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) // mc)
        for j in range(res):
            d = count(f"down_blocks.{i}.attentions.{j}.transformer_blocks.{{}}")
            depth.append(d)
            if d:
                context_dim = int(sd[f"down_blocks.{i}.attentions.{j}.transformer_blocks.0.attn2.to_k.weight"].shape[1])
                linear = sd[f"down_blocks.{i}.attentions.{j}.proj_in.weight"].dim() == 2
    for i in range(levels):
        for j in range(res + 1):
            depth_out.append(count(f"up_blocks.{i}.attentions.{j}.transformer_blocks.{{}}"))
    depth_out.reverse()  # diffusers up_blocks start at the deepest level; ComfyUI pops this list from its end
    mid = count("mid_block.attentions.0.transformer_blocks.{}")
    adm = None
    for k in ("add_embedding.linear_1.weight", "class_embedding.linear_1.weight"):
        if k in sd:
            adm = int(sd[k].shape[1])
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": int(sd["conv_out.weight"].shape[0]),
        "use_spatial_transformer": True, "legacy": False, "adm_in_channels": adm,
        "in_channels": int(sd["conv_in.weight"].shape[1]), "model_channels": mc, "num_res_blocks": [res] * levels,
        "transformer_depth": depth, "channel_mult": mult, "transformer_depth_middle": mid if mid else -1,
        "use_linear_in_transformer": linear, "context_dim": context_dim, "transformer_depth_output": depth_out,
        "use_temporal_attention": False, "use_temporal_resblock": False,
        **({"num_classes": "sequential"} if adm else {}),
    }


def _family_config_class(unet_config: dict):
    import comfy.supported_models as sm

    ctx, adm = unet_config.get("context_dim"), unet_config.get("adm_in_channels")
    if ctx == 2048 and adm == 2816:
        return sm.SDXL
    if ctx == 768 and not adm:
        return sm.SD15
    return None


def load_unet_file(path: str, name: str):
    """A ModelPatcher for a UNet-only file: core's loader first, then any-size diffusers/LDM layouts."""
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.sd
    import comfy.utils

    try:
        sd, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    except Exception as e:
        raise HyperSDError(f"Hyper-SD: could not read '{name}' ({str(e).splitlines()[0][:200]}). "
                           "Download it again.") from e
    model = comfy.sd.load_diffusion_model_state_dict(dict(sd), metadata=metadata)
    if model is not None:
        return model
    if "conv_in.weight" in sd:  # diffusers UNet of a size core's table does not list
        unet_config = diffusers_unet_config(sd)
        mapping = comfy.utils.unet_to_diffusers(unet_config)
        new_sd = {v: sd[k] for k, v in mapping.items() if k in sd}
    else:
        prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
        new_sd = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True) or sd
        unet_config = comfy.model_detection.detect_unet_config(new_sd, "")
    cls = _family_config_class(unet_config or {})
    if cls is None:
        raise HyperSDError(f"Hyper-SD: '{name}' is not a UNet this loader knows (SD1.5 or SDXL layout).")
    model_config = cls(unet_config)
    load_device = mm.get_torch_device()
    dtype = mm.unet_dtype(model_params=comfy.utils.calculate_parameters(new_sd),
                          supported_dtypes=list(model_config.supported_inference_dtypes),
                          weight_dtype=comfy.utils.weight_dtype(new_sd))
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, model_config.supported_inference_dtypes))
    model = model_config.get_model(new_sd, "")
    model = model.to(mm.unet_offload_device())
    model.load_model_weights(new_sd, "")
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


# ----------------------------------------------------------------------------- server

_SAFE_NAME = re.compile(r"^[^\x00]+$")
_FOLDERS = {"lora": "loras", "unet": "diffusion_models", "checkpoint": "checkpoints"}


def inspect_request(query: dict) -> tuple[int, dict]:
    """(HTTP status, JSON body) for GET /hypersd/inspect?lora=NAME (or unet=, checkpoint=)."""
    import folder_paths

    given = [(k, query[k]) for k in _FOLDERS if query.get(k)]
    if len(given) != 1:
        return 400, {"error": "give exactly one of ?lora=NAME, ?unet=NAME or ?checkpoint=NAME"}
    kind, name = given[0]
    folder = _FOLDERS[kind]
    norm = name.replace("\\", "/")
    if (not _SAFE_NAME.match(name) or os.path.isabs(name) or norm.startswith("/") or re.match(r"^[A-Za-z]:", name)
            or any(part in ("..", ".") for part in norm.split("/"))):
        return 400, {"error": f"refused: '{name}' is not a plain file name from the {folder} list"}
    if name not in folder_paths.get_filename_list(folder):
        return 404, {"error": f"'{name}' is not in the {folder} list", "folder": folder}
    try:
        path, info = inspect_lora_name(name, folder)
    except HyperSDError as e:
        return 422, {"error": str(e), "name": name, "folder": folder}
    body = info.to_json()
    body["summary"] = info.summary()
    body["folder"] = folder
    body["use_node"] = _advice(info, kind)
    return 200, body


def _advice(info: LoraInfo, asked_as: str) -> str:
    if info.kind == "lora":
        return "HyperSDLoraLoader"
    if info.kind == "unet":
        return "HyperSDUNetLoader"
    if info.kind == "checkpoint":
        return "CheckpointLoaderSimple"
    return ""


def _on_prompt(json_data):
    """Warn, before anything runs, when 'Load Checkpoint' is given a UNet-only file (e.g. the
    diffusers one-step UNet): core then fails later with a KeyError or 'clip input is invalid'."""
    try:
        import folder_paths

        prompt = json_data.get("prompt") or {}
        for node_id, node in prompt.items():
            if not isinstance(node, dict) or node.get("class_type") not in ("CheckpointLoaderSimple", "CheckpointLoader"):
                continue
            name = (node.get("inputs") or {}).get("ckpt_name")
            if not isinstance(name, str):
                continue
            path = folder_paths.get_full_path("checkpoints", name)
            if not path or not path.lower().endswith(lora_file.SAFETENSORS_EXTENSIONS):
                continue
            try:
                info = lora_file.inspect_cached(path, name)
            except (LoraFileError, OSError):
                continue
            if info.kind == "unet" and info.key_format == "diffusers":
                msg = (f"Hyper-SD: '{name}' is a diffusers-format UNet (no text encoder, no VAE), which 'Load Checkpoint' "
                       "cannot load. Move it to models/diffusion_models and load it with 'Hyper-SD UNet Loader (one-step)' "
                       "(or 'Load Diffusion Model'); take CLIP and VAE from your SDXL base checkpoint.")
                log.warning(msg)
                _notify({"node": node_id, "message": msg, "use_node": "HyperSDUNetLoader"})
            elif info.kind == "lora":
                msg = f"Hyper-SD: '{name}' is a LoRA, not a checkpoint. Move it to models/loras and use 'Hyper-SD LoRA Loader'."
                log.warning(msg)
                _notify({"node": node_id, "message": msg, "use_node": "HyperSDLoraLoader"})
    except Exception:  # never stand in the way of a prompt
        log.debug("Hyper-SD: prompt check failed", exc_info=True)
    return json_data


def _notify(data: dict) -> None:
    try:
        from server import PromptServer

        PromptServer.instance.send_sync("hypersd.advice", data)
    except Exception:
        pass


def register() -> None:
    try:
        from aiohttp import web
        from server import PromptServer

        inst = PromptServer.instance
    except Exception:  # no server in this process (tests, scripts)
        return
    if inst is None:
        return

    @inst.routes.get("/hypersd/inspect")
    async def hypersd_inspect(request):
        status, body = await asyncio.to_thread(inspect_request, dict(request.rel_url.query))
        return web.json_response(body, status=status)

    inst.add_on_prompt_handler(_on_prompt)


NODES = [HyperSDLoraLoader, HyperSDUNetLoader]
