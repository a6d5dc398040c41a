"""Human feedback learning nodes: reward models, and a feedback LoRA trained on a few-step LoRA.

The method is the core's (``hypersd_core.feedback``, ``rewards``, ``lora_merge``, the
pipeline's ``feedback`` method: checkpoints, resume, Cancel, NaN and out-of-memory handling
as for TSCD). These nodes adapt ComfyUI to it:

* ``HyperSDRewardLoader`` reads a reward file from ``models/hypersd_rewards`` (a folder this
  pack registers; files only, never a download) with its hinge margin and weight; chain
  loaders to combine rewards;
* ``HyperSDTrainFeedback`` applies the chosen few-step LoRA to the model (frozen: it is part
  of the base the feedback adapter trains on), makes the VAE's decoder differentiable (its
  weights out of inference mode), maps each training prompt to its class for rewards that
  need one (the caption names it), trains inside ComfyUI's guider as the TSCD node does,
  and saves ``<output_name>.safetensors`` (the frozen LoRA and the feedback merged exactly
  at ``merge_ratio``, with the frozen LoRA's recipe) and ``<output_name>_feedback`` (the
  feedback alone).
"""
from __future__ import annotations

import hashlib
import logging
import os

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io

from ..hypersd_core import data as core_data
from ..hypersd_core import feedback as core_feedback
from ..hypersd_core import lora_file, lora_merge, lora_train, rewards
from ..hypersd_core import metadata as vocab
from ..hypersd_core.lora_train import LORA_SCOPES
from ..hypersd_core.pipeline import FeedbackParts, RunFiles, TrainingRun, TrainSettings
from . import _comfy_model, _comfy_training
from ._training_progress import ComfyProgress

log = logging.getLogger("HyperSD")

REWARDS_FOLDER = "hypersd_rewards"
Reward = io.Custom("HYPERSD_REWARD")


def rewards_folder() -> str:
    """Register ``models/hypersd_rewards`` (idempotent; paths from extra_model_paths.yaml stay)."""
    default = os.path.join(folder_paths.models_dir, REWARDS_FOLDER)
    if REWARDS_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[REWARDS_FOLDER] = ([default], {".safetensors"})
    else:
        folder_paths.add_model_folder_path(REWARDS_FOLDER, default)
    return REWARDS_FOLDER


def register() -> None:
    rewards_folder()


# ---------------------------------------------------------------------- plain functions


def _reward_path(reward_name: str) -> str:
    parts = str(reward_name or "").replace("\\", "/").split("/")
    if not reward_name or os.path.isabs(str(reward_name)) or ".." in parts:
        raise ValueError(f"pick a reward file from the {REWARDS_FOLDER} folder (got {reward_name!r})")
    path = folder_paths.get_full_path(rewards_folder(), reward_name)
    if path is None:
        raise ValueError(f"reward '{reward_name}' is not in models/{REWARDS_FOLDER}: put the file there and refresh")
    return path


def load_reward(reward_name: str, margin: float, weight: float, device=None,
                clip_vision=None) -> core_feedback.RewardTerm:
    """The reward file ``reward_name`` of the rewards folder as a hinge term (``clip_vision``:
    the CLIP vision model a preference reward trained on CLIP features reads)."""
    clip = ClipFeatures(clip_vision) if clip_vision is not None else None
    reward = rewards.load_reward(_reward_path(reward_name), device=device, clip_features=clip)
    return core_feedback.RewardTerm(reward, margin=float(margin), weight=float(weight))


