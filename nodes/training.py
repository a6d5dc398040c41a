"""Training nodes: Hyper-SD TSCD distillation of the graph's own model into a LoRA.

``HyperSDTrainTSCD`` adapts ComfyUI's model to the plain-torch core
(``hypersd_core.tscd`` / ``hypersd_core.lora_train``):

* the model goes to the device with ``load_models_gpu(force_full_load=True)`` and the
  loop runs as a custom ``Sampler`` driven by a ``CFGGuider``, so conditioning, hooks,
  ControlNets and model patches act as in sampling; the teacher runs at the node's cfg
  (cond and uncond batched by ``calc_cond_batch``), student and EMA target at cfg 1;
* peft LoRA layers are put into the diffusion model for the run and taken out again
  afterwards (the base module is shared by every clone of the model);
* the LoRA is saved, atomically, into the first ``loras`` folder in kohya layout
  (``lora_unet_<diffusers name>.lora_down/lora_up/alpha``) with ``hypersd.*`` metadata;
  the optimizer state, EMA and step go to ``<name>.hypersd-state.pt`` beside it, which
  lets a later run with the same settings resume exactly where this one stopped.
"""
from __future__ import annotations

import logging
import math
import os
import time
import uuid

import torch

import comfy.lora
import comfy.model_management
import comfy.model_sampling
import comfy.samplers
import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..hypersd_core import lora_train, tscd

log = logging.getLogger(__name__)

STATE_SUFFIX = ".hypersd-state.pt"
PACK_NAME = "ComfyUI-HyperSD"
PROGRESS_EVENT = "hypersd.train.progress"
LOG_EVERY_S = 10.0  # how often training progress is written to the console log


class TrainingSaveError(RuntimeError):
    """The LoRA or its training state could not be written."""


class TrainingOutOfMemory(torch.OutOfMemoryError):
    """Training ran out of device or host memory; the message says what to change.

    An ``OutOfMemoryError`` so that ComfyUI treats it as one (it unloads its models after).
    """


# ---------------------------------------------------------------------- names and files


def safe_output_name(name: str) -> str:
    """The file stem for ``name``; refuses anything that is not a plain file name."""
    raw = (name or "").strip()
    if raw.lower().endswith(".safetensors"):
        raw = raw[: -len(".safetensors")]
    bad = ("/" in raw or "\\" in raw or "\x00" in raw or raw in ("", ".", "..") or raw.startswith(".")
           or ":" in raw or os.path.basename(raw) != raw)
    if bad:
        raise ValueError(f"output_name must be a plain file name without folders (like 'my_model_hypersd'), "
                         f"got {name!r}; the LoRA is always saved in the first 'loras' folder")
    return raw


def loras_dir() -> str:
    paths = folder_paths.get_folder_paths("loras")
    if not paths:
        raise TrainingSaveError("ComfyUI has no 'loras' folder configured")
    return paths[0]


def _atomic_write(path: str, write) -> None:
    """Write through ``write(tmp_path)`` then ``os.replace``; never leaves a partial ``path``."""
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.makedirs(folder, exist_ok=True)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            if os.path.exists(tmp):
                os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, Exception):  # OSError, or the safetensors writer's own error for the same causes
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise TrainingSaveError(f"could not save {path}: {why} (is the folder read-only or the disk full?); "
                                    f"any earlier file there is unchanged") from e
        raise


def save_lora_file(path: str, sd: dict, metadata: dict) -> None:
    import safetensors.torch

    _atomic_write(path, lambda tmp: safetensors.torch.save_file(sd, tmp, metadata=metadata))


def save_state_file(path: str, state: dict) -> None:
    _atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state_file(path: str) -> dict:
    with torch.inference_mode(False):  # the optimizer updates these tensors in place
        return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------- model adaptation


def key_prefix_map(model) -> dict[str, str]:
    """diffusion_model module path -> kohya key prefix, as ComfyUI's loader maps it back.

    Diffusers-style names (``lora_unet_down_blocks_0_attentions_0_proj_in``, the layout of
    the released Hyper-SD LoRAs) where ComfyUI knows them, ComfyUI's own path otherwise.
    """
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    out = {}
    try:
        diffusers = comfy.utils.unet_to_diffusers(model.model_config.unet_config)
    except Exception:  # not a UNet with a diffusers layout
        diffusers = {}
    for dk, ck in diffusers.items():
        if dk.endswith(".weight") and ck.endswith(".weight"):
            pre = "lora_unet_" + dk[: -len(".weight")].replace(".", "_")
            if key_map.get(pre) == f"diffusion_model.{ck}":
                out[ck[: -len(".weight")]] = pre
    return out


