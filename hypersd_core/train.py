"""The training loop every method of the pack runs on, in plain torch.

A run is a list of :class:`Stage`; a stage holds weighted loss terms (TSCD's consistency
term; score distillation's term, :mod:`.dmd`, keeps its own fake score and optimizer in the
run's state; feedback terms join the same way). :class:`Trainer`
takes AdamW steps on the student adapter, keeps its EMA twin, checks that everything
stays finite, and calls :class:`Callback` hooks (progress, Cancel, checkpoints).

Every random draw of step ``i`` (batch, timesteps, noise) comes from a generator seeded
by ``(seed, i)`` alone, so a run resumed from :meth:`Trainer.state_dict` continues
exactly as an uninterrupted one.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .lora_train import EMA, STUDENT

STATE_FORMAT = "hypersd-train-state/1"
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class Batch:
    x0: torch.Tensor  # clean latents, (B, C, H, W), in the denoiser's latent space
    cond: Any = None  # passed through to the eps function
    step: int = 0
    backward_scale: float = 1.0  # the weight of the term being called (set by the trainer)
    rows: slice | None = None  # data-parallel: this process's rows of the global batch
    global_size: int | None = None  # data-parallel: the global batch size (every process's rows)
    all_reduce: Callable[[torch.Tensor], None] | None = None  # data-parallel: sums a tensor over the processes

    @property
    def draw_size(self) -> int:
        """How many rows a term draws random numbers for: the global batch (data parallel: every
        process draws what one process with the global batch would; the step's generator is the
        same everywhere), of which :meth:`mine` keeps this process's rows."""
        return self.global_size or self.x0.shape[0]

    def mine(self, drawn: torch.Tensor) -> torch.Tensor:
        """This process's rows of a tensor drawn for :attr:`draw_size` rows."""
        return drawn if self.rows is None else drawn[self.rows]

    @property
    def parallel(self) -> bool:
        """Several processes share the step (data parallel)."""
        return self.rows is not None

    def randn(self, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
        """Gaussian noise shaped as ``like`` (this process's rows), drawn for the global batch."""
        drawn = torch.randn((self.draw_size, *like.shape[1:]), generator=generator, dtype=torch.float32)
        return self.mine(drawn).to(like.device, like.dtype)

    def randint(self, low: int, high: int, generator: torch.Generator) -> torch.Tensor:
        """Integers in ``[low, high)``, one per row of this process, drawn for the global batch."""
        return self.mine(torch.randint(low, high, (self.draw_size,), generator=generator))

    def average(self, params, value: float) -> float:
        """Data parallel: the gradients of ``params`` and ``value`` (a loss) averaged over the
        processes, for a term's own optimizer (the student's the trainer averages); the average
        is the same everywhere, so a non-finite one stops every process alike. One process: as is."""
        if not self.parallel:
            return value
        world = self.draw_size // self.x0.shape[0]
        flag = torch.tensor([value], dtype=torch.float64)
        self.all_reduce(flag)
        average_gradients(params, self.all_reduce, world)
        return float(flag[0]) / world

    def backward_now(self, part: torch.Tensor) -> torch.Tensor:
        """Backpropagate ``part`` of a term's loss at once (times the term's weight), so that its
        activations are freed before the term builds the rest; returns ``part`` detached, for the
        term to add to the value it returns. Gradients accumulate with the trainer's backward."""
        (part * self.backward_scale).backward()
        return part.detach()


def average_gradients(params, all_reduce: Callable[[torch.Tensor], None], world: int) -> None:
    """Data parallel: each parameter's gradient summed over the ``world`` processes (every process
    the same tensors in the same order; a missing gradient counts as zeros) and divided by it."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        all_reduce(p.grad)
        p.grad /= world


class LossTerm(Protocol):
    """A loss of one stage: ``term(batch, stage, generator) -> (loss, logs)``. A term may
    backpropagate part of its loss itself (``batch.backward_now``) and return that part detached:
    the trainer zeroes the gradients before calling the terms."""

    def __call__(self, batch: Batch, stage: "Stage", generator: torch.Generator) -> tuple[torch.Tensor, dict]: ...


@dataclass
class Stage:
    """``steps`` optimizer steps with ``segments`` (k) and weighted loss ``terms``."""

    segments: int
    steps: int
    terms: list[tuple[float, LossTerm]] = field(default_factory=list)
    name: str = ""
    reset_ema: bool = True  # start the EMA target from the student when the stage begins

    def __post_init__(self):
        if not self.name:
            self.name = f"tscd-k{self.segments}"


class NonFiniteLossError(RuntimeError):
    """The loss, the gradients or the weights stopped being finite."""

    def __init__(self, step: int, stage: Stage, what: str):
        self.step, self.stage, self.what = step, stage, what
        super().__init__(f"training stopped: the {what} became NaN or infinite at step {step + 1} ({stage.name}); "
                         f"try a lower learning rate or the 'huber' loss")


class Callback:
    """Hooks of :class:`Trainer`. ``on_step_start`` may raise to stop (Cancel)."""

    def on_run_start(self, trainer: "Trainer") -> None: ...
    def on_stage_start(self, trainer: "Trainer", index: int, stage: Stage) -> None: ...
    def on_step_start(self, trainer: "Trainer") -> None: ...
    def on_step_end(self, trainer: "Trainer", loss: float, logs: dict) -> None: ...
    def on_end(self, trainer: "Trainer") -> None: ...


def check_lr_schedule(schedule: str) -> None:
    """Refuse a learning-rate schedule other than :data:`LR_SCHEDULES`, saying which there are."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}: use one of {', '.join(LR_SCHEDULES)}")


