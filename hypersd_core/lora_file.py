"""What a Hyper-SD file is, decided from its safetensors header and metadata alone.

Plain Python (json, struct, re; torch only for pickle files). Nothing here imports
ComfyUI, and no weight tensor is read to decide: the header gives key names, shapes and
dtypes; the only data read are the scalar ``.alpha`` values (4 bytes each).

What is reported (``LoraInfo``):

* ``kind``: ``lora``, ``unet`` (a whole diffusion model: the diffusers-format Hyper-SDXL
  one-step UNet, or a ComfyUI/LDM UNet), ``checkpoint`` (UNet + text encoder + VAE, like
  ``Hyper-SDXL-1step-Unet-Comfyui.fp16``) or ``unknown``.
* ``family``: ``SD1.5``, ``SDXL``, ``SD3``, ``FLUX`` or ``unknown``. From the key names
  (``single_transformer_blocks``/``single_blocks`` -> FLUX; ``joint_blocks`` or MMDiT
  attention without single blocks -> SD3; UNet blocks -> SD1.5/SDXL) and, for UNets, from
  the cross-attention width (``attn2.to_k`` input: 768 SD1.5, 2048 SDXL, 1024 SD2 which is
  reported as ``unknown``). The file name is only a hint; a disagreement is a warning.
* ``key_format``: ``kohya`` (``lora_unet_*`` with ``lora_down``/``lora_up``/``alpha``),
  ``peft`` (``lora_A``/``lora_B``, e.g. ``transformer.*``), ``diffusers`` (older
  ``*.lora.down.weight``/``*_lora.down.weight``), ``comfyui`` (``diffusion_model.*``,
  as ComfyUI's own trainer saves).
* ``rank`` (the largest; ``ranks`` lists all), ``alpha`` (the most common ``.alpha``; None
  when the file has none: ComfyUI then uses scale 1), ``modules`` (LoRA layers on the
  diffusion model), ``te_modules`` (layers on a text encoder; the loader ignores them).
* ``variant``: ``unified`` (Hyper-SD15/SDXL-1step-lora: TCD, 1 to 8 steps), ``nsteps``
  (2/4/8/16-step LoRAs: DDIM trailing, cfg 1), ``cfg`` (CFG-preserving LoRAs: cfg 5-8 and
  negative prompts), ``onestep_unet`` (one step from timestep 800), ``hypersd_trained``
  (trained by this pack), or ``unknown``; with the recommended ``steps``, ``cfg``, ``eta``,
  ``sampler`` (``tcd``/``ddim``/``euler``/``lcm``), ``schedule`` (``tcd``/``trailing``/
  ``simple``/``one_step``/``segments``), ``strength`` and, for FLUX, ``guidance``.

Files trained by this pack are recognised by their ``hypersd.*`` metadata, read through
``metadata.read_trained`` (the vocabulary the trainer writes with); every recommendation
comes from ``metadata.recipe_for``.
"""
from __future__ import annotations

import copy
import json
import os
import re
import struct
from collections import Counter
from dataclasses import asdict, dataclass, field

from . import metadata as vocab
from .metadata import Recipe

PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1, "F4": 1}
_ALPHA_FORMATS = {"F32": "<f", "F64": "<d", "F16": "<e", "I64": "<q", "I32": "<i"}


class LoraFileError(ValueError):
    """A file that cannot be used: empty, truncated, corrupt, or an unsafe pickle."""


# ----------------------------------------------------------------------------- reading


