"""Ratings and the preference reward in plain Python/torch: validation, the SQLite store (WAL,
one transaction per write, concurrent writers, a crash mid-write), pairs, Bradley-Terry."""
from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
import threading

import pytest
import torch

from ComfyUI_HyperSD.hypersd_core import preference, ratings, rewards


@pytest.fixture
def folders(tmp_path):
    out = tmp_path / "output"
    (out / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png", "sub/d.png"):
        (out / name).write_bytes(name.encode())
    (tmp_path / "secret.png").write_bytes(b"outside")
    return {"output": str(out), "temp": str(tmp_path / "temp"), "input": str(tmp_path / "input")}


def img(name, sub=""):
    return {"filename": name, "subfolder": sub, "type": "output"}


# ---------------------------------------------------------------------- validation


def test_a_valid_rating_carries_its_context_and_the_pictures_hash(folders):
    row = ratings.rating_from_body({"kind": "like", "image": img("d.png", "sub"), "prompt": "a cat", "seed": 7,
                                    "checkpoint": "sd15.safetensors", "loras": ["hyper.safetensors", "x"],
                                    "sampler": {"steps": 4, "cfg": 1.0}, "source": "page"}, folders)
    assert row["image"] == "sub/d.png" and row["image_type"] == "output"
    assert row["image_sha256"] == ratings.file_sha256(os.path.join(folders["output"], "sub", "d.png"))
    assert (row["prompt"], row["seed"], row["loras"]) == ("a cat", 7, "hyper.safetensors, x")
    assert json.loads(row["sampler"]) == {"cfg": 1.0, "steps": 4} and row["other_image"] is None
    pref = ratings.rating_from_body({"kind": "prefer", "image": img("a.png"), "other": img("b.png")}, folders)
    assert (pref["image"], pref["other_image"]) == ("a.png", "b.png") and pref["other_sha256"]


@pytest.mark.parametrize("body, words", [
    ([1, 2], "JSON object"),
    ({"kind": "love", "image": img("a.png")}, "'kind' must be one of like, dislike, prefer"),
    ({"kind": "like"}, "no 'image'"),
    ({"kind": "like", "image": "a.png"}, "is given as"),
    ({"kind": "like", "image": img("../secret.png")}, "has a path in it"),
    ({"kind": "like", "image": img("a/b.png")}, "has a path in it"),
    ({"kind": "like", "image": img("secret.png", "..")}, "no absolute path, no '..'"),
    ({"kind": "like", "image": img("passwd", "/etc")}, "no absolute path"),
    ({"kind": "like", "image": img("nothere.png")}, "unknown image"),
    ({"kind": "like", "image": {**img("a.png"), "type": "models"}}, "type must be one of"),
    ({"kind": "prefer", "image": img("a.png")}, "also names 'other'"),
    ({"kind": "prefer", "image": img("a.png"), "other": img("a.png")}, "two different pictures"),
    ({"kind": "like", "image": img("a.png"), "other": img("b.png")}, "leave out 'other'"),
    ({"kind": "like", "image": img("a.png"), "seed": -1}, "'seed' must be a whole number"),
    ({"kind": "like", "image": img("a.png"), "seed": True}, "'seed' must be a whole number"),
    ({"kind": "like", "image": img("a.png"), "prompt": "x" * 5000}, "longer than"),
    ({"kind": "like", "image": img("a.png"), "pixels": "..."}, "unknown field(s) pixels"),
])
def test_bad_ratings_are_refused_with_a_sentence(folders, body, words):
    with pytest.raises(ratings.RatingError, match=None) as e:
        ratings.rating_from_body(body, folders)
    assert words in str(e.value)


# ---------------------------------------------------------------------- the store


def _row(folders, kind="like", name="a.png", **kw):
    body = {"kind": kind, "image": img(name), **kw}
    return ratings.rating_from_body(body, folders)


def test_store_add_list_export_delete(tmp_path, folders):
    db = ratings.RatingsDB(tmp_path / "user" / "hypersd" / "ratings.sqlite3")
    a = db.add(_row(folders, prompt="p, with a comma", seed=3))
    b = db.add(_row(folders, "prefer", "b.png", other=img("c.png")))
    assert [r["id"] for r in db.rows()] == [a["id"], b["id"]] and db.count() == 2
    assert db.rows(limit=1, offset=1)[0]["other_image"] == "c.png"
    with sqlite3.connect(db.path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == ratings.SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [r["kind"] for r in json.loads(db.export("json"))] == ["like", "prefer"]
    import csv
    import io

    rows = list(csv.DictReader(io.StringIO(db.export("csv"))))
    assert rows[0]["prompt"] == "p, with a comma" and rows[0]["seed"] == "3" and rows[1]["other_image"] == "c.png"
    assert list(rows[0]) == list(ratings.COLUMNS)
    assert db.delete(a["id"]) and not db.delete(a["id"]) and db.count() == 1
    with pytest.raises(ratings.RatingError, match="json or csv"):
        db.export("xml")


def test_two_writers_at_once_both_land(tmp_path, folders):
    db = ratings.RatingsDB(tmp_path / "r.sqlite3")
    db.count()  # created once; each thread then opens its own connection per write
    errors = []

    def rate(tag):
        try:
            for i in range(40):
                db.add(_row(folders, source=f"{tag}{i}"))
        except Exception as e:  # pragma: no cover - shown by the assert below
            errors.append(e)

    threads = [threading.Thread(target=rate, args=(t,)) for t in "xy"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    sources = {r["source"] for r in db.rows()}
    assert sources == {f"{t}{i}" for t in "xy" for i in range(40)}


def test_the_first_ratings_on_a_new_database_land_when_they_come_at_once(tmp_path, folders):
    """Switching a new file to write-ahead logging does not wait for other connections as
    writes do; three first raters at the same moment got "database is locked" (about one new
    database in 25 here) until the switch was retried."""
    errors, made = [], 0
    for trial in range(120):
        db = ratings.RatingsDB(tmp_path / f"new{trial}" / "r.sqlite3")
        start = threading.Barrier(3)

        def rate(tag, db=db, start=start):
            start.wait()
            try:
                for i in range(2):
                    db.add(_row(folders, source=f"{tag}{i}"))
            except Exception as e:  # pragma: no cover - shown by the assert below
                errors.append(f"{db.path.parent.name}: {e}")

        threads = [threading.Thread(target=rate, args=(t,)) for t in "xyz"]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        made += db.count()
    assert not errors, errors[:3]
    assert made == 120 * 3 * 2


def test_a_process_killed_mid_write_loses_only_its_unfinished_rating(tmp_path, folders):
    path = tmp_path / "r.sqlite3"
    db = ratings.RatingsDB(path)
    db.add(_row(folders, source="kept"))
    # another process opens the store, inserts inside a transaction and dies before the commit
    code = (f"import sqlite3, os; c = sqlite3.connect({str(path)!r}); c.execute('BEGIN IMMEDIATE');"
            "c.execute(\"INSERT INTO ratings (created, kind, image_type, image, image_sha256, source) "
            "VALUES (0, 'like', 'output', 'a.png', 'x', 'lost')\"); os._exit(9)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    assert [r["source"] for r in db.rows()] == ["kept"]
    db.add(_row(folders, source="after"))  # the store still takes writes
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert [r["source"] for r in db.rows()] == ["kept", "after"]


def test_an_unwritable_place_gives_a_sentence_not_a_traceback(tmp_path, folders):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the folder should be")  # as root, a read-only folder would not stop writes
    db = ratings.RatingsDB(blocker / "hypersd" / "ratings.sqlite3")
    with pytest.raises(ratings.RatingsStoreError, match="Make its folder writable, or point HYPERSD_RATINGS_DB"):
        db.add(_row(folders))
    assert blocker.read_text() == "a file where the folder should be"


def test_a_database_from_a_newer_pack_is_refused(tmp_path):
    path = tmp_path / "r.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version={ratings.SCHEMA_VERSION + 1}")
    with pytest.raises(ratings.RatingsStoreError, match="newer version of this pack"):
        ratings.RatingsDB(path).rows()


def test_default_path_is_in_the_user_directory_unless_the_environment_says(monkeypatch, tmp_path):
    monkeypatch.delenv("HYPERSD_RATINGS_DB", raising=False)
    assert ratings.default_path(str(tmp_path)) == tmp_path / "hypersd" / "ratings.sqlite3"
    monkeypatch.setenv("HYPERSD_RATINGS_DB", str(tmp_path / "x.db"))
    assert ratings.default_path("/elsewhere") == tmp_path / "x.db"


# ---------------------------------------------------------------------- pairs and Bradley-Terry


def test_pairs_by_hand():
    def r(i, kind, image, prompt="p", other=None):
        return {"id": i, "kind": kind, "image_type": "output", "image": image, "other_image": other, "prompt": prompt}

    rows = [r(1, "like", "a"), r(2, "dislike", "b"), r(3, "dislike", "c"), r(4, "like", "d", prompt="q"),
            r(5, "dislike", "e", prompt="q"), r(6, "like", "c"),  # c's latest rating is a like now
            r(7, "prefer", "b", other="a"), r(8, "prefer", "b", other="a"),  # counted once
            r(9, "like", "f", prompt="other prompt")]  # nothing to compare with in its prompt
    assert preference.pairs_from_ratings(rows) == [
        ("output/b", "output/a"), ("output/a", "output/b"), ("output/c", "output/b"), ("output/d", "output/e")]


def test_bradley_terry_loss_by_hand():
    s_w, s_l = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    expected = -(math.log(1 / (1 + math.exp(-2))) + math.log(0.5) + math.log(1 / (1 + math.exp(2)))) / 3
    assert float(preference.bradley_terry_loss(s_w, s_l)) == pytest.approx(expected, rel=1e-6)


def _taste_pairs(feats, n_pairs, gen):
    """A rater who prefers the larger first feature (with the pairs' pictures drawn at random)."""
    idx = torch.randint(0, len(feats), (n_pairs, 2), generator=gen)
    idx = idx[idx[:, 0] != idx[:, 1]]
    win = torch.where((feats[idx[:, 0], 0] > feats[idx[:, 1], 0]).unsqueeze(1), idx, idx.flip(1))
    return [tuple(p) for p in win.tolist()]


def test_a_head_learns_a_known_taste_and_ranks_new_pairs_as_it_does():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(120, 16, generator=gen) * torch.linspace(0.2, 3.0, 16)  # the taste is not the loudest feature
    head, rep = preference.train_head(feats, _taste_pairs(feats, 200, gen), holdout=0.25, seed=1)
    assert rep.held_out_pairs == round(0.25 * rep.pairs) and rep.train_pairs + rep.held_out_pairs == rep.pairs
    assert rep.agreement >= 0.9 and rep.train_agreement >= 0.9
    new = torch.randn(400, 16, generator=gen) * torch.linspace(0.2, 3.0, 16)
    s = head(new)
    pairs = torch.tensor(_taste_pairs(new, 500, gen))
    assert float((s[pairs[:, 0]] > s[pairs[:, 1]]).float().mean()) >= 0.9
    assert float(head(feats).mean()) == pytest.approx(0.0, abs=1e-4) and float(head(feats).std()) == pytest.approx(1.0, rel=1e-3)


def test_too_few_pairs_says_how_many_more_to_rate():
    feats = torch.randn(8, 4)
    with pytest.raises(preference.NotEnoughRatings, match=r"give 6 preference pair\(s\).*rate about 4 more"):
        preference.train_head(feats, [(0, 1), (2, 3), (4, 5), (6, 7), (0, 3), (2, 5)])


def test_a_saved_head_on_classifier_features_is_a_reward_with_gradient(tmp_path):
    gen = torch.Generator().manual_seed(0)
    clf = rewards.ConvClassifier((8, 16), 16, 1, 10, invert=True)
    rewards.save_classifier(tmp_path / "feat.safetensors", clf, [str(d) for d in range(10)])
    images = torch.rand(40, 3, 16, 16, generator=gen)
    with torch.no_grad():
        feats = clf.features(images)
    ink = (1 - images).mean(dim=(1, 2, 3))  # taste: more ink
    pairs = [(i, j) if ink[i] > ink[j] else (j, i) for i in range(0, 40, 2) for j in range(1, 40, 2)][:150]
    head, rep = preference.train_head(feats, pairs, seed=0)
    preference.save_head(tmp_path / "mine.safetensors", head, "classifier:feat.safetensors", rep)
    with torch.inference_mode():  # as ComfyUI runs nodes: the reward still backpropagates
        reward = rewards.load_reward(tmp_path / "mine.safetensors")
    assert isinstance(reward, preference.PreferenceReward) and reward.needs_labels is False
    x = images[:4].clone().requires_grad_(True)
    score = reward(x, None)
    saved_clf = rewards.load_reward(tmp_path / "feat.safetensors").classifier  # fp16 in the file
    with torch.no_grad():
        torch.testing.assert_close(score, head(saved_clf.features(images[:4])), rtol=1e-4, atol=1e-4)
    score.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert not any(p.requires_grad for p in reward.parameters())
    (tmp_path / "feat.safetensors").unlink()
    with pytest.raises(ValueError, match="features of the reward 'feat.safetensors', which is not beside it"):
        rewards.load_reward(tmp_path / "mine.safetensors")
    with pytest.raises(ValueError, match="connect the same CLIP vision model"):
        preference.save_head(tmp_path / "clip.safetensors", head, "clip_vision", rep)
        rewards.load_reward(tmp_path / "clip.safetensors")
