"""Fuzzing the file inspector (issue 18, item 2): random and adversarial safetensors and pickle
files given to ``lora_file.inspect_file`` give either a ``LoraInfo`` or the pack's own
``LoraFileError`` sentence (short: no megabyte key quoted back), never another exception, and
never run code from a pickle. For safetensors files the inspector also never reads past the
file nor any tensor data but the scalar ``.alpha`` values (the bytes this thread read, from
``/proc/thread-self/io``), and never holds more memory than a small multiple of the header
(``tracemalloc``'s peak)."""
from __future__ import annotations

import json
import os
import pickle
import struct
import tracemalloc
from pathlib import Path

import pytest

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ComfyUI_HyperSD.hypersd_core import lora_file

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
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


MEMORY_FACTOR = 32  # of the header's bytes: JSON's smallest values ("[{},{}]") cost ~20x as objects
MEMORY_FLOOR = 512 * 1024  # what inspecting any small file costs (the LoraInfo, counters, the recipe)
# this thread's counters: under pytest-xdist another thread of the process reads the test runner's
# messages, which the process-wide /proc/self/io counts (a failure seen so: 385 bytes of a 64-byte file)
IO = Path("/proc/thread-self/io")


def _bytes_read() -> tuple[int, int]:
    """(bytes returned by this thread's read calls before this one (``rchar``), this one's)."""
    text = IO.read_bytes()
    return int(text.split()[1]), len(text)


def _inspect(path):
    """Inspect ``path``; check the answer, the bytes read and the memory held while inspecting."""
    path = Path(path)
    raw = path.read_bytes()
    size = len(raw)
    safetensors = path.suffix == ".safetensors"
    tracemalloc.start()
    before = sum(_bytes_read()) if IO.exists() else None  # counted from after this read
    try:
        return lora_file.inspect_file(str(path))
    except lora_file.LoraFileError as e:
        assert str(e) and len(str(e)) < 600, str(e)[:600]  # a sentence, never a quoted megabyte
        return None
    finally:
        read = _bytes_read()[0] - before if before is not None else None
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        if safetensors and size >= 8:
            n = struct.unpack("<Q", raw[:8])[0]
            header = min(n, size - 8) if n <= lora_file.MAX_HEADER_BYTES else 0
            if read is not None:
                # never past the file, and of the tensor data only the .alpha scalars (8 bytes at most each)
                assert read <= size, (read, size)
                assert read <= 8 + header + 8 * raw.count(b".alpha"), (read, header)
            assert peak <= MEMORY_FACTOR * header + MEMORY_FLOOR, (peak, header)


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


def _safetensors(tmp_path, header: bytes | dict, body: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header, allow_nan=True).encode()
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + body)
    return p


