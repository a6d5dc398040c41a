"""Trainable LoRA adapters on a denoiser through peft, with an EMA copy and a teacher mode.

One set of base weights serves three roles:

* **student**: base + the trained adapter (``hypersd``);
* **target**: base + a frozen second adapter (``hypersd_ema``) holding an exponential
  moving average of the student, updated with :meth:`LoraAdapters.ema_update`;
* **teacher**: base with the adapters switched off;
* **fake** (optional, ``fake=True``): base + a third adapter (``hypersd_fake``), the fake
  score of score distillation (:mod:`hypersd_core.dmd`), trained by its own optimizer. It
  starts as a no-op (peft's ``B = 0``), so at first it answers exactly as the teacher does.

Nothing is copied but the LoRA matrices. :meth:`LoraAdapters.detach` removes the peft
layers again and leaves the module tree exactly as it was, so a host that shares the
base module between several users (ComfyUI's model patcher clones do) sees no change.

Files use kohya's layout (``<prefix>.lora_down.weight``, ``<prefix>.lora_up.weight``,
``<prefix>.alpha``); the caller gives the module-path -> key-prefix map, so this module
knows nothing about a particular host's naming.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn


STUDENT = "hypersd"
EMA = "hypersd_ema"
FAKE = "hypersd_fake"
LORA_SCOPES = ("transformer", "all")

# Module names inside the transformer blocks of SD-style UNets (attention, feed-forward,
# projections): the layout of the released Hyper-SD LoRAs.
_TRANSFORMER_PARTS = ("attn1.", "attn2.", ".ff.", "proj_in", "proj_out")


def check_scope(scope: str) -> None:
    """Refuse a LoRA scope other than :data:`LORA_SCOPES`, saying which there are."""
    if scope not in LORA_SCOPES:
        raise ValueError(f"unknown LoRA scope {scope!r}: use 'transformer' or 'all'")


def select_targets(module: nn.Module, scope: str = "transformer") -> list[str]:
    """Names of the ``nn.Linear``/``nn.Conv2d`` layers of ``module`` to adapt.

    ``scope="transformer"``: layers inside the transformer blocks (attention, feed-forward,
    proj_in/proj_out), as the released Hyper-SD LoRAs. ``scope="all"``: every linear and
    convolution layer (resnet convolutions, time embedding, input and output convolutions).
    """
    check_scope(scope)
    names = []
    for name, m in module.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or not name:
            continue
        if scope == "all" or any(p in f".{name}" for p in _TRANSFORMER_PARTS):
            names.append(name)
    return names


def kohya_prefix(prefixes: Mapping[str, str] | None = None) -> Callable[[str], str]:
    """``module path -> kohya key prefix``: ``prefixes`` where it names the module (the host's
    diffusers-style names, as the released Hyper-SD files use), else ``lora_unet_`` + the path
    with dots as underscores, which ComfyUI's LoRA loader maps back to the same module."""
    table = dict(prefixes or {})

    def prefix(module_name: str) -> str:
        return table.get(module_name) or "lora_unet_" + module_name.replace(".", "_")

    return prefix


def untracked(t: torch.Tensor) -> bool:
    """Whether autograd cannot use ``t``: an inference tensor, or a parameter created under
    ``torch.inference_mode`` whose data was replaced outside it (``module.to(device or dtype)``
    does that: the parameter no longer says it is an inference tensor, yet it still has no
    version counter, and any later use raises "Inference tensors do not track version counter")."""
    if t.is_inference():
        return True
    try:
        t._version
    except RuntimeError:
        return True
    return False


