"""Your own ratings: rate pictures in the page, train a preference reward from them.

* ``HyperSDRateImages`` saves its images like *Save Image* and shows them on the node with
  like / dislike buttons and a "prefer" choice between two (``web/hypersd.js``); each click
  goes to ``POST /hypersd/ratings`` with what the graph used (prompt text, seed, checkpoint and
  LoRA names, sampler settings), read from the queued graph upstream of the node.
* The routes store ratings in SQLite (``hypersd_core.ratings``; ComfyUI's user directory,
  ``hypersd/ratings.sqlite3``, or ``$HYPERSD_RATINGS_DB``), list, export (JSON, CSV) and delete
  them. Bad requests answer 400 with a sentence and store nothing; a database that cannot be
  written answers 503 with a sentence; the server keeps serving.
* ``HyperSDTrainPreferenceReward`` fits a Bradley-Terry head (``hypersd_core.preference``) on
  frozen features of the rated pictures (a CLIP vision model, or a classifier reward's
  features, as the toy's), reports its held-out agreement, saves it to
  ``models/hypersd_rewards`` and hands it on as a reward for ``HyperSDTrainFeedback``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os

import folder_paths
import numpy as np
import torch
from comfy_api.latest import io, ui

from ..hypersd_core import files, preference, ratings, rewards
from ._server import prompt_server
from .feedback import REWARDS_FOLDER, ClipFeatures, Reward, _reward_path, load_reward, rewards_folder

log = logging.getLogger("HyperSD")

_SQL_INT_MAX = 2 ** 63 - 1  # SQLite's largest integer: a larger id, limit or offset is refused before the query
CONTEXT_KEY = "hypersd_rating"  # the node's UI output the page reads the graph's settings from
_SAMPLER_KEYS = ("steps", "cfg", "sampler_name", "scheduler", "denoise", "eta")


def database() -> ratings.RatingsDB:
    return ratings.RatingsDB(ratings.default_path(folder_paths.get_user_directory()))


def image_folders() -> dict[str, str]:
    return {"output": folder_paths.get_output_directory(), "temp": folder_paths.get_temp_directory(),
            "input": folder_paths.get_input_directory()}


# ---------------------------------------------------------------------- the graph's settings


def _link(value):
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)


def _upstream(prompt: dict, start: str) -> list[str]:
    """Node ids feeding ``start`` (breadth first, each once, ``start`` excluded)."""
    seen, order, queue = {start}, [], [start]
    while queue:
        node = prompt.get(queue.pop(0)) or {}
        for value in (node.get("inputs") or {}).values():
            if _link(value) and value[0] not in seen and value[0] in prompt:
                seen.add(value[0])
                order.append(value[0])
                queue.append(value[0])
    return order


def _text_of(prompt: dict, start) -> str:
    """The prompt text behind a conditioning link: the first string ``text`` upstream."""
    if not _link(start):
        return ""
    for nid in [start[0]] + _upstream(prompt, start[0]):
        inputs = (prompt.get(nid) or {}).get("inputs") or {}
        for key in ("text", "text_g", "prompt"):
            if isinstance(inputs.get(key), str):
                return inputs[key]
    return ""


def graph_context(prompt: dict | None, node_id) -> dict:
    """What the queued graph used upstream of the rating node: ``prompt`` text, ``seed``,
    ``checkpoint`` and ``loras`` names, ``sampler`` settings."""
    prompt = prompt if isinstance(prompt, dict) else {}
    ids = _upstream(prompt, str(node_id)) if str(node_id) in prompt else list(prompt)
    out = {"prompt": "", "seed": None, "checkpoint": "", "loras": [], "sampler": {}}
    ckpts = []
    for nid in ids:
        node = prompt.get(nid) or {}
        inputs = node.get("inputs") or {}
        for key in ("ckpt_name", "unet_name"):
            if isinstance(inputs.get(key), str) and inputs[key] not in ckpts:
                ckpts.append(inputs[key])
        if isinstance(inputs.get("lora_name"), str) and inputs["lora_name"] not in out["loras"]:
            out["loras"].append(inputs["lora_name"])
        seed = inputs.get("seed", inputs.get("noise_seed"))
        if out["seed"] is None and isinstance(seed, int) and not isinstance(seed, bool):
            out["seed"] = seed
            out["sampler"] = {"node": node.get("class_type", ""),
                              **{k: inputs[k] for k in _SAMPLER_KEYS if isinstance(inputs.get(k), (int, float, str))}}
            out["prompt"] = _text_of(prompt, inputs.get("positive"))
    out["checkpoint"] = ", ".join(ckpts)
    return out


# ---------------------------------------------------------------------- routes


def store_rating(body) -> tuple[int, dict]:
    """(HTTP status, JSON) for one rating request's parsed body."""
    return _store_call(lambda: {"rating": database().add(ratings.rating_from_body(body, image_folders()))})