class ClipImageEmbed(torch.nn.Module):
    """``pixels -> projected image embedding`` of ComfyUI's CLIP vision model, with gradient.

    ComfyUI's ``encode_image`` rounds pixels to 8 bits first, which has no gradient, and its
    encoder layers add their residuals in place (``x += ...``), which autograd refuses once a
    layer norm has saved ``x``. So the same modules are called here in the same order (patch
    and position embeddings, pre-norm, each layer's attention and MLP with its residual, the
    class token's post-norm, the projection) with out-of-place residuals: the same numbers,
    and a graph that backpropagates."""

    def __init__(self, clip_vision):
        super().__init__()
        self.model = clip_vision.model
        lora_train.make_autograd_safe(self.model)  # loaded under inference mode; same values
        for p in self.model.parameters():
            p.requires_grad_(False)
        proj = getattr(self.model, "visual_projection", None)
        clip_layout = getattr(getattr(self.model, "vision_model", None), "output_layernorm", True) is False
        self.dim = int(proj.weight.shape[0]) if isinstance(proj, torch.nn.Module) and clip_layout else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        from comfy.ldm.modules.attention import optimized_attention_for_device

        vision = self.model.vision_model
        # where ComfyUI last put the model (a feedback run's reward hook brings it to the images)
        pixels = pixels.to(self.model.visual_projection.weight.device)
        x = vision.pre_layrnorm(vision.embeddings(pixels))
        attention = optimized_attention_for_device(x.device, mask=False, small_input=True)
        for layer in vision.encoder.layers:
            x = x + layer.self_attn(layer.layer_norm1(x), None, attention)
            x = x + layer.mlp(layer.layer_norm2(x))
        return self.model.visual_projection(vision.post_layernorm(x[:, 0, :]))


class ClipFeatures(torch.nn.Module):
    """``images [B, 3, H, W] in [0, 1] -> L2-normalised CLIP image embedding``, with gradient
    (a preference reward's frozen features): :func:`rewards.clip_pixels` with the vision
    model's own size and normalisation, then :class:`ClipImageEmbed`."""

    def __init__(self, clip_vision):
        super().__init__()
        import comfy.model_management

        # on the device ComfyUI runs it on (the GPU where there is one), as its encode_image does
        comfy.model_management.load_model_gpu(clip_vision.patcher)
        with torch.inference_mode(False):
            self.embed = ClipImageEmbed(clip_vision)
            lora_train.keep_on(self.embed.model, clip_vision.load_device)
        if self.embed.dim is None:
            raise ValueError("this vision model is not a CLIP one with an image projection: connect CLIP ViT-L/14 "
                             "(or another CLIP vision model) from CLIPVisionLoader")
        self.dim = self.embed.dim
        self.size, self.mean, self.std = clip_vision.image_size, clip_vision.image_mean, clip_vision.image_std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        e = self.embed(rewards.clip_pixels(images, self.size, self.mean, self.std)).float()
        return e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def aesthetic_reward(clip_vision, head_name: str, margin: float, weight: float) -> core_feedback.RewardTerm:
    """The LAION aesthetic predictor head ``head_name`` (rewards folder) on ``clip_vision``."""
    if clip_vision is None:
        raise ValueError("connect a CLIP vision model (CLIPVisionLoader with CLIP ViT-L/14, e.g. "
                         "clip_vision_vit_l.safetensors in models/clip_vision): the aesthetic head scores its embedding")
    with torch.inference_mode(False):
        head = rewards.read_head_file(_reward_path(head_name))
        embed = ClipImageEmbed(clip_vision)
        if embed.dim is None:
            raise ValueError("this vision model is not a CLIP one with an image projection (SigLIP, DINO and LLaVA "
                             "towers are not): the LAION aesthetic heads need CLIP ViT-L/14's 768-d projected "
                             "embedding")
        reward = rewards.AestheticReward(embed, head, embed.dim, size=clip_vision.image_size,
                                         mean=clip_vision.image_mean, std=clip_vision.image_std,
                                         name=os.path.splitext(os.path.basename(head_name))[0])
    return core_feedback.RewardTerm(reward, margin=float(margin), weight=float(weight))


