"""The training command outside ComfyUI (``scripts/train.py``, issue 17): a config file checked
before any process starts, and the same run on one process or on two under ``torchrun`` (gloo):
the same losses and, to float tolerance, the same LoRA, which core's loader takes with every key
matched and the pack's inspector reads with its recipe."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from hypersd_dev import REPO

CONFIG = """checkpoint = "toy"
data = "toy"
output = "{output}"
out_dir = "out"
stages = "2,1"
steps_per_stage = 2
batch_size = 4
learning_rate = 1e-3
rank = 4
teacher_cfg = 1.5
checkpoint_every = 0
per_digit = 2
resume = true
"""


def _env(processes: int = 1) -> dict:
    """The command's environment; runs of several processes on a machine with fewer GPUs go to the
    CPUs (``HYPERSD_DEVICE=cpu``: gloo), and the one-process run they are compared with too."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    if processes > 1 and torch.cuda.device_count() < 2:
        env["HYPERSD_DEVICE"] = "cpu"
    return env


def _run(cmd, cwd, timeout=600, processes: int = 1):
    return subprocess.run(cmd, cwd=REPO, env=_env(processes), capture_output=True, text=True, timeout=timeout)


def test_sharding_the_base_needs_torchrun(comfy):
    from ComfyUI_HyperSD.hypersd_core import lora_train

    with pytest.raises(ValueError, match="start the command with torchrun"):
        lora_train.shard_frozen_base(torch.nn.Linear(2, 2), [], "cpu")


@pytest.mark.parametrize("key, line, says", [
    ("colour", 'colour = "red"', "unknown key 'colour'"),
    ("checkpoint", 'checkpoint = "no/such/model.safetensors"', "model.safetensors does not exist"),
    ("rank", "rank = 999", "rank: 999 must be between 1 and 256"),
    ("output", 'output = "../escape"', "output: '../escape' must be a file name without folders"),
    ("learning_rate", 'learning_rate = "fast"', "learning_rate: 'fast' is not a number"),
])
def test_a_bad_config_is_refused_before_any_work_with_the_key_named(tmp_path, key, line, says):
    lines = [ln for ln in CONFIG.format(output="bad").splitlines() if ln.split("=")[0].strip() != key]
    (tmp_path / "bad.toml").write_text("\n".join(lines + [line]) + "\n")
    r = _run([sys.executable, "-m", "scripts.train", str(tmp_path / "bad.toml")], tmp_path)
    assert r.returncode == 2 and says in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "out").exists()  # nothing was started