def _parse_body(raw: bytes):
    if len(raw) > ratings.MAX_BODY:
        raise ratings.RatingError(f"the request is larger than {ratings.MAX_BODY} bytes: send one rating at a time "
                                  f"(the image by name, not its pixels)")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ratings.RatingError(f"the body is not JSON ({e}); send one rating as a JSON object") from None
    except RecursionError:
        raise ratings.RatingError("the body is nested too deeply to be a rating; send one rating as a JSON "
                                  "object") from None


def _store_call(fn):
    try:
        return 200, fn()
    except ratings.RatingError as e:
        return 400, {"error": str(e)}
    except ratings.RatingsStoreError as e:
        log.warning("Hyper-SD ratings: %s", e)
        return 503, {"error": str(e)}


def register() -> None:
    found = prompt_server()
    if found is None:
        return
    web, inst = found

    @inst.routes.post("/hypersd/ratings")
    async def hypersd_rate(request):
        if request.content_length is not None and request.content_length > ratings.MAX_BODY:
            return web.json_response({"error": f"the request is larger than {ratings.MAX_BODY} bytes: send one "
                                               f"rating at a time"}, status=400)
        raw = b""
        while len(raw) <= ratings.MAX_BODY:  # read() returns what has arrived: read until the end or the limit
            chunk = await request.content.read(ratings.MAX_BODY + 1 - len(raw))
            if not chunk:
                break
            raw += chunk
        try:
            body = _parse_body(raw)
        except ratings.RatingError as e:
            return web.json_response({"error": str(e)}, status=400)
        status, out = await asyncio.to_thread(store_rating, body)
        return web.json_response(out, status=status)

    @inst.routes.get("/hypersd/ratings")
    async def hypersd_ratings(request):
        q = request.rel_url.query
        try:
            limit = int(q["limit"]) if q.get("limit") else None
            offset = int(q.get("offset") or 0)
            if not 0 <= offset <= _SQL_INT_MAX or (limit is not None and not 0 <= limit <= _SQL_INT_MAX):
                raise ValueError
        except ValueError:
            return web.json_response({"error": "limit and offset are whole numbers, 0 or more (at most 2^63 - 1)"},
                                     status=400)
        db = database()
        status, out = await asyncio.to_thread(
            _store_call, lambda: {"count": db.count(), "ratings": db.rows(limit, offset)})
        return web.json_response(out, status=status)

    @inst.routes.get("/hypersd/ratings/export")
    async def hypersd_ratings_export(request):
        fmt = request.rel_url.query.get("format", "json")
        status, out = await asyncio.to_thread(_store_call, lambda: {"text": database().export(fmt)})
        if status != 200:
            return web.json_response(out, status=status)
        kind = "text/csv" if fmt == "csv" else "application/json"
        return web.Response(text=out["text"], content_type=kind, headers={
            "Content-Disposition": f'attachment; filename="hypersd_ratings.{fmt}"'})

    @inst.routes.delete("/hypersd/ratings/{rating_id}")
    async def hypersd_ratings_delete(request):
        try:
            rid = int(request.match_info["rating_id"])
        except ValueError:
            return web.json_response({"error": "give the rating's number: DELETE /hypersd/ratings/<id>"}, status=400)
        if abs(rid) > _SQL_INT_MAX:  # no rating has it (SQLite's integers are 64-bit)
            return web.json_response({"error": f"no rating {rid}"}, status=404)
        status, out = await asyncio.to_thread(_store_call, lambda: {"deleted": database().delete(rid)})
        if status == 200 and not out["deleted"]:
            return web.json_response({"error": f"no rating {rid}"}, status=404)
        return web.json_response({"deleted": rid} if status == 200 else out, status=status)

    rewards_folder()


# ---------------------------------------------------------------------- training the preference reward