def base_lora(lora_name: str, family: str) -> tuple[dict, dict, str, vocab.Recipe]:
    """The frozen LoRA: ``(kohya weights, the metadata its merged file carries, "name@digest", its recipe)``."""
    path = folder_paths.get_full_path("loras", lora_name) if lora_name else None
    if path is None:
        raise ValueError(f"LoRA '{lora_name}' is not in the loras folder; pick the few-step LoRA to train on")
    try:
        info = lora_file.inspect_file(path, lora_name)
    except lora_file.LoraFileError as e:
        raise ValueError(f"cannot train feedback on '{lora_name}': {e}") from None
    if info.kind != "lora":
        raise ValueError(f"'{lora_name}' is a {info.kind}, not a LoRA: feedback trains on a few-step LoRA "
                         f"(a Hyper-SD N-step or unified LoRA, or one this pack trained)")
    if info.family not in ("unknown", family) and not (info.family == "SD1.5" and family == "SD2"):
        raise ValueError(f"'{lora_name}' is a {info.family} LoRA but the model is {family}: pick a LoRA of the "
                         f"model's family")
    sd = comfy.utils.load_torch_file(path, safe_load=True)
    sd = {k: v for k, v in sd.items() if not k.startswith(("lora_te", "text_encoder", "lora_te1", "lora_te2"))}
    try:
        lora_merge.layers(sd, lora_name)  # only kohya-layout files can be merged exactly: refuse before training
    except ValueError as e:
        raise ValueError(f"cannot merge feedback into '{lora_name}': {e}") from None
    meta = dict(lora_file.read_safetensors_header(path)[1] or {}) if path.endswith(".safetensors") else {}
    recipe = info.recipe
    meta.update(recipe.to_metadata())
    meta[vocab.FAMILY] = info.family if info.family != "unknown" else family
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return sd, meta, f"{lora_name}@{h.hexdigest()[:16]}", recipe


def vae_decoder(vae, model, device, checkpointing: bool = False):
    """``decode(latents in the model's space) -> images [B, 3, H, W] in [0, 1]``, with gradient
    (``checkpointing``: the decoder's activations are recomputed in the backward pass)."""
    first = vae.first_stage_model
    lora_train.keep_on(first, device)

    def decode(x0: torch.Tensor) -> torch.Tensor:
        # ComfyUI's model management moves the VAE back to the CPU when it loads the diffusion
        # model for training (it frees everything else): bring it back (found on an H200)
        lora_train.keep_on(first, device)
        z = model.process_latent_out(x0)
        dtype = getattr(vae, "vae_dtype", torch.float32)
        if checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            images = checkpoint(first.decode, z.to(dtype), use_reentrant=False).float()
        else:
            images = first.decode(z.to(dtype)).float()
        return torch.clamp((images + 1.0) / 2.0, 0.0, 1.0)

    return decode


def prompt_labels(terms, captions, prompts: list, positives: list | None = None) -> list[int] | None:
    """Each prompt's class for rewards that need one, read from the captions: one caption per
    latent (beside ``positives``, one conditioning per latent, as *Make Training Dataset* gives
    them), or one per prompt. Latents that share a prompt must name the same class."""
    needing = [t.reward for t in terms if getattr(t.reward, "needs_labels", False)]
    if not needing:
        return None
    reward = needing[0]
    caps = [c for c in (captions or []) if c is not None]
    classes = ", ".join(reward.class_names)
    if not caps:
        raise ValueError(f"the reward '{reward.name}' scores each picture against its class: connect 'captions' "
                         f"(the texts of the training images, e.g. from 'Load Image and Text Dataset from Folder'), "
                         f"each naming its class (one of {classes})")

    def label(text):
        found = {r.label_of(text) for r in needing}
        if len(found) != 1:
            raise ValueError(f"the rewards read different classes from the caption {text!r}")
        return found.pop()

    if positives is not None and len(caps) == len(positives) and len(prompts) > 1:
        by_prompt: dict[str, set] = {}
        for cond, text in zip(positives, caps):
            by_prompt.setdefault(core_data.digest(cond).hexdigest(), set()).add(label(text))
        out = []
        for i, cond in enumerate(prompts):
            found = by_prompt.get(core_data.digest(cond).hexdigest(), set())
            if len(found) != 1:
                raise ValueError(f"the images of prompt {i + 1} have captions of {len(found)} classes; each prompt "
                                 f"needs captions of one class")
            out.append(found.pop())
        return out
    if len(caps) == len(prompts):
        return [label(c) for c in caps]
    if len(prompts) == 1 and len({label(c) for c in caps}) == 1:
        return [label(caps[0])]
    raise ValueError(f"connect one caption per training image or per prompt ({len(prompts)} prompts"
                     f"{f', {len(positives)} images' if positives is not None else ''}); got {len(caps)}")


