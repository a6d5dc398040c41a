"""Workflow files: ComfyUI's UI format (nodes + links, as saved by the editor and shipped in
``example_workflows/``) to and from the API format that ``/prompt`` takes.

Widget values are matched to inputs by the order ``/object_info`` gives (``input_order``);
an INT input with ``control_after_generate`` carries one extra UI value ("fixed",
"randomize", ...) that the API format does not have.
"""
from __future__ import annotations

import json
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _ordered_inputs(info: dict) -> list[tuple[str, list]]:
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            out.append((name, info["input"][section][name]))
    return out


def _is_widget(spec: list) -> bool:
    t = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):  # a socket in the front end, never a widget (e.g. a STRING from another node)
        return False
    return isinstance(t, list) or t in WIDGET_TYPES


def _extra_ui_value(spec: list) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return bool(opts.get("control_after_generate"))


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """Convert a UI-format workflow to an API-format prompt (muted/bypassed nodes dropped)."""
    links = {l[0]: l for l in ui.get("links", [])}
    api = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) in (2, 4) or node["type"] in ("Note", "MarkdownNote"):
            continue
        info = object_info.get(node["type"])
        if info is None:
            raise KeyError(f"node type {node['type']!r} (node {node['id']}) is not installed")
        linked = {i["name"]: i.get("link") for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values", []))
        inputs = {}
        for name, spec in _ordered_inputs(info):
            if _is_widget(spec) and values:
                inputs[name] = values.pop(0)
                if _extra_ui_value(spec) and values:
                    values.pop(0)
            if name in linked:
                l = links[linked[name]]
                inputs[name] = [str(l[1]), l[2]]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                "_meta": {"title": node.get("title", node["type"])}}
    return api


def api_to_ui(api: dict, object_info: dict, titles: dict | None = None, notes: list[str] | None = None) -> dict:
    """Lay out an API-format graph as a UI-format workflow (columns by depth)."""
    titles = titles or {}
    ids = list(api)
    depth = {}

    def d(nid):
        if nid not in depth:
            ups = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)]
            depth[nid] = 0 if not ups else 1 + max(d(u) for u in ups)
        return depth[nid]

    for nid in ids:
        d(nid)
    links, nodes = [], []
    rows: dict[int, int] = {}
    out_links: dict[tuple[str, int], list[int]] = {}
    for nid in ids:
        for name, v in api[nid]["inputs"].items():
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
                lid = len(links) + 1
                src_info = object_info[api[v[0]]["class_type"]]
                links.append([lid, int(v[0]), v[1], int(nid), name, src_info["output"][v[1]]])
                out_links.setdefault((v[0], v[1]), []).append(lid)
    for order, nid in enumerate(sorted(ids, key=lambda n: depth[n])):
        node = api[nid]
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
        for name, spec in _ordered_inputs(info):
            v = node["inputs"].get(name, (spec[1] or {}).get("default") if len(spec) > 1 else None)
            is_link = isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)
            if _is_widget(spec):
                widgets.append(None if is_link else v)
                if _extra_ui_value(spec):
                    widgets.append("fixed")
                if is_link:
                    inputs.append({"name": name, "type": spec[0] if isinstance(spec[0], str) else "COMBO",
                                   "widget": {"name": name}, "link": None})
            elif name in node["inputs"]:
                inputs.append({"name": name, "type": spec[0], "link": None})
        col = depth[nid]
        row = rows.get(col, 0)
        rows[col] = row + 1
        outputs = [{"name": n, "type": t, "links": out_links.get((nid, i), []), "slot_index": i}
                   for i, (n, t) in enumerate(zip(info["output_name"], info["output"]))]
        nodes.append({"id": int(nid), "type": node["class_type"], "pos": [40 + 360 * col, 40 + 260 * row],
                      "size": [320, 200], "flags": {}, "order": order, "mode": 0, "inputs": inputs,
                      "outputs": outputs, "title": titles.get(nid, info.get("display_name") or node["class_type"]),
                      "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets})
    for link in links:
        target = next(n for n in nodes if n["id"] == link[3])
        for inp in target["inputs"]:
            if inp["name"] == link[4]:
                inp["link"] = link[0]
                link[4] = target["inputs"].index(inp)
    next_id = max(int(i) for i in ids) + 1
    for k, text in enumerate(notes or []):
        nodes.append({"id": next_id + k, "type": "MarkdownNote", "pos": [40, 40 + 260 * (max(rows.values()) + k)],
                      "size": [560, 220], "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                      "properties": {}, "widgets_values": [text], "title": "About this workflow"})
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())
