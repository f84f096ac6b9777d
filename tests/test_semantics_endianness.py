"""Byte order: the ``byteorder`` record, LoadEndianness and its default, byte swapping.

Big-endian checkpoints are crafted from torch's own output (every storage swapped
by its tensors' element size, complex numbers per component, byteorder b'big') and
loaded with fastserial and torch side by side. For dtypes torch pickles with an
UntypedStorage (uint16/32/64) torch 2.13 does not swap at all and returns wrong
values; fastserial must swap by the tensor's dtype.
"""

import io
import sys

import fastserial
import pytest
import torch
from conftest import assert_matches_manifest, expected_for, fixture_path, load_with_mode
from fastserial import LoadEndianness
from test_semantics_craft import (
    assert_same,
    fs_save_bytes,
    read_records,
    rezip,
    to_big_endian,
    torch_save_bytes,
    write_records,
)

pytestmark = pytest.mark.skipif(sys.byteorder != "little", reason="written for little-endian hosts")


@pytest.fixture(autouse=True)
def reset_endianness():
    """Both libraries' defaults back to None (fastserial follows torch's when its own is None)."""
    fastserial.set_default_load_endianness(None)
    torch.serialization.set_default_load_endianness(None)
    yield
    fastserial.set_default_load_endianness(None)
    torch.serialization.set_default_load_endianness(None)


def _typed_sample():
    """One tensor per dtype torch pickles with a typed storage (so torch swaps it)."""
    return {
        "f16": torch.tensor([1.5, -2.25, 65504.0], dtype=torch.float16),
        "bf16": torch.tensor([1.5, -3.0], dtype=torch.bfloat16),
        "f32": torch.tensor([1.5, -2.0, 3.25e-5]),
        "f64": torch.tensor([1.0 / 3.0, -1e300], dtype=torch.float64),
        "c64": torch.tensor([1 + 2j, -3.5 - 4j], dtype=torch.complex64),
        "c128": torch.tensor([1 / 3 + 2j], dtype=torch.complex128),
        "i8": torch.tensor([-1, 2], dtype=torch.int8),
        "u8": torch.tensor([1, 255], dtype=torch.uint8),
        "i16": torch.tensor([1, -300, 0x1234], dtype=torch.int16),
        "i32": torch.tensor([1, -(2**30), 0x12345678], dtype=torch.int32),
        "i64": torch.tensor([1, -(2**40), 0x123456789A], dtype=torch.int64),
        "bool": torch.tensor([True, False, True]),
        "matrix": torch.arange(12, dtype=torch.float32).view(3, 4).t(),
        "param": torch.nn.Parameter(torch.tensor([0.25, 0.5])),
    }


def _unsigned_sample():
    """Dtypes torch pickles with torch.storage.UntypedStorage (_rebuild_tensor_v3)."""
    return {
        "u16": torch.tensor([1, 2, 0x1234, 65535], dtype=torch.uint16),
        "u32": torch.tensor([1, 0x12345678, 2**32 - 2], dtype=torch.uint32),
        "u64": torch.tensor([1, 2**40 + 5, 2**63 + 7], dtype=torch.uint64),
        "f32": torch.tensor([1.5, -2.0]),  # a typed storage in the same file
    }


def _swapped(t: torch.Tensor) -> torch.Tensor:
    """``t`` with every element byte-reversed (what a wrong-endian read returns)."""
    size = t.element_size() // (2 if t.is_complex() else 1)
    raw = t.contiguous().view(torch.uint8).view(-1, size).flip(1).contiguous()
    return raw.view(-1).view(t.dtype).view(t.shape)


# --------------------------------------------------------------------------- the API


def test_load_endianness_enum_matches_torch():
    assert [m.name for m in LoadEndianness] == ["NATIVE", "LITTLE", "BIG"]
    assert [m.name for m in torch.serialization.LoadEndianness] == ["NATIVE", "LITTLE", "BIG"]
    assert fastserial.get_default_load_endianness() is None


@pytest.mark.parametrize("value", [None, *LoadEndianness])
def test_set_and_get_default(value):
    fastserial.set_default_load_endianness(value)
    assert fastserial.get_default_load_endianness() is value


@pytest.mark.parametrize("bad", ["big", 3])
def test_set_default_rejects_other_types(bad):
    with pytest.raises(TypeError):
        fastserial.set_default_load_endianness(bad)
    assert fastserial.get_default_load_endianness() is None