def _entry(dtype="F32", shape=(1,), offsets=(0, 4)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


ALPHA = "lora_unet_down_blocks_0_attentions_0_proj_in.alpha"
# (what, header, body, header length written when it lies)
CRAFTED = [
    ("header length 2^64-1", b"{}", b"", 2**64 - 1),
    ("header length -1 read as signed (2^63)", b"{}", b"", 2**63),
    ("header length past safetensors' 100 MB limit", b"{}", b"", lora_file.MAX_HEADER_BYTES + 1),
    ("header one byte longer than the file", b"{}", b"", 3),
    ("header length 0", b"", b"", 0),
    ("JSON nested 100000 deep", b'{"__metadata__": {"a": ' + b"[" * 100000 + b"]" * 100000 + b"}}", b"", None),
    ("tensor entry nested 100000 deep", b'{"a": ' + b"{\"b\": " * 100000 + b"1" + b"}" * 100001, b"", None),
    ("a 5000-digit shape", b'{"a": {"dtype": "F32", "shape": [' + b"1" * 5000 + b'], "data_offsets": [0, 4]}}',
     b"0000", None),
    ("infinite offset", {"a": _entry(offsets=(0, float("inf")))}, b"0000", None),
    ("NaN shape", {"a": _entry(shape=(float("nan"),))}, b"0000", None),
    ("float offsets", {"a": _entry(offsets=(0.0, 4.0))}, b"0000", None),
    ("boolean shape", {"a": _entry(shape=(True,))}, b"0000", None),
    ("negative offsets reaching into the header", {ALPHA: _entry(shape=(), offsets=(-4, 0))}, b"0000", None),
    ("negative shape", {"a": _entry(shape=(-1, -4), offsets=(0, 16))}, b"0" * 16, None),
    ("offsets past the file", {ALPHA: _entry(shape=(), offsets=(2**40, 2**40 + 4))}, b"0000", None),
    ("offsets past 2^64", {"a": _entry(shape=(2**62, 2**62), offsets=(0, 2**126))}, b"0000", None),
    ("overlapping tensors", {ALPHA: _entry(shape=()), "x.alpha": _entry(shape=())}, b"0000", None),
    ("a gap between tensors", {ALPHA: _entry(shape=(), offsets=(4, 8))}, b"00000000", None),
    ("bytes after the last tensor", {ALPHA: _entry(shape=())}, b"00000000", None),
    ("unknown dtype", {"a": _entry(dtype="F128")}, b"0000", None),
    ("dtype not a string", {"a": _entry(dtype=["F32"])}, b"0000", None),
    ("an odd number of 4-bit values", {"a": _entry(dtype="F4", shape=(3,), offsets=(0, 1))}, b"0", None),
    ("non-UTF-8 bytes in a name", b'{"\xff\xfe.alpha": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}',
     b"0000", None),
    ("lone surrogates in a name", b'{"\\udc80\\ud800.alpha": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]}}',
     b"0000", None),
    ("a name of one megabyte", {"k" * 2**20: _entry(dtype="XYZ")}, b"0000", None),
    ("metadata not a map", {"__metadata__": [1, 2]}, b"", None),
    ("metadata values not text", {"__metadata__": {"ss_network_dim": 8}}, b"", None),
    ("enormous metadata (30 MB)", {"__metadata__": {"ss_tag_frequency": "x" * (30 * 2**20)}}, b"", None),
    ("50000 metadata keys", {"__metadata__": {f"k{i}": "v" for i in range(50000)}}, b"", None),
    ("the same key twice", b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
     b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', b"0000", None),
    ("20000 tensors", {f"lora_unet_b{i}.alpha": _entry(shape=(), offsets=(4 * i, 4 * i + 4)) for i in range(20000)},
     b"0000" * 20000, None),
    ("a header that is a list", b"[1, 2, 3]", b"", None),
    ("a header of spaces", b" " * 64, b"", None),
]


@pytest.mark.parametrize("what,header,body,length", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_crafted_safetensors(tmp_path, what, header, body, length):
    _inspect(_safetensors(tmp_path, header, body, length))


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x80", b"\x00" * 7, b"\xff" * 8, b"PK\x03\x04" + b"\x00" * 60],
                         ids=["0 bytes", "1 byte", "1 pickle byte", "7 bytes", "8 bytes of ff", "a zip"])
def test_tiny_files(tmp_path, data):
    for ext in (".safetensors", ".ckpt"):
        p = tmp_path / ("x" + ext)
        p.write_bytes(data)
        _inspect(p)


def test_valid_file_reads_only_header_and_alphas(tmp_path):
    """The control for the checks above: a real LoRA is inspected, and of its 4 MB of weights only
    the alpha scalars are read."""
    import torch
    from safetensors.torch import save_file

    sd = {}
    for i in range(8):
        base = f"lora_unet_down_blocks_0_attentions_{i}_proj_in"
        sd[base + ".lora_down.weight"] = torch.zeros(64, 1024)
        sd[base + ".lora_up.weight"] = torch.zeros(1024, 64)
        sd[base + ".alpha"] = torch.tensor(32.0)
    p = tmp_path / "real.safetensors"
    save_file(sd, str(p))
    info = _inspect(p)
    assert info is not None and info.rank == 64 and info.alpha == 32.0
    assert os.path.getsize(p) > 4 * 2**20