def make_autograd_safe(module: nn.Module) -> int:
    """Replace inference tensors (weights loaded under ``torch.inference_mode``) by normal copies.

    Autograd cannot save inference tensors for the backward pass, and a host may have
    loaded the base weights in inference mode, or built them so and moved them to the GPU
    afterwards (:func:`untracked`: on a GPU every weight is such a tensor). The copies hold
    the same values; each old tensor is released as its copy takes its place, so the peak is
    one tensor more. Returns how many tensors were replaced.
    """
    n = 0
    with torch.inference_mode(False), torch.no_grad():
        for mod in module.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None and untracked(p):
                    mod._parameters[name] = nn.Parameter(p.clone(), requires_grad=False)
                    n += 1
            for name, b in list(mod._buffers.items()):
                if b is not None and untracked(b):
                    mod._buffers[name] = b.clone()
                    n += 1
    return n


def keep_on(module: nn.Module, device) -> bool:
    """Put a frozen module that a host may move on its own (ComfyUI offloads models to the CPU when
    it loads another, and moves them under inference mode) back on ``device``, its tensors ones
    autograd can use (:func:`make_autograd_safe`; same values). Returns whether anything moved:
    when all is in place it only looks."""
    device = torch.device(device)
    tensors = [*module.parameters(), *module.buffers()]
    if all(_same_device(t.device, device) and not untracked(t) for t in tensors):
        return False
    with torch.inference_mode(False):
        module.to(device)
        make_autograd_safe(module)
        for p in module.parameters():
            p.requires_grad_(False)
    return True


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index == b.index or a.index is None or b.index is None)


def _lora_layers(module: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoraLayer)]


