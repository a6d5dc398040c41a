"""One training run of the pack, as explicit steps, in plain torch.

::

    settings = TrainSettings(stages="8,4,2,1", steps_per_stage=250, ...)    # 1. checked settings
    files = RunFiles.create(folder, "my_model_hypersd")                       # 2. where it is written
    run = TrainingRun(settings, files, family="SD1.5", alphas_cumprod=ab,    # 3. the run; reads the
                      key_prefix=kohya_prefix(names), resume=True)            #    state to resume first
    trainer = run.train(module, eps_fn, LatentData(groups), device=dev)       # 4. adapters, loss terms,
                                                                              #    stages, the loop
    run.lora                                                                  # 5. the LoRA, kohya keys

Whatever supplies a module to put the adapters in and ``eps_fn(x_t, t, cfg, cond) -> eps``
(see :mod:`hypersd_core.tscd`) can drive it: the ComfyUI node through ComfyUI's guider,
a script with the bare UNet (``scripts/train_outside_comfyui.py``), a distributed launcher.

:meth:`TrainingRun.train` in turn:

1. puts the student LoRA and its EMA twin into ``module`` (:class:`~.lora_train.LoraAdapters`);
2. builds the method's stages and loss terms (:data:`METHODS`: ``tscd``, progressive
   segment counts, each stage continuing from the previous weights);
3. continues from the saved training state when there is one (same settings only);
4. runs the loop (:class:`~.train.Trainer`) with the LoRA and its state saved every
   ``checkpoint_every`` steps and at the end, each stage's own LoRA at its end, and the
   stops: Cancel (``interrupts``: the last finished step is saved, then it re-raises),
   a NaN (stops, keeps the last good checkpoint), out of memory (saves the last step,
   raises :class:`~.train.TrainingOutOfMemory` with what to change, cheapest first);
5. keeps the trained LoRA in ``run.lora`` and takes the adapters out of ``module`` again.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import files as fileio
from . import metadata as vocab
from . import dmd, feedback, tscd
from .lora_merge import merge_cat
from .data import LatentData
from .lora_train import (LoraAdapters, activation_checkpointing, check_scope, kohya_prefix, select_targets,
                         shard_frozen_base)
from .train import (Callback, Checkpointer, NonFiniteLossError, Stage, StageSaver, Trainer,
                    TrainingOutOfMemory, check_lr_schedule, is_out_of_memory)

log = logging.getLogger(__name__)

STATE_SUFFIX = ".hypersd-state"  # no model-file extension: ComfyUI's LoRA lists leave the state out
LEGACY_STATE_SUFFIX = ".hypersd-state.pt"  # before: listed in every LoRA dropdown, failing when picked
# the signature's score-distillation settings (TrainSettings._score_settings)
SCORE_SETTINGS = ("score_steps", "generator_t", "fake_updates", "regression_weight", "score_tscd_weight",
                  "score_feedback_weight", "feedback_rewards")
FEEDBACK_SUFFIX = "_feedback"  # <name>_feedback.safetensors: a feedback run's LoRA alone (the merged one is <name>)


class TrainingDiverged(RuntimeError):
    """The loss, gradients or weights became NaN or infinite; the message says what is kept."""


# ---------------------------------------------------------------------- 1. settings


@dataclass(frozen=True)
class TrainSettings:
    """Everything a run is made of but the model and the data; checked when made."""

    stages: tuple[int, ...] | str = (8, 4, 2, 1)
    steps_per_stage: int = 250
    learning_rate: float = 1e-4
    rank: int = 16
    teacher_cfg: float = 7.0
    seed: int = 0
    batch_size: int = 4
    loss: str = "huber"
    lora_scope: str = "transformer"
    ema_decay: float = 0.95
    lr_schedule: str = "constant"
    gradient_checkpointing: bool = False
    checkpoint_every: int = 100
    save_stages: bool = True
    method: str = "tscd"
    # score distillation after the TSCD stages (0 = none): the unified LoRA's last stage
    score_steps: int = 0
    generator_t: int = dmd.GENERATOR_T_UNIFIED
    fake_updates: int = dmd.DEFAULT_FAKE_UPDATES
    regression_weight: float = dmd.DEFAULT_REGRESSION_WEIGHT
    score_tscd_weight: float = dmd.DEFAULT_SCORE_TSCD_WEIGHT
    # the feedback term carried by the score stage (as the paper does; 0 = none; needs FeedbackParts)
    score_feedback_weight: float = 0.0
    # feedback learning (method "feedback": ``stages`` are the student's step counts, one stage each)
    feedback_eta: float = 0.0
    # the eta of each step count (``(steps, eta)`` pairs, e.g. a unified LoRA's own table, so each stage
    # runs the schedule as the sampler will); a step count it does not list uses ``feedback_eta``
    feedback_eta_by_steps: tuple = ()
    structure_weight: float = 0.0
    scored_steps: str = "late half"  # where on the student's schedule the rewards score (feedback.SCORED_STEPS)
    anchor_weight: float = 0.0  # the feedback's anchor to the frozen LoRA's pictures (0: off, the paper's)
    merge_ratio: float = 1.0  # the feedback LoRA's strength in the merged file (not part of the state)
    feedback_on: str = ""  # what the feedback is trained on: the frozen LoRA's name and digest
    feedback_rewards: str = ""  # the rewards, margins and weights (name:margin:weight, ...)

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(vocab.parse_stages(self.stages)))
        table = self.feedback_eta_by_steps
        try:
            table = (vocab.parse_eta_by_steps(table) if table.strip() else ()) if isinstance(table, str) \
                else tuple((int(n), float(e)) for n, e in (table or ()))
        except (TypeError, ValueError) as e:
            raise ValueError(f"feedback_eta_by_steps must be steps:eta pairs such as '2:0.3,4:0.6' (eta in [0, 1]), "
                             f"got {self.feedback_eta_by_steps!r} ({e})") from None
        object.__setattr__(self, "feedback_eta_by_steps", table)
        checks = [
            (int(self.steps_per_stage) >= 1, "steps_per_stage must be at least 1"),
            (isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0
             and math.isfinite(self.learning_rate), "learning_rate must be a positive number"),
            (int(self.rank) >= 1, f"LoRA rank must be at least 1, got {self.rank}"),
            (int(self.batch_size) >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (math.isfinite(self.teacher_cfg) and self.teacher_cfg >= 1.0,
             f"teacher_cfg must be 1 or more (1 = no guidance), got {self.teacher_cfg}"),
            (0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1), got {self.ema_decay}"),
            (int(self.checkpoint_every) >= 0, "checkpoint_every must be 0 (only at the end) or more"),
            (self.method in METHODS, f"unknown training method {self.method!r}: use one of {', '.join(METHODS)}"),
            (int(self.score_steps) >= 0, f"score_steps must be 0 (no score distillation) or more, got {self.score_steps}"),
            (math.isfinite(self.score_feedback_weight) and self.score_feedback_weight >= 0,
             f"score_feedback_weight must be 0 (none) or more, got {self.score_feedback_weight}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        tscd.check_loss(self.loss)
        if self.score_steps:
            dmd.check_settings(self.generator_t, self.fake_updates, self.regression_weight,
                               tscd_weight=self.score_tscd_weight)
        if self.method == "feedback":
            feedback.check_settings(max(self.stages), self.feedback_eta, self.structure_weight,
                                    anchor_weight=self.anchor_weight)
            for k in self.stages:
                feedback.check_settings(k, self.eta_of_stage(k), 0.0)
            feedback.late_fraction_of(self.scored_steps)
            if not (math.isfinite(self.merge_ratio) and 0.0 <= self.merge_ratio <= 2.0):
                raise ValueError(f"merge_ratio must be in [0, 2] (the feedback LoRA's strength in the merged file), "
                                 f"got {self.merge_ratio}")
            if self.score_steps:
                raise ValueError("score_steps belongs to a TSCD run; a feedback run trains on a finished LoRA")
        check_scope(self.lora_scope)
        check_lr_schedule(self.lr_schedule)

    def signature(self, prompts: int = 1) -> dict:
        """What a saved state must share to be resumed (states of earlier versions still match)."""
        sig = {"method": self.method, "stages": vocab.format_stages(self.stages),
               "steps_per_stage": int(self.steps_per_stage), "learning_rate": float(self.learning_rate),
               "rank": int(self.rank), "teacher_cfg": float(self.teacher_cfg), "seed": int(self.seed),
               "batch_size": int(self.batch_size), "loss": self.loss, "lora_scope": self.lora_scope,
               "ema_decay": float(self.ema_decay)}
        if prompts > 1:
            sig["prompts"] = int(prompts)
        if self.lr_schedule != "constant":  # absent for constant: states saved before the option existed resume
            sig["lr_schedule"] = self.lr_schedule
        sig.update(self._score_settings())  # absent without score distillation, as in earlier states
        if self.method == "feedback":
            sig.update(self._feedback_settings())
        return sig

    def eta_of_stage(self, steps: int) -> float:
        """The feedback's sampler eta at a step count: ``feedback_eta_by_steps``'s entry, else ``feedback_eta``."""
        return float(dict(self.feedback_eta_by_steps).get(int(steps), self.feedback_eta))

    def _feedback_settings(self) -> dict:
        out = {"feedback_eta": float(self.feedback_eta), "structure_weight": float(self.structure_weight),
               "feedback_on": self.feedback_on, "feedback_rewards": self.feedback_rewards}
        if self.scored_steps != feedback.DEFAULT_SCORED_STEPS:  # absent at the default, as in earlier states
            out["scored_steps"] = self.scored_steps
        if self.anchor_weight:  # absent at 0, likewise
            out["anchor_weight"] = float(self.anchor_weight)
        if self.feedback_eta_by_steps:  # absent when empty, likewise
            out["feedback_eta_by_steps"] = vocab.format_eta_by_steps(self.feedback_eta_by_steps)
        return out

    def _score_settings(self) -> dict:
        if not self.score_steps:
            return {}
        out = {"score_steps": int(self.score_steps), "generator_t": int(self.generator_t),
               "fake_updates": int(self.fake_updates), "regression_weight": float(self.regression_weight)}
        if self.score_tscd_weight:  # absent at 0, as in the states saved before the setting existed
            out["score_tscd_weight"] = float(self.score_tscd_weight)
        if self.score_feedback_weight:  # absent at 0, likewise
            out["score_feedback_weight"] = float(self.score_feedback_weight)
            out["feedback_rewards"] = self.feedback_rewards
        return out

    def file_settings(self) -> dict:
        """The settings a LoRA file records (``hypersd.<setting>``)."""
        return {"steps_per_stage": int(self.steps_per_stage), "rank": int(self.rank), "alpha": float(self.rank),
                "teacher_cfg": float(self.teacher_cfg), "learning_rate": float(self.learning_rate),
                "seed": int(self.seed), "lora_scope": self.lora_scope, "lr_schedule": self.lr_schedule,
                **self._score_settings()}


# ---------------------------------------------------------------------- 2. files


@dataclass(frozen=True)
class RunFiles:
    """The files of a run named ``name`` in ``folder``."""

    folder: Path
    name: str

    @classmethod
    def create(cls, folder, output_name: str) -> "RunFiles":
        return cls(Path(folder), fileio.safe_output_name(output_name))

    @property
    def lora(self) -> Path:
        return self.folder / f"{self.name}.safetensors"

    @property
    def state(self) -> Path:
        return self.folder / f"{self.name}{STATE_SUFFIX}"

    @property
    def legacy_state(self) -> Path:
        """Where earlier versions kept the state (resumed from; removed once the new one is written)."""
        return self.folder / f"{self.name}{LEGACY_STATE_SUFFIX}"

    @property
    def feedback_lora(self) -> Path:
        """A feedback run's LoRA alone (to merge again at another ratio); ``lora`` is the merged one."""
        return self.folder / f"{self.name}{FEEDBACK_SUFFIX}.safetensors"

    def stage_lora(self, index: int, segments: int) -> Path:
        """``<name>_stage<n>_k<k>``: the LoRA of stage ``n`` (1-based), trained down to ``k`` segments."""
        return self.folder / f"{self.name}_stage{index + 1}_k{segments}.safetensors"

    def resume_state(self, resume: bool) -> dict | None:
        """The saved state to continue from; refuses a LoRA that has none rather than replace it."""
        state = self.state if self.state.exists() else self.legacy_state
        if resume and state.exists():
            try:
                with torch.inference_mode(False):  # the optimizer updates these tensors in place
                    return torch.load(state, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"cannot resume: the training state {state} is unreadable ({e}); "
                                 f"turn 'resume' off to start again or pick another output_name") from e
        if resume and self.lora.exists():
            raise ValueError(f"{self.lora} exists but has no training state beside it, so it cannot be resumed; "
                             f"turn 'resume' off to replace it or pick another output_name")
        return None


