"""Workflows shared by users of other Hyper-SD/TCD packs (``hypersd_core.convert``): each of
their nodes becomes this pack's, links and values kept; the converted workflow runs on the
real server and makes the same pictures as the same graph built with this pack's nodes;
``POST /hypersd/convert`` answers the page, and a file that is no workflow gets a sentence.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hypersd_dev import other_packs, workflows
from hypersd_dev.fixtures import place
from ComfyUI_HyperSD.hypersd_core import convert


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get("/object_info")


@pytest.fixture(scope="module")
def toy_ckpt(comfy_server):
    from toy import install

    installed = install.install(Path(tempfile.gettempdir()) / "hypersd-test-files" / "toy-models")
    return place(comfy_server.base, "checkpoints", installed["checkpoint"])


def _links_consistent(ui: dict) -> None:
    """Every link joins an existing output slot to an existing input slot, and both ends list it."""
    nodes = {n["id"]: n for n in ui["nodes"]}
    ids = set()
    for lid, src, src_slot, dst, dst_slot, _t in ui["links"]:
        ids.add(lid)
        assert lid in nodes[src]["outputs"][src_slot]["links"], (lid, nodes[src])
        assert nodes[dst]["inputs"][dst_slot]["link"] == lid, (lid, nodes[dst])
    for n in ui["nodes"]:
        assert all(i.get("link") is None or i["link"] in ids for i in n.get("inputs", [])), n
        assert all(lid in ids for o in n.get("outputs", []) for lid in o.get("links") or []), n


def _types(ui: dict) -> list[str]:
    return sorted(n["type"] for n in ui["nodes"])


def test_comfyui_tcd_node_splits_into_scheduler_and_sampler(object_info):
    ui = other_packs.as_saved(other_packs.jetthu_graph("toy.safetensors", steps=6, eta=0.45, denoise=0.8), object_info)
    before = copy.deepcopy(ui)
    out, notes = convert.convert_workflow(ui)
    assert ui == before  # the given workflow is not changed
    assert convert.foreign_types(ui) == ["TCDModelSamplingDiscrete"] and convert.foreign_types(out) == []
    _links_consistent(out)
    api = workflows.ui_to_api(out, object_info)  # every node is installed now
    sched = api["5"]
    new = next(k for k, v in api.items() if v["class_type"] == "HyperSDTCDSampler")
    assert int(new) == out["last_node_id"] == max(n["id"] for n in ui["nodes"]) + 1
    assert (sched["class_type"], sched["inputs"]) == ("HyperSDScheduler", {
        "model": ["1", 0], "steps": 6, "mode": "tcd", "denoise": 0.8})
    assert api[new]["inputs"] == {"eta": 0.45}
    sc = api["7"]["inputs"]
    assert (sc["model"], sc["sampler"], sc["sigmas"]) == (["1", 0], [new, 0], ["5", 0])
    assert len(notes) == 1 and "eta 0.45" in notes[0] and "MODEL output now comes from the model" in notes[0]
    assert "title" not in next(n for n in out["nodes"] if n["id"] == 5)  # not "TCD Model Sampling Discrete"


@pytest.mark.parametrize("euler_a", [False, True])
def test_tcd_scheduler_packs_nodes_become_the_packs(object_info, euler_a):
    ui = other_packs.as_saved(other_packs.dfl_graph("toy.safetensors", steps=5, gamma=0.6, euler_a=euler_a),
                              object_info)
    out, notes = convert.convert_workflow(ui)
    _links_consistent(out)
    api = workflows.ui_to_api(out, object_info)
    assert api["5"]["class_type"] == "HyperSDScheduler" and api["5"]["inputs"] == {
        "model": ["1", 0], "steps": 5, "mode": "tcd", "denoise": 1.0}
    assert api["6"] == {"class_type": "HyperSDTCDSampler", "inputs": {"eta": 0.6}, "_meta": api["6"]["_meta"]}
    assert len(out["nodes"]) == len(ui["nodes"]) and len(notes) == 2
    assert ("Euler-ancestral" in " ".join(notes)) == euler_a


def test_one_step_scheduler_becomes_timestep_800(object_info):
    out, notes = convert.convert_workflow(other_packs.as_saved(other_packs.one_step_graph("toy.safetensors"), object_info))
    api = workflows.ui_to_api(out, object_info)
    assert api["5"]["class_type"] == "HyperSDOneStepScheduler"
    assert api["5"]["inputs"] == {"model": ["1", 0], "timestep": 800, "denoise": 1.0}
    assert api["6"]["inputs"] == {"eta": 1.0} and len(notes) == 2


def test_api_prompts_convert_too():
    api = other_packs.jetthu_graph("toy.safetensors", steps=3, eta=0.2)
    out, notes = convert.convert_workflow(api)
    new = next(k for k, v in out.items() if v["class_type"] == "HyperSDTCDSampler")
    assert out[new]["inputs"] == {"eta": 0.2} and out["5"]["inputs"]["steps"] == 3
    assert (out["7"]["inputs"]["model"], out["7"]["inputs"]["sampler"], out["7"]["inputs"]["sigmas"]) == (
        ["1", 0], [new, 0], ["5", 0])
    dfl, notes = convert.convert_workflow(other_packs.dfl_graph("toy.safetensors", gamma=0.7))
    assert dfl["6"]["inputs"] == {"eta": 0.7} and dfl["5"]["inputs"]["mode"] == "tcd" and len(notes) == 2


def test_link_objects_and_subgraphs_of_the_newer_file_format(object_info):
    """Links saved as objects, and a TCD node inside a subgraph definition whose model comes in
    through the subgraph's input: converted, with the new node's id after every other."""
    ui = other_packs.as_saved(other_packs.jetthu_graph("toy.safetensors"), object_info)
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    inner = {"id": "sg-1", "name": "tcd inside", "nodes": [copy.deepcopy(n) for n in ui["nodes"] if n["id"] == 5],
             "links": [{"id": 100, "origin_id": -10, "origin_slot": 0, "target_id": 5, "target_slot": 0, "type": "MODEL"},
                       {"id": 101, "origin_id": 5, "origin_slot": 0, "target_id": -20, "target_slot": 0, "type": "MODEL"},
                       {"id": 102, "origin_id": 5, "origin_slot": 1, "target_id": -20, "target_slot": 1, "type": "SAMPLER"}],
             "inputs": [{"name": "model", "type": "MODEL", "linkIds": [100]}], "outputs": []}
    inner["nodes"][0]["id"] = 50
    for link in inner["links"]:
        link["target_id" if link["target_id"] == 5 else "origin_id"] = 50
    inner["nodes"][0]["inputs"][0]["link"] = 100
    inner["nodes"][0]["outputs"] = [{"name": "MODEL", "type": "MODEL", "links": [101]},
                                    {"name": "SAMPLER", "type": "SAMPLER", "links": [102]},
                                    {"name": "SIGMAS", "type": "SIGMAS", "links": []}]
    ui["links"] = [dict(zip(keys, link)) for link in ui["links"]]
    ui["definitions"] = {"subgraphs": [inner]}
    assert convert.foreign_types(ui) == ["TCDModelSamplingDiscrete"]
    out, notes = convert.convert_workflow(ui)
    assert len(notes) == 2 and notes[1].startswith("subgraph 'tcd inside': node 50")
    top_new = max(n["id"] for n in out["nodes"])
    sg = out["definitions"]["subgraphs"][0]
    sg_new = max(n["id"] for n in sg["nodes"])
    assert top_new == 51 and sg_new == 52 and out["last_node_id"] == 52  # ids unique across the file
    assert all(isinstance(link, dict) for link in out["links"])
    sampler_link = next(link for link in sg["links"] if link["id"] == 102)
    model_link = next(link for link in sg["links"] if link["id"] == 101)
    assert (sampler_link["origin_id"], sampler_link["origin_slot"]) == (52, 0)
    assert (model_link["origin_id"], model_link["origin_slot"]) == (-10, 0)
    assert sg["inputs"][0]["linkIds"] == [100, 101]
    as_lists = {**out, "links": [[link[k] for k in keys] for link in out["links"]]}
    _links_consistent(as_lists)


def test_a_graph_without_other_packs_nodes_comes_back_unchanged(object_info):
    api = other_packs.sampled("toy.safetensors", ["1", 0], ["6", 0], ["5", 0], "x", {
        "5": {"class_type": "HyperSDScheduler", "inputs": {"model": ["1", 0], "steps": 4, "mode": "tcd", "denoise": 1.0}},
        "6": {"class_type": "HyperSDTCDSampler", "inputs": {"eta": 0.3}}})
    ui = workflows.api_to_ui(api, object_info)
    assert convert.convert_workflow(ui) == (ui, []) and convert.convert_workflow(api) == (api, [])


@pytest.mark.parametrize("bad, says", [
    ([1, 2], "JSON object"),
    ({"nodes": "x"}, "neither 'nodes'"),
    ({"nodes": [], "links": {}}, "'links' is not a list"),
    ({"5": {"class_type": "SamplerTCD", "inputs": {"gamma": "much"}}}, "gamma"),
])
def test_files_that_are_no_workflow_get_a_sentence(bad, says):
    with pytest.raises(convert.ConvertError, match=says.replace("(", r"\(")):
        convert.convert_workflow(bad)


def _pixels(server, entry) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in server.output_files(entry, "9", "images")]


def test_converted_workflows_run_and_match_the_same_graph_built_with_the_packs_nodes(server, object_info, toy_ckpt):
    """The conversion answered by the server (``POST /hypersd/convert``, as the page asks it),
    queued: the pictures equal those of the graph a user of this pack would build by hand."""
    for graph, pack_nodes in (
            (other_packs.jetthu_graph(toy_ckpt, steps=4, eta=0.3), {
                "5": {"class_type": "HyperSDScheduler", "inputs": {"model": ["1", 0], "steps": 4, "mode": "tcd",
                                                                   "denoise": 1.0}},
                "6": {"class_type": "HyperSDTCDSampler", "inputs": {"eta": 0.3}}}),
            (other_packs.one_step_graph(toy_ckpt, gamma=1.0), {
                "5": {"class_type": "HyperSDOneStepScheduler", "inputs": {"model": ["1", 0], "timestep": 800,
                                                                          "denoise": 1.0}},
                "6": {"class_type": "HyperSDTCDSampler", "inputs": {"eta": 1.0}}})):
        status, body = server.request("POST", "/hypersd/convert", other_packs.as_saved(graph, object_info))
        assert status == 200 and body["types"] and len(body["converted"]) >= 1, body
        entry = server.run(workflows.ui_to_api(body["workflow"], object_info), timeout=300)
        by_hand = server.run(other_packs.sampled(toy_ckpt, ["1", 0], ["6", 0], ["5", 0], "by_hand", pack_nodes),
                             timeout=300)
        got, want = _pixels(server, entry), _pixels(server, by_hand)
        assert len(got) == 2 and all(a.shape == (64, 64, 3) and a.std() > 1 for a in got)
        assert all(np.array_equal(a, b) for a, b in zip(got, want))


def test_the_route_refuses_what_is_no_workflow_and_keeps_serving(server):
    status, body = server.request("POST", "/hypersd/convert", data=b"{not json")
    assert status == 400 and "not JSON" in body["error"]
    status, body = server.request("POST", "/hypersd/convert", {"nodes": 3})
    assert status == 400 and body["error"].startswith("Hyper-SD could not convert this workflow: not a ComfyUI workflow")
    assert server.get("/system_stats")["system"]
