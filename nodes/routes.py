"""The pack's server side: ``GET /hypersd/inspect`` and the advice given when a prompt is queued.

* ``/hypersd/inspect?lora=NAME`` (or ``unet=``/``checkpoint=``): what a file in a model
  folder is and how to sample it, as JSON (the same inspection the loader uses). Names
  with path components are refused (400), unknown names answer 404, unusable files 422.
* ``POST /hypersd/check``: a LoRA's name, its strength and the settings of the samplers its
  model flows into -> the badge line, one sentence per contradicting setting
  (``hypersd_core.advice``) and the values the page's "Apply" button sets.
* ``POST /hypersd/convert`` (a workflow, either format): the workflow with the nodes of other
  Hyper-SD/TCD packs converted to this pack's (``hypersd_core.convert``) and a sentence per
  converted node; 400 with what is wrong for a body that is no workflow.
* ``GET /hypersd/train/runs`` and ``/hypersd/train/runs/{node}``: the training runs since the
  server started (per-step loss and learning rate, stages, time, the files saved), which the
  page's chart asks for after a reload.
* an on-prompt hook: 'Load Checkpoint' given a diffusers UNet or a LoRA gets a warning
  in the log and an ``hypersd.advice`` message to the page (a toast), before anything runs.
"""
from __future__ import annotations

import asyncio
import logging
import os
import re

from ..hypersd_core import advice, convert, lora_file
from ..hypersd_core.lora_file import LoraFileError, LoraInfo
from . import _training_progress
from ._errors import HyperSDError
from ._server import prompt_server
from .lora import inspect_lora_name

log = logging.getLogger("HyperSD")

_SAFE_NAME = re.compile(r"^[^\x00]+$")
MAX_NAME = 4096  # the longest path Linux takes
_FOLDERS = {"lora": "loras", "unet": "diffusion_models", "checkpoint": "checkpoints"}


def _named_file(kind: str, name) -> tuple[int, dict | LoraInfo]:
    """(200, the file's inspection) or (HTTP status, JSON error body) for a name from a model list."""
    import folder_paths

    folder = _FOLDERS[kind]
    if not isinstance(name, str) or not name:
        return 400, {"error": f"give the file's name from the {folder} list"}
    if len(name) > MAX_NAME:  # longer than any path; never quoted back
        return 400, {"error": f"refused: a name of {len(name)} characters is no file name from the {folder} list"}
    norm = name.replace("\\", "/")
    if (not _SAFE_NAME.match(name) or os.path.isabs(name) or norm.startswith("/") or re.match(r"^[A-Za-z]:", name)
            or any(part in ("..", ".") for part in norm.split("/"))):
        return 400, {"error": f"refused: '{name}' is not a plain file name from the {folder} list"}
    if name not in folder_paths.get_filename_list(folder):
        return 404, {"error": f"'{name}' is not in the {folder} list", "folder": folder}
    try:
        _, info = inspect_lora_name(name, folder)
    except HyperSDError as e:
        return 422, {"error": str(e), "name": name, "folder": folder}
    return 200, info


def inspect_request(query: dict) -> tuple[int, dict]:
    """(HTTP status, JSON body) for GET /hypersd/inspect?lora=NAME (or unet=, checkpoint=)."""
    given = [(k, query[k]) for k in _FOLDERS if query.get(k)]
    if len(given) != 1:
        return 400, {"error": "give exactly one of ?lora=NAME, ?unet=NAME or ?checkpoint=NAME"}
    kind, name = given[0]
    status, info = _named_file(kind, name)
    if status != 200:
        return status, info
    body = info.to_json()
    body["summary"] = info.summary()
    body["folder"] = _FOLDERS[kind]
    body["use_node"] = _advice(info)
    body["hypersd"] = _is_hypersd_lora(info)
    body["badge"] = _badge(info)
    return 200, body


def _is_hypersd_lora(info: LoraInfo) -> bool:
    return info.kind == "lora" and info.variant != "unknown"


def _badge(info: LoraInfo) -> str:
    """The line the page's badge shows for a Hyper-SD file."""
    return f"Hyper-SD {info.family} {info.describe_variant()}: {advice.describe(info.recipe)}"


def check_request(body) -> tuple[int, dict]:
    """(HTTP status, JSON body) for POST /hypersd/check: ``{"lora": NAME, "strength": x | null,
    "samplers": [{"id": ..., "steps", "cfg", "sampler", "scheduler", "eta"}, ...]}`` ->
    ``{"hypersd", "badge", "apply", "warnings": {id: [sentence, ...]}, "strength_warnings"}``."""
    if not isinstance(body, dict):
        return 400, {"error": "send a JSON object with 'lora' and 'samplers'"}
    status, info = _named_file("lora", body.get("lora"))
    if status != 200:
        return status, info
    samplers = body.get("samplers") or []
    if not isinstance(samplers, list) or len(samplers) > 64:
        return 400, {"error": "'samplers' must be a list (at most 64)"}
    if not _is_hypersd_lora(info):
        return 200, {"hypersd": False, "badge": "", "apply": None, "warnings": {}, "strength_warnings": []}
    recipe, variant = info.recipe, info.variant
    out = {"hypersd": True, "badge": _badge(info), "warnings": {}}
    try:
        strength = body.get("strength")
        out["strength_warnings"] = advice.check(recipe, variant, advice.Settings.from_json({"strength": strength}))
        steps = None
        for item in samplers:
            s = advice.Settings.from_json({k: v for k, v in (item or {}).items() if k != "id"})
            steps = s.steps if steps is None else steps
            out["warnings"][str(item.get("id"))] = advice.check(recipe, variant, s)
    except (ValueError, AttributeError, OverflowError) as e:  # OverflowError: a step count of 1e400 (infinity)
        return 400, {"error": f"bad sampler settings: {e}"}
    out["apply"] = advice.apply_values(recipe, steps)
    return 200, out


