"""The native unpickler (rust/src/python/unpickle.rs), the empty_like template path of
the tensor factory, and the coalesced reads of small records (container/reader.rs).

Every load is compared with ``torch.load`` on the same bytes. Which unpickler ran is
observed through ``_ZipLoader.unpickler_used`` ("native" or "python"), captured by
wrapping ``_ZipLoader.load`` (the ``loaders`` fixture).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import re
import struct

import fastserial
import pytest
import torch
from conftest import fs_load, load_with_mode
from fastserial import serialization
from test_semantics_craft import (
    StorageRef,
    TensorRef,
    assert_same,
    craft_pickle,
    fs_save_bytes,
    make_checkpoint,
    read_records,
    record_offsets,
    to_big_endian,
    torch_save_bytes,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:TypedStorage is deprecated"),
    pytest.mark.filterwarnings("ignore:Detected pickle protocol"),
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor"),
]

PROTOCOLS = [2, 3, 4, 5]
SAVERS = ["torch", "fastserial"]


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def restore_threads():
    before = fastserial.get_num_threads()
    yield
    fastserial.set_num_threads(before)


def save_bytes(saver: str, obj, **kwargs) -> bytes:
    return (torch_save_bytes if saver == "torch" else fs_save_bytes)(obj, **kwargs)


def write_file(tmp_path, data: bytes, name: str = "ckpt.pt"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def pickle_opcodes(data: bytes) -> set:
    """The names of the opcodes in a checkpoint's ``data.pkl``."""
    pkl = read_records(data)[1]["data.pkl"]
    return {op.name for op, _, _ in pickletools.genops(pkl)}