# ---------------------------------------------------------------------- 2b. methods


def tscd_stages(settings: TrainSettings, eps_fn, adapters: LoraAdapters, alphas_cumprod: torch.Tensor,
                data: LatentData | None = None, parts: "FeedbackParts | None" = None) -> list[Stage]:
    """TSCD: one stage per segment count, each with the consistency term at the teacher's cfg; then,
    when ``score_steps`` > 0, one score-distillation stage (:mod:`.dmd`) on the same student, with
    the regression bank made here from ``data`` (its prompts) and the teacher, and the one-segment
    TSCD term beside it at ``score_tscd_weight`` (so the 2-8 step quality is kept) and, at
    ``score_feedback_weight``, the feedback term on the one-step generator's pictures (``parts``:
    the decoder and rewards), as the paper's score stage carries it."""
    term = tscd.TSCDLoss(eps_fn, adapters, alphas_cumprod, teacher_cfg=settings.teacher_cfg, loss=settings.loss)
    stages = tscd.progressive_stages(settings.stages, settings.steps_per_stage, lambda k: [(1.0, term)])
    if settings.score_steps:
        if data is None:
            raise ValueError("score distillation needs the training data (its prompts) for the regression bank")
        bank = None
        if settings.regression_weight > 0:
            bank = dmd.RegressionBank.build(eps_fn, adapters, alphas_cumprod, data, batches=dmd.BANK_BATCHES,
                                            batch_size=settings.batch_size, teacher_cfg=settings.teacher_cfg,
                                            ode_steps=dmd.BANK_ODE_STEPS, seed=settings.seed,
                                            device=alphas_cumprod.device)
        score = dmd.DMDLoss(eps_fn, adapters, alphas_cumprod, teacher_cfg=settings.teacher_cfg,
                            generator_t=settings.generator_t, fake_updates=settings.fake_updates,
                            fake_lr=settings.learning_rate, regression_weight=settings.regression_weight, bank=bank)
        terms = [(1.0, score)]
        if settings.score_tscd_weight:
            terms.append((float(settings.score_tscd_weight), term))
        if settings.score_feedback_weight:  # the one-step generator's pictures, scored by the rewards
            if parts is None:
                raise ValueError("score_feedback_weight needs rewards and a VAE (connect them) or 0")
            fb = feedback.FeedbackLoss(eps_fn, adapters, alphas_cumprod, decode=parts.decode, rewards=parts.rewards,
                                       sample_steps=1, eta=1.0, prompt_labels=parts.prompt_labels)
            terms.append((float(settings.score_feedback_weight), fb))
        stages.append(Stage(segments=1, steps=int(settings.score_steps), terms=terms, name="score",
                            reset_ema=False))
    return stages


