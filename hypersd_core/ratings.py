"""The user's own ratings of generated pictures, kept in SQLite (human feedback of one's own).

A rating says of a picture the server saved: ``like``, ``dislike``, or ``prefer`` (this
picture over ``other``), with what makes it useful later: the picture's path and SHA-256,
the prompt text, the seed, the checkpoint and LoRA names, the sampler settings and the time.
:mod:`.preference` turns ratings into Bradley-Terry pairs and trains a preference reward.

Storage is the standard library's ``sqlite3``: one file (the ComfyUI user directory's
``hypersd/ratings.sqlite3`` by default), write-ahead logging with full sync, one
transaction per write, the schema's version in ``PRAGMA user_version``. A write either
lands whole or not at all, also when the server stops or crashes during it, and two
writers at once (two browser tabs) both land: SQLite serialises them, each waiting up to
:data:`BUSY_SECONDS` for the other.

Validation is here too (:func:`rating_from_body`): a request body that is not a rating, a
picture that is not in the server's folders, a name with a path in it, all raise
:class:`RatingError` with a sentence saying what to send instead; nothing is written then.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from pathlib import Path

SCHEMA_VERSION = 1
KINDS = ("like", "dislike", "prefer")
IMAGE_TYPES = ("output", "temp", "input")
MAX_BODY = 16 * 1024  # bytes of one rating request
MAX_TEXT = 4000  # characters of a prompt or a settings text
BUSY_SECONDS = 30.0


def _begin_write(conn: sqlite3.Connection) -> None:
    """Open the write transaction holding the write lock from its start (``BEGIN IMMEDIATE``).
    A deferred one takes a read snapshot first and upgrades it; when another writer commits while
    it waits, SQLite answers "database is locked" at once instead of waiting (two clients rating
    at the same moment got a 503 so, seen in the crash bench)."""
    conn.execute("BEGIN IMMEDIATE")


def _wal(conn: sqlite3.Connection, wait: float = BUSY_SECONDS) -> None:
    """Put the database in write-ahead-log mode (a setting kept in the file, so once is enough).
    Switching needs the file to itself, and SQLite answers "database is locked" at once, without
    its busy wait, when another connection has it open: two first ratings at the same moment on a
    new database got a 503 so (seen in the crash bench). So the switch is retried here, for up to
    ``wait`` seconds, as the busy wait would have."""
    deadline = time.monotonic() + wait
    delay = 0.005
    while conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return  # switched (or a file system without WAL kept the old mode: nothing to wait for)
        except sqlite3.OperationalError as e:
            if ("locked" not in str(e) and "busy" not in str(e)) or time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


COLUMNS = ("id", "created", "kind", "image_type", "image", "image_sha256", "other_image", "other_sha256",
           "prompt", "seed", "checkpoint", "loras", "sampler", "source")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ratings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('like', 'dislike', 'prefer')),
    image_type TEXT NOT NULL,
    image TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    other_image TEXT,
    other_sha256 TEXT,
    prompt TEXT NOT NULL DEFAULT '',
    seed INTEGER,
    checkpoint TEXT NOT NULL DEFAULT '',
    loras TEXT NOT NULL DEFAULT '',
    sampler TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT '',
    CHECK ((kind = 'prefer') = (other_image IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS ratings_prompt ON ratings (prompt);
"""


class RatingError(ValueError):
    """A request that is not a valid rating (the server answers 400 with the message)."""


class RatingsStoreError(RuntimeError):
    """The ratings database cannot be opened or written (the server answers 503 with the message)."""


# ---------------------------------------------------------------------- validation


