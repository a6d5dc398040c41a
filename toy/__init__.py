"""The embedded toy model family: tiny models in real ComfyUI formats, built here.

Unlike ``hypersd_core``, this package builds ComfyUI objects and therefore needs a
ComfyUI on the import path (the host that ``scripts/setup_host.py`` prepares).

* ``weights/``: the committed toy teacher (``toy_unet.safetensors``, SD1.5 layout, fp16),
  its TAESD-layout VAE (``toy_vae.safetensors``), the digits classifier of the quality
  measure and ``training.json`` (how they were trained, what they scored).
* ``train_teacher.py``: the script that made them (seeded, about 30 minutes on 2 shared CPU cores).
* ``install.py``: assembles the full checkpoint ``hypersd_toy_digits.safetensors`` (UNet +
  VAE + the generated CLIP-L of ``clip.py``) into a ComfyUI ``models/`` folder; set-up runs it.
* ``quality.py``: ``measure(images, labels) -> {"accuracy", "fid", "n"}`` for generated digits.
* ``demo.py``: the main job's demo (teacher beside few-step sampling through a running server).
* ``data.py``: the digits (scikit-learn's ``load_digits`` at 32x32) and the prompts.
"""
