"""Model files and folders the tests and benchmarks run on, built here (nothing is downloaded).

* :func:`cached_file`: a generated file built once per version of the code that makes it;
* :func:`sd15_parts` / :func:`example_parts`: a tiny SD1.5-detected UNet, the generated
  CLIP-L, a tiny TAESD VAE, and tiny LoRAs of the official layouts named as the official
  files, placed in a server's model folders;
* :func:`split_checkpoint`: an example graph's ``CheckpointLoaderSimple`` replaced by those;
* :func:`registered_folder`: a model folder registered with ComfyUI for a while, then removed.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from . import REPO

FILE_CACHE = Path(tempfile.gettempdir()) / "hypersd-test-files"
OFFICIAL_SD15 = ("Hyper-SD15-8steps-lora.safetensors", "Hyper-SD15-1step-lora.safetensors",
                 "Hyper-SD15-8steps-CFG-lora.safetensors")
OFFICIAL_SDXL = ("Hyper-SDXL-4steps-lora.safetensors", "Hyper-SDXL-1step-lora.safetensors",
                 "Hyper-SDXL-12steps-CFG-lora.safetensors")
ONESTEP_UNET = "Hyper-SDXL-1step-Unet.safetensors"


def cached_file(name: str, build: Callable[[Path], object], deps: tuple[str, ...] = ()) -> Path:
    """A generated file, built once and reused while the repository files in ``deps`` are unchanged."""
    FILE_CACHE.mkdir(exist_ok=True)
    h = hashlib.sha256(b"".join((REPO / d).read_bytes() for d in deps)).hexdigest()[:12]
    stem, dot, ext = name.partition(".")
    path = FILE_CACHE / f"{stem}-{h}{dot}{ext}"
    if not path.exists():
        build(path)
    return path


def place(base: Path, folder: str, src: Path, name: str | None = None) -> str:
    """Make ``src`` visible in ``<base>/models/<folder>`` (a symlink); returns its name there."""
    dest = Path(base) / "models" / folder / (name or Path(src).name)
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.symlink_to(src)
    return dest.name


def place_toy(base: Path, loras: tuple[str, ...]) -> dict:
    """The toy family where the toy's example workflows look for it under ``base``: its checkpoint,
    the named LoRAs of ``toy/weights``, the toy reward, and the captioned digits in ``input/``.
    Returns ``toy.install.install``'s answer (the installed files)."""
    from toy import data, install

    from . import example_graphs

    installed = install.install(FILE_CACHE / "toy-models")
    weights = REPO / "toy" / "weights"
    place(base, "checkpoints", installed["checkpoint"])
    for name in loras:
        place(base, "loras", weights / name)
    place(base, "hypersd_rewards", weights / example_graphs.TOY_REWARD)
    data.write_dataset(Path(base) / "input" / example_graphs.TOY_DATASET, 1)
    return installed


@contextlib.contextmanager
def registered_folder(kind: str, path, first: bool = True) -> Iterator[Path]:
    """``path`` registered as a ComfyUI ``kind`` folder (first by default) for the ``with`` block."""
    import folder_paths

    saved = copy.deepcopy(folder_paths.folder_names_and_paths.get(kind))
    folder_paths.add_model_folder_path(kind, str(path), is_default=first)
    try:
        yield Path(path)
    finally:
        if saved is None:
            folder_paths.folder_names_and_paths.pop(kind, None)
        else:
            folder_paths.folder_names_and_paths[kind] = saved


# ----------------------------------------------------------------------------- tiny model files


def _write_tiny_unet(path: Path) -> None:
    import torch

    from ComfyUI_HyperSD.hypersd_core import files
    from toy import arch

    model = arch.build_sd15_model(arch.sd15_unet_config(320), seed=0)
    files.save_safetensors(path, {k: v.to(torch.float16) for k, v in model.diffusion_model.state_dict().items()})


def _write_tiny_taesd(path: Path) -> None:
    import comfy.taesd.taesd

    from ComfyUI_HyperSD.hypersd_core import files
    from toy import arch

    vae = comfy.taesd.taesd.TAESD(latent_channels=4)
    arch.init_weights_(vae, seed=0)
    files.save_safetensors(path, vae.state_dict())


def _write_clip_vision_vitl(path: Path) -> None:
    """CLIP ViT-L/14's vision tower in the layout of ``clip_vision_vit_l.safetensors`` (ComfyUI's
    ``clip_vision_config_vitl.json``: 24 layers, 1024 wide, a 768-d projection), seeded random
    weights in fp16 (about 600 MB)."""
    import json

    import torch

    import comfy.clip_model
    import comfy.ops
    from ComfyUI_HyperSD.hypersd_core import files

    import comfy.clip_vision

    config = json.loads((Path(comfy.clip_vision.__file__).parent / "clip_vision_config_vitl.json").read_text())
    with torch.device("meta"):
        model = comfy.clip_model.CLIPVisionModelProjection(config, torch.float16, "meta", comfy.ops.manual_cast)
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in model.state_dict().items():
        if "layer_norm" in k or "layrnorm" in k:
            t = torch.ones(v.shape) if k.endswith("weight") else torch.zeros(v.shape)
        else:
            t = torch.randn(v.shape, generator=gen) * (0.02 if v.dim() > 1 else 0.01)
        sd[k] = t.to(torch.float16)
    files.save_safetensors(path, sd)


