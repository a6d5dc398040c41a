"""Shared workflows made with other Hyper-SD/TCD packs, converted to this pack's nodes.

People share ComfyUI workflows that use the node types of the TCD and Hyper-SD packs they
had installed. Opened where those packs are missing, every such node is a red box and the
graph cannot run. :func:`convert_workflow` rewrites each of them into this pack's
equivalent, keeping the links and the values that mean the same thing:

==================================  =========================================================
other pack's node (its inputs)      this pack's node(s)
==================================  =========================================================
``TCDModelSamplingDiscrete``        ``HyperSDScheduler`` (model, steps, mode ``tcd``, denoise)
(JettHu/ComfyUI-TCD: model, steps,  for its SIGMAS and ``HyperSDTCDSampler`` (eta) for its
scheduler, denoise, eta; outputs    SAMPLER; its MODEL output is the model it was given (this
MODEL, SAMPLER, SIGMAS)             pack samples TCD without patching the model), so the links
                                    from it start at that model's source instead
``TCDScheduler`` (dfl; model,       ``HyperSDScheduler`` (model, steps, mode ``tcd``): TCD's own
steps on the ``ddim_uniform`` grid) grid, the one the TCD sampler is made for
``SamplerTCD`` (dfl; gamma, in      ``HyperSDTCDSampler`` (eta = gamma)
older versions eta)
``SamplerTCD EulerA`` (dfl; gamma)  ``HyperSDTCDSampler`` (eta = gamma): TCD's own step in
                                    place of the Euler-ancestral variant
``HyperSDXL1StepUnetScheduler``     ``HyperSDOneStepScheduler`` (model, timestep 800, denoise 1):
(ByteDance release; model, steps)   the steps were ignored there too (always one step from 800)
==================================  =========================================================

Both formats of a workflow file are read: the editor's (``nodes`` + ``links``, links as
lists or as objects) and the API's (``{id: {class_type, inputs}}``). The result is a new
workflow (the given one is not changed) and one sentence per converted node saying what
changed, for the page to show. Plain Python: no ComfyUI, no torch.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping

SCHEDULER = "HyperSDScheduler"
SAMPLER = "HyperSDTCDSampler"
ONE_STEP = "HyperSDOneStepScheduler"
DEFAULT_ETA = 0.3
DEFAULT_STEPS = 4
MIN_DENOISE = 0.01  # HyperSDScheduler's lowest denoise

# The node types this module converts, with the pack each comes from (for messages).
FOREIGN = {
    "TCDModelSamplingDiscrete": "ComfyUI-TCD (JettHu)",
    "TCDScheduler": "comfyui-tcd-scheduler (dfl)",
    "SamplerTCD": "comfyui-tcd-scheduler (dfl)",
    "SamplerTCD EulerA": "comfyui-tcd-scheduler (dfl)",
    "HyperSDXL1StepUnetScheduler": "Hyper-SD's ComfyUI release (ByteDance)",
}

TITLES = {"TCDModelSamplingDiscrete": ("TCD Model Sampling Discrete",)}  # display names they had


class ConvertError(ValueError):
    """The file is not a workflow this module can read; the message says what is wrong."""


def foreign_types(workflow: Mapping) -> list[str]:
    """The node types of :data:`FOREIGN` that ``workflow`` uses (sorted, each once)."""
    kind = _kind(workflow)
    if kind == "ui":
        defs = workflow.get("definitions")
        graphs = [workflow] + list((defs.get("subgraphs") or []) if isinstance(defs, Mapping) else [])
        types = [n.get("type") for g in graphs if isinstance(g, Mapping) for n in g.get("nodes") or []
                 if isinstance(n, Mapping)]
    else:
        types = [n.get("class_type") for n in workflow.values() if isinstance(n, Mapping)]
    return sorted({t for t in types if t in FOREIGN})


def convert_workflow(workflow: Mapping) -> tuple[dict, list[str]]:
    """``(converted copy, one sentence per converted node)``; a workflow without foreign nodes
    comes back equal to the given one with no sentences. :class:`ConvertError` when
    ``workflow`` is neither format, or a foreign node in it is malformed."""
    kind = _kind(workflow)
    wf = copy.deepcopy(dict(workflow))
    if kind == "api":
        return wf, _convert_api(wf)
    notes = _convert_ui(wf)
    defs = wf.get("definitions")
    for sg in (defs.get("subgraphs") or []) if isinstance(defs, dict) else []:
        if isinstance(sg, dict) and isinstance(sg.get("nodes"), list):
            name = sg.get("name") or sg.get("id") or "?"
            notes += [f"subgraph '{name}': {n}" for n in _convert_ui(sg, id_from=wf)]
    return wf, notes


# ----------------------------------------------------------------------------- values


def _number(v, default, cast, name: str, node) -> float:
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConvertError(f"node {node}: {name} is {v!r}, not a number; fix the value in the file and open it again")
    return cast(v)


def _clamp(v: float, lo: float, hi: float) -> float:
    return min(hi, max(lo, v))


def _scheduler_values(steps, denoise, node) -> tuple[int, float, str]:
    """(steps, denoise, note) for HyperSDScheduler from another pack's values."""
    steps = int(_clamp(_number(steps, DEFAULT_STEPS, int, "steps", node), 1, 1000))
    raw = _number(denoise, 1.0, float, "denoise", node)
    d = _clamp(raw, MIN_DENOISE, 1.0)
    note = f" (denoise {raw:g} is below the lowest, {MIN_DENOISE:g}: set to {d:g})" if d != raw else ""
    return steps, d, note