def _prefix_fn(prefixes: dict[str, str]):
    def fn(module_name: str) -> str:
        return prefixes.get(module_name) or "lora_unet_" + module_name.replace(".", "_")

    return fn


def model_family(model) -> str:
    """The model family in the pack's LoRA-metadata vocabulary (SD1.5, SD2, SDXL, ...)."""
    import comfy.supported_models as sm

    cfg = getattr(getattr(model, "model", None), "model_config", None)
    for cls_name, fam in (("SDXLRefiner", "SDXL-refiner"), ("SDXL", "SDXL"), ("SD15", "SD1.5"), ("SD20", "SD2")):
        cls = getattr(sm, cls_name, None)
        if cls is not None and isinstance(cfg, cls):
            return fam
    return type(cfg).__name__ if cfg is not None else "unknown"


def discrete_alphas_cumprod(model_sampling) -> torch.Tensor:
    """The teacher's 1000 alpha-bars; refuses models outside the discrete eps/v family."""
    ok = isinstance(model_sampling, comfy.model_sampling.ModelSamplingDiscrete) and isinstance(
        model_sampling, (comfy.model_sampling.EPS, comfy.model_sampling.V_PREDICTION)) and not isinstance(
        model_sampling, comfy.model_sampling.CONST)
    if not ok or getattr(model_sampling, "sigmas", None) is None:
        raise ValueError("TSCD distillation here supports discrete-time eps or v-prediction models "
                         "(SD1.x, SD2.x, SDXL and their fine-tunes); this model uses "
                         f"{type(model_sampling).__name__}")
    sig = model_sampling.sigmas.detach().float().cpu()
    return 1.0 / (1.0 + sig ** 2)


def make_eps_fn(guider, model_wrap, extra_args, sigmas_table: torch.Tensor, positives: list | None = None):
    """``eps_fn(x_t, t, cfg, cond)`` over ComfyUI's guider (VE space, returns denoised).

    With ``positives`` (the guider's processed positive conditionings, one per prompt),
    ``cond`` is the index of the batch's prompt and becomes the guider's positive.
    """
    sig_tab = sigmas_table.float()
    ab_tab = 1.0 / (1.0 + sig_tab ** 2)

    def eps_fn(x_t, t, cfg, cond):
        if positives is not None and cond is not None:
            guider.conds["positive"] = positives[int(cond)]
        t_cpu = t.detach().long().cpu()
        sigma = sig_tab[t_cpu].to(x_t.device, torch.float32)
        a = ab_tab[t_cpu].to(x_t.device, torch.float32).view(-1, *([1] * (x_t.dim() - 1)))
        x_ve = (x_t.float() / a.sqrt())
        guider.cfg = float(cfg)
        denoised = model_wrap(x_ve, sigma, **extra_args).float()
        return (x_ve - denoised) / sigma.view(-1, *([1] * (x_t.dim() - 1)))

    return eps_fn


class _LoopSampler(comfy.samplers.Sampler):
    """A Sampler whose ``sample`` runs the training loop inside the guider's set-up."""

    def __init__(self, fn):
        self.fn = fn

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.fn(model_wrap, extra_args)
        return torch.zeros_like(noise)


def latent_groups(latents) -> list[torch.Tensor]:
    """LATENT input (one dict, or a list of dicts) -> tensors grouped by shape."""
    items = latents if isinstance(latents, (list, tuple)) else [latents]
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for item in items:
        s = item["samples"] if isinstance(item, dict) else item
        if getattr(s, "is_nested", False):
            parts = list(s.unbind())
        else:
            parts = [s]
        for p in parts:
            if p.dim() == 3:
                p = p.unsqueeze(0)
            if p.dim() != 4:
                raise ValueError(f"training latents must be image latents (B, C, H, W); got shape {tuple(p.shape)}")
            by_shape.setdefault(tuple(p.shape[1:]), []).append(p.detach().float().cpu())
    groups = [torch.cat(v, 0) for v in by_shape.values()]
    if not groups or sum(g.shape[0] for g in groups) == 0:
        raise ValueError("no training latents: connect a LATENT (e.g. VAE Encode of your images)")
    return groups