@pytest.mark.parametrize("name", ["NATIVE", "LITTLE", "BIG"])
def test_default_endianness_is_torchs_setting_both_ways(name):
    """One setting: torch's. Set on either side, it holds for both (issue 12)."""
    try:
        torch.serialization.set_default_load_endianness(torch.serialization.LoadEndianness[name])
        assert fastserial.get_default_load_endianness() is LoadEndianness[name]
        torch.serialization.set_default_load_endianness(None)
        fastserial.set_default_load_endianness(torch.serialization.LoadEndianness[name])
        assert torch.serialization.get_default_load_endianness().name == name
        fastserial.set_default_load_endianness(LoadEndianness[name])
        assert torch.serialization.get_default_load_endianness().name == name
    finally:
        torch.serialization.set_default_load_endianness(None)
    assert fastserial.get_default_load_endianness() is None


# --------------------------------------------------------------------------- big_endian.pt


@pytest.mark.parametrize("mode", ["path", "fileobj", "bytesio", "mmap"])
def test_big_endian_fixture_matches_manifest_and_torch(mode):
    path = fixture_path("big_endian.pt")
    assert read_records(path.read_bytes())[1]["byteorder"] == b"big"
    got = load_with_mode(fastserial.load, path, mode)
    assert_matches_manifest(got, expected_for("big_endian.pt"))
    assert_same(got, torch.load(path))


@pytest.mark.parametrize("default", list(LoadEndianness))
def test_byteorder_record_wins_over_the_default(default):
    fastserial.set_default_load_endianness(default)
    got = fastserial.load(fixture_path("big_endian.pt"))
    assert_matches_manifest(got, expected_for("big_endian.pt"))


def test_big_endian_fixture_with_weights_only_false_and_callable():
    path = fixture_path("big_endian.pt")
    for kwargs in ({"weights_only": False}, {"map_location": lambda s, l: s}, {"verify": True}):
        assert_matches_manifest(fastserial.load(path, **kwargs), expected_for("big_endian.pt"))


# --------------------------------------------------------------------------- crafted big-endian files


LOAD_VARIANTS = {
    "bytesio": ({}, "bytesio"),
    "path": ({}, "path"),
    "mmap": ({"mmap": True}, "path"),
    "unsafe": ({"weights_only": False}, "bytesio"),
    "callable": ({"map_location": lambda s, l: s}, "bytesio"),
    "dict": ({"map_location": {"cpu": "cpu"}}, "bytesio"),
    "verify": ({"verify": True}, "path"),
}


def _load(data, variant, tmp_path, load=fastserial.load):
    kwargs, source = LOAD_VARIANTS[variant]
    if source == "path":
        path = tmp_path / "be.pt"
        path.write_bytes(data)
        return load(path, **kwargs)
    return load(io.BytesIO(data), **kwargs)


@pytest.mark.parametrize("variant", list(LOAD_VARIANTS))
def test_crafted_big_endian_typed_dtypes(variant, tmp_path):
    obj = _typed_sample()
    big = to_big_endian(torch_save_bytes(obj))
    got = _load(big, variant, tmp_path)
    assert_same(got, obj)
    if variant != "verify":  # a fastserial-only argument
        assert_same(got, _load(big, variant, tmp_path, load=torch.load))


def test_crafted_big_endian_from_fastserial_save_and_deflated(tmp_path):
    obj = _typed_sample()
    big = to_big_endian(fs_save_bytes(obj))
    assert_same(fastserial.load(io.BytesIO(big)), obj)
    deflated = rezip(big)
    assert_same(fastserial.load(io.BytesIO(deflated)), obj)
    path = tmp_path / "deflated.pt"
    path.write_bytes(deflated)
    assert_same(fastserial.load(path, mmap=True), obj)


def test_crafted_big_endian_meta_map_location():
    # torch 2.13 crashes the interpreter (SIGSEGV) loading a big-endian file with
    # map_location='meta'; fastserial builds meta tensors without touching the data.
    obj = _typed_sample()
    got = fastserial.load(io.BytesIO(to_big_endian(torch_save_bytes(obj))), map_location="meta")
    for key, t in obj.items():
        assert got[key].device.type == "meta"
        assert (got[key].dtype, got[key].shape, got[key].stride()) == (t.dtype, t.shape, t.stride())