def _eta(v, node, name: str = "eta") -> float:
    return _clamp(_number(v, DEFAULT_ETA, float, name, node), 0.0, 1.0)


def _widgets(node: Mapping) -> list:
    w = node.get("widgets_values")
    if isinstance(w, Mapping):  # some savers write widgets by name
        return list(w.values())
    return list(w) if isinstance(w, list) else []


# ----------------------------------------------------------------------------- formats


def _kind(workflow) -> str:
    if not isinstance(workflow, Mapping):
        raise ConvertError("a workflow is a JSON object; this file holds something else")
    if isinstance(workflow.get("nodes"), list):
        if not isinstance(workflow.get("links", []), list):
            raise ConvertError("the workflow's 'links' is not a list; the file is damaged")
        return "ui"
    if workflow and all(isinstance(v, Mapping) and "class_type" in v for v in workflow.values()):
        return "api"
    raise ConvertError("not a ComfyUI workflow: it has neither 'nodes' (a saved workflow) nor "
                       "nodes with 'class_type' (an API prompt)")


class _Links:
    """The editor format's links, as lists ``[id, from, from_slot, to, to_slot, type]`` or as
    objects ``{id, origin_id, origin_slot, target_id, target_slot, type}``, edited in place."""

    FIELDS = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")

    def __init__(self, wf: dict):
        self.wf = wf
        self.items = wf.setdefault("links", [])

    def get(self, link, field):
        if isinstance(link, list):
            return link[self.FIELDS.index(field)]
        return link.get(field)

    def set(self, link, field, value):
        if isinstance(link, list):
            link[self.FIELDS.index(field)] = value
        else:
            link[field] = value

    def by_id(self, link_id):
        for link in self.items:
            if self.get(link, "id") == link_id:
                return link
        return None

    def remove(self, link_id):
        self.items[:] = [link for link in self.items if self.get(link, "id") != link_id]


def _convert_ui(wf: dict, id_from: dict | None = None) -> list[str]:
    """Convert the nodes of one graph (the workflow, or a subgraph definition with ``id_from``
    the workflow whose ``last_node_id`` new nodes take their ids from)."""
    links = _Links(wf)
    nodes = wf["nodes"]
    by_id = {n.get("id"): n for n in nodes if isinstance(n, Mapping)}
    notes = []
    for node in list(nodes):
        if not isinstance(node, Mapping) or node.get("type") not in FOREIGN:
            continue
        old = node["type"]
        nid = node.get("id")
        w = _widgets(node)
        if old in ("SamplerTCD", "SamplerTCD EulerA"):
            eta = _eta(w[0] if w else None, nid, "gamma")
            _retype(node, SAMPLER, [eta], [("SAMPLER", "SAMPLER")])
            extra = "; TCD's own step replaces the Euler-ancestral variant" if old.endswith("EulerA") else ""
            notes.append(f"node {nid} '{old}' -> 'Hyper-SD TCD Sampler' (eta {eta:g}){extra}")
        elif old == "TCDScheduler":
            steps, denoise, note = _scheduler_values(w[0] if w else None, 1.0, nid)
            _retype(node, SCHEDULER, [steps, "tcd", denoise], [("SIGMAS", "SIGMAS")], keep_inputs=("model",))
            notes.append(f"node {nid} '{old}' -> 'Hyper-SD Scheduler' ({steps} steps on TCD's grid, "
                         f"which the TCD sampler is made for, in place of ddim_uniform){note}")
        elif old == "HyperSDXL1StepUnetScheduler":
            _retype(node, ONE_STEP, [800, 1.0], [("SIGMAS", "SIGMAS")], keep_inputs=("model",))
            notes.append(f"node {nid} '{old}' -> 'Hyper-SD One-Step Scheduler' (one step from timestep 800, "
                         f"as before; its steps value was not used there either)")
        else:  # TCDModelSamplingDiscrete: MODEL, SAMPLER, SIGMAS
            notes.append(_split_tcd_model_sampling(wf, node, by_id, links, id_from or wf))
    return notes


