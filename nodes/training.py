"""Training nodes: Hyper-SD TSCD distillation of the graph's own model into a LoRA.

The run itself is the core's (``hypersd_core.pipeline``: settings, data, adapters, loss
terms, stages, checkpoints, Cancel/NaN/out-of-memory handling, atomic files). This node
only adapts ComfyUI to it:

* the LATENT and CONDITIONING inputs become the core's latent groups (one prompt per
  latent, or one for all);
* the model is cloned, loaded fully onto its device, and trained inside ComfyUI's
  ``CFGGuider`` (``_comfy_training``), with its family, noise schedule and LoRA key names
  read off it (``_comfy_model``);
* progress goes to the progress bar, the node and the console, and Cancel stops the run
  within a step (``_training_progress``);
* files go to the first ``loras`` folder: ``<output_name>.safetensors`` (kohya keys that
  every LoRA loader reads, ``hypersd.*`` metadata with the recommended sampler), its
  training state ``<output_name>.hypersd-state`` for resuming, and a LoRA per stage.
"""
from __future__ import annotations

import comfy.sd
from comfy_api.latest import io

from ..hypersd_core import data as core_data
from ..hypersd_core import lora_train
from ..hypersd_core.lora_train import LORA_SCOPES
from ..hypersd_core.pipeline import RunFiles, TrainingRun, TrainSettings
from ..hypersd_core.train import LR_SCHEDULES
from ..hypersd_core.tscd import LOSSES
from . import _comfy_model, _comfy_training
from ._training_progress import ComfyProgress


def training_data(latents, positive, negative, positive_per_latent: bool):
    """``(groups, prompts)``: latents grouped with their prompt index (None: one prompt for all)."""
    if not positive:
        raise ValueError("connect a positive conditioning (the prompt the teacher is guided by)")
    if positive_per_latent:
        groups, prompts = core_data.paired_latent_groups(latents, positive)
    else:
        groups, prompts = [(g, None) for g in core_data.latent_groups(latents)], [positive]
    if not negative:
        raise ValueError("connect a negative conditioning (the teacher's classifier-free guidance needs it)")
    return groups, prompts


def train_tscd(model, latents, positive, negative, *, output_name: str = "hypersd_tscd", resume: bool = True,
               node_id=None, callbacks: tuple = (), positive_per_latent: bool = False, vae=None, rewards=(),
               captions=None, folder=None, shard: tuple[int, int] = (0, 1), shard_base: bool = False,
               **settings) -> tuple:
    """Train a TSCD LoRA for ``model``; returns ``(model_with_lora, lora_path, trainer)``.

    ``settings`` are :class:`~hypersd_core.pipeline.TrainSettings` fields (stages,
    steps_per_stage, learning_rate, rank, ...). ``positive`` is one CONDITIONING for every
    latent, or with ``positive_per_latent`` a list with one per item of ``latents``.
    ``callbacks`` (``hypersd_core.train.Callback``) run after the progress/Cancel one.
    ``folder`` (default: ComfyUI's first ``loras`` folder), ``shard`` (this process's
    ``(rank, world)`` under ``torch.distributed``) and ``shard_base`` (the frozen base sharded over
    the processes with FSDP2) are the training command's (``scripts/train.py``).
    """
    from . import feedback as fb_nodes  # the score stage's feedback term shares the feedback node's parts

    if settings.get("score_feedback_weight") and rewards:
        settings["feedback_rewards"] = fb_nodes.rewards_setting(rewards)
    settings = TrainSettings(**settings)
    files = RunFiles.create(folder or _comfy_model.loras_dir(), output_name)
    groups, prompts = training_data(latents, positive, negative, positive_per_latent)
    patcher = model.clone()
    parts = None
    if settings.score_steps and settings.score_feedback_weight:  # the score stage's feedback term
        if not rewards or vae is None:
            raise ValueError("score_feedback_weight > 0 needs 'rewards' (Hyper-SD Reward Loader) and the 'vae' "
                             "connected; or set it to 0")
        labels = fb_nodes.prompt_labels(rewards, captions, prompts, positive if positive_per_latent else None)
        parts = fb_nodes.feedback_parts(rewards, vae, patcher, labels, settings.gradient_checkpointing)
    model_sampling = patcher.get_model_object("model_sampling")
    run = TrainingRun(settings, files, family=_comfy_model.model_family(patcher),
                      alphas_cumprod=_comfy_model.discrete_alphas_cumprod(model_sampling),
                      key_prefix=lora_train.kohya_prefix(_comfy_model.key_prefix_map(patcher.model)),
                      resume=resume, prompts=len(prompts), parts=parts, shard=shard, shard_base=shard_base)
    data = core_data.LatentData([(patcher.model.process_latent_in(g), c if len(prompts) > 1 else None)
                                 for g, c in groups])
    progress = ComfyProgress(node_id)
    trainer = progress.watch(lambda: _comfy_training.train_in_comfy(patcher, run, data, prompts, negative,
                                                                    [progress, *callbacks]))
    # A sharded base (the command's FSDP2 runs) stays sharded: that process ends after training.
    out_model = model if shard_base and shard[1] > 1 else comfy.sd.load_lora_for_models(model, None, run.lora, 1.0, 0)[0]
    stage_files = [p for i, k in enumerate(settings.stages) if (p := files.stage_lora(i, k)).exists()]
    progress.finish([files.lora, *stage_files])
    return out_model, str(files.lora), trainer


