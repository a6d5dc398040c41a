"""A tiny TSCD run in plain torch (a small conditional eps network, six random latents), for the
core tests and for data-parallel checks that start processes of their own (which import it by
name, so it lives here and not in a test module)."""
from __future__ import annotations

import torch

from . import PACK  # noqa: F401  (registers the pack's package)
from ComfyUI_HyperSD.hypersd_core import lora_train, train, tscd
from ComfyUI_HyperSD.hypersd_core.data import LatentData


class TinyEps(torch.nn.Module):
    """A small conditional eps predictor: conv net with a timestep and condition embedding."""

    def __init__(self, ch=4, width=16, cond_dim=8):
        super().__init__()
        self.t_emb = torch.nn.Linear(1, width)
        self.c_emb = torch.nn.Linear(cond_dim, width)
        self.conv_in = torch.nn.Conv2d(ch, width, 3, padding=1)
        self.mid = torch.nn.Linear(width, width)
        self.conv_out = torch.nn.Conv2d(width, ch, 3, padding=1)

    def forward(self, x, t, c):
        h = self.conv_in(x)
        e = self.t_emb((t.float() / 1000.0)[:, None]) + self.c_emb(c)
        h = torch.nn.functional.silu(h + e[:, :, None, None])
        h = self.mid(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.conv_out(torch.nn.functional.silu(h))


class TinyReward:
    """A differentiable reward of images in [0, 1] (their brightness) with a supervised loss."""

    name = "tiny"
    needs_labels = False

    def __call__(self, images, labels=None):
        return images.mean(dim=(1, 2, 3))

    def supervised_loss(self, images, labels=None):
        return (images - 0.5).pow(2).mean()


def score_stage(eps_fn, adapters, ab, data, *, global_batch: int, seed: int, steps: int = 2) -> train.Stage:
    """A score stage carrying every term the pipeline's may: distribution matching with its fake
    score (2 updates) and regression bank, the TSCD term, and feedback with the structure term."""
    from ComfyUI_HyperSD.hypersd_core import dmd, feedback

    bank = dmd.RegressionBank.build(eps_fn, adapters, ab, data, batches=2, batch_size=global_batch,
                                    teacher_cfg=3.0, ode_steps=3, seed=seed)
    score = dmd.DMDLoss(eps_fn, adapters, ab, teacher_cfg=3.0, fake_updates=2, fake_lr=1e-3,
                        regression_weight=0.5, bank=bank)
    fb = feedback.FeedbackLoss(eps_fn, adapters, ab, decode=lambda lat: torch.sigmoid(lat[:, :3]),
                               rewards=[feedback.RewardTerm(TinyReward(), margin=0.9)], sample_steps=2, eta=0.5,
                               structure_weight=0.2)
    tscd_term = tscd.TSCDLoss(eps_fn, adapters, ab, teacher_cfg=3.0)
    return train.Stage(segments=1, steps=steps, terms=[(1.0, score), (0.5, tscd_term), (0.3, fb)], name="score",
                       reset_ema=False)


def setup(seed=0, stages=(2, 1), steps=3, lr=1e-3, callbacks=(), batch_size=3, shard=(0, 1), score=False):
    """(net, adapters, trainer, eps_fn): TSCD on TinyEps over 6 random latents, one condition
    (``score``: then a score stage with every term, :func:`score_stage`)."""
    torch.manual_seed(1234)  # the toy network's own init (the adapters do not use the global RNG)
    net = TinyEps()
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    ab = torch.cumprod(1 - betas, 0)
    uncond = torch.zeros(1, 8)

    def eps_fn(x, t, cfg, cond):
        c = cond.expand(x.shape[0], -1)
        e = net(x, t, c)
        if cfg == 1.0:
            return e
        eu = net(x, t, uncond.expand(x.shape[0], -1))
        return eu + cfg * (e - eu)

    adapters = lora_train.LoraAdapters(net, lora_train.select_targets(net, "all"), rank=2, seed=seed, fake=score)
    term = tscd.TSCDLoss(eps_fn, adapters, ab, teacher_cfg=3.0)
    gen = torch.Generator().manual_seed(5)
    data = LatentData([(torch.randn(6, 4, 8, 8, generator=gen), torch.randn(1, 8, generator=gen))])
    all_stages = tscd.progressive_stages(stages, steps, lambda k: [(1.0, term)])
    if score:
        all_stages.append(score_stage(eps_fn, adapters, ab, data, global_batch=batch_size * shard[1], seed=seed))
    trainer = train.Trainer(adapters, all_stages, data, lr=lr, batch_size=batch_size, seed=seed,
                            callbacks=list(callbacks), signature={"t": 1}, shard=shard)
    return net, adapters, trainer, eps_fn


def data_parallel_worker(rank: int, world: int, init_file: str, out: str, score: bool = False) -> None:
    """One process of a ``gloo`` group (``torch.multiprocessing.spawn``): the tiny TSCD run (and
    with ``score`` its score stage) with batch 3 per process; its LoRA, fake score and losses
    saved to ``out/<rank>.pt``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _, adapters, trainer, _ = setup(stages=(2, 1), steps=2, batch_size=3, shard=(rank, world), score=score)
        trainer.run()
        torch.save({"weights": adapters.weights(lora_train.STUDENT), "history": trainer.history,
                    "fake": adapters.weights(lora_train.FAKE) if score else {}}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()
