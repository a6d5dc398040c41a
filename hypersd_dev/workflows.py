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
    place: dict[str, tuple[int, int]] = {}

    def d(nid) -> tuple[int, int]:
        """(column, depth): a decode/save/preview node stands below the node it follows, in its column."""
        if nid not in place:
            ups = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str)]
            if not ups:
                place[nid] = (0, 0)
            else:
                cols, depths = zip(*(d(u) for u in ups))
                place[nid] = (max(cols) + (0 if api[nid]["class_type"] in _TAILS else 1), 1 + max(depths))
        return place[nid]

    for nid in ids:
        d(nid)
    links, nodes = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    for nid in ids:
        for name, v in api[nid]["inputs"].items():
            if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str):
                lid = len(links) + 1
                src_info = object_info[api[v[0]]["class_type"]]
                links.append([lid, int(v[0]), v[1], int(nid), name, src_info["output"][v[1]]])
                out_links.setdefault((v[0], v[1]), []).append(lid)
    # the note on top (its heading is its first line), then columns by depth, each node as tall
    # as its sockets and widgets, with room between columns for the wires
    note_h = max((_note_height(t) for t in notes or []), default=0)
    top = 40 + (note_h + 50 if notes else 0)
    col_y: dict[int, int] = {}
    for order, nid in enumerate(sorted(ids, key=lambda n: place[n])):
        node = api[nid]
        info = object_info[node["class_type"]]
        inputs, widgets, tall = [], [], 0
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
                elif spec[0] == "STRING" and (spec[1] or {}).get("multiline"):
                    tall += 1
            elif name in node["inputs"]:
                inputs.append({"name": name, "type": spec[0], "link": None})
        col = place[nid][0]
        outputs = [{"name": n, "type": t, "links": out_links.get((nid, i), []), "slot_index": i}
                   for i, (n, t) in enumerate(zip(info["output_name"], info["output"]))]
        sockets = max(sum(1 for i in inputs if "widget" not in i), len(outputs))
        height = 40 + 22 * sockets + 24 * (len(widgets) - tall) + 110 * tall
        width = 360 if len(widgets) > 8 else 320
        y = col_y.get(col, top)
        col_y[col] = y + height + 50
        nodes.append({"id": int(nid), "type": node["class_type"], "pos": [40 + 390 * col, y],
                      "size": [width, height], "flags": {}, "order": order, "mode": 0, "inputs": inputs,
                      "outputs": outputs, "title": titles.get(nid, info.get("display_name") or node["class_type"]),
                      "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": widgets})
    for link in links:
        target = next(n for n in nodes if n["id"] == link[3])
        for inp in target["inputs"]:
            if inp["name"] == link[4]:
                inp["link"] = link[0]
                link[4] = target["inputs"].index(inp)
    groups = _groups(nodes)
    next_id = max(int(i) for i in ids) + 1
    for k, text in enumerate(notes or []):
        nodes.append({"id": next_id + k, "type": "MarkdownNote", "pos": [40 + 800 * k, 40],
                      "size": [760, note_h], "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                      "properties": {}, "widgets_values": [text], "title": "About this workflow"})
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": groups, "config": {}, "extra": {}, "version": 0.4}


_TAILS = ("VAEDecode", "SaveImage", "PreviewImage", "SaveLatent", "HyperSDRateImages")


def _note_height(text: str) -> int:
    lines = sum(max(1, -(-len(line) // 105)) for line in text.splitlines())
    return 60 + 17 * lines


# Groups a reader finds the graph by: what is loaded, this pack's nodes, what samples and saves.
_GROUPS = (("Load", "#3f789e", lambda t: t.endswith(("Loader", "LoaderSimple", "LoaderModelOnly"))
            or t.startswith(("LoadImage", "MakeTrainingDataset"))),
           ("Hyper-SD", "#8a5aa8", lambda t: t.startswith("HyperSD")),
           ("Sample", "#4f8a4f", lambda t: t.startswith(("KSampler", "SamplerCustom", "VAEDecode", "SaveImage",
                                                          "PreviewImage", "SaveLatent"))))


def _box(n: dict) -> tuple[float, float, float, float]:
    (x, y), (w, h) = n["pos"], n["size"]
    return x, y - 30, x + w, y + h  # the title bar sits above pos


def _groups(nodes: list[dict]) -> list[dict]:
    """A group around each role's nodes, where the box holds no other node and meets no other group."""
    out, taken = [], set()
    for title, color, is_member in _GROUPS:
        members = [n for n in nodes if is_member(n["type"]) and n["id"] not in taken]
        if not members:
            continue
        boxes = [_box(n) for n in members]
        x0, y0 = min(b[0] for b in boxes) - 15, min(b[1] for b in boxes) - 45
        x1, y1 = max(b[2] for b in boxes) + 15, max(b[3] for b in boxes) + 15
        others = [_box(n) for n in nodes if n not in members]
        groups_ = [g["bounding"] for g in out]
        clash = any(a < x1 and c > x0 and b < y1 and d > y0 for a, b, c, d in others) or any(
            gx < x1 and gx + gw > x0 and gy < y1 and gy + gh > y0 for gx, gy, gw, gh in groups_)
        if clash:
            continue
        taken.update(n["id"] for n in members)
        out.append({"id": len(out) + 1, "title": title, "bounding": [x0, y0, x1 - x0, y1 - y0], "color": color,
                    "font_size": 24, "flags": {}})
    return out


def load(path: Path) -> dict:
    return json.loads(Path(path).read_text())
