"""A training run and sampling prompts on one server (issue 18, item 5).

ComfyUI runs one prompt at a time: prompts queued behind a training run wait in the queue and
then succeed; Cancel of the training ends only the training (its state saved, so queuing it
again continues it), and the prompts behind it run.
"""
from __future__ import annotations

import time

import pytest

from hypersd_dev.fixtures import tscd_train_graph
from hypersd_dev.server import ExecutionFailed

TRAIN_NODE = "6"  # the trainer's id in tscd_train_graph


def _sampling_graph(parts: dict, seed: int, prefix: str) -> dict:
    """One picture of the tiny SD1.5 model with the pack's scheduler and TCD sampler."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": parts["unet"], "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": parts["clip"], "type": "stable_diffusion"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a handwritten digit 3", "clip": ["2", 0]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "HyperSDScheduler", "inputs": {"model": ["1", 0], "steps": 4, "mode": "tcd", "denoise": 1.0}},
        "6": {"class_type": "HyperSDTCDSampler", "inputs": {"eta": 0.3}},
        "7": {"class_type": "SamplerCustom", "inputs": {
            "model": ["1", 0], "add_noise": True, "noise_seed": seed, "cfg": 1.0, "positive": ["3", 0],
            "negative": ["3", 0], "sampler": ["6", 0], "sigmas": ["5", 0], "latent_image": ["4", 0]}},
        "9": {"class_type": "SaveLatent", "inputs": {"samples": ["7", 0], "filename_prefix": prefix}},
    }


def _queue_ids(server) -> tuple[list[str], list[str]]:
    q = server.get("/queue")
    return [item[1] for item in q["queue_running"]], [item[1] for item in q["queue_pending"]]


def _stamp(entry: dict, event: str) -> int:
    """The server's time (ms) of an execution event in a history entry."""
    return next(m[1]["timestamp"] for m in entry["status"]["messages"] if m[0] == event)


def _wait_for_step(server, step: int, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status, run = server.get_status(f"/hypersd/train/runs/{TRAIN_NODE}")
        if status == 200 and run["status"] == "running" and run["step"] >= step:
            return run
        time.sleep(0.05)
    raise TimeoutError(f"the training did not reach step {step}")


def test_prompts_queued_behind_a_training_run_wait_then_succeed(server, sd15_parts):
    train = server.post_prompt(tscd_train_graph(sd15_parts, "conc_wait", steps_per_stage=6, resume=False))
    samplers = [server.post_prompt(_sampling_graph(sd15_parts, seed, f"conc_wait_{seed}")) for seed in (1, 2, 3)]
    _wait_for_step(server, 1)
    running, pending = _queue_ids(server)
    assert running == [train] and pending == samplers  # one prompt at a time, the rest in order
    done = server.wait(train, timeout=600)
    entries = [server.wait(p) for p in samplers]
    assert done["status"]["status_str"] == "success"
    trained_at = _stamp(done, "execution_success")
    for entry in entries:
        assert entry["status"]["status_str"] == "success"
        assert _stamp(entry, "execution_start") >= trained_at  # began after the training ended
        (latent,) = server.output_files(entry, "9")
        assert latent.stat().st_size > 0
    assert server.get("/queue") == {"queue_running": [], "queue_pending": []}


def test_cancelling_a_training_run_leaves_the_queue_working(server, sd15_parts):
    graph = tscd_train_graph(sd15_parts, "conc_cancel", steps_per_stage=200, resume=True)
    train = server.post_prompt(graph)
    behind = server.post_prompt(_sampling_graph(sd15_parts, 7, "conc_cancel_behind"))
    run = _wait_for_step(server, 3)
    server.request("POST", "/interrupt", {})  # the Cancel button of the queue
    with pytest.raises(ExecutionFailed) as failed:
        server.wait(train, timeout=120)
    assert any(m[0] == "execution_interrupted" for m in failed.value.entry["status"]["messages"])
    status, run = server.get_status(f"/hypersd/train/runs/{TRAIN_NODE}")
    assert status == 200 and run["status"] == "cancelled" and 3 <= run["step"] < 400
    cancelled_at = run["step"]
    entry = server.wait(behind)  # the prompt queued behind the training runs
    assert entry["status"]["status_str"] == "success" and server.output_files(entry, "9")[0].exists()
    # the training's state was saved on Cancel: queued again (a shorter run's settings would not
    # match, so the same graph), it continues from where it stopped instead of from step 0
    again = server.post_prompt(graph)
    run = _wait_for_step(server, cancelled_at + 1)
    assert run["start"] == cancelled_at
    server.request("POST", "/interrupt", {})
    with pytest.raises(ExecutionFailed):
        server.wait(again, timeout=120)
    entry = server.run(_sampling_graph(sd15_parts, 8, "conc_cancel_after"))  # and the queue still works
    assert entry["status"]["status_str"] == "success"