# ---------------------------------------------------------------------- node


def _data_inputs() -> list:
    return [
        io.Model.Input("model", tooltip="The model to distil (SD1.x, SD2.x, SDXL or a fine-tune). It is also "
                                        "the teacher: the LoRA is switched off for the teacher's prediction."),
        io.Latent.Input("latents", tooltip="Training images as latents (VAE Encode). One batch or several; "
                                           "different sizes are trained in separate batches."),
        io.Conditioning.Input("positive", tooltip="Prompt conditioning for the teacher and the student: "
                                                  "one for every latent, or a list with one per latent "
                                                  "(e.g. 'Make Training Dataset' of captioned images)."),
        io.Conditioning.Input("negative", tooltip="Negative conditioning for the teacher's classifier-free "
                                                  "guidance (baked into the LoRA)."),
    ]


def _setting_inputs() -> list:
    """The run's settings (``TrainSettings``), the file name and resume."""
    return [
        io.String.Input("stages", default="8,4,2,1",
                        tooltip="Segment counts of the progressive stages, in order: each stage continues "
                                "from the previous weights. The last one sets the recommended steps."),
        io.Int.Input("steps_per_stage", default=250, min=1, max=1_000_000,
                     tooltip="Optimizer steps in each stage."),
        io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-6,
                       tooltip="AdamW learning rate of the LoRA weights."),
        io.Int.Input("rank", default=16, min=1, max=256,
                     tooltip="LoRA rank (alpha = rank, so strength 1 applies the full update). "
                             "The released Hyper-SD LoRAs use 64."),
        io.Float.Input("teacher_cfg", default=7.0, min=1.0, max=30.0, step=0.1,
                       tooltip="The teacher's classifier-free guidance scale, baked into the student "
                               "(sample the result at cfg 1)."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                     tooltip="Seed of the LoRA initialisation, noise, timesteps and batches."),
        io.String.Input("output_name", default="hypersd_tscd",
                        tooltip="File name (no folders) of the LoRA in the first loras folder; "
                                "'.safetensors' is added."),
        io.Int.Input("checkpoint_every", default=100, min=0, max=1_000_000,
                     tooltip="Save the LoRA and its training state every N steps (0: only at the end "
                             "and on Cancel)."),
        io.Int.Input("batch_size", default=4, min=1, max=1024, tooltip="Latents per training step."),
        io.Boolean.Input("resume", default=True,
                         tooltip="Continue from the saved training state of output_name when there is one "
                                 "(same settings needed, but the score-distillation ones may change until "
                                 "its score stage has begun); off replaces it."),
        io.Combo.Input("loss", options=list(LOSSES), default="huber", optional=True,
                       tooltip="Distance between the student's jump and the EMA target's: pseudo-Huber "
                               "(robust) or MSE (the paper)."),
        io.Combo.Input("lora_scope", options=list(LORA_SCOPES), default="transformer", optional=True,
                       tooltip="Layers that get LoRA weights: the transformer blocks (attention, "
                               "feed-forward, projections; the Hyper-SD layout) or every linear and "
                               "convolution layer."),
        io.Float.Input("ema_decay", default=0.95, min=0.0, max=0.9999, step=0.001, optional=True,
                       tooltip="Decay of the EMA target's weights (0: the target is the student)."),
        io.Boolean.Input("gradient_checkpointing", default=False, optional=True,
                         tooltip="Recompute activations in the backward pass: less memory, slower steps."),
        io.Combo.Input("lr_schedule", options=list(LR_SCHEDULES), default="constant", optional=True,
                       tooltip="Learning rate over each stage: constant, or cosine (a short warm-up, then "
                               "down to a tenth of learning_rate at the stage's end, so every stage's "
                               "LoRA is saved at a low rate)."),
        io.Boolean.Input("save_stages", default=True, optional=True,
                         tooltip="Also save the LoRA of every stage but the last as "
                                 "<output_name>_stage<n>_k<k> (the k-step LoRA: sample it with k steps, "
                                 "TCD eta 0.3 on the trailing grid, cfg 1), as the official release has one file per step "
                                 "count. The last stage's LoRA is <output_name>."),
        io.Int.Input("score_steps", default=0, min=0, max=1_000_000, optional=True,
                     tooltip="Score distillation after the TSCD stages (0: none): the student learns to draw "
                             "in one step by distribution matching against the teacher, with a fake score "
                             "trained alongside as a third LoRA adapter on the same model (no second copy). "
                             "The result is one unified LoRA: sample it with TCD at 1 to 8 steps; the TSCD "
                             "result before it is saved as the last stage file. To add it to a finished "
                             "TSCD run, queue that run again with resume on: it continues from there."),
        io.Int.Input("generator_t", default=999, min=1, max=999, optional=True,
                     tooltip="Timestep the one-step generator is called at from pure noise during score "
                             "distillation: 999 for a unified LoRA, 800 for a dedicated one-step LoRA (as "
                             "the official one-step UNet; its file then recommends one LCM step from "
                             "timestep 800)."),
        io.Int.Input("fake_updates", default=5, min=1, max=50, optional=True,
                     tooltip="Fake-score updates per generator step in score distillation (DMD2 uses 10 "
                             "for SD1.5, 5 for SDXL); more keeps the fake score closer to the generator."),
        io.Float.Input("regression_weight", default=0.25, min=0.0, max=100.0, step=0.01, optional=True,
                       tooltip="Weight of the regression to the teacher's 25-step outputs from a fixed bank "
                               "of noises and prompts (made once per run), which keeps score distillation "
                               "from collapsing to a few pictures; 0 turns it off."),
        io.Float.Input("score_tscd_weight", default=1.0, min=0.0, max=100.0, step=0.05, optional=True,
                       tooltip="Weight of the TSCD consistency term kept beside distribution matching during "
                               "score distillation, so the unified LoRA stays good at 2 to 8 steps while it "
                               "learns one step; 0: distribution matching alone (the 2-8 step pictures "
                               "degrade the longer it runs)."),
        io.Float.Input("score_feedback_weight", default=0.0, min=0.0, max=100.0, step=0.05, optional=True,
                       tooltip="Weight of human feedback in the score-distillation stage (as the paper's): the "
                               "one-step pictures, decoded by 'vae', scored by 'rewards' with their hinges. "
                               "0: none."),
        io.Vae.Input("vae", optional=True, tooltip="The VAE that decodes the pictures the rewards score "
                                                   "(score_feedback_weight > 0)."),
        io.Custom("HYPERSD_REWARD").Input("rewards", optional=True,
                                          tooltip="Reward models (Hyper-SD Reward Loader) for score_feedback_weight."),
        io.String.Input("captions", force_input=True, optional=True,
                        tooltip="The training images' captions, for a classifier reward's classes "
                                "(score_feedback_weight > 0)."),
    ]