def _retype(node: dict, new_type: str, widgets: list, outputs: list[tuple[str, str]], keep_inputs=(),
            out_links: list[list] | None = None) -> None:
    """Make ``node`` a ``new_type`` node with ``widgets`` and ``outputs`` (name, type), keeping
    the links of the inputs named in ``keep_inputs`` and, per new output, ``out_links`` (by
    default those of the old output at the same index)."""
    if node.get("title") in (node.get("type"), *TITLES.get(node.get("type"), ())):
        node.pop("title")  # the other pack's default title: the new node shows its own
    node["type"] = new_type
    node["widgets_values"] = widgets
    props = node.setdefault("properties", {})
    if isinstance(props, dict):
        props["Node name for S&R"] = new_type
    node["inputs"] = [dict(i) for i in node.get("inputs") or [] if isinstance(i, Mapping) and i.get("name") in keep_inputs]
    if out_links is None:
        old = node.get("outputs") or []
        out_links = [list((old[k] or {}).get("links") or []) if k < len(old) else [] for k in range(len(outputs))]
    node["outputs"] = [{"name": name, "type": t, "links": out_links[k], "slot_index": k}
                       for k, (name, t) in enumerate(outputs)]


def _split_tcd_model_sampling(wf: dict, node: dict, by_id: dict, links: _Links, ids: dict) -> str:
    nid = node["id"]
    w = _widgets(node)  # steps, scheduler, denoise, eta
    steps, denoise, note = _scheduler_values(w[0] if len(w) > 0 else None, w[2] if len(w) > 2 else None, nid)
    eta = _eta(w[3] if len(w) > 3 else None, nid)
    outputs = node.get("outputs") or []
    out_links = [list((outputs[k] or {}).get("links") or []) if k < len(outputs) else [] for k in range(3)]
    model_in = next((i for i in node.get("inputs") or [] if isinstance(i, Mapping) and i.get("name") == "model"), None)
    source = links.by_id(model_in.get("link")) if model_in and model_in.get("link") is not None else None

    # 1. The SAMPLER output moves to a new Hyper-SD TCD Sampler node beside it.
    new_id = _next_node_id(wf, ids)
    pos = node.get("pos") or [0, 0]
    pos = [pos[0], pos[1]] if isinstance(pos, list) else [pos.get("0", 0), pos.get("1", 0)]
    sampler = {"id": new_id, "type": SAMPLER, "pos": [pos[0], pos[1] + 190], "size": [315, 58], "flags": {},
               "order": node.get("order", 0), "mode": node.get("mode", 0), "inputs": [],
               "outputs": [{"name": "SAMPLER", "type": "SAMPLER", "links": out_links[1], "slot_index": 0}],
               "properties": {"Node name for S&R": SAMPLER}, "widgets_values": [eta]}
    wf["nodes"].append(sampler)
    by_id[new_id] = sampler
    for lid in out_links[1]:
        link = links.by_id(lid)
        if link is not None:
            links.set(link, "origin_id", new_id)
            links.set(link, "origin_slot", 0)
    # 2. The node itself becomes the Hyper-SD Scheduler: its SIGMAS output (slot 2) becomes slot 0.
    for lid in out_links[2]:
        link = links.by_id(lid)
        if link is not None:
            links.set(link, "origin_slot", 0)
    # 3. The MODEL output's links start at the model's own source (or go, with no source).
    dropped = []
    for lid in out_links[0]:
        link = links.by_id(lid)
        if link is None:
            continue
        if source is None:
            links.remove(lid)
            dropped.append(lid)
            target = by_id.get(links.get(link, "target_id"))
            for i in (target or {}).get("inputs") or []:
                if isinstance(i, dict) and i.get("link") == lid:
                    i["link"] = None
            continue
        src_id, src_slot = links.get(source, "origin_id"), links.get(source, "origin_slot")
        links.set(link, "origin_id", src_id)
        links.set(link, "origin_slot", src_slot)
        src = by_id.get(src_id)
        if src is None and isinstance(src_id, int) and src_id < 0:  # a subgraph's input
            ins = wf.get("inputs") or []
            if src_slot < len(ins) and isinstance(ins[src_slot], dict):
                ins[src_slot].setdefault("linkIds", []).append(lid)
        elif src is not None and src_slot < len(src.get("outputs") or []):
            src["outputs"][src_slot].setdefault("links", [])
            if src["outputs"][src_slot]["links"] is None:
                src["outputs"][src_slot]["links"] = []
            src["outputs"][src_slot]["links"].append(lid)
    _retype(node, SCHEDULER, [steps, "tcd", denoise], [("SIGMAS", "SIGMAS")], keep_inputs=("model",),
            out_links=[out_links[2]])
    if "last_node_id" in ids or not isinstance(ids.get("state"), dict):
        ids["last_node_id"] = max(int(ids.get("last_node_id") or 0), new_id)
    if isinstance(ids.get("state"), dict) and "lastNodeId" in ids["state"]:  # the newer file format's counter
        ids["state"]["lastNodeId"] = max(int(ids["state"]["lastNodeId"] or 0), new_id)
    model_note = ("its MODEL output now comes from the model it was given" if out_links[0] and not dropped
                  else "its MODEL output had no model to pass on and is left unconnected" if dropped else "")
    return (f"node {nid} 'TCDModelSamplingDiscrete' -> 'Hyper-SD Scheduler' ({steps} steps on TCD's grid, "
            f"denoise {denoise:g}){note} and a new node {new_id} 'Hyper-SD TCD Sampler' (eta {eta:g})"
            + (f"; {model_note}" if model_note else ""))


