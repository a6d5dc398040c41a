"""Files the pack writes: atomic writes with ordinary permissions, and safe output names.

Every file of the repository (trained LoRAs, training states, the toy's checkpoint and
weights, benchmark reports, example workflows) is written through :func:`atomic_write`:

1. ``write(tmp)`` into a temporary file beside the target (same folder, so the rename
   stays on one file system), named ``.<name>.<random>.tmp``;
2. ``fsync`` the temporary file, then give it the permissions a plain ``open(path, "w")``
   would: the mode of the file it replaces, or ``0o666`` less the process umask for a
   new file (``safetensors`` and ``tempfile`` create ``0o600`` files, which a ComfyUI run
   by another user or in a container cannot read);
3. ``os.replace`` it over the target, then ``fsync`` the folder, so a crash leaves the old
   file or the new one, never a partial one. On any failure the temporary file is removed
   and the old file is left as it was;
4. remove the temporary files of earlier writes of the same target that a killed process
   left behind (older than :data:`STALE_TMP_S`, so no write still under way is touched).
"""
from __future__ import annotations

import glob
import os
import shutil
import stat
import time
import uuid
from collections.abc import Callable
from pathlib import Path

PathLike = str | os.PathLike


STALE_TMP_S = 3600.0  # a temporary file this old is a killed write's, not one still being written


class FileSaveError(RuntimeError):
    """A file could not be written (read-only folder, full disk, ...); the old file is unchanged."""


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, for a moment, for every thread)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The permission bits of a new file written plainly: 0o666 less the umask."""
    return 0o666 & ~_umask()


def plain_mode(path: PathLike) -> int:
    """The permission bits a plain write to ``path`` gives: its current mode, else :func:`new_file_mode`."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return new_file_mode()


def atomic_write(path: PathLike, write: Callable[[str], object]) -> Path:
    """Write ``path`` through ``write(tmp_path)``, atomically (see the module docstring).

    Raises :class:`FileSaveError` (with the reason and what to check) when the folder
    cannot be written or the disk is full; the previous ``path``, if any, is unchanged.
    """
    path = Path(path)
    folder = path.parent
    tmp = folder / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, plain_mode(path))
        os.replace(tmp, path)
        _fsync_folder(folder)
        _remove_stale_tmp(path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, Exception):  # OSError, or a writer's own error for the same causes
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise FileSaveError(f"could not save {path}: {why} (is the folder read-only or the disk full?); "
                                f"any earlier file there is unchanged") from e
        raise
    return path


def _remove_stale_tmp(path: Path) -> None:
    """Step 4: the ``.<name>.<random>.tmp`` files of ``path`` older than :data:`STALE_TMP_S`."""
    now = time.time()
    for old in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            if now - old.stat().st_mtime > STALE_TMP_S:
                old.unlink()
        except OSError:  # gone already, or not ours to remove
            pass


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_safetensors(path: PathLike, tensors: dict, metadata: dict | None = None) -> Path:
    """``safetensors.torch.save_file`` (contiguous tensors) through :func:`atomic_write`."""
    from safetensors.torch import save_file

    data = {k: v.contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(data, tmp, metadata=metadata))


def save_torch(path: PathLike, obj) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_text(path: PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def copy_file(src: PathLike, dest: PathLike) -> Path:
    """Copy ``src`` to ``dest`` atomically (a reader never sees a partial file)."""
    return atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp))


def safe_output_name(name: str, what: str = "output_name", folder: str = "loras") -> str:
    """The file stem for ``name``; refuses anything that is not a plain file name.

    ``".safetensors"`` at the end is dropped. Folders, ``..``, hidden names, drive letters
    and NUL are refused with a message that says what to give instead.
    """
    raw = (name or "").strip()
    if raw.lower().endswith(".safetensors"):
        raw = raw[: -len(".safetensors")]
    bad = ("/" in raw or "\\" in raw or "\x00" in raw or raw in ("", ".", "..") or raw.startswith(".")
           or ":" in raw or os.path.basename(raw) != raw)
    if bad:
        raise ValueError(f"{what} must be a plain file name without folders (like 'my_model_hypersd'), "
                         f"got {name!r}; the file is always saved in the first '{folder}' folder")
    return raw