def test_two_processes_under_torchrun_train_the_same_lora_as_one(tmp_path, comfy, caplog):
    from safetensors.torch import load_file

    from ComfyUI_HyperSD.hypersd_core import lora_file

    for name in ("one", "two"):  # the TSCD stages, then score distillation (fake score, regression bank)
        (tmp_path / f"{name}.toml").write_text(CONFIG.format(output=name) + "score_steps = 2\nfake_updates = 1\n")
    one = _run([sys.executable, "-m", "scripts.train", str(tmp_path / "one.toml")], tmp_path, processes=2)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "scripts.train",
                str(tmp_path / "two.toml")], tmp_path, processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    # the same on two processes with the frozen base sharded over them (FSDP2; the adapters whole)
    (tmp_path / "sharded.toml").write_text((tmp_path / "two.toml").read_text().replace('output = "two"',
                                                                                      'output = "sharded"')
                                           + "shard_base = true\n")
    sharded = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "scripts.train",
                    str(tmp_path / "sharded.toml")], tmp_path, processes=2)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    s1, s2, s3 = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (one, two, sharded))
    assert (s1["processes"], s2["processes"], s1["steps"], s2["steps"]) == (1, 2, 6, 6)
    # the same up to the order of float sums (the all-reduce): 1.06e-4 relative seen on one CI machine
    assert s2["losses"] == pytest.approx(s1["losses"], rel=1e-3)
    a, b, c = load_file(s1["lora"]), load_file(s2["lora"]), load_file(s3["lora"])
    assert set(a) == set(b) and all(float((a[k] - b[k]).abs().max()) < 1e-4 for k in a)
    assert (s2["shard_base"], s3["shard_base"], s3["steps"]) == (False, True, 6) and s3["losses"] == s2["losses"]
    assert set(c) == set(b) and all(float((c[k] - b[k]).abs().max()) < 1e-6 for k in b)
    assert s3["base_mib_per_process"] == pytest.approx(s2["base_mib_per_process"] / 2, rel=0.01)
    assert (tmp_path / "out" / "two_stage1_k2.safetensors").exists()  # rank 0 wrote the stage LoRA too
    from safetensors import safe_open

    with safe_open(s2["lora"], "pt") as f:
        assert (f.metadata()["hypersd.score_steps"], f.metadata()["hypersd.fake_updates"]) == ("2", "1")

    # the file is the node's: core's loader maps every key; the inspector reads its recipe
    import comfy.lora
    import comfy.lora_convert
    import comfy.sd

    from toy import install

    import hypersd_dev

    ckpt = install.install(hypersd_dev.comfy_dir() / "models")["checkpoint"]
    model = comfy.sd.load_checkpoint_guess_config(str(ckpt), output_vae=False, output_clip=False)[0]
    with caplog.at_level(logging.WARNING):
        comfy.sd.load_lora_for_models(model, None, b, 1.0, 0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(b)), comfy.lora.model_lora_keys_unet(model.model, {}),
                                  log_missing=False)
    assert len(loaded) == sum(1 for k in b if k.endswith(".lora_down.weight")) > 0
    info = lora_file.inspect_file(s2["lora"])
    assert (info.variant, info.family, info.sampler, info.steps) == ("hypersd_trained", "SD1.5", "tcd", 1)


def _gpus() -> int:
    return torch.cuda.device_count()


@pytest.mark.skipif(not 0 < _gpus() < 8, reason="a GPU check: more processes than this machine's GPUs")
def test_more_processes_than_gpus_are_refused_with_what_to_do(tmp_path):
    """nccl cannot share a GPU between processes: every process stops before any waits on another,
    and the message gives the process count to use and the CPU alternative."""
    (tmp_path / "run.toml").write_text(CONFIG.format(output="many"))
    r = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(_gpus() + 1), "-m",
              "scripts.train", str(tmp_path / "run.toml")], tmp_path, timeout=300)
    assert r.returncode != 0
    assert f"{_gpus() + 1} processes on this machine but {_gpus()} GPU(s)" in r.stderr, r.stderr[-2000:]
    assert f"--nproc-per-node {_gpus()}" in r.stderr and "HYPERSD_DEVICE=cpu" in r.stderr
    assert not (tmp_path / "out").exists()