@dataclass
class FeedbackParts:
    """What a feedback run needs beyond the settings: the differentiable decoder, the rewards,
    each prompt's class, and the frozen LoRA it trains on (its kohya weights and the metadata
    its merged file carries: the frozen LoRA's recipe, since the feedback does not change it)."""

    decode: Callable[[torch.Tensor], torch.Tensor]
    rewards: Sequence[feedback.RewardTerm]
    base_lora: dict | None = None  # a feedback run's frozen LoRA (None: the score stage's feedback term)
    base_metadata: dict | None = None
    prompt_labels: Sequence[int] | None = None


def feedback_stages(settings: TrainSettings, eps_fn, adapters: LoraAdapters, alphas_cumprod: torch.Tensor,
                    data: LatentData | None = None, parts: FeedbackParts | None = None) -> list[Stage]:
    """Feedback learning (:mod:`.feedback`): one stage per entry of ``stages`` (the student's step
    count in that stage, e.g. ``4`` for a 4-step LoRA), ``steps_per_stage`` steps each, the
    student adapter being the feedback LoRA on top of the frozen one (part of the base)."""
    if parts is None:
        raise ValueError("a feedback run needs its decoder, rewards and frozen LoRA (FeedbackParts)")
    stages = []
    for k in settings.stages:
        term = feedback.FeedbackLoss(eps_fn, adapters, alphas_cumprod, decode=parts.decode, rewards=parts.rewards,
                                     sample_steps=k, eta=settings.eta_of_stage(k),
                                     structure_weight=settings.structure_weight, prompt_labels=parts.prompt_labels,
                                     late_fraction=feedback.late_fraction_of(settings.scored_steps),
                                     anchor_weight=settings.anchor_weight)
        stages.append(Stage(segments=k, steps=int(settings.steps_per_stage), terms=[(1.0, term)],
                            name=f"feedback-{k}step", reset_ema=False))
    return stages


