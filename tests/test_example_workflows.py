"""The shipped example workflows: current with their graph definitions, and they run.

Each file names the official model files; on the server they run with a tiny SD1.5
model and LoRAs of the official kohya layout, named as the official files.
"""
from __future__ import annotations


import pytest

from hypersd_dev import REPO, example_graphs, workflows
from hypersd_dev.fixtures import split_checkpoint

EXAMPLES = REPO / "example_workflows"
_path = example_graphs.example_path


def _strip(api: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in api.items()}


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.get("/object_info")


@pytest.mark.parametrize("name", sorted(example_graphs.WORKFLOWS))
def test_shipped_file_matches_its_graph(name, object_info):
    ui = workflows.load(_path(name))
    graph = example_graphs.WORKFLOWS[name]["graph"]
    assert _strip(workflows.ui_to_api(ui, object_info)) == graph, (
        f"{_path(name).name} is stale: run scripts/build_example_workflows.py")
    notes = [n for n in ui["nodes"] if n["type"] == "MarkdownNote"]
    assert notes, f"{name} has no note"
    for node in graph.values():  # the note names every official file the graph expects
        for v in node["inputs"].values():
            if isinstance(v, str) and v.endswith(".safetensors"):
                assert v in notes[0]["widgets_values"][0], f"{name}: the note does not name {v}"


def test_every_shipped_file_has_a_graph():
    shipped = {p.stem for p in EXAMPLES.glob("*.json")}
    named = {example_graphs.FILES[k] for k in example_graphs.WORKFLOWS}  # each file named by its card title
    assert shipped == named, shipped ^ named
    assert set(example_graphs.FILES) == set(example_graphs.WORKFLOWS)


@pytest.mark.parametrize("name", sorted(example_graphs.SAMPLING))
def test_sampling_example_runs_on_the_server(name, server, object_info, example_parts):
    """Each few-step recipe, as shipped, makes a picture; the checkpoint is the tiny SD1.5 stand-in.

    (The loader examples run in test_lora_server.py, which also checks their summaries.)
    """
    api = split_checkpoint(workflows.ui_to_api(workflows.load(_path(name)), object_info), example_parts)
    entry = server.run(api)
    (image,) = server.output_files(entry, "9", "images")
    assert image.stat().st_size > 100


def test_training_example_runs_on_the_server(server, object_info, example_parts):
    """The TSCD example as shipped, shortened (2 stages of 1 step) and on the tiny stand-ins:
    captioned images from input/, LoRAs of every stage in models/loras, a picture from the result."""
    from PIL import Image

    folder = server.base / "input" / example_graphs.TRAIN_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (64, 64), colour).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a {colour} square")
    api = split_checkpoint(workflows.ui_to_api(workflows.load(_path("hypersd_sd15_train_tscd")), object_info),
                           example_parts)
    train = api["5"]["inputs"]
    assert (train["stages"], train["output_name"]) == ("8,4,2,1", "my_model_hypersd")
    train.update(stages="2,1", steps_per_stage=1, batch_size=2, output_name="example_tscd", resume=False)
    entry = server.run(api, timeout=600)
    (image,) = server.output_files(entry, "9", "images")
    assert image.stat().st_size > 100
    loras = server.base / "models" / "loras"
    assert (loras / "example_tscd.safetensors").exists() and (loras / "example_tscd_stage1_k2.safetensors").exists()


