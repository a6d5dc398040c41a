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


def setup(seed=0, stages=(2, 1), steps=3, lr=1e-3, callbacks=(), batch_size=3, shard=(0, 1)):
    """(net, adapters, trainer, eps_fn): TSCD on TinyEps over 6 random latents, one condition."""
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

    adapters = lora_train.LoraAdapters(net, lora_train.select_targets(net, "all"), rank=2, seed=seed)
    term = tscd.TSCDLoss(eps_fn, adapters, ab, teacher_cfg=3.0)
    gen = torch.Generator().manual_seed(5)
    data = LatentData([(torch.randn(6, 4, 8, 8, generator=gen), torch.randn(1, 8, generator=gen))])
    trainer = train.Trainer(adapters, tscd.progressive_stages(stages, steps, lambda k: [(1.0, term)]), data,
                           lr=lr, batch_size=batch_size, seed=seed, callbacks=list(callbacks), signature={"t": 1},
                           shard=shard)
    return net, adapters, trainer, eps_fn


def data_parallel_worker(rank: int, world: int, init_file: str, out: str) -> None:
    """One process of a ``gloo`` group (``torch.multiprocessing.spawn``): the tiny TSCD run with
    batch 3 per process; its LoRA and losses saved to ``out/<rank>.pt``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _, adapters, trainer, _ = setup(stages=(2, 1), steps=2, batch_size=3, shard=(rank, world))
        trainer.run()
        torch.save({"weights": adapters.weights(lora_train.STUDENT), "history": trainer.history}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()