def learning_rate_at(base: float, schedule: str, step_in_stage: int, stage_steps: int, floor: float = 0.1,
                     warmup: int | None = None) -> float:
    """The learning rate of a stage's ``step_in_stage``-th step (0-based).

    ``constant``: ``base``. ``cosine``: a linear warm-up over ``warmup`` steps (default:
    the first 5% of the stage), then ``base * (floor + (1 - floor) * (1 + cos(pi * j / S)) / 2)``
    with ``j`` the steps since the warm-up and ``S`` the steps left after it, down to
    ``floor * base`` at the stage's last step, so every stage (and the LoRA saved at its end)
    finishes at a low rate.
    """
    check_lr_schedule(schedule)
    if schedule == "constant":
        return base
    S = max(int(stage_steps), 1)
    warm = max(1, S // 20) if warmup is None else max(1, int(warmup))
    j = min(max(int(step_in_stage), 0), S - 1)
    if j < warm:
        return base * (j + 1) / warm
    frac = (j - warm) / max(S - 1 - warm, 1)
    return base * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * frac)))


def step_seed(seed: int, step: int) -> int:
    return (int(seed) * 1_000_003 + int(step) * 7_919 + 12_345) % (2**63 - 1)


class Trainer:
    """Runs stages of weighted loss terms on the student adapter with AdamW and an EMA."""

    def __init__(self, adapters, stages: Sequence[Stage], data, *, lr: float, batch_size: int,
                 seed: int, device=None, dtype=torch.float32, ema_decay: float = 0.95, grad_clip: float = 1.0,
                 weight_decay: float = 0.0, callbacks: Sequence[Callback] = (), signature: dict | None = None,
                 lr_schedule: str = "constant", shard: tuple[int, int] = (0, 1),
                 all_reduce: Callable[[torch.Tensor], None] | None = None):
        self.adapters = adapters
        # Data parallel (``shard`` = (rank, world)): each process takes its ``batch_size`` rows of
        # a global batch of ``batch_size * world`` drawn from the step's seed, and the LoRA
        # gradients are averaged over processes (``all_reduce``: sums a tensor in place over
        # them; torch.distributed's by default) before the optimizer step, so every process
        # holds the same weights, equal to one process with the global batch.
        self.rank, self.world = int(shard[0]), int(shard[1])
        if not 0 <= self.rank < self.world:
            raise ValueError(f"shard {shard}: the rank must be in 0..world-1")
        if self.world > 1 and all_reduce is None:
            import torch.distributed as dist

            all_reduce = dist.all_reduce
        self.all_reduce = all_reduce
        self.stages = list(stages)
        unsharded = sorted({type(t).__name__ for s in self.stages for _, t in s.terms
                            if not getattr(t, "data_parallel", False)})
        if self.world > 1 and unsharded:
            raise ValueError(f"{', '.join(unsharded)} cannot be split over processes yet (its random numbers "
                             "are drawn per process); run it in one process")
        if not self.stages or any(s.steps < 0 for s in self.stages):
            raise ValueError("stages must be non-empty with non-negative step counts")
        self.data = data
        self.lr = float(lr)
        check_lr_schedule(lr_schedule)
        self.lr_schedule = lr_schedule
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.device = device if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.ema_decay = float(ema_decay)
        self.grad_clip = float(grad_clip)
        self.callbacks = list(callbacks)
        self.signature = dict(signature or {})
        self.optimizer = torch.optim.AdamW(adapters.student_parameters(), lr=self.lr, weight_decay=weight_decay)
        self.step = 0
        self.last_loss: float | None = None
        self.history: list[float] = []
        self.starts = []
        acc = 0
        for s in self.stages:
            self.starts.append(acc)
            acc += s.steps
        self.total_steps = acc

    def stage_at(self, step: int) -> tuple[int, Stage]:
        for i in range(len(self.stages) - 1, -1, -1):
            if step >= self.starts[i] and self.stages[i].steps > 0:
                return i, self.stages[i]
        return 0, self.stages[0]

    def stage_ends(self) -> list[int]:
        """The step after which each stage is done."""
        return [start + stage.steps for start, stage in zip(self.starts, self.stages)]

    def run(self) -> "Trainer":
        self.adapters.set_mode("student")
        for cb in self.callbacks:
            cb.on_run_start(self)
        while self.step < self.total_steps:
            step = self.step
            index, stage = self.stage_at(step)
            if step == self.starts[index]:
                if stage.reset_ema:
                    self.adapters.copy_student_to_ema()
                for cb in self.callbacks:
                    cb.on_stage_start(self, index, stage)
            for cb in self.callbacks:
                cb.on_step_start(self)
            loss, logs = self._one_step(step, stage, self.starts[index])
            self.step = step + 1
            self.last_loss = loss
            self.history.append(loss)
            for cb in self.callbacks:
                cb.on_step_end(self, loss, logs)
        for cb in self.callbacks:
            cb.on_end(self)
        return self

    def _one_step(self, step: int, stage: Stage, stage_start: int = 0) -> tuple[float, dict]:
        """1. draw the batch; 2. the stage's weighted terms, each backpropagated as soon as it is
        computed (gradients add up; one term's activations are held at a time); 3. check, clip and
        step; 4. EMA."""
        gen = torch.Generator().manual_seed(step_seed(self.seed, step))
        b, world = self.batch_size, self.world
        x0, cond = self.data.sample(b * world, gen, self.device, self.dtype)
        rows = slice(self.rank * b, (self.rank + 1) * b) if world > 1 else None
        batch = Batch(x0=x0 if rows is None else x0[rows], cond=cond, step=step, rows=rows,
                      global_size=b * world if world > 1 else None, all_reduce=self.all_reduce if world > 1 else None)
        total = None
        bad = False  # data parallel: a non-finite loss on any process stops them all, together
        logs: dict = {"stage": stage.name, "segments": stage.segments}
        self.optimizer.zero_grad(set_to_none=True)  # before the terms: they may backpropagate parts early
        for weight, term in stage.terms:
            batch.backward_scale = float(weight)
            try:
                value, extra = term(batch, stage, gen)
            except NonFiniteLossError as e:  # a term's own check (a part it backpropagated early)
                if world == 1:
                    raise
                self.adapters.set_mode("student")
                bad = e  # data parallel: every process learns of it in the average below, and all stop
                continue
            logs.update(extra)
            part = value * weight
            self.adapters.set_mode("student")  # the mode a recomputing (checkpointed) backward needs
            if not torch.isfinite(part.detach()).all():
                if world == 1:
                    raise NonFiniteLossError(step, stage, "loss")
                bad = bad or True
                continue
            if part.requires_grad:  # each term's graph is freed before the next term builds its own
                part.backward()
            total = part.detach() if total is None else total + part.detach()
        if world > 1:
            total = self._average(step, stage, total, bad)
        if total is None:
            raise ValueError(f"stage {stage.name} has no loss term")
        lr = learning_rate_at(self.lr, self.lr_schedule, step - stage_start, stage.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        params = self.adapters.student_parameters()
        if self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        if not math.isfinite(float(norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(step, stage, "gradient")
        self.optimizer.step()
        if not self.adapters.all_finite():
            raise NonFiniteLossError(step, stage, "LoRA weights")
        self.adapters.ema_update(self.ema_decay)
        logs["grad_norm"] = float(norm)
        logs["lr"] = lr
        return float(total.detach()), logs

    def _average(self, step: int, stage: Stage, total, bad) -> torch.Tensor:
        """Data parallel: the loss and the LoRA gradients averaged over the processes (every
        process sums the same tensors in the same order); a non-finite loss anywhere stops all
        (``bad``: True, or the error a term of this process raised, which it then raises)."""
        flags = torch.tensor([1.0 if bad or total is None else 0.0, float(total) if total is not None else 0.0],
                             dtype=torch.float64)
        self.all_reduce(flags)
        if flags[0] > 0:
            raise bad if isinstance(bad, NonFiniteLossError) else NonFiniteLossError(step, stage, "loss")
        average_gradients(self.adapters.student_parameters(), self.all_reduce, self.world)
        return (flags[1] / self.world).to(torch.float32)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything needed to continue: weights, EMA, optimizer state, step, signature."""
        return {
            "format": STATE_FORMAT,
            "step": int(self.step),
            "signature": dict(self.signature),
            "student": self.adapters.weights(STUDENT),
            "ema": self.adapters.weights(EMA),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "history": [float(x) for x in self.history],
            "terms": {key: term.state_dict() for key, term in self._stateful_terms()},
        }

    def _stateful_terms(self):
        """``("<stage>.<term>", term)`` for each loss term with its own state (score distillation's
        fake score and its optimizer)."""
        for i, stage in enumerate(self.stages):
            for j, (_, term) in enumerate(stage.terms):
                if hasattr(term, "state_dict"):
                    yield f"{i}.{j}", term

    def load_state_dict(self, sd: dict, free_settings: Collection[str] = ()) -> None:
        """Continue from ``sd``. Its signature must equal this run's, but for ``free_settings``:
        settings of stages the saved state has not begun (the caller checks that), such as the
        score-distillation settings added to a finished TSCD run. The loss terms of a stage not
        yet begun start fresh: they change only while their stage runs, so fresh equals saved."""
        if sd.get("format") != STATE_FORMAT:
            raise ValueError("not a Hyper-SD training state")
        saved_sig = sd.get("signature", {})
        diff = sorted(k for k in set(saved_sig) | set(self.signature)
                      if saved_sig.get(k) != self.signature.get(k) and k not in free_settings)
        if diff:
            raise ValueError(f"the saved training state was made with different settings ({', '.join(diff)})")
        step = int(sd["step"])
        self.adapters.load_weights(sd["student"], STUDENT)
        self.adapters.load_weights(sd["ema"], EMA)
        self.optimizer.load_state_dict(sd["optimizer"])
        saved_terms = sd.get("terms", {})
        for key, term in self._stateful_terms():
            if step <= self.starts[int(key.split(".")[0])]:
                continue  # its stage has not begun
            if key not in saved_terms:
                raise ValueError(f"the saved training state has no state for loss term {key} of this run")
            term.load_state_dict(saved_terms[key])
        self.step = step
        self.history = list(sd.get("history", []))
        self.last_loss = self.history[-1] if self.history else None


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu").clone()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# ---------------------------------------------------------------------- saving as the run goes


class Checkpointer(Callback):
    """Calls ``save(trainer)`` every ``every`` steps (0: never in between) and at the end."""

    def __init__(self, every: int, save: Callable[[Trainer], None], saved_step: int | None = None):
        self.every = int(every)
        self.save = save
        self.saved_step = saved_step

    def on_step_end(self, trainer, loss, logs):
        if self.every > 0 and trainer.step % self.every == 0:
            self._save(trainer)

    def on_end(self, trainer):
        if self.saved_step != trainer.step:
            self._save(trainer)

    def _save(self, trainer) -> None:
        self.save(trainer)
        self.saved_step = trainer.step

    def save_unsaved(self, trainer) -> bool:
        """After a stop (Cancel, out of memory): save the last finished step if it is not saved
        yet and its weights are finite; True when it saved."""
        if self.saved_step == trainer.step or not trainer.adapters.all_finite():
            return False
        self._save(trainer)
        return True


class StageSaver(Callback):
    """At the end of every stage but the last, ``save(trainer, index)`` (that stage's own result)."""

    def __init__(self, save: Callable[[Trainer, int], None]):
        self.save = save

    def on_step_end(self, trainer, loss, logs):
        for i, end in enumerate(trainer.stage_ends()[:-1]):
            if trainer.stages[i].steps > 0 and trainer.step == end:
                self.save(trainer, i)


# ---------------------------------------------------------------------- running out of memory


class TrainingOutOfMemory(torch.OutOfMemoryError):
    """Training ran out of device or host memory; the message says what to change.

    An ``OutOfMemoryError``, so a host that frees its models after one (ComfyUI) does so.
    """


def is_out_of_memory(e: BaseException) -> bool:
    """A device or host allocation failure (CUDA, MPS, XPU or the CPU allocator)."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text)
