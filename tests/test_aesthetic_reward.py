"""The LAION aesthetic predictor as a feedback reward, on a generated CLIP ViT-L/14 vision
checkpoint of the real layout (loaded by ComfyUI's own clip_vision loader) and heads of the
real shapes: the same score as a plain forward, gradients under ComfyUI's inference mode, and
bad heads refused with a sentence."""
from __future__ import annotations

import pickle

import pytest
import torch

from hypersd_dev.fixtures import clip_vision_vitl, registered_folder

V2_SHAPES = [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]


def _v2_head(seed=0, dim=768):
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for (o, i), idx in zip([(1024, dim)] + V2_SHAPES[1:], (0, 2, 4, 6, 7)):
        sd[f"layers.{idx}.weight"] = torch.randn(o, i, generator=gen) / i ** 0.5
        sd[f"layers.{idx}.bias"] = torch.randn(o, generator=gen) * 0.1
    return sd


@pytest.fixture(scope="module")
def clip_vision(pack):
    import comfy.clip_vision

    with torch.inference_mode():  # as CLIPVisionLoader runs
        return comfy.clip_vision.load(str(clip_vision_vitl()))


@pytest.fixture
def heads(comfy, tmp_path):
    from safetensors.torch import save_file

    torch.save(_v2_head(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    gen = torch.Generator().manual_seed(1)
    save_file({"weight": torch.randn(1, 768, generator=gen), "bias": torch.zeros(1)}, str(tmp_path / "v1.safetensors"))
    torch.save(_v2_head(dim=1024), tmp_path / "vit_h_head.pth")

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"weight": Evil()}))
    torch.save({"weight": torch.zeros(3, 5)}, tmp_path / "odd.pth")
    with registered_folder("hypersd_rewards", tmp_path):
        yield tmp_path


def test_the_aesthetic_reward_is_the_head_on_the_vision_models_embedding(pack, clip_vision, heads):
    from ComfyUI_HyperSD.nodes import feedback

    with torch.inference_mode():  # as ComfyUI runs a node
        term = feedback.aesthetic_reward(clip_vision, "sac+logos+ava1-l14-linearMSE.pth", 6.5, 0.1)
    reward = term.reward
    assert (reward.head.version, reward.head.dims, term.margin, reward.needs_labels) == ("v2", [768, 1024, 128, 64, 16, 1],
                                                                                          6.5, False)
    # pictures already at 224 px with 8-bit values: ComfyUI's own encode_image (which rounds to 8 bits)
    # sees the same pixels, so the plain forward of the head on its embedding is the reference
    gen = torch.Generator().manual_seed(3)
    images = (torch.randint(0, 256, (2, 224, 224, 3), generator=gen).float() / 255.0)
    with torch.inference_mode():
        embeds = clip_vision.encode_image(images)["image_embeds"].float()
    e = embeds / embeds.norm(dim=-1, keepdim=True)
    sd = _v2_head()
    x = e
    for idx in (0, 2, 4, 6, 7):
        x = x @ sd[f"layers.{idx}.weight"].T + sd[f"layers.{idx}.bias"]
    with torch.no_grad():
        got = reward(images.movedim(-1, 1), None)
    torch.testing.assert_close(got, x.squeeze(-1), rtol=2e-3, atol=2e-3)
    # gradients reach the pictures, though the vision model was loaded under inference mode; at
    # another size the differentiable resize takes over
    pixels = torch.rand(1, 3, 64, 64, generator=gen).requires_grad_(True)
    reward(pixels, None).sum().backward()
    assert pixels.grad is not None and float(pixels.grad.abs().sum()) > 0
    assert not any(p.grad is not None for p in reward.parameters())


def test_heads_load_from_safetensors_and_weights_only_pickles(pack, clip_vision, heads):
    from ComfyUI_HyperSD.hypersd_core import rewards

    assert rewards.read_head_file(heads / "v1.safetensors").version == "v1"
    with pytest.raises(ValueError, match="not a plain state dict"):
        rewards.read_head_file(heads / "evil.pth")  # refused by the weights-only reader, never run
    with pytest.raises(ValueError, match="not a LAION aesthetic predictor head"):
        rewards.read_head_file(heads / "odd.pth")
    from ComfyUI_HyperSD.nodes import feedback

    with torch.inference_mode(), pytest.raises(ValueError, match="takes 1024-d embeddings but the vision model gives 768"):
        feedback.aesthetic_reward(clip_vision, "vit_h_head.pth", 6.5, 0.1)
    with pytest.raises(ValueError, match="connect a CLIP vision model"):
        feedback.aesthetic_reward(None, "v1.safetensors", 6.5, 0.1)
    with pytest.raises(ValueError, match="Aesthetic Reward"):
        feedback.load_reward("sac+logos+ava1-l14-linearMSE.pth", 0.0, 1.0)  # the classifier loader points here
    with pytest.raises(ValueError, match="pick a reward file"):
        feedback.aesthetic_reward(clip_vision, "/etc/passwd", 6.5, 0.1)