def _load_image(path: str) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def rated_features(pairs, features, batch: int = 64) -> tuple[torch.Tensor, list[tuple[int, int]], int]:
    """Features of the pictures in ``pairs`` (:func:`preference.pairs_from_ratings`; those still
    on disk) and the pairs as row indices; also how many pairs were dropped because a picture is gone."""
    folders = image_folders()
    paths = {}
    for key in sorted({k for p in pairs for k in p}):
        kind, rel = key.split("/", 1)
        path = os.path.join(folders.get(kind, ""), *rel.split("/"))
        if kind in folders and os.path.isfile(path):
            paths[key] = path
    kept = [p for p in pairs if p[0] in paths and p[1] in paths]
    index = {k: i for i, k in enumerate(sorted({k for p in kept for k in p}))}
    feats: list[torch.Tensor | None] = [None] * len(index)
    by_size: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
    for key, i in index.items():
        img = _load_image(paths[key])
        by_size.setdefault(tuple(img.shape), []).append((i, img))
    with torch.no_grad():
        for group in by_size.values():
            for s in range(0, len(group), batch):
                chunk = group[s:s + batch]
                f = features(torch.stack([im for _, im in chunk])).float().cpu()
                for (i, _), row in zip(chunk, f):
                    feats[i] = row
    stacked = torch.stack(feats) if feats else torch.zeros(0, 1)
    return stacked, [(index[w], index[l]) for w, l in kept], len(pairs) - len(kept)


def feature_model(features_from: str, clip_vision):
    """``(images -> features, the name recorded in the file)``."""
    if features_from == "clip_vision":
        if clip_vision is None:
            raise ValueError("features_from is clip_vision: connect a CLIP vision model (CLIPVisionLoader), or pick "
                             "a classifier reward whose features to use")
        return ClipFeatures(clip_vision), "clip_vision"
    reward = rewards.load_reward(_reward_path(features_from))
    if not isinstance(reward, rewards.ClassifierReward):
        raise ValueError(f"'{features_from}' is not a classifier reward: pick one (e.g. the toy's "
                         f"hypersd_toy_reward.safetensors) or clip_vision")
    return reward.classifier.features, f"classifier:{features_from}"


def train_preference_reward(features_from: str, output_name: str, clip_vision=None, *, holdout: float = 0.2,
                            steps: int = 400, learning_rate: float = 0.05, seed: int = 0, prompt_contains: str = ""):
    """Train and save a preference head from the stored ratings; ``(path, report)``."""
    name = files.safe_output_name(output_name, folder=REWARDS_FOLDER)
    rows = database().rows()
    if prompt_contains:
        rows = [r for r in rows if prompt_contains.lower() in (r.get("prompt") or "").lower()]
    pairs = preference.pairs_from_ratings(rows)
    preference.check_enough(len(pairs))  # before any picture is read
    features, source = feature_model(features_from, clip_vision)
    with torch.inference_mode(False):
        feats, pairs, dropped = rated_features(pairs, features)
    if dropped:
        log.warning("Hyper-SD preference: %d pair(s) left out: their pictures are no longer in ComfyUI's folders",
                    dropped)
    head, report = preference.train_head(feats, pairs, holdout=holdout, steps=steps, learning_rate=learning_rate,
                                         seed=seed)
    folder = folder_paths.get_folder_paths(rewards_folder())[0]
    path = os.path.join(folder, name + ".safetensors")
    preference.save_head(path, head, source, report, {"hypersd.preference_prompt_filter": prompt_contains,
                                                      "hypersd.preference_dropped_pairs": str(dropped)})
    log.info("Hyper-SD preference reward %s: %s", os.path.basename(path), report.summary())
    return path, report


# ---------------------------------------------------------------------- nodes


class HyperSDRateImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperSDRateImages",
            display_name="Hyper-SD Rate Images",
            category="Hyper-SD/training",
            description=("Saves the images (as Save Image does) and shows them with buttons to like or dislike each "
                         "one and to prefer one of two. Every click is stored with the prompt text, seed, checkpoint, "
                         "LoRAs and sampler settings the graph used, in ComfyUI's user folder (hypersd/ratings."
                         "sqlite3). 'Hyper-SD Train Preference Reward' learns your taste from them."),
            inputs=[
                io.Image.Input("images", tooltip="The pictures to rate."),
                io.String.Input("filename_prefix", default="hypersd_rated",
                                tooltip="Prefix of the saved files in the output folder (as Save Image)."),
                io.String.Input("prompt_text", default="", optional=True,
                                tooltip="The prompt the ratings are filed under; empty: read from the graph (the "
                                        "text of the sampler's positive prompt). Likes and dislikes are only "
                                        "compared within one prompt."),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo, io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, images, filename_prefix="hypersd_rated", prompt_text="") -> io.NodeOutput:
        saved = ui.ImageSaveHelper.save_images(images, filename_prefix=filename_prefix, folder_type=io.FolderType.output,
                                               cls=cls, compress_level=4)
        context = graph_context(cls.hidden.prompt, cls.hidden.unique_id)
        if prompt_text:
            context["prompt"] = prompt_text
        return io.NodeOutput(ui={"images": saved, CONTEXT_KEY: [context]})


class HyperSDTrainPreferenceReward(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HyperSDTrainPreferenceReward",
            display_name="Hyper-SD Train Preference Reward",
            category="Hyper-SD/training",
            description=("Learns your taste from the ratings made with 'Hyper-SD Rate Images': a Bradley-Terry head "
                         "(within a prompt a liked picture beats a disliked one; a 'prefer' click is one pair) on "
                         "frozen image features, with a share of the pairs held out to measure how often it agrees "
                         "with you. Saves it to models/hypersd_rewards and passes it on as a reward for "
                         "'Hyper-SD Train Feedback LoRA'."),
            inputs=[
                io.Combo.Input("features_from", options=["clip_vision"] + folder_paths.get_filename_list(rewards_folder()),
                               default="clip_vision",
                               tooltip="The frozen features the head reads: clip_vision (connect CLIP ViT-L/14 from "
                                       "CLIPVisionLoader) or a classifier reward's (the toy's hypersd_toy_reward)."),
                io.String.Input("output_name", default="my_preference",
                                tooltip="File name (no folders) of the head in models/hypersd_rewards."),
                io.Float.Input("margin", default=1.0, min=-100.0, max=100.0, step=0.05,
                               tooltip="Hinge margin for feedback: the score is in standard deviations over the "
                                       "rated pictures (0 = the average rated picture), so 1 asks for pictures one "
                                       "standard deviation above it and no further."),
                io.Float.Input("weight", default=1.0, min=0.0, max=100.0, step=0.05,
                               tooltip="Weight of this reward's hinge in the feedback loss."),
                io.Float.Input("holdout", default=0.2, min=0.0, max=0.9, step=0.05,
                               tooltip="Share of the pairs kept out of training to measure the agreement."),
                io.Int.Input("steps", default=400, min=1, max=100_000, tooltip="Optimizer steps (full batch)."),
                io.Float.Input("learning_rate", default=0.05, min=1e-6, max=10.0, step=0.001,
                               tooltip="Adam learning rate of the head."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Seed of the held-out split and the head's initialisation."),
                io.String.Input("prompt_contains", default="", optional=True,
                                tooltip="Use only ratings whose prompt contains this text (empty: all)."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="CLIP vision model, when features_from is clip_vision."),
                Reward.Input("rewards", optional=True, tooltip="Rewards loaded before this one (to combine)."),
            ],
            outputs=[
                Reward.Output(display_name="rewards", tooltip="The rewards so far, with this preference reward."),
                io.String.Output(display_name="report", tooltip="Pairs used and the held-out agreement."),
                io.String.Output(display_name="path", tooltip="Where the head was saved."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, features_from, output_name, margin, weight, holdout, steps, learning_rate, seed,
                prompt_contains="", clip_vision=None, rewards=None) -> io.NodeOutput:
        path, report = train_preference_reward(features_from, output_name, clip_vision, holdout=holdout, steps=steps,
                                               learning_rate=learning_rate, seed=seed, prompt_contains=prompt_contains)
        term = load_reward(os.path.basename(path), margin, weight, clip_vision=clip_vision)  # as the loader reads it
        text = report.summary()
        return io.NodeOutput(list(rewards or []) + [term], text, path, ui={"text": [text]})


NODES = [HyperSDRateImages, HyperSDTrainPreferenceReward]
__all__ = ["REWARDS_FOLDER", "NODES", "graph_context", "store_rating", "train_preference_reward"]
