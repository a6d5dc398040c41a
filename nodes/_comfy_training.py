"""Running the core's training inside ComfyUI's sampling machinery.

The model goes to the device with ``load_models_gpu(force_full_load=True)`` and the run
happens inside ``CFGGuider.sample`` (a :class:`TrainingSampler` whose ``sample`` trains),
so conditioning, hooks, ControlNets and model patches act as they do in sampling.
:class:`GuiderDenoiser` is the core's ``eps_fn`` over the guider: the teacher runs at its
cfg (cond and uncond batched by ComfyUI), student and EMA target at cfg 1.
"""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.samplers

from ..hypersd_core.data import LatentData
from ..hypersd_core.lora_train import make_autograd_safe
from ..hypersd_core.pipeline import TrainingRun

EXTRA_PROMPT = "hypersd_positive_{}"  # guider condition names of the 2nd, 3rd, ... prompt


class GuiderDenoiser:
    """``eps_fn(x_t, t, cfg, cond)`` (variance-preserving ``x_t``, integer ``t``) over a guider.

    ``positives``: the guider's processed positive conditionings, one per prompt; a batch's
    ``cond`` is then the index of its prompt. ComfyUI's models work in sigma space and
    return the denoised latent: ``x = x_t / sqrt(a_t)``, ``eps = (x - denoised) / sigma_t``.
    """

    def __init__(self, guider, extra_args: dict, sigmas_table: torch.Tensor, positives: list | None = None):
        self.guider = guider
        self.extra_args = extra_args
        self.sigmas = sigmas_table.float()
        self.alphas = 1.0 / (1.0 + self.sigmas ** 2)
        self.positives = positives

    def __call__(self, x_t, t, cfg, cond):
        if self.positives is not None and cond is not None:
            self.guider.conds["positive"] = self.positives[int(cond)]
        t_cpu = t.detach().long().cpu()
        shape = (-1,) + (1,) * (x_t.dim() - 1)
        sigma = self.sigmas[t_cpu].to(x_t.device, torch.float32)
        a = self.alphas[t_cpu].to(x_t.device, torch.float32).view(shape)
        x = x_t.float() / a.sqrt()
        self.guider.cfg = float(cfg)
        denoised = self.guider(x, sigma, **self.extra_args).float()
        return (x - denoised) / sigma.view(shape)


class TrainingSampler(comfy.samplers.Sampler):
    """A Sampler whose ``sample`` runs a training run inside the guider's set-up."""

    def __init__(self, run: TrainingRun, module, data: LatentData, n_prompts: int, callbacks: list, device,
                 sigmas_table: torch.Tensor):
        self.run, self.module, self.data, self.n_prompts = run, module, data, n_prompts
        self.callbacks, self.device, self.sigmas_table = callbacks, device, sigmas_table
        self.trainer = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        guider = model_wrap  # CFGGuider passes itself
        positives = None
        if self.n_prompts > 1:  # the guider processed every prompt; each batch picks its own
            positives = [guider.conds["positive"]] + [guider.conds[EXTRA_PROMPT.format(i)]
                                                      for i in range(1, self.n_prompts)]
        eps_fn = GuiderDenoiser(guider, extra_args, self.sigmas_table, positives)
        self.trainer = self.run.train(self.module, eps_fn, self.data, device=self.device, callbacks=self.callbacks,
                                      interrupts=(comfy.model_management.InterruptProcessingException,),
                                      free_memory=comfy.model_management.soft_empty_cache)
        return torch.zeros_like(noise)


def train_in_comfy(patcher, run: TrainingRun, data: LatentData, prompts: list, negative, callbacks: list):
    """Load ``patcher`` fully onto its device and run ``run`` there through a CFGGuider; returns the trainer."""
    guider = comfy.samplers.CFGGuider(patcher)
    conds = {"positive": prompts[0], "negative": negative}
    conds.update({EXTRA_PROMPT.format(i): p for i, p in enumerate(prompts) if i > 0})
    guider.inner_set_conds(conds)
    guider.set_cfg(1.0)
    sigmas = patcher.get_model_object("model_sampling").sigmas.detach().float().cpu()
    sampler = TrainingSampler(run, patcher.model.diffusion_model, data, len(prompts), callbacks, patcher.load_device,
                              sigmas)
    biggest = max(g.shape[0] for g, _ in data.groups)
    shape = (min(run.settings.batch_size, biggest),) + tuple(data.groups[0][0].shape[1:])
    with torch.inference_mode(False), torch.enable_grad():
        comfy.model_management.load_models_gpu([patcher], memory_required=1e20, force_full_load=True)
        # Built or moved under inference mode (the loaders, an earlier sampling on the GPU): normal
        # copies, or the first step fails with "Inference tensors do not track version counter".
        make_autograd_safe(patcher.model)
        guider.sample(torch.zeros(shape), torch.zeros(shape), sampler, torch.stack([sigmas[-1], sigmas[0]]),
                      seed=run.settings.seed, disable_pbar=True)
    return sampler.trainer