def _next_node_id(wf: dict, top: dict) -> int:
    graphs = [wf, top] + list(((top.get("definitions") or {}).get("subgraphs") or []))
    ids = [n.get("id") for g in graphs if isinstance(g, Mapping) for n in g.get("nodes") or []
           if isinstance(n, Mapping) and isinstance(n.get("id"), int)]
    state = top.get("state") if isinstance(top.get("state"), Mapping) else {}
    return max([int(top.get("last_node_id") or 0), int(state.get("lastNodeId") or 0), *ids]) + 1


def _convert_api(wf: dict) -> list[str]:
    notes = []
    for nid in list(wf):
        node = wf[nid]
        old = node.get("class_type")
        if old not in FOREIGN:
            continue
        inputs = node.get("inputs") or {}
        if not isinstance(inputs, Mapping):
            raise ConvertError(f"node {nid}: its inputs are not an object; the file is damaged")
        if old in ("SamplerTCD", "SamplerTCD EulerA"):
            eta = _eta(inputs.get("gamma", inputs.get("eta")), nid, "gamma" if "gamma" in inputs else "eta")
            wf[nid] = {**node, "class_type": SAMPLER, "inputs": {"eta": eta}}
            notes.append(f"node {nid} '{old}' -> 'Hyper-SD TCD Sampler' (eta {eta:g})")
        elif old == "TCDScheduler":
            steps, denoise, note = _scheduler_values(inputs.get("steps"), 1.0, nid)
            wf[nid] = {**node, "class_type": SCHEDULER,
                       "inputs": {"model": inputs.get("model"), "steps": steps, "mode": "tcd", "denoise": denoise}}
            notes.append(f"node {nid} '{old}' -> 'Hyper-SD Scheduler' ({steps} steps on TCD's grid){note}")
        elif old == "HyperSDXL1StepUnetScheduler":
            wf[nid] = {**node, "class_type": ONE_STEP,
                       "inputs": {"model": inputs.get("model"), "timestep": 800, "denoise": 1.0}}
            notes.append(f"node {nid} '{old}' -> 'Hyper-SD One-Step Scheduler' (one step from timestep 800)")
        else:
            steps, denoise, note = _scheduler_values(inputs.get("steps"), inputs.get("denoise"), nid)
            eta = _eta(inputs.get("eta"), nid)
            new_id = _free_api_id(wf, nid)
            wf[nid] = {**node, "class_type": SCHEDULER,
                       "inputs": {"model": inputs.get("model"), "steps": steps, "mode": "tcd", "denoise": denoise}}
            wf[new_id] = {"class_type": SAMPLER, "inputs": {"eta": eta}}
            model = inputs.get("model")
            for other in wf.values():
                for name, v in list((other.get("inputs") or {}).items()):
                    if isinstance(v, list) and len(v) == 2 and str(v[0]) == str(nid):
                        if v[1] == 0:
                            other["inputs"][name] = copy.deepcopy(model)
                        elif v[1] == 1:
                            other["inputs"][name] = [new_id, 0]
                        elif v[1] == 2:
                            other["inputs"][name] = [v[0], 0]
            notes.append(f"node {nid} 'TCDModelSamplingDiscrete' -> 'Hyper-SD Scheduler' ({steps} steps on TCD's "
                         f"grid, denoise {denoise:g}){note} and a new node {new_id} 'Hyper-SD TCD Sampler' "
                         f"(eta {eta:g}); its MODEL output now comes from the model it was given")
    return notes


def _free_api_id(wf: dict, base) -> str:
    nums = [int(k) for k in wf if str(k).isdigit()]
    if nums:
        return str(max(nums) + 1)
    k = 1
    while f"{base}_{k}" in wf:
        k += 1
    return f"{base}_{k}"
