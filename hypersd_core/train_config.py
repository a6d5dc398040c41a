"""The training command's config file (TOML), checked before any process starts work.

    checkpoint = "path/to/model.safetensors"   # or "toy": the toy teacher set-up installs
    data = "path/to/folder"                     # images with a same-name .txt caption each, or "toy"
    output = "my_model_hypersd"                 # the LoRA's name (a file name, no folders)
    out_dir = "out/train"                       # where the LoRA and its training state go
    stages = "8,4,2,1"
    steps_per_stage = 250
    batch_size = 8                              # the global batch, split over the processes
    learning_rate = 1e-4
    rank = 16
    teacher_cfg = 7.0
    score_steps = 200                           # optional: score distillation after the stages
    ...

:func:`load` returns the settings with defaults filled in, or raises :class:`ConfigError`
naming the key and saying what to write (an unknown key, a value of the wrong type or out
of range, a path that does not exist). Plain Python; nothing here imports torch or ComfyUI.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

from .metadata import parse_stages


class ConfigError(ValueError):
    """A config file the command refuses; the message names the key."""


OPTIONAL = object()  # a key's default: left out of the settings when the file leaves it out

# key -> (type, default (None: required; OPTIONAL: the trainer's own), check(value) -> error or "")
def _range(lo, hi):
    return lambda v: "" if lo <= v <= hi else f"must be between {lo:g} and {hi:g}"


def _choice(*options):
    return lambda v: "" if v in options else f"must be one of {', '.join(options)}"


def _name(v):
    return "" if v and "/" not in v and "\\" not in v and v not in (".", "..") else "must be a file name without folders"


def _stages(v):
    try:
        parse_stages(v)
    except ValueError as e:
        return str(e)
    return ""


KEYS = {
    "checkpoint": (str, None, lambda v: ""),
    "data": (str, None, lambda v: ""),
    "output": (str, None, _name),
    "out_dir": (str, "out/train", lambda v: ""),
    "stages": (str, "8,4,2,1", _stages),
    "steps_per_stage": (int, 250, _range(1, 1_000_000)),
    "batch_size": (int, 8, _range(1, 65536)),
    "learning_rate": (float, 1e-4, lambda v: "" if 0 < v <= 1 else "must be above 0 and at most 1"),
    "rank": (int, 16, _range(1, 256)),
    "teacher_cfg": (float, 7.0, _range(1.0, 30.0)),
    "seed": (int, 0, _range(0, 2 ** 63 - 1)),
    "checkpoint_every": (int, 100, _range(0, 1_000_000)),
    "lora_scope": (str, "transformer", _choice("transformer", "all")),
    "lr_schedule": (str, "constant", _choice("constant", "cosine")),
    "resume": (bool, True, lambda v: ""),
    "per_digit": (int, 50, _range(1, 500)),  # data = "toy": training digits per class
    "shard_base": (bool, False, lambda v: ""),  # under torchrun: the frozen base sharded with FSDP2
    # score distillation after the TSCD stages (the unified LoRA); left out: the trainer's defaults
    "score_steps": (int, OPTIONAL, _range(0, 1_000_000)),
    "generator_t": (int, OPTIONAL, _range(1, 999)),
    "fake_updates": (int, OPTIONAL, _range(1, 50)),
    "regression_weight": (float, OPTIONAL, _range(0.0, 100.0)),
    "score_tscd_weight": (float, OPTIONAL, _range(0.0, 100.0)),
}
SCORE_KEYS = ("score_steps", "generator_t", "fake_updates", "regression_weight", "score_tscd_weight")


def load(path) -> dict:
    """The checked settings of the config file at ``path`` (relative paths in it are relative to
    the file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a TOML file ({e})") from None
    return check(raw, path.parent)


def check(raw: dict, base: Path) -> dict:
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r}: the keys are {', '.join(KEYS)}")
    out = {}
    for key, (kind, default, rule) in KEYS.items():
        if key not in raw:
            if default is None:
                raise ConfigError(f"{key}: missing; write {key} = ...")
            if default is not OPTIONAL:
                out[key] = default
            continue
        v = raw[key]
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
            raise ConfigError(f"{key}: {v!r} is not {'a number' if kind in (int, float) else kind.__name__}")
        problem = rule(v)
        if problem:
            raise ConfigError(f"{key}: {v!r} {problem}")
        out[key] = v
    for key in ("checkpoint", "data"):
        if out[key] != "toy":
            p = Path(out[key]) if Path(out[key]).is_absolute() else base / out[key]
            if not p.exists():
                raise ConfigError(f"{key}: {p} does not exist")
            out[key] = str(p)
    if out["checkpoint"] != "toy" and not out["checkpoint"].lower().endswith((".safetensors", ".ckpt", ".pt")):
        raise ConfigError(f"checkpoint: {out['checkpoint']} is not a .safetensors or .ckpt file")
    if out["data"] != "toy" and not Path(out["data"]).is_dir():
        raise ConfigError(f"data: {out['data']} is not a folder of captioned images")
    out_dir = Path(out["out_dir"])
    out["out_dir"] = str(out_dir if out_dir.is_absolute() else base / out_dir)
    return out