def test_a_folder_of_captioned_images_is_encoded_once_and_trained_on(tmp_path):
    import hypersd_dev  # noqa: F401
    from toy import data

    data.write_dataset(tmp_path / "imgs", 1)  # one page per digit, "a handwritten digit N" beside each
    (tmp_path / "run.toml").write_text(CONFIG.format(output="folder").replace('data = "toy"', 'data = "imgs"'))
    r = _run([sys.executable, "-m", "scripts.train", str(tmp_path / "run.toml")], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    cache = tmp_path / "out" / "folder.latents.pt"
    assert json.loads(r.stdout.strip().splitlines()[-1])["steps"] == 4 and cache.exists()
    stamp = cache.stat().st_mtime_ns
    assert _run([sys.executable, "-m", "scripts.train", str(tmp_path / "run.toml")], tmp_path).returncode == 0
    assert cache.stat().st_mtime_ns == stamp  # encoded once: the second run read the cache
    (tmp_path / "imgs" / "extra.png").write_bytes((tmp_path / "imgs" / sorted(
        p.name for p in (tmp_path / "imgs").glob("*.png"))[0]).read_bytes())
    r = _run([sys.executable, "-m", "scripts.train", str(tmp_path / "run.toml")], tmp_path)
    assert r.returncode != 0 and "extra.png has no caption file extra.txt" in r.stderr


def test_a_killed_process_stops_the_run_and_a_restart_with_another_count_finishes_it(tmp_path):
    """Two processes under torchrun; one is killed (SIGKILL) after the first checkpoint: the run
    stops with the last checkpoint intact. Queued again with one process and resume on, it
    continues from that checkpoint and ends where an uninterrupted run ends."""
    import signal
    import time

    import psutil
    from safetensors.torch import load_file

    slow = CONFIG.replace("steps_per_stage = 2", "steps_per_stage = 30").replace("checkpoint_every = 0",
                                                                               "checkpoint_every = 5")
    (tmp_path / "cut.toml").write_text(slow.format(output="cut"))
    (tmp_path / "whole.toml").write_text(slow.format(output="whole"))
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                             "scripts.train", str(tmp_path / "cut.toml")], cwd=REPO, env=_env(2),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = tmp_path / "out" / "cut.hypersd-state"
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert state.exists(), "no checkpoint was written"
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "scripts.train" in " ".join(c.cmdline())]
    assert len(workers) == 2
    os.kill(workers[1].pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0  # the run stopped; it did not hang
    cut_lora = load_file(str(tmp_path / "out" / "cut.safetensors"))  # the last checkpoint, whole
    assert cut_lora

    resumed = _run([sys.executable, "-m", "scripts.train", str(tmp_path / "cut.toml")], tmp_path, processes=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = _run([sys.executable, "-m", "scripts.train", str(tmp_path / "whole.toml")], tmp_path, processes=2)
    assert whole.returncode == 0, whole.stderr[-3000:]
    a, b = load_file(str(tmp_path / "out" / "cut.safetensors")), load_file(str(tmp_path / "out" / "whole.safetensors"))
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["steps"] == 60
    assert set(a) == set(b) and all(float((a[k] - b[k]).abs().max()) < 1e-4 for k in a)


def test_a_run_moves_between_the_command_and_the_node(tmp_path, training, loras):
    """Same settings, same files: a TSCD run trained by the command continues in the node with
    score distillation (the command trains the TSCD stages; the unified LoRA's score stage runs in
    the node), and a node run cancelled half-way is finished by the command. A command whose
    settings differ from the node's state is refused with the setting named, the file untouched."""
    import comfy.model_management as mm
    from safetensors import safe_open

    import hypersd_dev
    from ComfyUI_HyperSD.hypersd_core import train
    from scripts.train_outside_comfyui import load_toy

    def config(output, **over):
        text = CONFIG.format(output=output).replace('out_dir = "out"', f'out_dir = "{loras}"')
        for k, v in over.items():
            text = "\n".join(ln for ln in text.splitlines() if ln.split("=")[0].strip() != k) + f"\n{k} = {v}\n"
        (tmp_path / f"{output}.toml").write_text(text)
        return _run([sys.executable, "-m", "scripts.train", str(tmp_path / f"{output}.toml")], tmp_path)

    def meta(name):
        with safe_open(str(loras / f"{name}.safetensors"), "pt") as f:
            return f.metadata()

    class Steps(train.Callback):
        def __init__(self, cancel_at=None):
            self.started, self.cancel_at = [], cancel_at

        def on_step_start(self, trainer):
            self.started.append(trainer.step)

        def on_step_end(self, trainer, loss, logs):
            if trainer.step == self.cancel_at:
                mm.interrupt_current_processing(True)

    model, clip, vae = load_toy(hypersd_dev.comfy_dir() / "models")
    from scripts.train import encode_folder
    from toy import data

    data.write_dataset(tmp_path / "digits", 2)  # the node's inputs, as the command encodes them
    latents, positive, negative = encode_folder(tmp_path / "digits", clip, vae)
    same = dict(stages="2,1", steps_per_stage=2, batch_size=4, learning_rate=1e-3, rank=4, teacher_cfg=1.5, seed=0,
                checkpoint_every=0, lora_scope="transformer", lr_schedule="constant")

    def node(name, callbacks=(), **over):
        with torch.inference_mode():  # as ComfyUI's executor runs nodes
            return training.train_tscd(model, latents, positive, negative, positive_per_latent=True, output_name=name,
                                       resume=True, callbacks=tuple(callbacks), **{**same, **over})

    # 1. command -> node: the command's finished TSCD run gets its score stage in the node
    r = config("c2n")
    assert r.returncode == 0, r.stderr[-3000:]
    assert meta("c2n")["hypersd.step"] == "4" and (loras / "c2n_stage1_k2.safetensors").exists()
    steps = Steps()
    _, path, trainer = node("c2n", [steps], score_steps=2, fake_updates=1)
    assert steps.started == [4, 5] and trainer.step == 6  # the TSCD stages were not trained again
    m = meta("c2n")
    assert (m["hypersd.step"], m["hypersd.score_steps"], m["hypersd.complete"]) == ("6", "2", "true")
    assert (loras / "c2n_stage2_k1.safetensors").exists()  # the TSCD result it continued from, kept

    def cancelled_at_step_2(name):
        steps = Steps(cancel_at=2)
        try:
            with pytest.raises(mm.InterruptProcessingException):
                node(name, [steps])
        finally:
            mm.interrupt_current_processing(False)
        assert steps.started == [0, 1] and meta(name)["hypersd.step"] == "2"

    # 2. node -> command: a node run cancelled after step 2 is finished by the command
    cancelled_at_step_2("n2c")
    r = config("n2c")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert (out["resumed_from"], out["steps"]) == (2, 4)
    assert (meta("n2c")["hypersd.step"], meta("n2c")["hypersd.complete"]) == ("4", "true")

    # 3. settings that differ: refused, the setting named, nothing written
    cancelled_at_step_2("other")
    before = (loras / "other.safetensors").read_bytes(), (loras / "other.hypersd-state").read_bytes()
    r = config("other", batch_size=8)
    assert r.returncode == 2 and "cannot resume" in r.stderr and "batch_size" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert ((loras / "other.safetensors").read_bytes(), (loras / "other.hypersd-state").read_bytes()) == before


def test_the_command_trains_sdxl_through_the_nodes_path(tmp_path, comfy, caplog):
    """SDXL (which needs the pooled text and the size conditioning): the command's training function on
    a loaded SDXL model (a tiny one built in memory: ComfyUI detects SDXL files only at full size)
    writes a LoRA that the inspector reads as SDXL and core's loader takes with every key."""
    import comfy.lora
    import comfy.lora_convert
    import comfy.sd

    from ComfyUI_HyperSD.hypersd_core import lora_file, train_config
    from scripts.train import train_loaded
    from toy import arch

    model = arch.tiny_sdxl_patcher()
    gen = torch.Generator().manual_seed(0)

    def cond():
        return [[torch.randn(1, 77, 2048, generator=gen), {"pooled_output": torch.randn(1, 1280, generator=gen)}]]

    latents = [{"samples": torch.randn(3, 4, 8, 8, generator=gen)} for _ in range(2)]
    cfg = train_config.check({"checkpoint": "toy", "data": "toy", "output": "xl", "out_dir": str(tmp_path),
                              "stages": "2,1", "steps_per_stage": 1, "batch_size": 2, "rank": 4,
                              "checkpoint_every": 0}, tmp_path)
    assert train_loaded(cfg, model, latents, [cond(), cond()], cond()) == 0
    path = tmp_path / "xl.safetensors"
    info = lora_file.inspect_file(str(path))
    assert (info.family, info.variant, info.steps) == ("SDXL", "hypersd_trained", 1)
    sd = comfy.utils.load_torch_file(str(path))
    with caplog.at_level(logging.WARNING):
        comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(sd)),
                                  comfy.lora.model_lora_keys_unet(model.model, {}), log_missing=False)
    assert len(loaded) == sum(1 for k in sd if k.endswith(".lora_down.weight")) > 0
