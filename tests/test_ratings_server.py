"""Your own ratings through a real ComfyUI server: the rating node, the routes (bad requests
refused with a sentence and nothing stored, ratings surviving a restart, an unwritable
database answered with a sentence while the server keeps serving), and a preference reward
trained from ratings with the toy reward's features."""
from __future__ import annotations

import csv
import io
import sqlite3

import pytest

from hypersd_dev import REPO
from hypersd_dev.fixtures import place
from hypersd_dev.server import ComfyServer, ExecutionFailed

TOY_REWARD = "hypersd_toy_reward.safetensors"


def rate_graph(colors, prefix="rated", prompt_text=""):
    """One EmptyImage -> HyperSDRateImages pair per colour (grey levels: 0 = black)."""
    g = {}
    for i, c in enumerate(colors):
        g[f"img{i}"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                                "color": int(c) * 0x010101}}
        g[f"rate{i}"] = {"class_type": "HyperSDRateImages", "inputs": {
            "images": [f"img{i}", 0], "filename_prefix": f"{prefix}_{i}", "prompt_text": prompt_text}}
    return g


def saved(entry, node):
    return entry["outputs"][node]["images"]


def count(srv) -> int:
    status, body = srv.request("GET", "/hypersd/ratings")
    assert status == 200, body
    return body["count"]


def test_the_rating_node_saves_its_images_and_the_graph_settings(server):
    g = {"img": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 3, "color": 0}},
         "rate": {"class_type": "HyperSDRateImages", "inputs": {"images": ["img", 0], "filename_prefix": "node_test",
                                                                "prompt_text": "a test"}}}
    entry = server.run(g)
    images = saved(entry, "rate")
    assert len(images) == 3 and all((server.base / "output" / im["subfolder"] / im["filename"]).is_file()
                                    for im in images)
    context = entry["outputs"]["rate"]["hypersd_rating"][0]
    assert context["prompt"] == "a test" and context["seed"] is None


def test_graph_context_reads_what_the_graph_used(pack):
    from ComfyUI_HyperSD.nodes.ratings import graph_context

    prompt = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
        "5": {"class_type": "HyperSDLoraLoader", "inputs": {"model": ["4", 0], "lora_name": "Hyper-SD15-4steps.safetensors",
                                                            "strength": 1.0, "steps": 4}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["5", 0], "seed": 42, "steps": 4, "cfg": 1.0,
                                                   "sampler_name": "ddim", "scheduler": "hypersd_trailing",
                                                   "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["9", 0],
                                                   "denoise": 1.0}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 2}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "10": {"class_type": "HyperSDRateImages", "inputs": {"images": ["8", 0], "filename_prefix": "x"}},
        "11": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["4", 0], "lora_name": "unrelated.safetensors",
                                                               "strength_model": 1.0}},
    }
    ctx = graph_context(prompt, "10")
    assert ctx == {"prompt": "a red fox", "seed": 42, "checkpoint": "sd15.safetensors",
                   "loras": ["Hyper-SD15-4steps.safetensors"],
                   "sampler": {"node": "KSampler", "steps": 4, "cfg": 1.0, "sampler_name": "ddim",
                               "scheduler": "hypersd_trailing", "denoise": 1.0}}


def test_routes_store_list_export_delete_and_refuse_bad_requests(server):
    entry = server.run(rate_graph([0, 255], prefix="routes"))
    a, b = saved(entry, "rate0")[0], saved(entry, "rate1")[0]
    before = count(server)
    bad = [
        (b"{not json", "not JSON"),
        (b'{"kind": "like", "image": {"filename": "no_such_picture.png", "subfolder": "", "type": "output"}}',
         "unknown image"),
        (b'{"kind": "like", "image": {"filename": "../../comfy.db", "subfolder": "", "type": "output"}}',
         "has a path in it"),
        (b'{"kind": "like", "image": {"filename": "x.png", "subfolder": "../models", "type": "output"}}', "'..'"),
        (b'{"kind": "meh", "image": {"filename": "x.png"}}', "'kind' must be one of"),
        (b'{"kind": "like", "image": {"filename": "a.png"}, "pixels": "' + b"A" * 20000 + b'"}', "larger than"),
    ]
    for data, words in bad:
        status, body = server.request("POST", "/hypersd/ratings", data=data)
        assert status == 400 and words in body["error"], (data[:80], status, body)
    assert count(server) == before  # nothing was written
    status, body = server.rate({"kind": "like", "image": a, "prompt": "routes", "seed": 1, "source": "test"})
    assert status == 200 and body["rating"]["image"].endswith(a["filename"]) and body["rating"]["seed"] == 1
    like_id = body["rating"]["id"]
    status, body = server.rate({"kind": "prefer", "image": b, "other": a, "prompt": "routes"})
    assert status == 200 and body["rating"]["other_image"] == a["filename"]
    status, listed = server.request("GET", f"/hypersd/ratings?offset={before}")
    assert [r["kind"] for r in listed["ratings"]] == ["like", "prefer"] and listed["count"] == before + 2
    status, text = server.request("GET", "/hypersd/ratings/export?format=csv")
    rows = list(csv.DictReader(io.StringIO(text.decode())))
    assert status == 200 and rows[-1]["kind"] == "prefer" and rows[-2]["source"] == "test"
    status, js = server.request("GET", "/hypersd/ratings/export?format=json")
    assert status == 200 and js[-1]["kind"] == "prefer"
    assert server.request("GET", "/hypersd/ratings/export?format=xml")[0] == 400
    assert server.request("DELETE", f"/hypersd/ratings/{like_id}") == (200, {"deleted": like_id})
    assert server.request("DELETE", f"/hypersd/ratings/{like_id}")[0] == 404
    assert server.request("DELETE", "/hypersd/ratings/abc")[0] == 400
    assert count(server) == before + 1