class LoraAdapters:
    """A student LoRA and its EMA twin injected into ``module`` (in place) with peft.

    ``rank`` and ``alpha`` follow kohya: the update is ``up @ down * alpha / rank``.
    Initialisation is seeded (``seed``) and independent of the global RNG state.
    """

    def __init__(self, module: nn.Module, targets: Iterable[str], rank: int, alpha: float | None = None,
                 seed: int = 0, dtype: torch.dtype = torch.float32, fake: bool = False):
        from peft import LoraConfig, inject_adapter_in_model

        self.module = module
        self.targets = list(targets)
        if not self.targets:
            raise ValueError("no layer to adapt: the model has no linear or convolution layer in the chosen scope")
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.rank = int(rank)
        self.alpha = float(alpha if alpha is not None else rank)
        make_autograd_safe(module)
        self._grad_flags = {n: p.requires_grad for n, p in module.named_parameters()}
        cfg = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=0.0, target_modules=self.targets,
                         init_lora_weights=True, bias="none")
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # peft warns that a second adapter joins the first: that is the design here.
            warnings.filterwarnings("ignore", message=".*peft_config.*")
            torch.manual_seed(seed)
            inject_adapter_in_model(cfg, module, adapter_name=STUDENT)
            inject_adapter_in_model(cfg, module, adapter_name=EMA)
            if fake:
                inject_adapter_in_model(cfg, module, adapter_name=FAKE)
        self.has_fake = bool(fake)
        self.layers = _lora_layers(module)
        for _, layer in self.layers:
            for name in (STUDENT, EMA, FAKE) if fake else (STUDENT, EMA):
                layer.lora_A[name].to(dtype)
                layer.lora_B[name].to(dtype)
        for p in module.parameters():
            p.requires_grad_(False)
        self._mode = None
        self.set_mode("student")
        self.copy_student_to_ema()
        self.attached = True

    # ------------------------------------------------------------------ modes
    def set_mode(self, mode: str) -> None:
        """``student`` (trainable adapter on), ``target`` (EMA adapter on), ``teacher`` (adapters off),
        ``fake`` (the fake-score adapter on and trainable; the student frozen)."""
        if mode == self._mode:
            return
        for _, layer in self.layers:
            if mode == "teacher":
                layer.enable_adapters(False)
            elif mode == "student":
                layer.enable_adapters(True)
                layer.set_adapter(STUDENT)
            elif mode == "target":
                layer.enable_adapters(True)
                layer.set_adapter(EMA, inference_mode=True)
            elif mode == "fake" and self.has_fake:
                layer.enable_adapters(True)
                layer.set_adapter(FAKE)
            elif mode == "fake":
                raise ValueError("these adapters have no fake score: create them with fake=True")
            else:
                raise ValueError(f"unknown adapter mode {mode!r}: use student, target, teacher or fake")
        if mode != "student":
            for p in self.student_parameters():
                p.requires_grad_(False)
        self._mode = mode

    @contextlib.contextmanager
    def mode(self, mode: str) -> Iterator[None]:
        prev = self._mode
        self.set_mode(mode)
        try:
            yield
        finally:
            self.set_mode(prev)

    # ------------------------------------------------------------------ weights
    def _named(self, adapter: str) -> Iterator[tuple[str, str, nn.Parameter]]:
        for name, layer in self.layers:
            yield name, "down", layer.lora_A[adapter].weight
            yield name, "up", layer.lora_B[adapter].weight

    def student_parameters(self) -> list[nn.Parameter]:
        return [p for _, _, p in self._named(STUDENT)]

    def ema_parameters(self) -> list[nn.Parameter]:
        return [p for _, _, p in self._named(EMA)]

    def all_parameters(self) -> list[nn.Parameter]:
        """Every adapter's matrices (student, EMA and, if any, the fake score)."""
        return [p for a in (STUDENT, EMA) + ((FAKE,) if self.has_fake else ()) for _, _, p in self._named(a)]

    def fake_parameters(self) -> list[nn.Parameter]:
        if not self.has_fake:
            raise ValueError("these adapters have no fake score: create them with fake=True")
        return [p for _, _, p in self._named(FAKE)]

    @torch.no_grad()
    def copy_student_to_ema(self) -> None:
        for s, e in zip(self.student_parameters(), self.ema_parameters()):
            e.copy_(s)

    @torch.no_grad()
    def ema_update(self, decay: float) -> None:
        for s, e in zip(self.student_parameters(), self.ema_parameters()):
            e.lerp_(s.to(e.dtype), 1.0 - decay)

    def all_finite(self) -> bool:
        return all(bool(torch.isfinite(p).all()) for p in self.student_parameters())

    def weights(self, adapter: str = STUDENT) -> dict[str, torch.Tensor]:
        """``{"<module>.down"|"<module>.up": tensor}`` (detached copies on the CPU, float32)."""
        return {f"{n}.{kind}": p.detach().to("cpu", torch.float32).clone() for n, kind, p in self._named(adapter)}

    @torch.no_grad()
    def load_weights(self, sd: Mapping[str, torch.Tensor], adapter: str = STUDENT) -> None:
        missing = []
        for n, kind, p in self._named(adapter):
            t = sd.get(f"{n}.{kind}")
            if t is None:
                missing.append(f"{n}.{kind}")
                continue
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"LoRA weight {n}.{kind} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            p.copy_(t.to(p))
        if missing:
            raise ValueError(f"LoRA weights missing for {len(missing)} layers, e.g. {missing[:3]}")

    def kohya_state_dict(self, key_prefix: Callable[[str], str], adapter: str = STUDENT,
                         dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The adapter in kohya layout; ``key_prefix(module_name)`` names each layer in the file."""
        out = {}
        for n, kind, p in self._named(adapter):
            pre = key_prefix(n)
            out[f"{pre}.lora_{kind}.weight"] = p.detach().to("cpu", dtype).contiguous().clone()
            if kind == "down":
                out[f"{pre}.alpha"] = torch.tensor(self.alpha, dtype=dtype)
        return out

    # ------------------------------------------------------------------ removal
    def detach(self) -> None:
        """Remove the peft layers: every adapted layer gets its original module back."""
        if not self.attached:
            return
        for name, layer in self.layers:
            parent_name, _, child = name.rpartition(".")
            parent = self.module.get_submodule(parent_name) if parent_name else self.module
            setattr(parent, child, layer.get_base_layer())
        for n, p in self.module.named_parameters():
            flag = self._grad_flags.get(n)
            if flag is None or p.requires_grad == flag:
                continue
            if p.is_inference():  # weights loaded under inference mode (as ComfyUI loads them)
                with torch.inference_mode():
                    p.requires_grad_(flag)
            else:
                p.requires_grad_(flag)
        if hasattr(self.module, "peft_config"):
            try:
                delattr(self.module, "peft_config")
            except AttributeError:
                pass
        self.layers = []
        self.attached = False


# ---------------------------------------------------------------------- checkpointing


def _is_container(m: nn.Module) -> bool:
    return isinstance(m, (nn.ModuleList, nn.Sequential, nn.ModuleDict))


def _leaf_blocks(module: nn.Module) -> list[nn.Module]:
    """The highest non-container sub-modules (UNet blocks called one by one)."""
    out = []
    for child in module.children():
        if _is_container(child):
            out.extend(_leaf_blocks(child))
        else:
            out.append(child)
    return out


@contextlib.contextmanager
def activation_checkpointing(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Recompute the activations of ``module``'s top blocks in the backward pass.

    Non-reentrant checkpointing (reentrant checkpointing silently stops LoRA weights
    training); it only acts when gradients are on, so frozen teacher and target passes
    run at normal speed.
    """
    if not enabled:
        yield
        return
    from torch.utils.checkpoint import checkpoint

    patched = []
    for block in _leaf_blocks(module):
        original = block.forward
        own = block.__dict__.get("forward")

        def fwd(*args, _orig=original, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(_orig, *args, use_reentrant=False, **kwargs)
            return _orig(*args, **kwargs)

        block.forward = fwd
        patched.append((block, own))
    try:
        yield
    finally:
        for block, own in patched:
            if own is not None:
                block.forward = own
            else:
                block.__dict__.pop("forward", None)


# ---------------------------------------------------------------------- sharding the frozen base


def parameter_bytes(module: nn.Module, exclude: Iterable[nn.Parameter] = ()) -> int:
    """Bytes of ``module``'s parameters but ``exclude`` held by this process (of a sharded one,
    its own shard)."""
    skip = {id(p) for p in exclude}
    total = 0
    for p in module.parameters():
        if id(p) not in skip:
            local = p.to_local() if hasattr(p, "to_local") else p
            total += local.numel() * local.element_size()
    return total


def shard_frozen_base(module: nn.Module, keep: Iterable[nn.Parameter], device) -> int:
    """Shard the frozen base of ``module`` over the processes with FSDP2; returns the bytes of
    the base this process then holds (:func:`parameter_bytes`, the adapters left out).

    Under ``torchrun`` with the default data parallelism every process holds the whole base;
    where the base and the training do not fit one device together,
    ``torch.distributed.fsdp.fully_shard`` cuts each top block's frozen weights
    (:func:`_leaf_blocks`, the UNet's ResBlocks and transformers; then the rest at the root) into
    one piece per process, gathers a block's weights just before its forward (and again before
    its backward) and frees them after. The adapters (``keep``: student, EMA,
    fake score) stay whole on every process, so everything that reads, averages, saves or resumes
    them works as with the whole base, and a run resumes with or without sharding; the LoRA is the
    same to float tolerance. The price is two weight all-gathers per block and pass. The process
    group must be initialised (``scripts/train.py`` does it). The module is sharded where it is
    (the host loaded it whole first) and stays sharded: the training command ends after training.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("sharding the base needs torch.distributed: start the command with torchrun")
    keep = set(keep)
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    for block in _leaf_blocks(module):
        own = list(block.parameters())
        if any(p not in keep for p in own):
            fully_shard(block, mesh=mesh, ignored_params={p for p in own if p in keep})
    fully_shard(module, mesh=mesh, ignored_params=keep)
    return parameter_bytes(module, exclude=keep)