def _digest(obj, h=None):
    """sha256 over the values of a tensor / conditioning structure (for a canonical order)."""
    import hashlib

    h = h or hashlib.sha256()
    if isinstance(obj, torch.Tensor):
        t = obj.detach().float().cpu().contiguous()
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            _digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        h.update(b"[%d" % len(obj))
        for v in obj:
            _digest(v, h)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(repr(obj).encode())
    else:  # hooks, ControlNets, ...: identity is all we can compare
        h.update(f"{type(obj).__name__}@{id(obj)}".encode())
    return h


def paired_latent_groups(latents, positives) -> tuple[list[tuple[torch.Tensor, int]], list]:
    """Latents with one positive conditioning each -> ``([(latents, prompt index)], prompts)``.

    ``latents`` is a list of LATENTs and ``positives`` a list of CONDITIONINGs of the same
    length (what ComfyUI's *Make Training Dataset* gives: one caption per image). Latents
    with equal prompts (compared by value) and equal shapes train together; each training
    batch comes from one such group. Prompts and latents are put in a canonical order (by
    content), so the order a folder is listed in does not change the trained LoRA.
    """
    items = latents if isinstance(latents, (list, tuple)) else [latents]
    if len(items) != len(positives):
        raise ValueError(f"{len(positives)} positive conditionings for {len(items)} latents: connect one positive "
                         f"(used for every latent) or one per latent, in the same order (e.g. the two lists of "
                         f"'Make Training Dataset')")
    prompt_of: dict[str, object] = {}
    members: dict[tuple, list[torch.Tensor]] = {}
    for item, cond in zip(items, positives):
        if not cond:
            raise ValueError("an empty positive conditioning was given for a latent")
        key = _digest(cond).hexdigest()
        prompt_of.setdefault(key, cond)
        for g in latent_groups(item):
            members.setdefault((key, tuple(g.shape[1:])), []).extend(g.unbind(0))
    keys = sorted(prompt_of)
    index = {k: i for i, k in enumerate(keys)}
    groups = []
    for (key, shape) in sorted(members, key=lambda ks: (index[ks[0]], ks[1])):
        rows = sorted(members[(key, shape)], key=lambda r: _digest(r).hexdigest())
        groups.append((torch.stack(rows, 0), index[key]))
    return groups, [prompt_of[k] for k in keys]


# ---------------------------------------------------------------------- callbacks


class _ComfyProgress(tscd.Callback):
    def __init__(self, total: int, node_id, start: int):
        self.pbar = comfy.utils.ProgressBar(max(total, 1))
        self.node_id = node_id
        self.total = total
        self.t0 = time.monotonic()
        self.start = start
        self._last_text = 0.0
        self._last_log = 0.0
        if start:
            self.pbar.update_absolute(start, max(total, 1))

    def on_step_start(self, trainer):
        comfy.model_management.throw_exception_if_processing_interrupted()

    def on_step_end(self, trainer, loss, logs):
        self.pbar.update_absolute(trainer.step, max(self.total, 1))
        now = time.monotonic()
        if now - self._last_text < 0.25 and trainer.step < self.total:
            return
        self._last_text = now
        rate = (trainer.step - self.start) / max(now - self.t0, 1e-9)
        text = (f"step {trainer.step}/{self.total} · {logs.get('stage', '')} · loss {loss:.5f} · "
                f"{rate:.2f} it/s")
        if now - self._last_log >= LOG_EVERY_S or trainer.step >= self.total:
            self._last_log = now  # the console shows progress too, every LOG_EVERY_S seconds
            log.info("HyperSD TSCD: %s", text)
        try:
            from server import PromptServer

            srv = getattr(PromptServer, "instance", None)
        except Exception:
            srv = None
        if srv is not None and self.node_id is not None:
            try:
                srv.send_progress_text(text, self.node_id)
                srv.send_sync(PROGRESS_EVENT, {"node": str(self.node_id), "step": trainer.step, "total": self.total,
                                               "loss": loss, "stage": logs.get("stage", "")})
            except Exception as e:  # the UI is optional; training goes on
                log.debug("HyperSD TSCD: progress message failed: %s", e)