def rewards_setting(terms) -> str:
    """The rewards as a run records them (``name:margin:weight, ...``): part of its resume signature."""
    return ",".join(f"{getattr(t.reward, 'name', 'reward')}:{t.margin:g}:{t.weight:g}" for t in terms)


def _follow_images(reward, args) -> None:
    lora_train.keep_on(reward, args[0].device)  # returns None: the call's arguments stay as they are


def feedback_parts(terms, vae, patcher, labels, checkpointing: bool, **base) -> FeedbackParts:
    """The rewards moved to the model's device (out of inference mode) and the differentiable
    decoder, as a run's :class:`FeedbackParts` (``base``: a feedback run's frozen LoRA)."""
    device = patcher.load_device
    for t in terms:
        lora_train.keep_on(t.reward, device)
        if not getattr(t.reward, "_hypersd_follows_images", False):
            # a reward on a ComfyUI model (CLIP vision) is offloaded with it when the diffusion
            # model loads: each call brings it back to where its images are
            t.reward.register_forward_pre_hook(_follow_images)
            t.reward._hypersd_follows_images = True
    return FeedbackParts(decode=vae_decoder(vae, patcher.model, device, checkpointing=checkpointing),
                         rewards=list(terms), prompt_labels=labels, **base)


def lora_etas(recipe: vocab.Recipe, stages) -> tuple[tuple[int, float], ...]:
    """The sampler eta the frozen LoRA's recipe (:func:`base_lora`'s) gives each step count of
    ``stages``: a unified (TCD) LoRA's own table or TCD's rule, a TCD-sampled N-step LoRA's eta,
    0 (DDIM) for the others."""
    tcd = recipe.sampler == "tcd"
    return tuple((k, recipe.with_steps(k).eta if tcd else 0.0) for k in vocab.parse_stages(stages))


def train_feedback(model, lora_name, vae, reward_terms, latents, positive, captions=None, *,
                   output_name: str = "hypersd_feedback", resume: bool = True, node_id=None, callbacks: tuple = (),
                   positive_per_latent: bool = False, eta_of_lora: bool = False, **settings) -> tuple:
    """Train a feedback LoRA on ``lora_name``; returns ``(model_with_merged_lora, merged_path,
    feedback_path, trainer)``. ``settings``: :class:`TrainSettings` fields (``stages`` are the
    student's step counts; ``steps_per_stage``, ``learning_rate``, ``rank``, ``feedback_eta``,
    ``structure_weight``, ``merge_ratio``, ...). ``eta_of_lora``: each step count at the LoRA's own
    eta (:func:`lora_etas`) instead of ``feedback_eta``."""
    if not reward_terms:
        raise ValueError("connect at least one reward (Hyper-SD Reward Loader)")
    if not positive:
        raise ValueError("connect a positive conditioning (the prompt of the training images)")
    family = _comfy_model.model_family(model)
    base_sd, base_meta, base_id, base_recipe = base_lora(lora_name, family)
    if eta_of_lora:
        settings["feedback_eta_by_steps"] = lora_etas(base_recipe, settings.get("stages", "4"))
    settings = TrainSettings(method="feedback", feedback_on=base_id, feedback_rewards=rewards_setting(reward_terms),
                             **{"save_stages": False, **settings})
    files = RunFiles.create(_comfy_model.loras_dir(), output_name)
    if positive_per_latent:
        groups, prompts = core_data.paired_latent_groups(latents, positive)
    else:
        groups, prompts = [(g, None) for g in core_data.latent_groups(latents)], [positive]
    labels = prompt_labels(reward_terms, captions, prompts, positive if positive_per_latent else None)
    patched, _ = comfy.sd.load_lora_for_models(model, None, base_sd, 1.0, 0)  # the frozen LoRA, in the base
    patcher = patched.clone()
    parts = feedback_parts(reward_terms, vae, patcher, labels, settings.gradient_checkpointing, base_lora=base_sd,
                           base_metadata=base_meta)
    run = TrainingRun(settings, files, family=family,
                      alphas_cumprod=_comfy_model.discrete_alphas_cumprod(patcher.get_model_object("model_sampling")),
                      key_prefix=lora_train.kohya_prefix(_comfy_model.key_prefix_map(patcher.model)),
                      resume=resume, prompts=len(prompts), parts=parts)
    data = core_data.LatentData([(patcher.model.process_latent_in(g), c if len(prompts) > 1 else None)
                                 for g, c in groups])
    # the feedback samples at cfg 1, so the guider's negative is never evaluated: the prompt stands in
    progress = ComfyProgress(node_id, "HyperSD feedback")
    trainer = progress.watch(lambda: _comfy_training.train_in_comfy(patcher, run, data, prompts, prompts[0],
                                                                    [progress, *callbacks]))
    out_model, _ = comfy.sd.load_lora_for_models(model, None, run.lora, 1.0, 0)
    progress.finish([files.lora, files.feedback_lora])
    return out_model, str(files.lora), str(files.feedback_lora), trainer