def convert_request(body) -> tuple[int, dict]:
    """(HTTP status, JSON body) for POST /hypersd/convert."""
    try:
        workflow, notes = convert.convert_workflow(body)
        types = convert.foreign_types(body)
    except convert.ConvertError as e:
        return 400, {"error": f"Hyper-SD could not convert this workflow: {e}"}
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError) as e:
        # a value of the wrong type or shape that convert does not look for (a damaged or hostile file)
        log.debug("Hyper-SD: convert refused a workflow", exc_info=True)
        return 400, {"error": f"Hyper-SD could not convert this workflow: a value in it has the wrong type or shape "
                              f"({e.__class__.__name__}); the file is damaged"}
    return 200, {"workflow": workflow, "converted": notes, "types": types}


def _advice(info: LoraInfo) -> str:
    if info.kind == "lora":
        return "HyperSDLoraLoader"
    if info.kind == "unet":
        return "HyperSDUNetLoader"
    if info.kind == "checkpoint":
        return "CheckpointLoaderSimple"
    return ""


def _on_prompt(json_data):
    """Warn, before anything runs, when 'Load Checkpoint' is given a UNet-only file (e.g. the
    diffusers one-step UNet): core then fails later with a KeyError or 'clip input is invalid'."""
    try:
        import folder_paths

        prompt = json_data.get("prompt") or {}
        for node_id, node in prompt.items():
            if not isinstance(node, dict) or node.get("class_type") not in ("CheckpointLoaderSimple", "CheckpointLoader"):
                continue
            name = (node.get("inputs") or {}).get("ckpt_name")
            if not isinstance(name, str):
                continue
            path = folder_paths.get_full_path("checkpoints", name)
            if not path or not path.lower().endswith(lora_file.SAFETENSORS_EXTENSIONS):
                continue
            try:
                info = lora_file.inspect_cached(path, name)
            except (LoraFileError, OSError):
                continue
            fam = info.family if info.family != "unknown" else "matching"
            if info.kind == "unet" and info.key_format == "diffusers":
                msg = (f"'{name}' is a UNet for {info.family} in diffusers format (no text encoder, no VAE), which 'Load "
                       "Checkpoint' cannot load. Move it to models/diffusion_models and load it with 'Hyper-SD UNet "
                       f"Loader (one-step)' (or 'Load Diffusion Model'); take CLIP and VAE from your {fam} base "
                       "checkpoint.")
                use = "HyperSDUNetLoader"
            elif info.kind == "lora":
                msg = (f"'{name}' is a LoRA for {info.family}, not a checkpoint. Move it to models/loras and use "
                       f"'Hyper-SD LoRA Loader' after your {fam} base checkpoint.")
                use = "HyperSDLoraLoader"
            else:
                continue
            log.warning("Hyper-SD: %s", msg)
            _notify({"node": node_id, "message": msg, "use_node": use})  # the page's toast is titled Hyper-SD
    except Exception:  # never stand in the way of a prompt
        log.debug("Hyper-SD: prompt check failed", exc_info=True)
    return json_data


def _notify(data: dict) -> None:
    try:
        from server import PromptServer

        PromptServer.instance.send_sync("hypersd.advice", data)
    except Exception as e:  # the page is optional; the log has the advice
        log.debug("Hyper-SD: advice message failed: %s", e)


def register() -> None:
    found = prompt_server()
    if found is None:
        return
    web, inst = found

    @inst.routes.get("/hypersd/inspect")
    async def hypersd_inspect(request):
        status, body = await asyncio.to_thread(inspect_request, dict(request.rel_url.query))
        return web.json_response(body, status=status)

    @inst.routes.get("/hypersd/train/runs")
    async def hypersd_train_runs(request):
        return web.json_response({"runs": _training_progress.runs_json()})

    @inst.routes.get("/hypersd/train/runs/{node}")
    async def hypersd_train_run(request):
        run = _training_progress.run_json(request.match_info["node"])
        if run is None:
            return web.json_response({"error": "no training run of that node since the server started"}, status=404)
        return web.json_response(run)

    def json_post(path: str, handle, what: str, max_body: int | None = None):
        """POST ``path``: the JSON body to ``handle(body) -> (status, answer)``, off the event loop;
        a body over ``max_body`` bytes is refused unread (otherwise the host's upload limit holds)."""

        async def route(request):
            if max_body is not None and (request.content_length or 0) > max_body:
                return web.json_response({"error": f"the body is larger than {max_body} bytes; send {what}"},
                                         status=413)
            try:
                body = await request.json()
            except (ValueError, LookupError, RecursionError):  # not JSON, an unknown charset, nested too deep to parse
                return web.json_response({"error": f"the body is not JSON; send {what}"}, status=400)
            status, out = await asyncio.to_thread(handle, body)
            return web.json_response(out, status=status)

        inst.routes.post(path)(route)

    json_post("/hypersd/check", check_request, "the LoRA's name and the samplers' settings", max_body=1 << 20)
    json_post("/hypersd/convert", convert_request, "the workflow file's text")

    inst.add_on_prompt_handler(_on_prompt)