def clip_vision_vitl() -> Path:
    """The generated CLIP ViT-L/14 vision checkpoint (:func:`_write_clip_vision_vitl`), made once."""
    return cached_file("hypersd_test_clip_vision_vit_l.safetensors", _write_clip_vision_vitl, ("hypersd_dev/fixtures.py",))


def sd15_parts(base: Path) -> dict:
    """A tiny SD1.5-detected UNet (UNETLoader) and the generated CLIP-L (CLIPLoader) in a server's folders."""
    from toy import clip

    unet = cached_file("hypersd_test_sd15_unet.safetensors", _write_tiny_unet, ("toy/arch.py",))
    clip_file = cached_file("hypersd_test_clip_l.safetensors", clip.write_clip_l, ("toy/clip.py",))
    return {"unet": place(base, "unet", unet, "hypersd_test_sd15_unet.safetensors"),
            "clip": place(base, "clip", clip_file, "hypersd_test_clip_l.safetensors")}


def example_parts(base: Path) -> dict:
    """:func:`sd15_parts`, a tiny TAESD VAE, and tiny LoRAs of the official layouts named as the
    official files (SD1.5, SDXL, and the diffusers one-step UNet) in a server's folders."""
    from ComfyUI_HyperSD.hypersd_core import files
    from toy import arch

    from . import layouts

    parts = sd15_parts(base)
    vae = cached_file("hypersd_test_taesd.safetensors", _write_tiny_taesd, ("toy/arch.py",))
    parts["vae"] = place(base, "vae", vae, "hypersd_test_taesd.safetensors")
    sd15_layout = layouts.kohya_layout(layouts.build_model("SD1.5", arch.sd15_unet_config(320), device="meta"))
    sdxl_small = layouts.build_model("SDXL", layouts.sdxl_config(small=True), seed=2)
    sdxl_layout = layouts.kohya_layout(sdxl_small)
    loras = Path(base) / "models" / "loras"
    for names, layout in ((OFFICIAL_SD15, sd15_layout), (OFFICIAL_SDXL, sdxl_layout)):
        for official in names:
            if not (loras / official).exists():
                layouts.write_lora(loras / official, layout, rank=4, alpha=4.0, scale=0.002)
    unet = Path(base) / "models" / "diffusion_models" / ONESTEP_UNET
    if not unet.exists():
        files.save_safetensors(unet, layouts.diffusers_unet_state_dict(sdxl_small))
    return parts


def split_checkpoint(api: dict, parts: dict) -> dict:
    """CheckpointLoaderSimple -> UNETLoader + CLIPLoader + VAELoader with the tiny stand-ins (64 px)."""
    api = json.loads(json.dumps(api))  # a deep copy
    for nid, node in list(api.items()):
        if node["class_type"] != "CheckpointLoaderSimple":
            continue
        api[nid] = {"class_type": "UNETLoader", "inputs": {"unet_name": parts["unet"], "weight_dtype": "default"}}
        api[nid + "_clip"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": parts["clip"],
                                                                      "type": "stable_diffusion"}}
        api[nid + "_vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": parts["vae"]}}
        for other in api.values():
            for k, v in other["inputs"].items():
                if isinstance(v, list) and len(v) == 2 and v[0] == nid and v[1] in (1, 2):
                    other["inputs"][k] = [nid + ("_clip" if v[1] == 1 else "_vae"), 0]
    for node in api.values():
        if node["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage"):
            node["inputs"].update(width=64, height=64)
    return api


def tscd_train_graph(parts: dict, name: str, **over) -> dict:
    """A short HyperSDTrainTSCD run (stages 2,1 x 2 steps, batch 2) on the tiny SD1.5 parts, then one
    KSampler step with the trained model saved as a latent; ``over`` changes the trainer's inputs."""
    inputs = {"model": ["1", 0], "latents": ["4", 0], "positive": ["3", 0], "negative": ["5", 0],
              "stages": "2,1", "steps_per_stage": 2, "learning_rate": 1e-4, "rank": 4, "teacher_cfg": 5.0, "seed": 3,
              "output_name": name, "checkpoint_every": 0, "batch_size": 2, "resume": True}
    inputs.update(over)
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": parts["unet"], "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": parts["clip"], "type": "stable_diffusion"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a handwritten digit 7", "clip": ["2", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "6": {"class_type": "HyperSDTrainTSCD", "inputs": inputs},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["6", 0], "seed": 1, "steps": 1, "cfg": 1.0, "sampler_name": "ddim", "scheduler": "sgm_uniform",
            "positive": ["3", 0], "negative": ["5", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": f"tscd_{name}"}},
    }