# method name -> stages(settings, eps_fn, adapters, alphas_cumprod, data, parts); later methods join here.
METHODS: dict[str, Callable[..., list[Stage]]] = {"tscd": tscd_stages, "feedback": feedback_stages}


# ---------------------------------------------------------------------- 3-5. the run


@dataclass
class TrainingRun:
    """One run: settings and files, the model's family, schedule and key names, and the outcome."""

    settings: TrainSettings
    files: RunFiles
    family: str
    alphas_cumprod: torch.Tensor
    key_prefix: Callable[[str], str] = field(default_factory=kohya_prefix)
    resume: bool = True
    prompts: int = 1
    resume_state: dict | None = None
    lora: dict | None = None  # the trained LoRA (kohya keys), once train() has finished
    parts: FeedbackParts | None = None  # a feedback run's decoder, rewards and frozen LoRA
    # data parallel (torchrun): (rank, world). ``settings.batch_size`` is the global batch, split
    # evenly; every process trains the same weights and only rank 0 writes files, so a run
    # resumes with another number of processes.
    shard: tuple[int, int] = (0, 1)
    # data parallel with the frozen base sharded over the processes (FSDP2,
    # :func:`~hypersd_core.lora_train.shard_frozen_base`) instead of whole on each
    shard_base: bool = False

    def __post_init__(self):
        self.resume_state = self.files.resume_state(self.resume)

    def train(self, module: torch.nn.Module, eps_fn: tscd.EpsFn, data: LatentData, *, device=None,
              callbacks: Sequence[Callback] = (), interrupts: tuple[type[BaseException], ...] = (KeyboardInterrupt,),
              free_memory: Callable[[], None] | None = None) -> Trainer:
        """Steps 1-5 of the module docstring; returns the finished trainer."""
        s = self.settings
        with torch.inference_mode(False), torch.enable_grad():
            adapters = LoraAdapters(module, select_targets(module, s.lora_scope), rank=s.rank, seed=s.seed,
                                    fake=s.score_steps > 0)
            try:
                stages = METHODS[s.method](s, eps_fn, adapters, self.alphas_cumprod.to(device or "cpu"), data,
                                           parts=self.parts)
                world = int(self.shard[1])
                if s.batch_size % world:
                    raise ValueError(f"batch_size {s.batch_size} does not split over {world} processes: make it a "
                                     f"multiple of {world}")
                if self.shard_base and world > 1:
                    shard_frozen_base(module, adapters.all_parameters(), device or "cpu")
                trainer = Trainer(adapters, stages, data, lr=s.learning_rate, batch_size=s.batch_size // world,
                                  seed=s.seed, device=device, ema_decay=s.ema_decay,
                                  signature=s.signature(self.prompts), lr_schedule=s.lr_schedule, shard=self.shard)
                checkpointer = Checkpointer(s.checkpoint_every, self.save, saved_step=self._resume(trainer))
                trainer.callbacks = [checkpointer, *([StageSaver(self.save_stage)] if s.save_stages and s.method == "tscd" else []),
                                     *callbacks]
                with activation_checkpointing(module, s.gradient_checkpointing):
                    self._run(trainer, checkpointer, interrupts, free_memory, data)
                self.lora = self.lora_weights(trainer)
                return trainer
            finally:
                adapters.detach()

    def _resume(self, trainer: Trainer) -> int | None:
        """Load the saved state into ``trainer``; the step it was saved at, or None when nothing was
        resumed or the file on disk must be rewritten (its score settings changed).

        A state saved before the score stage began (a finished TSCD run, or one stopped in its TSCD
        stages) continues with any score-distillation settings: that is how score distillation is
        added to a TSCD run without training its stages again. The TSCD result it starts from is
        kept as the last stage's file."""
        if self.resume_state is None:
            return None
        s = self.settings
        saved_sig = self.resume_state.get("signature", {})
        tscd_end = trainer.stage_ends()[len(s.stages) - 1]  # the step after which the TSCD stages are done
        free = SCORE_SETTINGS if int(self.resume_state.get("step", 0)) <= tscd_end else ()
        try:
            trainer.load_state_dict(self.resume_state, free_settings=free)
        except ValueError as e:
            hint = (" (score-distillation settings can change only before the score stage has begun)"
                    if any(saved_sig.get(k) != trainer.signature.get(k) for k in SCORE_SETTINGS) else "")
            raise ValueError(f"cannot resume {self.files.lora}: {e}{hint}; use the same settings, turn 'resume' "
                             f"off or pick another output_name") from None
        log.info("HyperSD TSCD: resuming %s at step %d/%d", self.files.name, trainer.step, trainer.total_steps)
        if s.method == "feedback":  # files written again at the end: a finished run queued with another
            return None             # merge_ratio re-merges (the ratio is not part of the state)
        if saved_sig == trainer.signature:
            self._rewrite_step_files(trainer)
            return trainer.step
        log.info("HyperSD TSCD: %s continues its TSCD stages with new score-distillation settings", self.files.name)
        if s.save_stages:  # the TSCD result this continues from, if no stage file holds it yet
            for i, end in enumerate(trainer.stage_ends()[:len(s.stages)]):
                if end == trainer.step and end < trainer.total_steps and not self.files.stage_lora(i, s.stages[i]).exists():
                    self.save_stage(trainer, i)
        return None

    def _rewrite_step_files(self, trainer: Trainer) -> None:
        """The LoRA of the step a run resumes at and, at a stage's end, that stage's LoRA, written
        again from the state. A save writes the state first, so a process killed in the middle of
        one (SIGKILL, power loss) can leave that step's LoRA a step older, or its stage LoRA
        missing; resumed at that step, the run would not write them again (at its last step, not
        at all). They equal what the save was writing: the resumed weights are that step's."""
        if self.shard[0] != 0:
            return
        self.save_lora(trainer)
        if self.settings.save_stages:
            StageSaver(self.save_stage).on_step_end(trainer, trainer.last_loss, {})

    def _run(self, trainer: Trainer, checkpointer: Checkpointer, interrupts, free_memory, data: LatentData) -> None:
        try:
            trainer.run()
        except interrupts:
            checkpointer.save_unsaved(trainer)
            log.info("HyperSD TSCD: stopped at step %d; checkpoint %s", trainer.step, self.files.lora)
            raise
        except NonFiniteLossError as e:
            kept = (f"the last good checkpoint (step {checkpointer.saved_step}) is kept at {self.files.lora}"
                    if checkpointer.saved_step is not None else "no checkpoint had been saved yet")
            raise TrainingDiverged(f"HyperSD TSCD: {e}; {kept}") from None
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            trainer.optimizer.zero_grad(set_to_none=True)  # gradients are the largest thing freed here
            if free_memory is not None:
                free_memory()
            kept = self._keep_after_out_of_memory(trainer, checkpointer)
            raise TrainingOutOfMemory(out_of_memory_advice(trainer.step, trainer.total_steps, kept, self.settings,
                                                           shape=data.groups[0][0].shape)) from e

    def _keep_after_out_of_memory(self, trainer: Trainer, checkpointer: Checkpointer) -> str:
        kept = "no checkpoint had been saved yet"
        if checkpointer.saved_step is not None:
            kept = f"the checkpoint of step {checkpointer.saved_step} is kept at {self.files.lora}"
        try:  # the weights of the last finished step are intact: keep them too
            if checkpointer.save_unsaved(trainer):
                kept = f"the weights of step {trainer.step} are saved at {self.files.lora}"
        except Exception as save_error:  # out of memory again, or a full disk: keep the old file
            log.warning("HyperSD TSCD: could not save after running out of memory: %s", save_error)
        return kept

    # ------------------------------------------------------------------ files
    def metadata(self, trainer: Trainer, upto: int | None = None) -> dict[str, str]:
        """The LoRA's metadata; ``upto``: a stage file, holding stages ``0..upto`` (complete)."""
        ks = self.settings.stages
        done = ks if upto is None else ks[:upto + 1]
        return vocab.trained_metadata(
            method=self.settings.method, family=self.family, stages=done, settings=self.settings.file_settings(),
            step=trainer.step, total_steps=trainer.total_steps if upto is None else trainer.step,
            complete=upto is not None or trainer.step >= trainer.total_steps, rank=self.settings.rank,
            run_stages=ks if upto is not None else None, last_loss=trainer.last_loss,
            recipe_segments=1 if upto is None and self.settings.score_steps else None)

    def lora_weights(self, trainer: Trainer) -> dict:
        """The LoRA a loader applies: the student; for a feedback run, the frozen LoRA and the
        feedback LoRA at ``merge_ratio`` merged exactly (rank concatenation)."""
        own = trainer.adapters.kohya_state_dict(self.key_prefix)
        if self.settings.method != "feedback":
            return own
        return merge_cat(self.parts.base_lora, own, 1.0, self.settings.merge_ratio)

    def feedback_metadata(self, trainer: Trainer, merged: bool) -> dict[str, str]:
        """A feedback file's metadata: the frozen LoRA's (its recipe holds), plus what was trained."""
        s = self.settings
        md = {k: v for k, v in self.parts.base_metadata.items() if not k.startswith("ss_")}
        md.update({vocab.TRAINED_BY: vocab.PACK_NAME, vocab.FAMILY: md.get(vocab.FAMILY, self.family),
                   vocab.PREFIX + "feedback_on": s.feedback_on, vocab.PREFIX + "feedback_rewards": s.feedback_rewards,
                   vocab.PREFIX + "feedback_steps": vocab.format_stages(s.stages),
                   vocab.PREFIX + "feedback_step": str(trainer.step),
                   vocab.PREFIX + "feedback_total_steps": str(trainer.total_steps),
                   vocab.PREFIX + "feedback_eta": str(float(s.feedback_eta)),
                   vocab.PREFIX + "structure_weight": str(float(s.structure_weight)),
                   vocab.PREFIX + "feedback_scored_steps": s.scored_steps,
                   vocab.PREFIX + "feedback_anchor_weight": str(float(s.anchor_weight)),
                   **({vocab.PREFIX + "feedback_eta_by_steps": vocab.format_eta_by_steps(s.feedback_eta_by_steps)}
                      if s.feedback_eta_by_steps else {}),
                   vocab.PREFIX + "feedback_learning_rate": str(float(s.learning_rate)),
                   vocab.PREFIX + "feedback_rank": str(int(s.rank)),
                   "ss_network_module": "networks.lora"})
        if merged:
            md[vocab.PREFIX + "feedback_ratio"] = str(float(s.merge_ratio))
        else:
            md[vocab.PREFIX + "feedback_only"] = ("true: apply it on top of " + s.feedback_on.split("@")[0]
                                                  + ", or load the merged file")
        if trainer.step < trainer.total_steps:
            md[vocab.COMPLETE] = "false"
            md[vocab.STEP], md[vocab.TOTAL_STEPS] = str(trainer.step), str(trainer.total_steps)
        return md

    def save(self, trainer: Trainer) -> None:
        """The LoRA and the training state that resumes it, each written atomically (a feedback
        run: the merged LoRA and the feedback LoRA alone). Data parallel: rank 0 only."""
        if self.shard[0] != 0:
            return
        fileio.save_torch(self.files.state, trainer.state_dict())
        if self.files.legacy_state.exists():  # the run's state now lives under the new name
            self.files.legacy_state.unlink()
        self.save_lora(trainer)
        log.info("HyperSD TSCD: saved %s at step %d/%d", self.files.lora, trainer.step, trainer.total_steps)

    def save_lora(self, trainer: Trainer) -> None:
        """The LoRA of the trainer's step (a feedback run: the merged LoRA and the feedback alone)."""
        if self.settings.method == "feedback":
            own = trainer.adapters.kohya_state_dict(self.key_prefix)
            fileio.save_safetensors(self.files.feedback_lora, own, self.feedback_metadata(trainer, merged=False))
            merged = merge_cat(self.parts.base_lora, own, 1.0, self.settings.merge_ratio)
            md = self.feedback_metadata(trainer, merged=True)
            md["ss_network_dim"] = str(max(int(v.shape[0]) for k, v in merged.items() if k.endswith(".lora_down.weight")))
            fileio.save_safetensors(self.files.lora, merged, md)
        else:
            fileio.save_safetensors(self.files.lora, trainer.adapters.kohya_state_dict(self.key_prefix),
                                    self.metadata(trainer))

    def save_stage(self, trainer: Trainer, index: int) -> None:
        if self.shard[0] != 0:
            return
        k = self.settings.stages[index]
        path = self.files.stage_lora(index, k)
        fileio.save_safetensors(path, trainer.adapters.kohya_state_dict(self.key_prefix), self.metadata(trainer, index))
        log.info("HyperSD TSCD: stage %d (k=%d) done, its %d-step LoRA saved as %s", index + 1, k, k, path)


def out_of_memory_advice(step: int, total: int, kept: str, settings: TrainSettings, shape) -> str:
    """What to change after running out of memory, cheapest first."""
    tips = []
    if not settings.gradient_checkpointing:
        tips.append("turn on gradient_checkpointing and queue again: with resume on, training continues from "
                    "the saved step (about 0.7x the memory for about 1.2x the time)")
    if settings.batch_size > 1:
        tips.append(f"lower batch_size (now {settings.batch_size}; try {max(1, settings.batch_size // 2)}) with a "
                    f"new output_name or resume off: a different batch size starts a new run")
    if settings.lora_scope == "all":
        tips.append("set lora_scope to 'transformer' (fewer LoRA layers)")
    if settings.rank > 16:
        tips.append(f"lower rank (now {settings.rank})")
    tips.append(f"train on smaller images (latents now {'x'.join(str(int(v)) for v in shape[-2:])})")
    tips.append("close other workflows' models or restart ComfyUI so the model has the device to itself")
    return (f"HyperSD TSCD ran out of memory at step {step + 1}/{total}; {kept}. To fit: "
            + "; ".join(f"({i + 1}) {t}" for i, t in enumerate(tips)) + ".")
