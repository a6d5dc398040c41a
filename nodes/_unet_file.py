"""Loading UNet-only files: the diffusers-format Hyper-SDXL one-step UNet, and smaller UNets of
the SD1.5/SDXL layouts that core's size table does not list."""
from __future__ import annotations

from ._errors import HyperSDError


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