class _Checkpointer(tscd.Callback):
    def __init__(self, every: int, save):
        self.every = int(every)
        self.save = save
        self.saved_step: int | None = None

    def on_step_end(self, trainer, loss, logs):
        if self.every > 0 and trainer.step % self.every == 0:
            self.save(trainer)
            self.saved_step = trainer.step

    def on_end(self, trainer):
        if self.saved_step != trainer.step:
            self.save(trainer)
            self.saved_step = trainer.step

    def save_unsaved(self, trainer) -> bool:
        """After a stop (Cancel, out of memory): save the last finished step if it is not saved
        yet and its weights are finite; True when it saved."""
        if self.saved_step == trainer.step or not trainer.adapters.all_finite():
            return False
        self.save(trainer)
        self.saved_step = trainer.step
        return True


class _StageSaver(tscd.Callback):
    """At the end of every stage but the last, ``save(trainer, index)`` (that stage's own LoRA)."""

    def __init__(self, save):
        self.save = save

    def on_step_end(self, trainer, loss, logs):
        for i, stage in enumerate(trainer.stages[:-1]):
            if stage.steps > 0 and trainer.step == trainer.starts[i] + stage.steps:
                self.save(trainer, i)


def stage_file_stem(name: str, index: int, segments: int) -> str:
    """``<name>_stage<n>_k<k>``: the LoRA of stage ``n`` (1-based), trained down to ``k`` segments."""
    return f"{name}_stage{index + 1}_k{segments}"