def iter_tensors(obj, where="obj"):
    """``(where, tensor)`` for every tensor in a nest of dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        yield where, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from iter_tensors(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from iter_tensors(v, f"{where}[{i}]")


def assert_like_torch(got, want):
    """``got`` equals ``want`` (torch's load): structure, types, identity where torch's
    objects are shared, every tensor's dtype, shape, stride, storage_offset,
    requires_grad, storage nbytes and values, and which tensors share a storage."""
    assert_same(got, want)
    got_t = list(iter_tensors(got))
    want_t = list(iter_tensors(want))
    assert [w for w, _ in got_t] == [w for w, _ in want_t]
    for (where, g), (_, w) in zip(got_t, want_t):
        assert type(g) is type(w), where
        assert g.dtype == w.dtype, where
        assert g.shape == w.shape, where
        assert g.stride() == w.stride(), f"{where}: stride {g.stride()} != {w.stride()}"
        assert g.storage_offset() == w.storage_offset(), where
        assert g.requires_grad == w.requires_grad, where
        assert g.untyped_storage().nbytes() == w.untyped_storage().nbytes(), where
        assert g.device == w.device, where

    # Storage sharing: the partition of tensors by storage is the same as torch's.
    def groups(tensors):
        first: dict = {}
        out = []
        for i, (_, t) in enumerate(tensors):
            st = t.untyped_storage()
            out.append(first.setdefault(st.data_ptr(), i) if st.nbytes() else None)
        return out

    got_groups, want_groups = groups(got_t), groups(want_t)
    for (where, _), g, w in zip(want_t, got_groups, want_groups):
        assert g == w, (
            f"{where}: shares storage with #{g} in fastserial's load, with #{w} in torch's"
        )


def torch_reference_load(data: bytes, **kwargs):
    """``torch.load`` of ``data``; torch's weights-only unpickler lacks some opcodes of
    protocols 4 and 5 (FRAME), so those references are loaded with weights_only=False."""
    try:
        return torch.load(io.BytesIO(data), **kwargs)
    except pickle.UnpicklingError as e:
        if kwargs.get("weights_only") is False or "Unsupported operand" not in str(e):
            raise
        return torch.load(io.BytesIO(data), **{**kwargs, "weights_only": False})


def check_load(
    loaders, data: bytes, tmp_path, *, expect="native", modes=("path",), verify=False, **kwargs
):
    """Load ``data`` with torch and with fastserial (in each mode), assert equality and
    which unpickler ran; returns fastserial's last result and torch's."""
    path = write_file(tmp_path, data)
    want = torch_reference_load(data, **kwargs)
    got = None
    for mode in modes:
        before = len(loaders)
        got = load_with_mode(fastserial.load, path, mode, verify=verify, **kwargs)
        assert len(loaders) == before + 1
        assert_like_torch(got, want)
        if expect is not None:
            assert loaders[-1].unpickler_used == expect, (
                f"mode {mode}: unpickler_used is {loaders[-1].unpickler_used!r}, expected {expect!r}"
            )
    return got, want


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _values(shape, dtype, seed):
    """Distinct, deterministic values of ``dtype`` (different for every seed)."""
    g = _gen(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_complex:
        return torch.randn(shape, dtype=dtype, generator=g)
    if dtype.is_floating_point:
        if dtype.itemsize == 1:  # float8: make in float32, then convert
            return torch.randn(shape, generator=g).to(dtype)
        return torch.randn(shape, generator=g).to(dtype)
    if dtype in (torch.uint16, torch.uint32, torch.uint64):
        return torch.randint(0, 1000, shape, generator=g, dtype=torch.int64).to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2**40)), min(info.max, 2**40)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dtype)


# --------------------------------------------------------------------------- objects


def many_small_tensors(n=200):
    return {f"layer{i}.weight": _values((i % 7 + 1, 3), torch.float32, i) for i in range(n)}


def scalars_object():
    return {
        "ints": [
            0,
            1,
            127,
            128,
            255,
            256,
            65535,
            65536,
            -1,
            -128,
            -129,
            -65536,
            2**31 - 1,
            2**31,
            -(2**31),
            -(2**31) - 1,
            2**40,
            -(2**40),
            2**63 - 1,
            -(2**63),
        ],
        "floats": [0.0, -0.0, 1.5, -2.25, 1e300, 5e-324, float("inf"), float("-inf"), float("nan")],
        "bools": [True, False],
        "none": None,
        "strs": ["", "ascii", "héllo wörld", "日本語テキスト", "emoji 🎉", "ß" * 200, "x" * 300],
        "bytes": [b"\x00\xff\x80", b"z" * 300, b"\xc3\xa9"],
        "nested": {"a": {"b": [1, (2, 3.0, "four"), {"c": None, "d": [[], {}, ()]}]}},
        "tuples": [(), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), ((1, (2, (3,))),)],
        "keys": {
            1: "one",
            -5: "minus five",
            (1, 2): "tuple key",
            2**40: "big",
            "é": "non-ascii key",
            False: "bool key",
            0.5: "float key",
        },
        "tensor": torch.arange(5, dtype=torch.int64),
        "step": 12345,
    }


def shared_storage_object():
    base = torch.arange(100, dtype=torch.float32)
    other = torch.arange(30, dtype=torch.int16).view(5, 6)
    return {
        # views first: the storage is first met through a non-dense view
        "slice": base[10:20],
        "grid": base[:60].view(6, 10),
        "grid_t": base[:60].view(6, 10).t(),
        "strided": base[1::3],
        "tail": base[97:],
        "base": base,
        "other_col": other[:, 2],
        "other": other,
        "other_again": other[1:],
        "alone": torch.ones(4),
        "in_list": [base[5:7], (other.t(), base[50])],
    }


def layouts_object():
    """Several tensors of each of a few non-contiguous dense layouts (each owning its
    storage), so the factory's empty_like templates are used, interleaved with
    contiguous tensors of the same shapes and with odd size-1 strides."""
    obj = {}
    for i in range(6):
        obj[f"t{i}"] = _values((3, 4), torch.float32, 10 + i).t()  # (4, 3), stride (1, 4)
        obj[f"c{i}"] = _values((4, 3), torch.float32, 20 + i)  # (4, 3), stride (3, 1)
        obj[f"p{i}"] = _values((2, 3, 4), torch.float64, 30 + i).permute(2, 0, 1)
        obj[f"h{i}"] = _values((3, 4), torch.float16, 40 + i).t()  # same layout, other dtype
        odd = torch.empty_strided((3, 1), (1, 7), dtype=torch.float32)
        odd.copy_(_values((3, 1), torch.float32, 50 + i))
        obj[f"odd{i}"] = odd
        odd2 = torch.empty_strided((1, 4), (1, 1), dtype=torch.int32)
        odd2.copy_(_values((1, 4), torch.int32, 60 + i))
        obj[f"odd2_{i}"] = odd2
        obj[f"s{i}"] = torch.tensor(float(i))  # 0-d
        obj[f"z{i}"] = torch.empty(0, 3)  # zero elements
        obj[f"cl{i}"] = _values((2, 3, 4, 5), torch.float32, 70 + i).to(
            memory_format=torch.channels_last
        )
        obj[f"ex{i}"] = _values((3,), torch.float32, 80 + i).expand(4, 3)  # stride 0
    # requires_grad on the first of a layout, not on the rest (and the other way round)
    obj["rg0"] = _values((3, 4), torch.float32, 90).t().requires_grad_()
    obj["rg1"] = _values((3, 4), torch.float32, 91).t()
    obj["rg2"] = _values((5,), torch.float32, 92)
    obj["rg3"] = _values((5,), torch.float32, 93).requires_grad_()
    return obj


CORE_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.complex64,
    torch.complex128,
]
for _name in ("uint16", "uint32", "uint64"):
    if hasattr(torch, _name):
        CORE_DTYPES.append(getattr(torch, _name))
EXOTIC_DTYPES = [
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "complex32") if hasattr(torch, n)
]


def dtypes_object(dtypes):
    obj = {}
    for i, dt in enumerate(dtypes):
        name = str(dt).split(".")[1]
        if dt == torch.complex32:
            make = lambda shape, seed, dt=dt: _values(shape, torch.complex64, seed).to(dt)  # noqa: E731
        else:
            make = lambda shape, seed, dt=dt: _values(shape, dt, seed)  # noqa: E731
        obj[name] = make((3, 5), i)
        obj[name + "_again"] = make((3, 5), 100 + i)  # same layout: template path
        obj[name + "_t"] = make((5, 3), 200 + i).t()
        obj[name + "_0d"] = make((), 300 + i)
        obj[name + "_empty"] = make((0,), 0)
        obj[name + "_view"] = obj[name][1:, 2:]
    return obj


def state_dict_module():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 10),
        torch.nn.LayerNorm(10),
    )
    model.register_buffer("scale", torch.tensor(2.0))
    model(torch.randn(2, 3, 6, 6))  # BatchNorm running stats and num_batches_tracked
    return model


# --------------------------------------------------------------------------- 1. native path


@pytest.mark.parametrize("mode", ["path", "pathlike", "fileobj", "bytesio", "mmap"])
@pytest.mark.parametrize("saver", SAVERS)
def test_flat_dict_of_many_small_tensors(loaders, tmp_path, saver, mode):
    obj = many_small_tensors(300)
    data = save_bytes(saver, obj)
    got, want = check_load(loaders, data, tmp_path, modes=(mode,))
    assert list(got) == list(obj)
    for k in obj:
        assert torch.equal(got[k], obj[k])
    # 300 distinct storages
    assert len({t.untyped_storage().data_ptr() for t in got.values()}) == 300


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("saver", SAVERS)
def test_state_dict_with_metadata(loaders, tmp_path, saver, protocol):
    model = state_dict_module()
    sd = model.state_dict()
    data = save_bytes(saver, sd, pickle_protocol=protocol)
    assert "BUILD" in pickle_opcodes(data)  # the _metadata attribute
    got, want = check_load(loaders, data, tmp_path, modes=("path", "bytesio"))
    assert type(got) is collections.OrderedDict
    assert list(got.keys()) == list(sd.keys())
    assert hasattr(got, "_metadata") and hasattr(want, "_metadata")
    assert type(got._metadata) is type(want._metadata)
    assert got._metadata == want._metadata
    assert got._metadata == sd._metadata
    assert got["1.num_batches_tracked"].dtype == torch.int64
    assert got["1.num_batches_tracked"].dim() == 0
    fresh = state_dict_module()
    for p in fresh.parameters():
        torch.nn.init.zeros_(p)
    fresh.load_state_dict(got, strict=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, sd[k]), k


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("saver", SAVERS)
def test_scalars_strings_bytes_and_nesting(loaders, tmp_path, saver, protocol):
    obj = scalars_object()
    if protocol >= 3:  # protocol 2 spells b"" as a call of builtins.bytes (refused)
        obj["bytes"].insert(0, b"")
    data = save_bytes(saver, obj, pickle_protocol=protocol)
    ops = pickle_opcodes(data)
    assert {"LONG1", "BININT", "BININT1", "BININT2", "BINFLOAT", "NEWTRUE", "NEWFALSE"} <= ops
    if protocol >= 3:
        assert {"SHORT_BINBYTES", "BINBYTES"} <= ops
    got, want = check_load(loaders, data, tmp_path)
    assert got["ints"] == obj["ints"]
    assert all(type(i) is int for i in got["ints"])
    assert got["strs"] == obj["strs"]
    assert got["bytes"] == obj["bytes"]
    assert got["keys"] == want["keys"]
    assert [type(k) for k in got["keys"]] == [type(k) for k in want["keys"]]
    assert got["nested"] == obj["nested"]
    assert got["tuples"] == obj["tuples"]
    assert str(got["floats"]) == str(want["floats"])  # -0.0, inf, nan spelled alike


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_pickle_protocols_use_their_opcodes(loaders, tmp_path, protocol):
    obj = {"sd": state_dict_module().state_dict(), "extra": scalars_object()}
    obj["many"] = many_small_tensors(150)  # > 256 memo entries: LONG_BINPUT/LONG_BINGET
    obj["again"] = obj["many"]["layer149.weight"]
    data = torch_save_bytes(obj, pickle_protocol=protocol)
    ops = pickle_opcodes(data)
    assert "PROTO" in ops
    if protocol >= 4:
        assert {"FRAME", "STACK_GLOBAL", "MEMOIZE", "SHORT_BINUNICODE"} <= ops
    else:
        assert {"GLOBAL", "BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET"} <= ops
    check_load(loaders, data, tmp_path, modes=("path", "mmap"))


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("saver", SAVERS)
def test_tensors_sharing_storages(loaders, tmp_path, saver, protocol):
    obj = shared_storage_object()
    data = save_bytes(saver, obj, pickle_protocol=protocol)
    got, want = check_load(loaders, data, tmp_path, modes=("path", "fileobj", "bytesio", "mmap"))
    ptr = got["base"].untyped_storage().data_ptr()
    for k in ("slice", "grid", "grid_t", "strided", "tail"):
        assert got[k].untyped_storage().data_ptr() == ptr, k
    assert got["in_list"][0].untyped_storage().data_ptr() == ptr
    assert got["in_list"][1][1].untyped_storage().data_ptr() == ptr
    optr = got["other"].untyped_storage().data_ptr()
    assert optr != ptr
    assert got["other_col"].untyped_storage().data_ptr() == optr
    assert got["in_list"][1][0].untyped_storage().data_ptr() == optr
    assert got["alone"].untyped_storage().data_ptr() not in (ptr, optr)
    assert got["strided"].stride() == (3,) and got["strided"].storage_offset() == 1
    # really one storage: writing through the base is seen through the views
    got["base"][15] = -7.0
    assert got["slice"][5].item() == -7.0
    assert got["grid"][1, 5].item() == -7.0
    assert got["grid_t"][5, 1].item() == -7.0


@pytest.mark.parametrize("saver", SAVERS)
@pytest.mark.parametrize("verify", [False, True])
def test_repeated_non_contiguous_layouts_use_exact_strides(loaders, tmp_path, saver, verify):
    obj = layouts_object()
    data = save_bytes(saver, obj)
    got, want = check_load(loaders, data, tmp_path, modes=("path", "bytesio"), verify=verify)
    for k, w in want.items():
        assert got[k].stride() == w.stride(), k
        assert got[k].is_contiguous() == w.is_contiguous(), k
        assert got[k].is_contiguous(memory_format=torch.channels_last) == w.is_contiguous(
            memory_format=torch.channels_last
        ), k
    assert got["t0"].stride() == (1, 4)
    assert got["p0"].stride() == obj["p0"].stride()
    assert got["odd0"].stride() == (1, 7)
    assert got["odd2_0"].stride() == (1, 1)
    assert got["cl0"].stride() == obj["cl0"].stride()
    # each tensor of a repeated layout owns its own memory and its own values
    ptrs = [got[f"t{i}"].untyped_storage().data_ptr() for i in range(6)]
    assert len(set(ptrs)) == 6
    for i in range(6):
        assert torch.equal(got[f"t{i}"], obj[f"t{i}"])
        assert torch.equal(got[f"p{i}"], obj[f"p{i}"])
    assert got["rg0"].requires_grad and not got["rg1"].requires_grad
    assert not got["rg2"].requires_grad and got["rg3"].requires_grad
    assert all(got[k].is_leaf for k in ("rg0", "rg1", "rg3"))


@pytest.mark.parametrize("saver", SAVERS)
def test_dtypes(loaders, tmp_path, saver):
    data = save_bytes(saver, dtypes_object(CORE_DTYPES))
    got, want = check_load(loaders, data, tmp_path, modes=("path", "bytesio", "mmap"))
    for dt in CORE_DTYPES:
        name = str(dt).split(".")[1]
        assert got[name].dtype == dt
        assert got[name + "_0d"].dim() == 0
        assert got[name + "_empty"].numel() == 0
        assert got[name + "_view"].untyped_storage().data_ptr() == (
            got[name].untyped_storage().data_ptr()
        )


@pytest.mark.skipif(not EXOTIC_DTYPES, reason="no float8/complex32 in this torch")
def test_exotic_dtypes_load_like_torch(loaders, tmp_path):
    data = torch_save_bytes(dtypes_object(EXOTIC_DTYPES))
    check_load(loaders, data, tmp_path, expect=None, modes=("path", "bytesio"))


@pytest.mark.parametrize("saver", SAVERS)
def test_requires_grad_and_zero_sized_tensors(loaders, tmp_path, saver):
    w = torch.randn(3, 4, generator=_gen(1), requires_grad=True)
    obj = {
        "w": w,
        "b": torch.zeros(4, requires_grad=True),
        "d": torch.randn(2, generator=_gen(2), dtype=torch.float64).requires_grad_(),
        "no": torch.ones(2),
        "scalar": torch.tensor(3.5),
        "scalar_rg": torch.tensor(1.25, requires_grad=True),
        "int_scalar": torch.tensor(-7),
        "empty": torch.empty(0),
        "empty2": torch.empty(4, 0, 2),
        "empty_rg": torch.empty(0, requires_grad=True),
        "one": torch.ones(1, 1, 1),
    }
    data = save_bytes(saver, obj)
    got, want = check_load(loaders, data, tmp_path, modes=("path", "bytesio", "mmap"))
    for k, v in obj.items():
        assert got[k].requires_grad == v.requires_grad, k
        assert got[k].is_leaf, k
        assert got[k].grad_fn is None, k
        assert torch.equal(got[k].detach(), v.detach()), k
    assert got["scalar"].shape == () and got["scalar"].item() == 3.5
    assert got["empty2"].shape == (4, 0, 2)
    assert got["empty"].untyped_storage().nbytes() == 0


@pytest.mark.parametrize("map_location", [None, "cpu", torch.device("cpu"), {"cpu": "cpu"}])
def test_native_with_cpu_map_locations_and_options(loaders, tmp_path, map_location):
    obj = {"sd": state_dict_module().state_dict(), "shared": shared_storage_object()}
    data = torch_save_bytes(obj)
    path = write_file(tmp_path, data)
    want = torch_reference_load(data, map_location=map_location)
    for kwargs in ({}, {"weights_only": False}, {"pickle_module": pickle, "weights_only": False}):
        got, used = fs_load(loaders, str(path), map_location=map_location, **kwargs)
        assert used == "native", kwargs
        assert_like_torch(got, want)


def test_map_locations_running_user_code_skip_the_native_machine(loaders, tmp_path):
    obj = {"sd": state_dict_module().state_dict(), "shared": shared_storage_object()}
    data = torch_save_bytes(obj)
    path = write_file(tmp_path, data)

    want_calls, got_calls = [], []
    want = torch.load(path, map_location=lambda s, loc: want_calls.append(loc) or s)
    got, used = fs_load(loaders, str(path), map_location=lambda s, loc: got_calls.append(loc) or s)
    assert used != "native"
    assert got_calls == want_calls and len(got_calls) > 0
    assert_like_torch(got, want)

    want = torch.load(path, map_location="meta")
    got, used = fs_load(loaders, str(path), map_location="meta")
    assert used != "native"
    for (where, g), (_, w) in zip(iter_tensors(got), iter_tensors(want)):
        assert g.device.type == "meta" and w.device.type == "meta", where
        assert (g.dtype, g.shape, g.stride(), g.storage_offset()) == (
            w.dtype,
            w.shape,
            w.stride(),
            w.storage_offset(),
        ), where


# --------------------------------------------------------------------------- 2. identity


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("saver", SAVERS)
def test_shared_objects_keep_their_identity(loaders, tmp_path, saver, protocol):
    t = (1, 2)
    lst = [1, "x", 3.0]
    d = {"k": 1}
    nested = ([5, 6], "y")
    tensor = torch.arange(3.0)
    key = ("a", 1)
    inner = [7]
    obj = {
        "t1": t,
        "t2": t,
        "l1": lst,
        "l2": lst,
        "d1": d,
        "d2": d,
        "e1": (),
        "e2": (),
        "n1": nested,
        "n2": nested,
        "x1": tensor,
        "x2": tensor,
        "tt1": (tensor, t),
        "tt2": (tensor, t),
        "keyed": {key: 1},
        "key": key,
        "holder": (inner,),
        "inner": inner,
        "list_of_same": [lst, lst, t, t],
    }
    data = save_bytes(saver, obj, pickle_protocol=protocol)
    path = write_file(tmp_path, data)
    want = torch_reference_load(data)
    got, used = fs_load(loaders, str(path))
    assert used == "native"
    assert_like_torch(got, want)

    def same(o, a, b):
        return o[a] is o[b]

    for a, b in [
        ("t1", "t2"),
        ("l1", "l2"),
        ("d1", "d2"),
        ("e1", "e2"),
        ("n1", "n2"),
        ("x1", "x2"),
        ("tt1", "tt2"),
    ]:
        assert same(got, a, b) == same(want, a, b), (a, b)
    # mutable and tensor objects referenced twice must be one object, as in torch
    assert want["l1"] is want["l2"] and got["l1"] is got["l2"]
    assert got["d1"] is got["d2"]
    assert got["x1"] is got["x2"]
    assert got["t1"] is got["t2"]  # torch's unpickler memoizes the tuple
    assert got["n1"][0] is got["n2"][0]
    assert got["tt1"][0] is got["x1"] and got["tt1"][1] is got["t1"]
    assert (next(iter(got["keyed"])) is got["key"]) == (next(iter(want["keyed"])) is want["key"])
    assert got["holder"][0] is got["inner"]
    los = got["list_of_same"]
    assert los[0] is los[1] is got["l1"] and los[2] is los[3] is got["t1"]
    got["l1"].append("appended")
    assert got["l2"][-1] == "appended" and los[0][-1] == "appended"
    got["d1"]["new"] = 2
    assert got["d2"]["new"] == 2


# --------------------------------------------------------------------------- 3. fallback


def _fallback_cases():
    big = 2**2100  # LONG4 (more than 255 bytes)
    return {
        "long4": ({"n": big, "neg": -big}, [2, 3, 4, 5]),
        "long1_over_8_bytes": ({"a": 2**64 + 1, "b": -(2**64), "c": 2**63}, [2, 3, 4, 5]),
        "set_opcodes": ({"s": {1, 2, 3}}, [4, 5]),  # EMPTY_SET + ADDITEMS
        "set_py2_name": ({"s": {1, 2, 3}}, [2]),  # __builtin__.set: a renamed global
        "surrogate_string": ({"s": "bad \ud800 surrogate"}, [2, 3, 4, 5]),
        "untyped_storage": ({"st": torch.arange(4, dtype=torch.uint8).untyped_storage()}, [2, 4]),
        "quantized": (
            {"q": torch.quantize_per_tensor(torch.arange(4.0), 0.5, 1, torch.quint8)},
            [2, 4],
        ),
        "complex_py2_name": ({"z": 1 + 2j}, [2]),
    }


_FALLBACKS = [
    pytest.param(name, protocol, id=f"{name}-p{protocol}")
    for name, (_, protocols) in _fallback_cases().items()
    for protocol in protocols
]


@pytest.mark.parametrize("name,protocol", _FALLBACKS)
def test_unsupported_pickles_fall_back_to_python(loaders, tmp_path, name, protocol):
    value, _ = _fallback_cases()[name]
    # tensors (shared storage, repeated layouts) built by the native machine before it
    # gives up must not leak into the restarted load
    obj = {"first": shared_storage_object(), "layouts": layouts_object()}
    obj.update(value)
    obj["last"] = many_small_tensors(20)
    data = torch_save_bytes(obj, pickle_protocol=protocol)
    got, want = check_load(
        loaders, data, tmp_path, expect="python", modes=("path", "bytesio", "mmap")
    )
    for k in value:
        if isinstance(value[k], (int, str, set, complex)):
            assert got[k] == value[k]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_globals_called_through_python_load_like_torch(loaders, tmp_path, protocol):
    """torch.Size, Counter, Parameter, device and dtype are allowed globals: the native
    machine calls them (REDUCE on a resolved global) instead of giving up."""
    p = torch.nn.Parameter(torch.randn(3, generator=_gen(3)))
    frozen = torch.nn.Parameter(torch.randn(2, generator=_gen(4)), requires_grad=False)
    obj = {
        "size": torch.Size([2, 3, 4]),
        "empty_size": torch.Size([]),
        "counter": collections.Counter({"a": 3, "b": 1}),
        "param": p,
        "param_again": p,
        "frozen_param": frozen,
        "device": torch.device("cpu"),
        "dtype": torch.bfloat16,
        "od": collections.OrderedDict([("x", 1), ("y", torch.ones(2))]),
        "empty_od": collections.OrderedDict(),
        "bytes": b"\x00\x01",  # protocol 2: _codecs.encode
    }
    data = torch_save_bytes(obj, pickle_protocol=protocol)
    got, want = check_load(loaders, data, tmp_path, modes=("path", "bytesio"))
    assert type(got["size"]) is torch.Size and got["size"] == torch.Size([2, 3, 4])
    assert type(got["counter"]) is collections.Counter and got["counter"] == obj["counter"]
    assert type(got["param"]) is torch.nn.Parameter and got["param"].requires_grad
    assert got["param"] is got["param_again"]
    assert type(got["frozen_param"]) is torch.nn.Parameter
    assert not got["frozen_param"].requires_grad
    assert torch.equal(got["param"].detach(), p.detach())
    assert type(got["od"]) is collections.OrderedDict and type(got["empty_od"]) is type(
        want["empty_od"]
    )
    assert got["dtype"] is torch.bfloat16


def test_non_allowlisted_class_with_weights_only_false_falls_back(loaders, tmp_path):
    obj = {"t": torch.ones(3), "point": _Point(1, torch.arange(2.0)), "n": 5}
    data = torch_save_bytes(obj)
    path = write_file(tmp_path, data)
    want = torch.load(path, weights_only=False)
    got, used = fs_load(loaders, str(path), weights_only=False)
    assert used == "python"
    assert type(got["point"]) is _Point
    assert torch.equal(got["point"].y, want["point"].y)
    assert torch.equal(got["t"], want["t"]) and got["n"] == 5


class _Point:
    def __init__(self, x, y):
        self.x, self.y = x, y


# --------------------------------------------------------------------------- 4. safety


def _boom(arg):
    _boom.calls.append(arg)
    return arg


_boom.calls = []


class _Boom:
    def __reduce__(self):
        return (_boom, ("boom",))


def _global(module: str, name: str, protocol: int) -> bytes:
    if protocol >= 4:
        m, n = module.encode(), name.encode()
        return b"\x8c" + bytes([len(m)]) + m + b"\x8c" + bytes([len(n)]) + n + b"\x93"
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("module", ["posix", "os"])
def test_disallowed_global_is_refused_and_never_runs(tmp_path, module, protocol):
    canary = tmp_path / "pwned"
    call = _global(module, "system", protocol) + _str(f"touch {canary}") + b"\x85R"
    # a dict with a tensor first (all natively loadable), then the call
    head = craft_pickle(
        {"t": TensorRef(StorageRef("0", torch.FloatStorage, 4), 0, (4,), (1,))}, protocol=protocol
    )
    assert head.endswith(b".")
    pkl = head[:-1] + _str("evil") + call + b"s."
    data = make_checkpoint(pkl, {"0": torch.arange(4.0).numpy().tobytes()})
    # the file is well formed: a full unpickle (outside the weights-only policy) would run it
    assert pickletools.dis(pkl, out=io.StringIO()) is None
    path = write_file(tmp_path, data)
    for mode in ("path", "fileobj", "bytesio", "mmap"):
        for verify in (False, True):
            with pytest.raises(pickle.UnpicklingError, match=rf"{module}\.system"):
                load_with_mode(fastserial.load, path, mode, verify=verify)
    assert not canary.exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(io.BytesIO(data))
    assert not canary.exists()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_reduce_of_unlisted_function_never_runs(loaders, tmp_path, protocol):
    obj = dict(many_small_tensors(10))
    obj["boom"] = _Boom()
    data = torch_save_bytes(obj, pickle_protocol=protocol)
    path = write_file(tmp_path, data)
    _boom.calls.clear()
    with pytest.raises(pickle.UnpicklingError, match="_boom"):
        fastserial.load(str(path))
    assert _boom.calls == []
    got, used = fs_load(loaders, str(path), weights_only=False)
    assert used == "python"
    assert got["boom"] == "boom" and _boom.calls == ["boom"]


# --------------------------------------------------------------------------- 5. errors


def _checkpoint_with_bad_view(n_good: int = 30):
    tensors = {}
    storages = {}
    for i in range(n_good):
        storages[str(i)] = torch.full((4,), float(i)).numpy().tobytes()
        tensors[f"g{i}"] = TensorRef(StorageRef(str(i), torch.FloatStorage, 4), 0, (4,), (1,))
    bad = str(n_good)
    storages[bad] = torch.arange(4.0).numpy().tobytes()  # 16 bytes
    tensors["bad"] = TensorRef(StorageRef(bad, torch.FloatStorage, 4), 1, (2, 2), (2, 1))
    for i in range(n_good + 1, n_good + 10):
        storages[str(i)] = torch.full((4,), float(i)).numpy().tobytes()
        tensors[f"g{i}"] = TensorRef(StorageRef(str(i), torch.FloatStorage, 4), 0, (4,), (1,))
    return make_checkpoint(craft_pickle(tensors), storages), bad


@pytest.mark.parametrize("mode", ["path", "bytesio", "mmap"])
def test_view_past_its_storage_names_the_record(tmp_path, mode):
    data, bad = _checkpoint_with_bad_view()
    path = write_file(tmp_path, data)
    with pytest.raises(
        fastserial.CheckpointError, match="reaches past the end of its 16-byte"
    ) as e:
        load_with_mode(fastserial.load, path, mode)
    assert f"data/{bad}'" in str(e.value)
    with pytest.raises(Exception):  # noqa: B017 - torch's own error
        torch.load(io.BytesIO(data))


def test_storage_size_mismatch_names_the_record(tmp_path):
    storages = {str(i): torch.full((4,), float(i)).numpy().tobytes() for i in range(20)}
    storages["7"] = b"\0" * 12
    tensors = {
        f"g{i}": TensorRef(StorageRef(str(i), torch.FloatStorage, 4), 0, (4,), (1,))
        for i in range(20)
    }
    data = make_checkpoint(craft_pickle(tensors), storages)
    path = write_file(tmp_path, data)
    with pytest.raises(fastserial.CheckpointError, match=r"data/7' holds 12 bytes"):
        fastserial.load(str(path))


@pytest.mark.parametrize("mode", ["path", "fileobj", "bytesio", "mmap"])
@pytest.mark.parametrize("saver", SAVERS)
def test_verify_names_the_corrupted_record(loaders, tmp_path, saver, mode, restore_threads):
    obj = many_small_tensors(200)
    data = bytearray(save_bytes(saver, obj))
    _, records = read_records(bytes(data))
    keys = sorted(
        (n.split("/", 1)[1] for n in records if n.startswith("data/") and len(records[n])),
        key=int,
    )
    offsets = record_offsets(bytes(data))
    victim = keys[len(keys) // 2 + 3]
    data[offsets[f"data/{victim}"] + 5] ^= 0x40
    data = bytes(data)
    path = write_file(tmp_path, data)
    for threads in (1, 4):
        fastserial.set_num_threads(threads)
        with pytest.raises(fastserial.CheckpointError, match="CRC32") as e:
            load_with_mode(fastserial.load, path, mode, verify=True)
        assert re.search(rf"data/{victim}'", str(e.value)), str(e.value)
    # without verify, the corrupted value loads as torch loads it
    got = load_with_mode(fastserial.load, path, mode)
    assert loaders[-1].unpickler_used == "native"
    try:
        want = torch.load(io.BytesIO(data))
    except Exception:  # torch may check CRCs itself
        want = None
    if want is not None:
        assert_like_torch(got, want)
    changed = [k for k in obj if not torch.equal(got[k], obj[k])]
    assert len(changed) == 1


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9, -30, -1])
def test_truncated_file_raises_checkpoint_error(tmp_path, cut):
    data = torch_save_bytes(many_small_tensors(200))
    n = int(len(data) * cut) if cut > 0 else len(data) + cut
    path = write_file(tmp_path, data[:n])
    for mode in ("path", "fileobj", "bytesio", "mmap"):
        for verify in (False, True):
            with pytest.raises(fastserial.CheckpointError):
                load_with_mode(fastserial.load, path, mode, verify=verify)


@pytest.mark.parametrize("opener", ["path", "fileobj"])
@pytest.mark.parametrize("verify", [False, True])
def test_file_truncated_after_open_names_a_missing_record(
    monkeypatch, tmp_path, opener, verify, restore_threads
):
    """The archive is opened (central directory parsed), then the file shrinks before
    the tensor data is read: the grouped read fails and the error names a record."""
    obj = many_small_tensors(200)
    data = torch_save_bytes(obj)
    offsets = record_offsets(data)
    first_lost = 120
    cut = offsets[f"data/{first_lost}"] + 4
    path = write_file(tmp_path, data)
    original = serialization._ZipLoader.load

    def load(self):
        os.truncate(path, cut)
        return original(self)

    monkeypatch.setattr(serialization._ZipLoader, "load", load)
    for threads in (1, 4):
        fastserial.set_num_threads(threads)
        path.write_bytes(data)
        with pytest.raises(fastserial.CheckpointError) as e:
            if opener == "path":
                fastserial.load(str(path), verify=verify)
            else:
                with open(path, "rb") as fh:
                    fastserial.load(fh, verify=verify)
        m = re.search(r"record '[^']*data/(\d+)'", str(e.value))
        assert m, str(e.value)
        assert int(m.group(1)) >= first_lost


# --------------------------------------------------------------------------- 6. byte order


def big_endian_object():
    obj = {}
    for i in range(60):
        obj[f"f{i}"] = _values((i % 5 + 1, 2), torch.float32, i)
        obj[f"s{i}"] = _values((3,), torch.int16, 1000 + i)
        obj[f"c{i}"] = _values((2, 2), torch.complex64, 2000 + i)
        if i % 10 == 0:
            obj[f"d{i}"] = _values((4,), torch.float64, 3000 + i)
            obj[f"b{i}"] = _values((3, 2), torch.bfloat16, 4000 + i).t()
            obj[f"i{i}"] = _values((5,), torch.int64, 5000 + i)
    base = _values((20,), torch.float32, 9999)
    obj["base"] = base
    obj["base_view"] = base[3:9].view(2, 3)
    obj["base_t"] = base[:12].view(3, 4).t()
    obj["scalar"] = torch.tensor(2.5)
    return obj


@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("saver", SAVERS)
def test_big_endian_many_small_tensors(loaders, tmp_path, saver, verify, restore_threads):
    data = to_big_endian(save_bytes(saver, big_endian_object()))
    assert read_records(data)[1]["byteorder"] == b"big"
    for threads in (1, 4):
        fastserial.set_num_threads(threads)
        got, want = check_load(
            loaders, data, tmp_path, modes=("path", "fileobj", "bytesio", "mmap"), verify=verify
        )
    obj = big_endian_object()
    for k, v in obj.items():
        assert torch.equal(got[k], v), k
    assert got["base_view"].untyped_storage().data_ptr() == got["base"].untyped_storage().data_ptr()


# --------------------------------------------------------------------------- 7. many shapes


def interleaved_object(n=400):
    shapes = [
        ((3,), torch.float32, False),
        ((2, 5), torch.float32, False),
        ((4, 4, 2), torch.float16, False),
        ((7,), torch.int64, False),
        ((3, 6), torch.float32, True),  # stored transposed: (6, 3), stride (1, 6)
    ]
    obj = {}
    for i in range(n):
        shape, dtype, transpose = shapes[i % len(shapes)]
        t = _values(shape, dtype, i)
        obj[f"t{i}"] = t.t() if transpose else t
        if i % 97 == 50:  # a big record (> 256 KiB) splits the groups of small ones
            obj[f"big{i}"] = _values((80_000,), torch.float32, 10_000 + i)
        if i % 61 == 30:  # mid-sized records, more than the group gap apart
            obj[f"mid{i}"] = _values((1500,), torch.float32, 20_000 + i)
    return obj


@pytest.mark.parametrize("verify", [False, True])
@pytest.mark.parametrize("saver", SAVERS)
def test_hundreds_of_interleaved_small_tensors(loaders, tmp_path, saver, verify, restore_threads):
    obj = interleaved_object()
    data = save_bytes(saver, obj)
    for threads in (1, 4):
        fastserial.set_num_threads(threads)
        got, want = check_load(
            loaders, data, tmp_path, modes=("path", "fileobj", "bytesio"), verify=verify
        )
    assert list(got) == list(obj)
    for k, v in obj.items():
        assert torch.equal(got[k], v), k
        assert got[k].stride() == v.stride(), k
    assert len({t.untyped_storage().data_ptr() for t in got.values()}) == len(obj)


@pytest.mark.parametrize("error", [KeyboardInterrupt, MemoryError])
def test_interrupts_and_memory_errors_are_not_retried(loaders, tmp_path, monkeypatch, error):
    """An interrupt (or MemoryError) raised while the native unpickler builds tensors
    reaches the caller; it must not be taken for "unsupported" and start the load
    over with Python's unpickler. Only the first tensor creation raises, so a retry
    would succeed and hide it."""
    path = write_file(tmp_path, save_bytes("torch", many_small_tensors(50)))
    # Small tensors are made by torch's DLPack import (packed), others by empty_like.
    info = fastserial.serialization._TorchInfo.get()
    calls = []

    def failing_once(real):
        def wrapper(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise error()
            return real(*args, **kwargs)

        return wrapper

    real_empty_like, real_from_dlpack = torch.empty_like, info.from_dlpack
    monkeypatch.setattr(torch, "empty_like", failing_once(real_empty_like))
    monkeypatch.setattr(info, "from_dlpack", failing_once(real_from_dlpack))
    with pytest.raises(error):
        fastserial.load(path)
    assert loaders[-1].unpickler_used == "native"
    assert len(calls) == 1
    # And without the fault, the same file loads natively.
    monkeypatch.setattr(torch, "empty_like", real_empty_like)
    monkeypatch.setattr(info, "from_dlpack", real_from_dlpack)
    got, used = fs_load(loaders, path)
    assert used == "native"
    assert_like_torch(got, torch.load(path))


def test_memo_keys_the_scan_says_are_unread_end_a_run_if_read(loaders, tmp_path, monkeypatch):
    """The native unpickler keeps only the memo keys the scan says a GET reads. Were
    the scan wrong, reading a key it did not keep must hand the pickle to Python's
    unpickler, never produce a wrong value: here the scan claims no key is read,
    while torch's pickle reads its memoized globals and strings for every tensor."""
    obj = many_small_tensors(30)
    path = write_file(tmp_path, save_bytes("torch", obj))
    got, used = fs_load(loaders, path)
    assert used == "native"
    real_scan = serialization._native.scan_pickle

    def scan_claiming_no_reads(*args, **kwargs):
        scan = real_scan(*args, **kwargs)
        assert scan["memo_read"], "torch's pickle reads memo keys"
        scan["memo_read"] = b""
        return scan

    monkeypatch.setattr(serialization._native, "scan_pickle", scan_claiming_no_reads)
    got, used = fs_load(loaders, path)
    assert used == "python"
    assert_like_torch(got, torch.load(path))