def test_unified_training_example_runs_on_the_server(server, object_info, example_parts):
    """TSCD then score distillation, as shipped, shortened (1 stage of 1 step, 1 score step): the unified
    LoRA recommends TCD at one step, the TSCD result is kept as the stage file, the picture is made."""
    from PIL import Image
    from safetensors import safe_open

    folder = server.base / "input" / example_graphs.TRAIN_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (64, 64), colour).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a {colour} square")
    api = split_checkpoint(workflows.ui_to_api(workflows.load(_path("hypersd_sd15_train_unified")),
                                               object_info), example_parts)
    train = api["5"]["inputs"]
    assert (train["stages"], train["score_steps"], train["output_name"]) == ("8,4,2,1", 500, "my_model_hypersd_unified")
    train.update(stages="2,1", steps_per_stage=1, score_steps=1, fake_updates=1, batch_size=2,
                 output_name="example_unified", resume=False)
    entry = server.run(api, timeout=600)
    (image,) = server.output_files(entry, "9", "images")
    assert image.stat().st_size > 100
    loras = server.base / "models" / "loras"
    with safe_open(str(loras / "example_unified.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["hypersd.score_steps"], meta["hypersd.recommended_sampler"], meta["hypersd.step"]) == ("1", "tcd", "3")
    assert (loras / "example_unified_stage2_k1.safetensors").exists()


def test_feedback_example_runs_on_the_server_with_the_toy(server, object_info):
    """The feedback example, as shipped, shortened (2 steps, batch 2, 10 captioned digits), on the toy
    files it names (set-up installs them): the merged and the feedback LoRA land in models/loras, the
    merged one keeps the 4-step recipe, and the 4-step pictures are made."""
    from safetensors import safe_open

    from hypersd_dev.fixtures import place_toy

    place_toy(server.base, (example_graphs.TOY_K4_LORA,))
    api = workflows.ui_to_api(workflows.load(_path("hypersd_toy_train_feedback")), object_info)
    train = api["5"]["inputs"]
    assert (train["lora_name"], train["captions"], train["output_name"]) == (example_graphs.TOY_K4_LORA, ["2", 1],
                                                                            "my_toy_feedback")
    train.update(steps=2, batch_size=2, checkpoint_every=0, output_name="example_feedback", resume=False)
    entry = server.run(api, timeout=600)
    images = server.output_files(entry, "9", "images")
    assert len(images) == 4 and all(im.stat().st_size > 100 for im in images)
    loras = server.base / "models" / "loras"
    with safe_open(str(loras / "example_feedback.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["hypersd.recommended_steps"], meta["hypersd.recommended_sampler"], meta["hypersd.feedback_step"]) == (
        "4", "tcd", "2")  # the toy k4 LoRA's recipe: TCD on the trailing grid
    assert (loras / "example_feedback_feedback.safetensors").exists()


def test_rating_and_preference_examples_close_the_loop_on_the_toy(server, object_info):
    """The rating example, as shipped, twice (two seeds); a scripted rater who likes bold strokes
    rates its pictures through the page's route; then the preference example, shortened (2
    feedback steps, batch 2): the head is saved with its pairs, the feedback LoRA keeps the
    unified recipe, the 4-step pictures are made."""
    from safetensors import safe_open

    from bench.bench_preference import ink_mass
    from hypersd_dev.fixtures import place_toy

    place_toy(server.base, (example_graphs.TOY_UNIFIED_LORA,))
    rate = workflows.ui_to_api(workflows.load(_path("hypersd_toy_rate_images")), object_info)
    rated = 0
    for seed in (42, 43):
        rate["6"]["inputs"]["noise_seed"] = seed
        entry = server.run(rate, timeout=600)
        out = entry["outputs"]["8"]
        refs, ctx = out["images"], out["hypersd_rating"][0]
        assert len(refs) == 8 and ctx["prompt"] == "a handwritten digit 7" and ctx["seed"] == seed
        assert ctx["loras"] == [example_graphs.TOY_UNIFIED_LORA] and ctx["checkpoint"] == example_graphs.TOY_CKPT
        inks = [ink_mass(im) for im in server.images(entry, "8")]
        order = sorted(range(8), key=lambda i: inks[i])
        for kind, i in [("dislike", j) for j in order[:3]] + [("like", j) for j in order[-3:]]:
            status, body = server.rate({"kind": kind, "image": refs[i], "prompt": ctx["prompt"], "seed": ctx["seed"],
                                        "checkpoint": ctx["checkpoint"], "loras": ctx["loras"],
                                        "sampler": {**ctx["sampler"], "batch_index": i}})
            assert status == 200, body
            rated += 1
        status, body = server.rate({"kind": "prefer", "image": refs[order[4]], "other": refs[order[3]],
                                    "prompt": ctx["prompt"]})
        assert status == 200, body
    assert rated == 12
    api = workflows.ui_to_api(workflows.load(_path("hypersd_toy_train_preference")), object_info)
    api["4"]["inputs"].update(prompt_contains="a handwritten digit 7", output_name="example_preference")
    api["5"]["inputs"].update(steps=2, batch_size=2, checkpoint_every=0, output_name="example_pref_feedback",
                              resume=False)
    entry = server.run(api, timeout=600)
    assert len(server.output_files(entry, "12", "images")) == 4
    with safe_open(str(server.base / "models" / "hypersd_rewards" / "example_preference.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["hypersd.preference_pairs"] == "38"  # 6 liked x 6 disliked, and 2 'prefer' choices
    with safe_open(str(server.base / "models" / "loras" / "example_pref_feedback.safetensors"), "pt") as f:
        lora_meta = f.metadata()
    assert (lora_meta["hypersd.recommended_sampler"], lora_meta["hypersd.feedback_rewards"]) == (
        "tcd", "example_preference:2:1")
