"""Fuzzing the file inspector (issue 18, item 2): random and adversarial safetensors and pickle
files given to ``lora_file.inspect_file`` give either a ``LoraInfo`` or the pack's own
``LoraFileError`` sentence, never another exception, and never run code from a pickle."""
from __future__ import annotations

import json
import pickle
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ComfyUI_HyperSD.hypersd_core import lora_file

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = ["F32", "F16", "BF16", "I64", "U8", "F8_E4M3", "XYZ", "", "f32"]
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                         st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
names = st.one_of(st.sampled_from(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
                                   "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
                                   "lora_unet_down_blocks_0_attentions_0_proj_in.alpha",
                                   "diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight",
                                   "transformer.x.lora_A.weight", "__metadata__"]), st.text(max_size=30))
entries = st.fixed_dictionaries({"dtype": st.one_of(st.sampled_from(DTYPES), json_values),
                                 "shape": st.one_of(st.lists(st.integers(-3, 70000), max_size=5), json_values),
                                 "data_offsets": st.one_of(st.lists(st.integers(-10, 2**40), min_size=2, max_size=2),
                                                           json_values)})
headers = st.dictionaries(names, st.one_of(entries, json_values), max_size=6)


def _inspect(path):
    try:
        return lora_file.inspect_file(str(path))
    except lora_file.LoraFileError as e:
        assert str(e)  # a sentence
        return None


@SETTINGS
@given(data=st.binary(max_size=300))
def test_random_bytes(tmp_path, data):
    p = tmp_path / "x.safetensors"
    p.write_bytes(data)
    _inspect(p)


@SETTINGS
@given(header=headers, body=st.binary(max_size=200), lie=st.integers(-50, 50), metadata=json_values)
def test_adversarial_headers(tmp_path, header, body, lie, metadata):
    h = dict(header)
    if metadata is not None:
        h["__metadata__"] = metadata
    raw = json.dumps(h, allow_nan=True).encode()
    n = max(0, len(raw) + lie)  # a header length that may lie about the header
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", n) + raw + body)
    _inspect(p)


class _Boom:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


@SETTINGS
@given(obj=json_values)
def test_pickles_never_run_code(tmp_path, obj, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i, payload in enumerate((pickle.dumps(obj), pickle.dumps({"state_dict": _Boom()}), pickle.dumps(obj)[:7])):
        p = tmp_path / f"x{i}.ckpt"
        p.write_bytes(payload)
        _inspect(p)
    assert not (tmp_path / "PWNED").exists()
