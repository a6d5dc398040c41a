"""Workflows as other Hyper-SD/TCD packs save them, for the conversion tests.

``DEFS`` describes those packs' nodes the way ``/object_info`` would if they were installed,
written from their published node definitions (inputs, defaults and outputs as the table in
the reference notes gives them); with it, :func:`hypersd_dev.workflows.api_to_ui` lays out
a graph that uses them as the editor of such a user saves it.
"""
from __future__ import annotations

from . import workflows


def _def(inputs: dict, order: list[str], outputs: list[str], display: str | None = None) -> dict:
    return {"input": {"required": inputs}, "input_order": {"required": order}, "output": outputs,
            "output_name": outputs, "display_name": display}


DEFS = {
    "TCDModelSamplingDiscrete": _def(  # JettHu/ComfyUI-TCD
        {"model": ["MODEL"], "steps": ["INT", {"default": 4, "min": 1, "max": 50}],
         "scheduler": [["simple", "sgm_uniform"]], "denoise": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0}],
         "eta": ["FLOAT", {"default": 0.3, "min": 0.0, "max": 1.0}]},
        ["model", "steps", "scheduler", "denoise", "eta"], ["MODEL", "SAMPLER", "SIGMAS"], "TCD Model Sampling Discrete"),
    "TCDScheduler": _def(  # dfl/comfyui-tcd-scheduler
        {"model": ["MODEL"], "steps": ["INT", {"default": 8, "min": 1, "max": 10000}]}, ["model", "steps"], ["SIGMAS"]),
    "SamplerTCD": _def({"gamma": ["FLOAT", {"default": 0.3, "min": 0, "max": 1.0}]}, ["gamma"], ["SAMPLER"]),
    "SamplerTCD EulerA": _def({"gamma": ["FLOAT", {"default": 0.3, "min": 0, "max": 1.0}]}, ["gamma"], ["SAMPLER"]),
    "HyperSDXL1StepUnetScheduler": _def(  # the Hyper-SD release's ComfyUI node
        {"model": ["MODEL"], "steps": ["INT", {"default": 1, "min": 1, "max": 10}]}, ["model", "steps"], ["SIGMAS"]),
}


def sampled(ckpt: str, model, sampler, sigmas, prefix: str, nodes: dict, seed: int = 7) -> dict:
    """An API graph: ``ckpt`` loaded, the prompt "a handwritten digit 3", SamplerCustom with the
    given model/sampler/sigmas sources (``[id, slot]``), decoded and saved under ``prefix``."""
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a handwritten digit 3", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}},
        "7": {"class_type": "SamplerCustom", "inputs": {
            "model": model, "add_noise": True, "noise_seed": seed, "cfg": 1.5, "positive": ["2", 0],
            "negative": ["3", 0], "sampler": sampler, "sigmas": sigmas, "latent_image": ["4", 0]}},
    }
    g.update(nodes)
    return g


def jetthu_graph(ckpt: str, steps: int = 4, eta: float = 0.3, denoise: float = 1.0) -> dict:
    """ComfyUI-TCD's one node giving SamplerCustom its model, sampler and sigmas."""
    return sampled(ckpt, ["5", 0], ["5", 1], ["5", 2], "jetthu", {"5": {
        "class_type": "TCDModelSamplingDiscrete",
        "inputs": {"model": ["1", 0], "steps": steps, "scheduler": "simple", "denoise": denoise, "eta": eta}}})


def dfl_graph(ckpt: str, steps: int = 4, gamma: float = 0.5, euler_a: bool = False) -> dict:
    """comfyui-tcd-scheduler's scheduler and sampler nodes."""
    return sampled(ckpt, ["1", 0], ["6", 0], ["5", 0], "dfl", {
        "5": {"class_type": "TCDScheduler", "inputs": {"model": ["1", 0], "steps": steps}},
        "6": {"class_type": "SamplerTCD EulerA" if euler_a else "SamplerTCD", "inputs": {"gamma": gamma}}})


def one_step_graph(ckpt: str, gamma: float = 1.0) -> dict:
    """The Hyper-SD release's one-step scheduler with a TCD sampler (the one-step UNet's recipe)."""
    return sampled(ckpt, ["1", 0], ["6", 0], ["5", 0], "onestep", {
        "5": {"class_type": "HyperSDXL1StepUnetScheduler", "inputs": {"model": ["1", 0], "steps": 1}},
        "6": {"class_type": "SamplerTCD EulerA", "inputs": {"gamma": gamma}}})


def as_saved(api: dict, object_info: dict) -> dict:
    """``api`` laid out as the editor saves it, with the other packs' nodes defined."""
    return workflows.api_to_ui(api, {**object_info, **DEFS})