# ---------------------------------------------------------------------- nodes


class HyperSDRewardLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperSDRewardLoader",
            display_name="Hyper-SD Reward Loader",
            category="Hyper-SD/training",
            description=("Loads a reward model for feedback learning from models/hypersd_rewards (a file, never a "
                         "download): this pack's classifier rewards, or a preference reward trained from your "
                         "ratings; with its hinge margin and weight. Chain loaders to train against several "
                         "rewards at once."),
            inputs=[
                io.Combo.Input("reward_name", options=folder_paths.get_filename_list(rewards_folder()),
                               tooltip="The reward file (models/hypersd_rewards), e.g. the toy's "
                                       "hypersd_toy_reward.safetensors."),
                io.Float.Input("margin", default=-0.05, min=-100.0, max=100.0, step=0.01,
                               tooltip="Hinge margin: a picture whose reward reaches it gives no gradient, so the "
                                       "reward is not over-optimised. For a classifier reward (log-probability "
                                       "of the class, at most 0) -0.05 stops at about 95% confidence."),
                io.Float.Input("weight", default=1.0, min=0.0, max=100.0, step=0.05,
                               tooltip="Weight of this reward's hinge in the feedback loss."),
                Reward.Input("rewards", optional=True, tooltip="Rewards loaded before this one (to combine)."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Only for a preference reward trained on CLIP vision features ('Hyper-SD "
                                            "Train Preference Reward' with clip_vision): the same CLIP vision model."),
            ],
            outputs=[Reward.Output(display_name="rewards", tooltip="The rewards so far, for the feedback node.")],
        )

    @classmethod
    def execute(cls, reward_name, margin, weight, rewards=None, clip_vision=None) -> io.NodeOutput:
        term = load_reward(reward_name, margin, weight, clip_vision=clip_vision)
        return io.NodeOutput(list(rewards or []) + [term])