def is_out_of_memory(e: BaseException) -> bool:
    """A device or host allocation failure (CUDA, MPS, XPU or the CPU allocator)."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text)


def out_of_memory_advice(step: int, total: int, kept: str, *, batch_size: int, rank: int, lora_scope: str,
                         gradient_checkpointing: bool, shape) -> str:
    """What to change after running out of memory, cheapest first."""
    tips = []
    if not gradient_checkpointing:
        tips.append("turn on gradient_checkpointing and queue again: with resume on, training continues from "
                    "the saved step (about 0.7x the memory for about 1.2x the time)")
    if batch_size > 1:
        tips.append(f"lower batch_size (now {batch_size}; try {max(1, batch_size // 2)}) with a new output_name "
                    f"or resume off: a different batch size starts a new run")
    if lora_scope == "all":
        tips.append("set lora_scope to 'transformer' (fewer LoRA layers)")
    if rank > 16:
        tips.append(f"lower rank (now {rank})")
    tips.append(f"train on smaller images (latents now {'x'.join(str(int(v)) for v in shape[-2:])})")
    tips.append("close other workflows' models or restart ComfyUI so the model has the device to itself")
    return (f"HyperSD TSCD ran out of memory at step {step + 1}/{total}; {kept}. To fit: "
            + "; ".join(f"({i + 1}) {t}" for i, t in enumerate(tips)) + ".")


# ---------------------------------------------------------------------- the work


def train_tscd(model, latents, positive, negative, *, stages: str = "8,4,2,1", steps_per_stage: int = 250,
               learning_rate: float = 1e-4, rank: int = 16, teacher_cfg: float = 7.0, seed: int = 0,
               output_name: str = "hypersd_tscd", checkpoint_every: int = 100, batch_size: int = 4,
               resume: bool = True, loss: str = "huber", lora_scope: str = "transformer",
               ema_decay: float = 0.95, gradient_checkpointing: bool = False, save_stages: bool = True,
               lr_schedule: str = "constant",
               node_id=None, callbacks: tuple = (), positive_per_latent: bool = False) -> tuple:
    """Train a TSCD LoRA for ``model``; returns ``(model_with_lora, lora_path, trainer)``.

    ``positive`` is one CONDITIONING for every latent, or with ``positive_per_latent`` a
    list of CONDITIONINGs, one per item of the list ``latents`` (see
    :func:`paired_latent_groups`). ``callbacks`` (``tscd.Callback``) run after the node's
    own (progress, Cancel, checkpoints). With ``save_stages``, the end of every stage but the
    last also writes that stage's LoRA (``<name>_stage<n>_k<k>``: the k-step LoRA, as the
    official release has one file per step count); the last stage's is ``<name>``.
    """
    name = safe_output_name(output_name)
    ks = tscd.parse_stages(stages)
    if steps_per_stage < 1:
        raise ValueError("steps_per_stage must be at least 1")
    if not (learning_rate > 0 and math.isfinite(learning_rate)):
        raise ValueError("learning_rate must be a positive number")
    folder = loras_dir()
    lora_path = os.path.join(folder, name + ".safetensors")
    state_path = os.path.join(folder, name + STATE_SUFFIX)
    if not positive:
        raise ValueError("connect a positive conditioning (the prompt the teacher is guided by)")
    if positive_per_latent:
        paired, prompts = paired_latent_groups(latents, positive)
    else:
        paired, prompts = [(g, None) for g in latent_groups(latents)], [positive]
    groups = [g for g, _ in paired]
    if not negative:
        raise ValueError("connect a negative conditioning (the teacher's classifier-free guidance needs it)")

    resume_state = None
    if resume and os.path.exists(state_path):
        try:
            resume_state = load_state_file(state_path)
        except Exception as e:
            raise ValueError(f"cannot resume: the training state {state_path} is unreadable ({e}); "
                             f"turn 'resume' off to start again or pick another output_name") from e
    elif resume and os.path.exists(lora_path):
        raise ValueError(f"{lora_path} exists but has no training state beside it, so it cannot be resumed; "
                         f"turn 'resume' off to replace it or pick another output_name")

    mp = model.clone()
    ms = mp.get_model_object("model_sampling")
    alphas_cumprod = discrete_alphas_cumprod(ms)
    sigmas_table = ms.sigmas.detach().float().cpu()
    family = model_family(mp)
    prefixes = _prefix_fn(key_prefix_map(mp.model))
    groups = [mp.model.process_latent_in(g) for g in groups]

    signature = {"method": "tscd", "stages": ",".join(map(str, ks)), "steps_per_stage": int(steps_per_stage),
                 "learning_rate": float(learning_rate), "rank": int(rank), "teacher_cfg": float(teacher_cfg),
                 "seed": int(seed), "batch_size": int(batch_size), "loss": loss, "lora_scope": lora_scope,
                 "ema_decay": float(ema_decay)}
    if len(prompts) > 1:
        signature["prompts"] = len(prompts)
    if lr_schedule != "constant":  # (absent for constant: states saved before the option existed still resume)
        signature["lr_schedule"] = lr_schedule
    result: dict = {}

    def metadata(trainer, upto: int | None = None) -> dict:
        """The file's metadata; ``upto``: a stage file, holding stages ``0..upto`` (complete)."""
        done = ks if upto is None else ks[:upto + 1]
        rec = tscd.recommended_settings(done[-1])
        md = {
            "hypersd.trained_by": PACK_NAME, "hypersd.method": "tscd", "hypersd.family": family,
            "hypersd.stages": ",".join(map(str, done)), "hypersd.steps_per_stage": str(steps_per_stage),
            "hypersd.rank": str(rank), "hypersd.alpha": str(float(rank)),
            "hypersd.teacher_cfg": str(float(teacher_cfg)), "hypersd.learning_rate": str(float(learning_rate)),
            "hypersd.seed": str(int(seed)), "hypersd.lora_scope": lora_scope, "hypersd.lr_schedule": lr_schedule,
            "hypersd.step": str(trainer.step),
            "hypersd.total_steps": str(trainer.total_steps if upto is None else trainer.step),
            "hypersd.complete": "true" if upto is not None or trainer.step >= trainer.total_steps else "false",
            "hypersd.recommended_steps": rec["steps"], "hypersd.recommended_cfg": rec["cfg"],
            "hypersd.recommended_sampler": rec["sampler"], "hypersd.recommended_eta": rec["eta"],
            "hypersd.recommended_schedule": rec["schedule"],
            "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(float(rank)),
        }
        if upto is not None:
            md["hypersd.run_stages"] = signature["stages"]  # the whole run this stage belongs to
        if trainer.last_loss is not None:
            md["hypersd.last_loss"] = f"{trainer.last_loss:.6g}"
        return md

    def save(trainer) -> None:
        sd = trainer.adapters.kohya_state_dict(prefixes)
        state = trainer.state_dict()
        save_state_file(state_path, state)
        save_lora_file(lora_path, sd, metadata(trainer))
        log.info("HyperSD TSCD: saved %s at step %d/%d", lora_path, trainer.step, trainer.total_steps)

    def save_stage(trainer, index: int) -> None:
        path = os.path.join(folder, stage_file_stem(name, index, ks[index]) + ".safetensors")
        save_lora_file(path, trainer.adapters.kohya_state_dict(prefixes), metadata(trainer, index))
        log.info("HyperSD TSCD: stage %d (k=%d) done, its %d-step LoRA saved as %s", index + 1, ks[index],
                 ks[index], path)

    def loop(model_wrap, extra_args):
        guider = loop.guider
        dm = mp.model.diffusion_model
        targets = lora_train.select_targets(dm, lora_scope)
        adapters = lora_train.LoraAdapters(dm, targets, rank=rank, seed=seed)
        try:
            positives = None
            if len(prompts) > 1:  # the guider processed every prompt; each batch picks its own
                positives = [guider.conds["positive"]] + [guider.conds[f"hypersd_positive_{i}"]
                                                          for i in range(1, len(prompts))]
            eps_fn = make_eps_fn(guider, model_wrap, extra_args, sigmas_table, positives)
            dev = mp.load_device
            term = tscd.TSCDLoss(eps_fn, adapters, alphas_cumprod.to(dev), teacher_cfg=teacher_cfg, loss=loss)
            data = tscd.LatentData([(g, c if len(prompts) > 1 else None) for g, (_, c) in zip(groups, paired)])
            stage_list = tscd.progressive_stages(ks, steps_per_stage, lambda k: [(1.0, term)])
            checkpointer = _Checkpointer(checkpoint_every, save)
            trainer = tscd.Trainer(adapters, stage_list, data, lr=learning_rate, batch_size=batch_size, seed=seed,
                                   device=dev, ema_decay=ema_decay, signature=signature,
                                   callbacks=[], lr_schedule=lr_schedule)
            if resume_state is not None:
                try:
                    trainer.load_state_dict(resume_state)
                except ValueError as e:
                    raise ValueError(f"cannot resume {lora_path}: {e}; use the same settings, turn 'resume' off "
                                     f"or pick another output_name") from None
                checkpointer.saved_step = trainer.step
                log.info("HyperSD TSCD: resuming %s at step %d/%d", name, trainer.step, trainer.total_steps)
            trainer.callbacks = [_ComfyProgress(trainer.total_steps, node_id, trainer.step), checkpointer,
                                 *([_StageSaver(save_stage)] if save_stages else []), *callbacks]
            result["trainer"] = trainer
            try:
                with lora_train.activation_checkpointing(dm, gradient_checkpointing):
                    trainer.run()
            except comfy.model_management.InterruptProcessingException:
                checkpointer.save_unsaved(trainer)
                log.info("HyperSD TSCD: cancelled at step %d; checkpoint %s", trainer.step, lora_path)
                raise
            except tscd.NonFiniteLossError as e:
                kept = (f"the last good checkpoint (step {checkpointer.saved_step}) is kept at {lora_path}"
                        if checkpointer.saved_step is not None else "no checkpoint had been saved yet")
                raise RuntimeError(f"HyperSD TSCD: {e}; {kept}") from None
            except Exception as e:
                if not is_out_of_memory(e):
                    raise
                trainer.optimizer.zero_grad(set_to_none=True)  # gradients are the largest thing freed here
                comfy.model_management.soft_empty_cache()
                kept = "no checkpoint had been saved yet"
                if checkpointer.saved_step is not None:
                    kept = f"the checkpoint of step {checkpointer.saved_step} is kept at {lora_path}"
                try:  # the weights of the last finished step are intact: keep them too
                    if checkpointer.save_unsaved(trainer):
                        kept = f"the weights of step {trainer.step} are saved at {lora_path}"
                except Exception as save_error:  # out of memory again, or a full disk: keep the old file
                    log.warning("HyperSD TSCD: could not save after running out of memory: %s", save_error)
                raise TrainingOutOfMemory(out_of_memory_advice(
                    trainer.step, trainer.total_steps, kept, batch_size=batch_size, rank=rank, lora_scope=lora_scope,
                    gradient_checkpointing=gradient_checkpointing, shape=groups[0].shape)) from e
            result["lora"] = adapters.kohya_state_dict(prefixes)
        finally:
            adapters.detach()

    sampler = _LoopSampler(loop)
    guider = comfy.samplers.CFGGuider(mp)
    conds = {"positive": prompts[0], "negative": negative}
    conds.update({f"hypersd_positive_{i}": p for i, p in enumerate(prompts) if i > 0})
    guider.inner_set_conds(conds)
    guider.set_cfg(1.0)
    loop.guider = guider
    shape = (min(batch_size, max(g.shape[0] for g in groups)),) + tuple(groups[0].shape[1:])
    with torch.inference_mode(False), torch.enable_grad():
        comfy.model_management.load_models_gpu([mp], memory_required=1e20, force_full_load=True)
        noise = torch.zeros(shape)
        dummy_sigmas = torch.stack([sigmas_table[-1], sigmas_table[0]])
        guider.sample(noise, torch.zeros(shape), sampler, dummy_sigmas, seed=seed, disable_pbar=True)

    out_model, _ = comfy.sd.load_lora_for_models(model, None, result["lora"], 1.0, 0)
    return out_model, lora_path, result["trainer"]