def test_ratings_survive_a_restart_and_an_unwritable_database_is_a_sentence(tmp_path):
    base = tmp_path / "server"
    with ComfyServer(base) as srv:
        entry = srv.run(rate_graph([10]))
        status, body = srv.rate({"kind": "like", "image": saved(entry, "rate0")[0], "prompt": "kept"})
        assert status == 200
    with ComfyServer(base) as srv:  # a new process on the same folders
        status, listed = srv.request("GET", "/hypersd/ratings")
        assert [r["prompt"] for r in listed["ratings"]] == ["kept"]
    db = base / "user" / "hypersd" / "ratings.sqlite3"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

    blocker = tmp_path / "a_file"  # the tests run as root, whom a read-only folder does not stop
    blocker.write_text("not a folder")
    with ComfyServer(tmp_path / "server2", env={"HYPERSD_RATINGS_DB": str(blocker / "ratings.sqlite3")}) as srv:
        entry = srv.run(rate_graph([10]))
        status, body = srv.rate({"kind": "like", "image": saved(entry, "rate0")[0]})
        assert status == 503 and "Make its folder writable, or point HYPERSD_RATINGS_DB" in body["error"]
        assert "Traceback" not in body["error"]
        assert srv.get("/object_info/HyperSDRateImages")["HyperSDRateImages"]["name"] == "HyperSDRateImages"
        assert srv.run(rate_graph([20], prefix="still"))  # still serving prompts
        assert not srv.pack_problems(srv.log())
    assert blocker.read_text() == "not a folder"


def test_a_preference_reward_learns_the_raters_taste_from_ratings(server):
    """A rater who likes darker pictures rates 24 grey pictures through the route; the head on the
    toy reward's features agrees with them on the held-out pairs, and is saved as a reward file."""
    rewards_dir = server.base / "models" / "hypersd_rewards"
    rewards_dir.mkdir(parents=True, exist_ok=True)
    place(server.base, "hypersd_rewards", REPO / "toy" / "weights" / TOY_REWARD)  # other tests may have placed it
    greys = [int(v) for v in range(0, 240, 10)]
    entry = server.run(rate_graph(greys, prefix="taste", prompt_text="taste test"))
    for i, g in enumerate(greys):
        status, body = server.rate({"kind": "like" if g < 120 else "dislike", "image": saved(entry, f"rate{i}")[0],
                                    "prompt": "taste test"})
        assert status == 200, body
    train = {"train": {"class_type": "HyperSDTrainPreferenceReward", "inputs": {
        "features_from": TOY_REWARD, "output_name": "my_taste", "margin": 1.0, "weight": 1.0, "holdout": 0.25,
        "steps": 300, "learning_rate": 0.05, "seed": 0, "prompt_contains": "taste test"}}}
    out = server.run(train)["outputs"]["train"]["text"][0]
    assert "144 pairs from 24 rated pictures" in out and "held out 36" in out
    agreement = float(out.split("orders ")[1].split("%")[0])
    assert agreement >= 80.0, out
    from safetensors import safe_open

    with safe_open(str(rewards_dir / "my_taste.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["hypersd.reward"] == "preference" and meta["hypersd.preference_features"] == f"classifier:{TOY_REWARD}"
    assert meta["hypersd.preference_pairs"] == "144"
    # too few ratings for another prompt: refused, saying how many more to rate
    few = {"train": {"class_type": "HyperSDTrainPreferenceReward", "inputs": {
        **train["train"]["inputs"], "output_name": "too_few", "prompt_contains": "no such prompt"}}}
    with pytest.raises(ExecutionFailed, match="rate about 10 more"):
        server.run(few)
    assert not (rewards_dir / "too_few.safetensors").exists()
    server.expect_pack_errors = True  # the refused run's message is logged with its traceback