class HyperSDAestheticReward(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperSDAestheticReward",
            display_name="Hyper-SD Aesthetic Reward (LAION)",
            category="Hyper-SD/training",
            description=("The LAION aesthetic predictor as a reward for feedback learning (the reward Hyper-SD "
                         "used): its head (v1 linear or v2 MLP, .safetensors or a .pth state dict, in "
                         "models/hypersd_rewards) on the CLIP ViT-L/14 vision model's image embedding, with its own "
                         "differentiable resize and normalisation. Chain with other reward loaders."),
            inputs=[
                io.ClipVision.Input("clip_vision", tooltip="CLIP ViT-L/14 from CLIPVisionLoader (models/clip_vision)."),
                io.Combo.Input("head_name", options=folder_paths.get_filename_list(rewards_folder()),
                               tooltip="The aesthetic head, e.g. sac+logos+ava1-l14-linearMSE.pth (v2) or "
                                       "sa_0_4_vit_l_14_linear.pth (v1), in models/hypersd_rewards."),
                io.Float.Input("margin", default=6.5, min=-100.0, max=100.0, step=0.05,
                               tooltip="Hinge margin on the aesthetic score (about 1 to 10): pictures that score "
                                       "this much give no gradient, so the score is not over-optimised."),
                io.Float.Input("weight", default=0.1, min=0.0, max=100.0, step=0.01,
                               tooltip="Weight of this reward's hinge in the feedback loss."),
                Reward.Input("rewards", optional=True, tooltip="Rewards loaded before this one (to combine)."),
            ],
            outputs=[Reward.Output(display_name="rewards", tooltip="The rewards so far, for the feedback node.")],
        )

    @classmethod
    def execute(cls, clip_vision, head_name, margin, weight, rewards=None) -> io.NodeOutput:
        return io.NodeOutput(list(rewards or []) + [aesthetic_reward(clip_vision, head_name, margin, weight)])


def _setting_inputs() -> list:
    return [
        io.String.Input("steps_of_lora", default="4",
                        tooltip="The step count the LoRA is used at (4 for a 4-step LoRA); the feedback runs the "
                                "LoRA's own schedule to a late step. Several (e.g. '2,4') train one after another."),
        io.Int.Input("steps", default=200, min=1, max=1_000_000, tooltip="Optimizer steps per step count."),
        io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-6,
                       tooltip="AdamW learning rate of the feedback LoRA."),
        io.Int.Input("rank", default=8, min=1, max=256, tooltip="Rank of the feedback LoRA (alpha = rank)."),
        io.Float.Input("merge_ratio", default=1.0, min=0.0, max=2.0, step=0.05,
                       tooltip="Strength of the feedback in the merged LoRA (<output_name>): lower stays closer to "
                               "the LoRA it was trained on, higher follows the reward more. The feedback alone is "
                               "saved too (<output_name>_feedback), to merge again at another ratio."),
        io.Float.Input("eta", default=0.0, min=0.0, max=1.0, step=0.05,
                       tooltip="The LoRA's sampler on the way to the late step: 0 = DDIM (N-step LoRAs); TCD's "
                               "eta for a unified LoRA."),
        io.Float.Input("structure_weight", default=0.0, min=0.0, max=100.0, step=0.05,
                       tooltip="Weight of the structure term: real training images noised to a middle step, "
                               "denoised in one step and scored by the reward's own supervised loss against their "
                               "class (a classifier reward). 0: off."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                     tooltip="Seed of the LoRA initialisation, noise, late steps and batches."),
        io.Int.Input("batch_size", default=4, min=1, max=1024, tooltip="Pictures per training step."),
        io.String.Input("output_name", default="hypersd_feedback",
                        tooltip="File name (no folders) of the merged LoRA in the loras folder; the feedback alone "
                                "is <output_name>_feedback."),
        io.Int.Input("checkpoint_every", default=50, min=0, max=1_000_000,
                     tooltip="Save the LoRAs and the training state every N steps (0: only at the end and on "
                             "Cancel)."),
        io.Boolean.Input("resume", default=True,
                         tooltip="Continue from the saved training state of output_name (same settings and the "
                                 "same LoRA file); off replaces it."),
        io.Combo.Input("lora_scope", options=list(LORA_SCOPES), default="transformer", optional=True,
                       tooltip="Layers the feedback LoRA adapts: the transformer blocks, or every linear and "
                               "convolution layer."),
        io.Boolean.Input("gradient_checkpointing", default=False, optional=True,
                         tooltip="Recompute the activations of the UNet and the VAE decoder in the backward pass: "
                                 "less memory, slower steps."),
        io.Combo.Input("scored_steps", options=list(core_feedback.SCORED_STEPS),
                       default=core_feedback.DEFAULT_SCORED_STEPS, optional=True,
                       tooltip="Where on the LoRA's schedule the rewards score the one-step picture: 'late half' "
                               "(the paper's and ReFL's choice) or 'whole schedule' (the first step too, where a "
                               "picture's content is decided; on the toy's unified LoRA it raised the reward with "
                               "less drift from the data at 2 and 4 steps)."),
        io.Float.Input("anchor_weight", default=0.0, min=0.0, max=1000.0, step=0.05, optional=True,
                       tooltip="Keeps the pictures near the frozen LoRA's: the mean squared difference of the "
                               "one-step picture (latent) from the frozen LoRA's at the same step and noise. The "
                               "hinge leaves a picture that already scores its margin alone; the anchor also holds "
                               "it where it was. 0: off (the paper's)."),
        io.Boolean.Input("eta_of_lora", default=False, optional=True,
                         tooltip="Run each step count at the eta the LoRA's sampler uses there (a unified LoRA's "
                                 "own table: e.g. 1 at one step, 0.3 at two), so the feedback sees the pictures "
                                 "you will sample; eta is then not used. Off: eta at every step count."),
    ]