class HyperSDTrainTSCD(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperSDTrainTSCD",
            display_name="Hyper-SD Train TSCD LoRA",
            category="Hyper-SD/training",
            description=(
                "Distils the connected model into a few-step Hyper-SD LoRA with Trajectory Segmented Consistency "
                "Distillation: progressive stages of k segments (e.g. 8,4,2,1), teacher = the model itself with "
                "classifier-free guidance baked in. Saves into the loras folder (kohya keys, metadata with the "
                "recommended sampler), checkpoints every N steps, resumes with optimizer state, honours Cancel."),
            is_input_list=True,
            inputs=_data_inputs() + _setting_inputs(),
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the trained LoRA applied "
                                                              "(sample at cfg 1 with the recommended sampler)."),
                io.String.Output(display_name="lora_path", tooltip="Path of the saved LoRA file."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, latents, positive, negative, **options) -> io.NodeOutput:
        # is_input_list: every input arrives as a list; the settings are its single value, and an
        # optional input a workflow leaves out keeps TrainSettings' default.
        captions = options.pop("captions", None)
        rewards = [t for group in (options.pop("rewards", None) or []) for t in (group or [])]
        values = {k: (v[0] if v else None) if isinstance(v, list) else v for k, v in options.items()}
        settings = {k: v for k, v in values.items() if v is not None}
        positives = [p for p in (positive if isinstance(positive, list) else [positive]) if p is not None]
        per_latent = len(positives) > 1
        pos = positives if per_latent else (positives[0] if positives else None)
        neg = negative[0] if negative else None
        m, path, _ = train_tscd(model[0], latents, pos, neg, positive_per_latent=per_latent,
                                node_id=cls.hidden.unique_id, rewards=rewards, captions=captions, **settings)
        return io.NodeOutput(m, path)


NODES = [HyperSDTrainTSCD]