@pytest.mark.parametrize("variant", LOAD_VARIANTS)
def test_crafted_big_endian_unsigned_dtypes_swap_by_tensor_dtype(variant, tmp_path):
    # torch 2.13 returns these unswapped (u16 [1, 2, ...] comes back as [256, 512, ...]):
    # the storage is untyped, so torch swaps by 1 byte. fastserial deliberately swaps
    # by the tensor's dtype and returns the saved values.
    obj = _unsigned_sample()
    big = to_big_endian(torch_save_bytes(obj))
    assert_same(_load(big, variant, tmp_path), obj)


def test_unsigned_dtypes_little_endian_roundtrip():
    obj = _unsigned_sample()
    assert_same(fastserial.load(io.BytesIO(torch_save_bytes(obj))), obj)
    assert_same(torch.load(io.BytesIO(fs_save_bytes(obj))), obj)


def test_big_endian_shared_storage_swapped_once():
    base = torch.arange(8, dtype=torch.int32) * 0x01010101
    obj = {"base": base, "view": base[2:6], "again": base[1::2]}
    got = fastserial.load(io.BytesIO(to_big_endian(torch_save_bytes(obj))))
    assert_same(got, obj)


# --------------------------------------------------------------------------- no byteorder record


def test_disable_byteorder_record_omits_the_record():
    # torch 2.13 still writes 'byteorder' (at the end) when asked not to; fastserial
    # omits it, which is what the flag asks for.
    records = read_records(fs_save_bytes(_typed_sample(), _disable_byteorder_record=True))[1]
    assert "byteorder" not in records
    assert read_records(fs_save_bytes(_typed_sample()))[1]["byteorder"] == b"little"


@pytest.mark.parametrize("default", [None, LoadEndianness.NATIVE, LoadEndianness.LITTLE])
def test_no_record_little_defaults_read_little(default):
    obj = _typed_sample()
    data = fs_save_bytes(obj, _disable_byteorder_record=True)
    fastserial.set_default_load_endianness(default)
    assert_same(fastserial.load(io.BytesIO(data)), obj)


def test_no_byteorder_fixture():
    fastserial.set_default_load_endianness(LoadEndianness.LITTLE)
    got = fastserial.load(fixture_path("no_byteorder.pt"))
    assert_matches_manifest(got, expected_for("no_byteorder.pt"))


def test_no_record_big_default_swaps_like_torch():
    obj = _typed_sample()
    data = fs_save_bytes(obj, _disable_byteorder_record=True)
    fastserial.set_default_load_endianness(LoadEndianness.BIG)
    torch.serialization.set_default_load_endianness(torch.serialization.LoadEndianness.BIG)
    got = fastserial.load(io.BytesIO(data))
    assert_same(got, torch.load(io.BytesIO(data)))
    assert torch.equal(got["i32"], _swapped(obj["i32"]))
    assert torch.equal(got["c64"].view(torch.float32), _swapped(obj["c64"].view(torch.float32)))


def test_no_record_follows_torch_default_when_own_is_none():
    obj = {"i32": torch.tensor([1, 2], dtype=torch.int32)}
    data = fs_save_bytes(obj, _disable_byteorder_record=True)
    torch.serialization.set_default_load_endianness(torch.serialization.LoadEndianness.BIG)
    assert torch.equal(fastserial.load(io.BytesIO(data))["i32"], _swapped(obj["i32"]))
    # fastserial's own setting wins over torch's.
    fastserial.set_default_load_endianness(LoadEndianness.LITTLE)
    assert torch.equal(fastserial.load(io.BytesIO(data))["i32"], obj["i32"])


@pytest.mark.parametrize("variant", ["bytesio", "mmap", "unsafe", "callable"])
def test_big_endian_data_without_record_read_with_big_default(variant, tmp_path):
    obj = _typed_sample()
    data = to_big_endian(torch_save_bytes(obj), byteorder_record=False)
    assert "byteorder" not in read_records(data)[1]
    fastserial.set_default_load_endianness(LoadEndianness.BIG)
    assert_same(_load(data, variant, tmp_path), obj)


def test_big_endian_unsigned_without_record_read_with_big_default():
    obj = _unsigned_sample()
    data = to_big_endian(torch_save_bytes(obj), byteorder_record=False)
    fastserial.set_default_load_endianness(LoadEndianness.BIG)
    assert_same(fastserial.load(io.BytesIO(data)), obj)


def test_invalid_byteorder_record_raises_checkpoint_error():
    prefix, records = read_records(torch_save_bytes({"a": torch.ones(2)}))
    records["byteorder"] = b"middle"
    with pytest.raises(fastserial.CheckpointError, match="byteorder"):
        fastserial.load(io.BytesIO(write_records(records, prefix)))