class HyperSDTrainFeedback(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperSDTrainFeedback",
            display_name="Hyper-SD Train Feedback LoRA",
            category="Hyper-SD/training",
            description=(
                "Human feedback learning (Hyper-SD part 2): trains a LoRA on top of a few-step LoRA (frozen) so its "
                "pictures score higher with the connected reward models: the LoRA's own schedule to a late step, "
                "x0 in one step, decoded by the VAE, a hinge on each reward. Saves the merged LoRA at merge_ratio "
                "(same recipe as the LoRA it builds on) and the feedback alone; checkpoints, resumes, honours "
                "Cancel."),
            is_input_list=True,
            inputs=[
                io.Model.Input("model", tooltip="The base model, WITHOUT the few-step LoRA (the node applies it)."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="The few-step LoRA to improve (kohya layout: the official Hyper-SD SD1.5/"
                                       "SDXL files or one this pack trained). It stays frozen."),
                io.Vae.Input("vae", tooltip="The VAE that decodes the pictures the rewards score."),
                Reward.Input("rewards", tooltip="Reward models (Hyper-SD Reward Loader)."),
                io.Latent.Input("latents", tooltip="Training images as latents (VAE Encode): the batch shape, and the "
                                                   "real images of the structure term."),
                io.Conditioning.Input("positive", tooltip="Prompt conditioning: one for every latent, or one per "
                                                          "latent (e.g. 'Make Training Dataset')."),
                io.String.Input("captions", force_input=True, optional=True,
                                tooltip="The prompts' texts, one per prompt (e.g. the captions of 'Load Image and "
                                        "Text Dataset from Folder'): a classifier reward reads each prompt's class "
                                        "from it (the class name as a word)."),
            ] + _setting_inputs(),
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the merged LoRA applied."),
                io.String.Output(display_name="lora_path", tooltip="Path of the merged LoRA."),
                io.String.Output(display_name="feedback_lora_path", tooltip="Path of the feedback LoRA alone."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, lora_name, vae, rewards, latents, positive, captions=None, **options) -> io.NodeOutput:
        values = {k: (v[0] if v else None) if isinstance(v, list) else v for k, v in options.items()}
        values = {k: v for k, v in values.items() if v is not None}
        settings = {"stages": values.pop("steps_of_lora", "4"), "steps_per_stage": values.pop("steps", 200),
                    "feedback_eta": values.pop("eta", 0.0), **values}
        positives = [p for p in (positive if isinstance(positive, list) else [positive]) if p is not None]
        per_latent = len(positives) > 1
        terms = [t for group in (rewards or []) for t in (group or [])]
        m, path, fb_path, _ = train_feedback(model[0], lora_name[0], vae[0], terms, latents,
                                             positives if per_latent else (positives[0] if positives else None),
                                             captions, positive_per_latent=per_latent,
                                             node_id=cls.hidden.unique_id, **settings)
        return io.NodeOutput(m, path, fb_path)


NODES = [HyperSDRewardLoader, HyperSDAestheticReward, HyperSDTrainFeedback]