def _plain_part(value, what: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RatingError(f"{what} must be a string")
    if not value and allow_empty:
        return ""
    if not value or "\x00" in value or len(value) > 255:
        raise RatingError(f"{what} must be a file name of 1 to 255 characters")
    return value


def image_path(ref, folders: Mapping[str, str]) -> tuple[str, str, Path]:
    """``(type, "subfolder/filename", absolute path)`` of an image reference ``{filename,
    subfolder, type}`` as ComfyUI's page has it, inside ``folders[type]``; a file name with a
    path in it, a subfolder that climbs out, a type other than output/temp/input or a picture
    that is not there raise :class:`RatingError`."""
    if not isinstance(ref, Mapping):
        raise RatingError("an image is given as {\"filename\": ..., \"subfolder\": ..., \"type\": \"output\"}, "
                          "as the page receives it from the node")
    name = _plain_part(ref.get("filename"), "the image's filename")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise RatingError(f"the image's filename {name!r} has a path in it: give the plain file name and put "
                          f"its folder in 'subfolder'")
    sub = _plain_part(ref.get("subfolder", ""), "the image's subfolder", allow_empty=True).replace("\\", "/")
    if sub.startswith("/") or os.path.isabs(sub) or ":" in sub or any(p in ("..", ".") for p in sub.split("/") if p):
        raise RatingError(f"the image's subfolder {sub!r} must be a folder inside ComfyUI's output folder "
                          f"(no absolute path, no '..')")
    kind = ref.get("type", "output")
    if kind not in IMAGE_TYPES or kind not in folders:
        raise RatingError(f"the image's type must be one of {', '.join(t for t in IMAGE_TYPES if t in folders)}, "
                          f"got {kind!r}")
    base = Path(folders[kind]).resolve()
    rel = "/".join([p for p in sub.split("/") if p] + [name])
    path = (base / rel).resolve()
    if os.path.commonpath([str(base), str(path)]) != str(base):
        raise RatingError(f"the image {rel!r} is outside ComfyUI's {kind} folder")
    if not path.is_file():
        raise RatingError(f"unknown image: {rel!r} is not in ComfyUI's {kind} folder (rate pictures the server "
                          f"saved, e.g. with the 'Hyper-SD Rate Images' node)")
    return kind, rel, path


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _text(value, what: str) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, str) for v in value):
            raise RatingError(f"{what} must be a string or a list of strings")
        value = ", ".join(value)
    elif isinstance(value, Mapping):
        value = json.dumps(value, sort_keys=True)
    if not isinstance(value, str):
        raise RatingError(f"{what} must be text")
    if len(value) > MAX_TEXT or "\x00" in value:
        raise RatingError(f"{what} is longer than {MAX_TEXT} characters")
    return value


def rating_from_body(body, folders: Mapping[str, str], hasher: Callable = file_sha256) -> dict:
    """The row to store for a rating request's JSON ``body``::

        {"kind": "like" | "dislike" | "prefer", "image": {filename, subfolder, type},
         "other": {...} (prefer only: the picture this one is preferred over),
         "prompt": str, "seed": int, "checkpoint": str, "loras": str | [str], "sampler": str | {...},
         "source": str}

    ``folders``: ComfyUI's folder of each image type. Raises :class:`RatingError`."""
    if not isinstance(body, Mapping):
        raise RatingError("send one rating as a JSON object with 'kind' and 'image'")
    unknown = set(body) - {"kind", "image", "other", "prompt", "seed", "checkpoint", "loras", "sampler", "source"}
    if unknown:
        raise RatingError(f"unknown field(s) {', '.join(sorted(map(str, unknown)))} in the rating")
    kind = body.get("kind")
    if kind not in KINDS:
        raise RatingError(f"'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    if "image" not in body:
        raise RatingError("the rating has no 'image' (the picture rated)")
    image_type, image, path = image_path(body["image"], folders)
    other = other_sha = None
    if kind == "prefer":
        if "other" not in body:
            raise RatingError("a 'prefer' rating also names 'other', the picture the image is preferred over")
        other_type, other, other_path = image_path(body["other"], folders)
        if (other_type, other) == (image_type, image):
            raise RatingError("a 'prefer' rating compares two different pictures")
        if other_type != image_type:
            raise RatingError("the two pictures of a 'prefer' rating come from the same folder type")
        other_sha = hasher(other_path)
    elif "other" in body:
        raise RatingError(f"a {kind!r} rating rates one picture: leave out 'other' (or use kind 'prefer')")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64):
        raise RatingError(f"'seed' must be a whole number from 0 to 2^64 - 1, got {seed!r}")
    return {"created": time.time(), "kind": kind, "image_type": image_type, "image": image,
            "image_sha256": hasher(path), "other_image": other, "other_sha256": other_sha,
            "prompt": _text(body.get("prompt"), "'prompt'"), "seed": seed,
            "checkpoint": _text(body.get("checkpoint"), "'checkpoint'"), "loras": _text(body.get("loras"), "'loras'"),
            "sampler": _text(body.get("sampler"), "'sampler'"), "source": _text(body.get("source"), "'source'")}