def read_safetensors_header(path: str) -> tuple[dict, dict, int]:
    """(tensors, metadata, data_start) from a safetensors file; checks it is complete.

    ``tensors`` maps name -> {"dtype", "shape", "data_offsets"}. Raises ``LoraFileError``
    with a sentence for an empty, truncated or corrupt file.
    """
    name = os.path.basename(path)
    size = os.path.getsize(path)
    if size == 0:
        raise LoraFileError(f"'{name}' is empty (0 bytes): the download or copy did not finish. Download it again.")
    if size < 8:
        raise LoraFileError(f"'{name}' is only {size} bytes: it is truncated or not a safetensors file.")
    with open(path, "rb", buffering=0) as f:  # unbuffered: exactly the header's bytes are read
        head = _read_exact(f, 8)
        (n,) = struct.unpack("<Q", head)
        if (n > MAX_HEADER_BYTES or 8 + n > size) and head.startswith((b"PK\x03\x04", b"\x80")):
            raise LoraFileError(f"'{name}' is not a valid safetensors file: it is a pickle/zip (.ckpt/.pt) file "
                                "with a .safetensors name. Use the real .safetensors release.")
        if n > MAX_HEADER_BYTES or n == 0:
            # the message never quotes the number: it is the file's first bytes (a linked file's content)
            raise LoraFileError(f"'{name}' is not a valid safetensors file (its first 8 bytes are no header "
                                "length); it may be a .ckpt/.pt renamed to .safetensors, or corrupt.")
        if 8 + n > size:
            raise LoraFileError(f"'{name}' is truncated: its header says it is longer than the whole file "
                                f"({size} bytes). Download it again.")
        raw = _read_exact(f, n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # ValueError: bad JSON, ints past 4300 digits
        raise LoraFileError(f"'{name}' has a corrupt safetensors header ({e.__class__.__name__}): "
                            "the file is damaged. Download it again.") from None
    if not isinstance(header, dict):
        raise LoraFileError(f"'{name}' has a corrupt safetensors header (not a JSON object).")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise LoraFileError(f"'{name}' has a corrupt safetensors header (its metadata is not text: "
                            "safetensors would refuse to load it). The file is damaged; download it again.")
    # 1. Every entry as safetensors itself checks it (so a file passed here also loads): a known
    #    dtype, a shape and two offsets of non-negative integers, a size that matches the shape.
    data_len = size - 8 - n
    spans = []
    for key, t in header.items():
        try:
            begin, end = t["data_offsets"]
            shape = list(t["shape"])
            width = _DTYPE_BYTES[t["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise LoraFileError(f"'{name}' has a corrupt safetensors header (entry '{_short(key)}').") from None
        if not all(type(v) is int and v >= 0 for v in (begin, end, *shape)):  # no floats, bools, infinities
            raise LoraFileError(f"'{name}' has a corrupt safetensors header (entry '{_short(key)}').")
        count = 1
        for s in shape:
            count *= s
        nbytes = count // 2 if t["dtype"] == "F4" else count * width  # F4: two values a byte
        if end < begin or end - begin != nbytes or t["dtype"] == "F4" and count % 2:
            raise LoraFileError(f"'{name}' has a corrupt safetensors header (size of '{_short(key)}').")
        spans.append((begin, end, key))
    need = max((end for _, end, _ in spans), default=0)
    if need > data_len:
        raise LoraFileError(f"'{name}' is truncated: its tensors need {need + 8 + n} bytes but the file has {size} "
                            f"({100.0 * size / (need + 8 + n):.0f}%). Download it again.")
    # 2. The tensors tile the data exactly, as safetensors requires: in offset order each begins
    #    where the one before ended, none overlaps another, and the last ends at the file's end.
    at = 0
    for begin, end, key in sorted(spans, key=lambda s: (s[0], s[1])):
        if begin != at:
            raise LoraFileError(f"'{name}' has a corrupt safetensors header ('{_short(key)}' "
                                f"{'overlaps another tensor' if begin < at else 'leaves a gap before it'}).")
        at = end
    if at != data_len:
        raise LoraFileError(f"'{name}' is not a valid safetensors file: {data_len - at} bytes follow its last "
                            "tensor. It is damaged; download it again.")
    return header, metadata, 8 + n


def _short(key, limit: int = 80) -> str:
    """A header key for a message: at most ``limit`` characters (a key may be megabytes long)."""
    key = str(key)
    return key if len(key) <= limit else key[:limit] + "..."


def _read_exact(f, n: int) -> bytes:
    """``n`` bytes from an unbuffered file (raw reads may return fewer than asked)."""
    parts, left = [], n
    while left > 0:
        chunk = f.read(left)
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _read_alphas(path: str, header: dict, data_start: int, keys: list[str]) -> dict[str, float]:
    """The scalar ``.alpha`` values: a seek and a read of their few bytes each, nothing else."""
    out = {}
    with open(path, "rb", buffering=0) as f:
        for k in keys:
            t = header[k]
            fmt = _ALPHA_FORMATS.get(t["dtype"])
            begin, end = t["data_offsets"]
            if fmt is None or end - begin != struct.calcsize(fmt):
                continue
            f.seek(data_start + begin)
            out[k] = float(struct.unpack(fmt, _read_exact(f, end - begin))[0])
    return out


def _read_pickle(path: str) -> dict:
    """Shapes of a pickled state dict, loaded with torch's weights-only unpickler on 'meta'."""
    import torch

    name = os.path.basename(path)
    if os.path.getsize(path) == 0:
        raise LoraFileError(f"'{name}' is empty (0 bytes): the download or copy did not finish.")
    try:
        sd = torch.load(path, map_location="meta", weights_only=True)
    except Exception as e:  # the unpickler says why; we only say what to do
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise LoraFileError(
            f"'{name}' was refused: it is a pickle file that cannot be loaded safely (weights only) "
            f"({first[:200]}). Convert it to .safetensors or use the .safetensors release.") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise LoraFileError(f"'{name}' holds no state dict.")
    return {str(k): {"dtype": str(v.dtype).replace("torch.", ""), "shape": list(v.shape)}
            for k, v in sd.items() if hasattr(v, "shape")}


# ----------------------------------------------------------------------------- keys

_LORA_SUFFIXES = (
    (".lora_down.weight", "down", "kohya"), (".lora_up.weight", "up", "kohya"), (".lora_mid.weight", "mid", "kohya"),
    (".lora_A.weight", "down", "peft"), (".lora_B.weight", "up", "peft"),
    (".lora_A.default.weight", "down", "peft"), (".lora_B.default.weight", "up", "peft"),
    (".lora.down.weight", "down", "diffusers"), (".lora.up.weight", "up", "diffusers"),
    ("_lora.down.weight", "down", "diffusers"), ("_lora.up.weight", "up", "diffusers"),
    (".lora_linear_layer.down.weight", "down", "diffusers"), (".lora_linear_layer.up.weight", "up", "diffusers"),
    (".alpha", "alpha", None),
)
_TE_PREFIXES = ("lora_te", "text_encoder", "te1.", "te2.", "text_encoders.", "lora_prior_te")


def _split(key: str):
    for suf, part, fmt in _LORA_SUFFIXES:
        if key.endswith(suf):
            return key[: -len(suf)], part, fmt
    return None, None, None


def _flat(module: str) -> str:
    return module.replace(".", "_")


def _family_from_modules(flat_names: list[str], context_dims: Counter) -> tuple[str, str]:
    """(family, reason) from flattened module names and shapes."""
    joined = "\n".join(flat_names)
    if re.search(r"single_transformer_blocks_|single_blocks_|double_blocks_", joined):
        return "FLUX", "single/double transformer blocks"
    if "joint_blocks_" in joined or "context_block" in joined:
        return "SD3", "joint (MMDiT) blocks"
    if re.search(r"(^|_)transformer_blocks_\d+_(attn_add_[qkv]_proj|ff_context|norm1_context)", joined):
        return "SD3", "MMDiT blocks without single blocks"
    unet = re.search(r"(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)_", joined)
    if unet:
        if context_dims:
            ctx = context_dims.most_common(1)[0][0]
            if ctx == 768:
                return "SD1.5", "UNet with 768-wide cross-attention"
            if ctx == 2048:
                return "SDXL", "UNet with 2048-wide cross-attention"
            if ctx == 1024:
                return "unknown", "SD2-like UNet (1024-wide cross-attention)"
            if ctx == 1280:
                return "unknown", "SDXL-refiner-like UNet (1280-wide cross-attention)"
        if re.search(r"down_blocks_2_attentions_\d_transformer_blocks_[2-9]|input_blocks_[78]_1_transformer_blocks_[1-9]"
                     r"|add_embedding|label_emb", joined):
            return "SDXL", "SDXL-only blocks"
        if re.search(r"down_blocks_0_attentions|input_blocks_[12]_1_", joined):
            return "SD1.5", "SD1.5-only attention blocks"
        return "unknown", "UNet of unknown size"
    return "unknown", "no known block names"


# ----------------------------------------------------------------------------- names

_NAME_PATTERNS = [
    # (regex on the normalised stem, family, variant, steps)
    (r"hyper-?sd(15|xl)-1-?step-unet", None, "onestep_unet", 1),
    (r"hyper-?sd(15|xl)-1-?steps?-lora", None, "unified", 1),
    (r"hyper-?sd(15|xl)-(\d+)-?steps?-cfg-lora", None, "cfg", None),
    (r"hyper-?sd(15|xl)-(\d+)-?steps?-lora", None, "nsteps", None),
    (r"hyper-?sd3-(\d+)-?steps?-cfg-lora", "SD3", "cfg", None),
    (r"hyper-?flux\.?1?-?dev-(\d+)-?steps?-lora", "FLUX", "nsteps", None),
]


def name_hint(file_name: str) -> dict | None:
    """Family, variant and steps an official Hyper-SD file name announces (None if not one)."""
    stem = os.path.basename(file_name).lower().replace("_", "-").replace(" ", "-")
    for pat, fam, variant, steps in _NAME_PATTERNS:
        m = re.search(pat, stem)
        if not m:
            continue
        groups = m.groups()
        if fam is None:
            fam = "SD1.5" if groups[0] == "15" else "SDXL"
            if steps is None:
                steps = int(groups[1])
        elif steps is None:
            steps = int(groups[0])
        return {"family": fam, "variant": variant, "steps": steps}
    return None


# ----------------------------------------------------------------------------- result


@dataclass
class LoraInfo:
    file_name: str
    size_bytes: int
    container: str  # safetensors | pickle
    kind: str = "unknown"  # lora | unet | checkpoint | unknown
    family: str = "unknown"
    family_reason: str = ""
    key_format: str = "unknown"
    tensors: int = 0
    modules: int = 0
    te_modules: int = 0
    rank: int | None = None
    ranks: list = field(default_factory=list)
    alpha: float | None = None
    dtype: str | None = None
    variant: str = "unknown"
    variant_source: str = ""  # metadata | name | none
    official: bool = False
    steps: int = 4
    cfg: float = 1.0
    eta: float = 0.0
    sampler: str = "ddim"
    schedule: str = "trailing"
    strength: float = 1.0
    guidance: float | None = None
    eta_by_steps: list = field(default_factory=list)  # [[steps, eta], ...]: the file's own TCD eta per step count
    stages: list = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    warnings: list = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def recipe(self) -> Recipe:
        return Recipe(self.steps, self.cfg, self.sampler, self.schedule, self.eta, self.strength, self.guidance,
                      tuple((int(n), float(e)) for n, e in self.eta_by_steps))

    def use_recipe(self, recipe: Recipe) -> None:
        self.steps, self.cfg, self.sampler, self.schedule = recipe.steps, recipe.cfg, recipe.sampler, recipe.schedule
        self.eta, self.strength, self.guidance = recipe.eta, recipe.strength, recipe.guidance
        self.eta_by_steps = [[n, e] for n, e in recipe.eta_by_steps]

    def describe_variant(self) -> str:
        return {
            "unified": "unified 1-step LoRA (TCD, 1-8 steps)",
            "nsteps": f"{self.steps}-step LoRA",
            "cfg": f"{self.steps}-step CFG LoRA",
            "onestep_unet": "one-step UNet",
            "hypersd_trained": "LoRA trained with ComfyUI-HyperSD",
        }.get(self.variant, "unrecognised Hyper-SD variant")

    def summary(self) -> str:
        parts = [f"{self.file_name}: {self.family} {self.describe_variant()}"]
        if self.kind == "lora":
            r = f"rank {self.rank}" if self.rank else "rank ?"
            a = f", alpha {self.alpha:g}" if self.alpha is not None else ""
            parts.append(f"{self.key_format} keys, {self.modules} layers, {r}{a}")
        rec = f"{self.steps} steps, {self.sampler}"
        if self.sampler == "tcd":
            rec += f" eta {self.eta:g}"
        rec += f", {self.schedule} schedule, cfg {self.cfg:g}"
        if self.guidance is not None:
            rec += f", guidance {self.guidance:g}"
        parts.append(rec)
        return "; ".join(parts)


def inspect_header(file_name: str, size: int, container: str, header: dict, metadata: dict,
                   alphas: dict[str, float]) -> LoraInfo:
    """Build a ``LoraInfo`` from a parsed header (names, shapes, dtypes), metadata and alphas."""
    info = LoraInfo(file_name=file_name, size_bytes=size, container=container, tensors=len(header))
    info.metadata = {k: v for k, v in metadata.items() if k.startswith(vocab.PREFIX) or k in ("modelspec.architecture",)}
    keys = list(header)
    modules: dict[str, dict] = {}
    formats = Counter()
    dtypes = Counter()
    for k in keys:
        mod, part, fmt = _split(k)
        if mod is None:
            continue
        entry = modules.setdefault(mod, {})
        entry[part] = k
        if fmt:
            formats[fmt] += 1
        if part != "alpha":
            dtypes[header[k]["dtype"]] += 1
    lora_modules = {m: e for m, e in modules.items() if "down" in e or "up" in e}

    if lora_modules:
        info.kind = "lora"
        unet_mods = {m: e for m, e in lora_modules.items() if not m.startswith(_TE_PREFIXES)}
        info.te_modules = len(lora_modules) - len(unet_mods)
        info.modules = len(unet_mods)
        if any(m.startswith("diffusion_model.") for m in unet_mods):
            info.key_format = "comfyui"
        elif formats:
            info.key_format = formats.most_common(1)[0][0]
        ranks, ctx = Counter(), Counter()
        for m, e in unet_mods.items():
            down = header[e["down"]]["shape"] if "down" in e else None
            if down:
                ranks[int(down[0])] += 1
                fm = _flat(m)
                if re.search(r"attn2_to_[kv]$", fm) and len(down) >= 2:
                    ctx[int(down[1])] += 1
        info.ranks = sorted(ranks)
        info.rank = max(ranks) if ranks else None
        alpha_keys = [e["alpha"] for e in unet_mods.values() if "alpha" in e]
        vals = [alphas[k] for k in alpha_keys if k in alphas]
        if vals:
            info.alpha = Counter(vals).most_common(1)[0][0]
        info.dtype = dtypes.most_common(1)[0][0] if dtypes else None
        flat = [_flat(m) for m in unet_mods]
        info.family, info.family_reason = _family_from_modules(flat, ctx)
    else:
        flat = keys
        info.dtype = Counter(t["dtype"] for t in header.values()).most_common(1)[0][0] if header else None
        if any(k.startswith("model.diffusion_model.") for k in keys) and any(
                k.startswith(("first_stage_model.", "conditioner.", "cond_stage_model.")) for k in keys):
            info.kind, info.key_format = "checkpoint", "comfyui"
        elif "conv_in.weight" in header and any(k.startswith("down_blocks.") for k in keys):
            info.kind, info.key_format = "unet", "diffusers"
        elif any(k.startswith(("input_blocks.", "model.diffusion_model.", "diffusion_model.")) for k in keys):
            info.kind, info.key_format = "unet", "comfyui"
        if info.kind != "unknown":
            ctx = Counter()
            for k, t in header.items():
                if re.search(r"attn2[._]to_k[._]weight$", k) and len(t["shape"]) == 2:
                    ctx[int(t["shape"][1])] += 1
            info.family, info.family_reason = _family_from_modules([_flat(k) for k in flat], ctx)

    _decide_variant(info, metadata)
    if info.variant == "unknown" and info.kind == "lora":
        info.warnings.append("the file name does not say which Hyper-SD variant this is (renamed file?); "
                             f"assuming {info.steps} steps with {info.sampler} - set steps/sampler by hand if that is wrong")
    if info.kind == "lora" and info.te_modules:
        info.warnings.append(f"{info.te_modules} text-encoder layers are ignored (Hyper-SD patches the diffusion model only)")
    return info


def _decide_variant(info: LoraInfo, meta: dict) -> None:
    """Variant and recipe: this pack's metadata first, then the official file name."""
    hint = name_hint(info.file_name)
    if vocab.is_trained_by_pack(meta):
        info.variant, info.variant_source = "hypersd_trained", "metadata"
        trained = vocab.read_trained(meta, info.family)
        info.stages = trained.stages
        info.warnings.extend(trained.warnings)
        if trained.family_from_metadata:
            info.family, info.family_reason = trained.family, "metadata"
        info.use_recipe(trained.recipe)
        return
    steps = None
    if hint:
        info.variant, info.variant_source, info.official = hint["variant"], "name", True
        if info.family == "unknown" and info.kind != "unknown":
            info.family, info.family_reason = hint["family"], "file name"
        elif info.family != "unknown" and hint["family"] != info.family:
            info.warnings.append(f"the file name says {hint['family']} but its keys are {info.family}; "
                                 f"using {info.family}")
        if info.variant == "onestep_unet" and info.kind == "lora":
            info.warnings.append("the name says one-step UNet but the file holds a LoRA")
            info.variant = "unknown"
        steps = hint["steps"] if info.variant == hint["variant"] else None
    else:
        info.variant_source = "none"
    info.use_recipe(vocab.recipe_for(info.variant, info.family, steps))


def inspect_file(path: str, display_name: str | None = None) -> LoraInfo:
    """Inspect a LoRA/UNet/checkpoint file. Raises ``LoraFileError`` for unusable files."""
    name = display_name or os.path.basename(path)
    if not os.path.isfile(path):
        raise LoraFileError(f"'{name}' does not exist.")
    size = os.path.getsize(path)
    low = path.lower()
    if low.endswith(PICKLE_EXTENSIONS):
        return inspect_header(name, size, "pickle", _read_pickle(path), {}, {})
    header, metadata, data_start = read_safetensors_header(path)
    alpha_keys = [k for k in header if k.endswith(".alpha")]
    alphas = _read_alphas(path, header, data_start, alpha_keys) if alpha_keys else {}
    return inspect_header(name, size, "safetensors", header, metadata, alphas)


_cache: dict = {}


def inspect_cached(path: str, display_name: str | None = None) -> LoraInfo:
    """``inspect_file`` memoised on (path, size, mtime): a header is parsed once per file version."""
    st = os.stat(path)
    key = (os.path.abspath(path), display_name, st.st_size, st.st_mtime_ns)
    hit = _cache.get(key)
    if hit is None:
        hit = inspect_file(path, display_name)
        if len(_cache) > 256:
            _cache.clear()
        _cache[key] = hit
    return copy.deepcopy(hit)


def with_steps(info: LoraInfo, steps: int) -> LoraInfo:
    """A copy of ``info`` set to run ``steps`` steps (a TCD recipe's eta follows: the file's own
    ``eta_by_steps`` where it has one, else 1.0 at one step and 0.3 above)."""
    out = copy.deepcopy(info)
    out.use_recipe(info.recipe.with_steps(steps))
    return out