# ---------------------------------------------------------------------- node


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
            inputs=[
                io.Model.Input("model", tooltip="The model to distil (SD1.x, SD2.x, SDXL or a fine-tune). It is also "
                                                "the teacher: the LoRA is switched off for the teacher's prediction."),
                io.Latent.Input("latents", tooltip="Training images as latents (VAE Encode). One batch or several; "
                                                   "different sizes are trained in separate batches."),
                io.Conditioning.Input("positive", tooltip="Prompt conditioning for the teacher and the student: "
                                                          "one for every latent, or a list with one per latent "
                                                          "(e.g. 'Make Training Dataset' of captioned images)."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning for the teacher's classifier-free "
                                                          "guidance (baked into the LoRA)."),
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
                                         "(same settings needed); off replaces it."),
                io.Combo.Input("loss", options=["huber", "mse"], default="huber", optional=True,
                               tooltip="Distance between the student's jump and the EMA target's: pseudo-Huber "
                                       "(robust) or MSE (the paper)."),
                io.Combo.Input("lora_scope", options=["transformer", "all"], default="transformer", optional=True,
                               tooltip="Layers that get LoRA weights: the transformer blocks (attention, "
                                       "feed-forward, projections; the Hyper-SD layout) or every linear and "
                                       "convolution layer."),
                io.Float.Input("ema_decay", default=0.95, min=0.0, max=0.9999, step=0.001, optional=True,
                               tooltip="Decay of the EMA target's weights (0: the target is the student)."),
                io.Boolean.Input("gradient_checkpointing", default=False, optional=True,
                                 tooltip="Recompute activations in the backward pass: less memory, slower steps."),
                io.Combo.Input("lr_schedule", options=list(tscd.LR_SCHEDULES), default="constant", optional=True,
                               tooltip="Learning rate over each stage: constant, or cosine (a short warm-up, then "
                                       "down to a tenth of learning_rate at the stage's end, so every stage's "
                                       "LoRA is saved at a low rate)."),
                io.Boolean.Input("save_stages", default=True, optional=True,
                                 tooltip="Also save the LoRA of every stage but the last as "
                                         "<output_name>_stage<n>_k<k> (the k-step LoRA: sample it with k steps, "
                                         "DDIM trailing, cfg 1), as the official release has one file per step "
                                         "count. The last stage's LoRA is <output_name>."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the trained LoRA applied "
                                                              "(sample at cfg 1 with the recommended sampler)."),
                io.String.Output(display_name="lora_path", tooltip="Path of the saved LoRA file."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, latents, positive, negative, stages, steps_per_stage, learning_rate, rank,
                teacher_cfg, seed, output_name, checkpoint_every, batch_size, resume, loss=None,
                lora_scope=None, ema_decay=None, gradient_checkpointing=None, save_stages=None,
                lr_schedule=None) -> io.NodeOutput:
        first = lambda v, d=None: (v[0] if isinstance(v, list) and v else (d if v is None else v))  # noqa: E731
        positives = [p for p in (positive if isinstance(positive, list) else [positive]) if p is not None]
        per_latent = len(positives) > 1
        pos = positives if per_latent else first(positive)
        neg = first(negative)
        m, path, _ = train_tscd(
            first(model), latents, pos, neg, positive_per_latent=per_latent, stages=first(stages),
            steps_per_stage=first(steps_per_stage),
            learning_rate=first(learning_rate), rank=first(rank), teacher_cfg=first(teacher_cfg),
            seed=first(seed), output_name=first(output_name), checkpoint_every=first(checkpoint_every),
            batch_size=first(batch_size), resume=first(resume), loss=first(loss, "huber"),
            lora_scope=first(lora_scope, "transformer"), ema_decay=first(ema_decay, 0.95),
            gradient_checkpointing=first(gradient_checkpointing, False), save_stages=first(save_stages, True),
            lr_schedule=first(lr_schedule, "constant"), node_id=cls.hidden.unique_id)
        return io.NodeOutput(m, path)


NODES = [HyperSDTrainTSCD]