# ---------------------------------------------------------------------- the database


class RatingsDB:
    """The ratings file at ``path`` (created with its folder on first use)."""

    def __init__(self, path):
        self.path = Path(path)

    def _fail(self, e: Exception) -> RatingsStoreError:
        return RatingsStoreError(
            f"cannot use the ratings database {self.path} ({e}). Make its folder writable, or point "
            f"HYPERSD_RATINGS_DB to a writable file (by default it lives in ComfyUI's user directory, which "
            f"--user-directory moves); the server keeps running and nothing was stored")

    def connect(self) -> sqlite3.Connection:
        """A connection with the schema in place (WAL, full sync, the version checked)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(str(self.path), timeout=BUSY_SECONDS)
        except (OSError, sqlite3.Error) as e:
            raise self._fail(e) from None
        try:
            conn.row_factory = sqlite3.Row
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RatingsStoreError(f"the ratings database {self.path} has schema version {version}, made by a "
                                        f"newer version of this pack (this one reads {SCHEMA_VERSION}): update the "
                                        f"pack, or move the file away to start a new one")
            _wal(conn)
            conn.execute("PRAGMA synchronous=FULL")
            if version < SCHEMA_VERSION:  # one transaction: a second creator waits, then finds it made
                conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA + f"PRAGMA user_version={SCHEMA_VERSION};COMMIT;")
            return conn
        except sqlite3.Error as e:
            conn.close()
            raise self._fail(e) from None
        except RatingsStoreError:
            conn.close()
            raise

    def _run(self, fn):
        conn = self.connect()
        try:
            return fn(conn)
        except sqlite3.Error as e:
            raise self._fail(e) from None
        finally:
            conn.close()

    def add(self, row: Mapping) -> dict:
        """Store one rating (a :func:`rating_from_body` row) in one transaction; the stored row."""
        cols = [c for c in COLUMNS if c != "id"]

        def go(conn):
            with conn:
                _begin_write(conn)
                cur = conn.execute(f"INSERT INTO ratings ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                                   [row.get(c) for c in cols])
            return dict(conn.execute("SELECT * FROM ratings WHERE id = ?", (cur.lastrowid,)).fetchone())

        return self._run(go)

    def rows(self, limit: int | None = None, offset: int = 0) -> list[dict]:
        """Ratings in the order they were made (``limit``/``offset`` for pages)."""
        lim = -1 if limit is None else int(limit)
        return self._run(lambda c: [dict(r) for r in c.execute(
            "SELECT * FROM ratings ORDER BY id LIMIT ? OFFSET ?", (lim, int(offset)))])

    def count(self) -> int:
        return self._run(lambda c: int(c.execute("SELECT COUNT(*) FROM ratings").fetchone()[0]))

    def delete(self, rating_id: int) -> bool:
        def go(conn):
            with conn:
                _begin_write(conn)
                return conn.execute("DELETE FROM ratings WHERE id = ?", (int(rating_id),)).rowcount > 0

        return self._run(go)

    def export(self, fmt: str) -> str:
        """Every rating as ``json`` (a list of objects) or ``csv`` (a header row, then one row each)."""
        if fmt not in ("json", "csv"):
            raise RatingError(f"export format must be json or csv, got {fmt!r}")
        rows = self.rows()
        if fmt == "json":
            return json.dumps(rows, indent=1)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v) for k, v in r.items()})
        return buf.getvalue()


def default_path(user_directory: str) -> Path:
    """``$HYPERSD_RATINGS_DB``, else ``<ComfyUI user directory>/hypersd/ratings.sqlite3``."""
    env = os.environ.get("HYPERSD_RATINGS_DB")
    return Path(env) if env else Path(user_directory) / "hypersd" / "ratings.sqlite3"
