"""pickle_module, pickle_protocol, **pickle_load_args, and every kind of object
torch.save writes: sparse (COO, CSR, CSC, BSR, BSC), quantized, nested and meta
tensors, storages saved directly, torch.Size/dtype/device/layout, tensor subclasses
and tensors with Python attributes, whole modules, custom classes.

Each object is saved by torch and by fastserial and loaded by both; the loads
must agree."""

import collections
import io
import pickle
import pickletools
import types

import fastserial
import pytest
import torch
from conftest import assert_matches_manifest, expected_for, fixture_path
from test_semantics_craft import assert_same, fs_save_bytes, read_records, torch_save_bytes

pytestmark = [
    pytest.mark.filterwarnings("ignore:TypedStorage is deprecated"),
    pytest.mark.filterwarnings("ignore:Detected pickle protocol"),
    pytest.mark.filterwarnings("ignore:pickle_load_args only works"),
    pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled"),
    pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta"),
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors"),
]


class Point:
    """A plain class pickled by reference (NEWOBJ + BUILD)."""

    def __init__(self, x, y):
        self.x, self.y = x, y


class KeywordOnly:
    """Pickled with NEWOBJ_EX at protocol 4+ (keyword arguments to __new__)."""

    def __new__(cls, *, value=0):
        obj = super().__new__(cls)
        obj.value = value
        return obj

    def __getnewargs_ex__(self):
        return (), {"value": self.value}


class MyTensor(torch.Tensor):
    """A tensor subclass (saved through torch._tensor._rebuild_from_type_v2)."""


def _dense():
    return torch.tensor(
        [[0.0, 1.0, 0.0, 0.0], [2.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 4.0], [5.0, 0.0, 0.0, 0.0]]
    )


def _tensor_with_attrs():
    t = torch.arange(3.0)
    t.note = "calibrated"
    t.stats = {"mean": 1.0, "n": 3}
    return t


def _subclass():
    t = torch.arange(4.0).as_subclass(MyTensor)
    t.tag = "sub"
    return t


def _coo_uncoalesced():
    return torch.sparse_coo_tensor(
        torch.tensor([[0, 0, 1], [1, 1, 0]]), torch.tensor([1.0, 2.0, 3.0]), (2, 2)
    )


OBJECTS = {
    "sparse_coo": lambda: _dense().to_sparse(),
    "sparse_coo_uncoalesced": _coo_uncoalesced,
    "sparse_csr": lambda: _dense().to_sparse_csr(),
    "sparse_csc": lambda: _dense().to_sparse_csc(),
    "sparse_bsr": lambda: _dense().to_sparse_bsr((2, 2)),
    "sparse_bsc": lambda: _dense().to_sparse_bsc((2, 2)),
    "quantized_per_tensor": lambda: torch.quantize_per_tensor(
        torch.tensor([1.0, -2.0, 3.5]), 0.5, 3, torch.qint8
    ),
    "quantized_per_channel": lambda: torch.quantize_per_channel(
        torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        torch.tensor([0.1, 0.2], dtype=torch.float64),
        torch.tensor([0, 1]),
        0,
        torch.quint8,
    ),
    "quantized_quint4x2": lambda: torch.quantize_per_tensor(
        torch.tensor([1.0, 2.0, 3.0, 4.0]), 0.5, 0, torch.quint4x2
    ),
    "nested": lambda: torch.nested.nested_tensor([torch.arange(3.0), torch.arange(5.0)]),
    "meta": lambda: torch.empty(3, 4, device="meta"),
    "meta_param": lambda: torch.nn.Parameter(torch.empty(2, device="meta")),
    "untyped_storage": lambda: torch.arange(4, dtype=torch.int32).untyped_storage(),
    "typed_storage": lambda: torch.storage.TypedStorage([1.5, 2.5], dtype=torch.float64),
    "legacy_storage_class": lambda: torch.FloatStorage([1.0, 2.0]),
    "storage_and_tensor": lambda: (lambda t: {"t": t, "s": t.untyped_storage()})(
        torch.arange(3, dtype=torch.uint8)
    ),
    "size": lambda: torch.Size([2, 3]),
    "dtypes": lambda: [
        torch.bfloat16,
        torch.float8_e4m3fn,
        torch.uint16,
        torch.complex64,
        torch.bool,
    ],
    "devices": lambda: [torch.device("cuda", 1), torch.device("cpu"), torch.device("meta")],
    "layouts": lambda: [torch.strided, torch.sparse_coo, torch.sparse_csr],
    "parameter": lambda: torch.nn.Parameter(torch.ones(2, 3)),
    "parameter_no_grad": lambda: torch.nn.Parameter(torch.ones(2), requires_grad=False),
    "requires_grad": lambda: torch.ones(2).requires_grad_(),
    "tensor_with_attrs": _tensor_with_attrs,
    "ordered_dict_metadata": lambda: torch.nn.Linear(2, 2).state_dict(),
    "python_values": lambda: {
        1: "int key",
        (1, 2): [None, True, 1.5, -(2**70), "ü", b"\x00\xff"],
        "set": {1, 2},
        "complex": 1 + 2j,
        "bytearray": bytearray(b"ab"),
    },
}

# Objects whose load needs an allow-listed global under weights_only=True.
NEEDS_UNSAFE = {
    "tensor_subclass": _subclass,
    "module": lambda: torch.nn.Linear(3, 2),
    "point": lambda: Point(1, torch.ones(2)),
}


def _wrap(name, make):
    return {"obj": make(), "other": torch.arange(2.0)}


_REFUSED = object()


def _loads(data, weights_only):
    """fastserial's and torch's loads of ``data``; both ``_REFUSED`` when the installed
    torch refuses it (torch 2.15 no longer allows nested tensors) and fastserial does too."""
    try:
        want = torch.load(io.BytesIO(data), weights_only=weights_only)
    except pickle.UnpicklingError:
        with pytest.raises(pickle.UnpicklingError):
            fastserial.load(io.BytesIO(data), weights_only=weights_only)
        return _REFUSED, _REFUSED
    got = fastserial.load(io.BytesIO(data), weights_only=weights_only)
    return got, want


@pytest.mark.parametrize("saver", ["torch", "fastserial"])
@pytest.mark.parametrize("name", list(OBJECTS))
def test_objects_load_like_torch(name, saver):
    obj = _wrap(name, OBJECTS[name])
    data = torch_save_bytes(obj) if saver == "torch" else fs_save_bytes(obj)
    for weights_only in (True, False):
        got, want = _loads(data, weights_only)
        if got is not _REFUSED:
            assert_same(got, want)
    if "storage" not in name:  # storages load as TypedStorage, in torch too
        assert_same(got, obj, check_sharing=False)


@pytest.mark.parametrize("name", list(OBJECTS))
def test_fastserial_save_writes_torch_records(name):
    """fastserial.save writes the same storage records as torch.save, and a pickle
    that unpickles to the same persistent ids and globals."""
    obj = _wrap(name, OBJECTS[name])
    ours = read_records(fs_save_bytes(obj))[1]
    theirs = read_records(torch_save_bytes(obj))[1]
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        if key.startswith("data/"):
            assert ours[key] == theirs[key], key
    assert _globals(ours["data.pkl"]) == _globals(theirs["data.pkl"])


def _globals(pkl):
    ops = list(pickletools.genops(pkl))
    found = [arg for op, arg, _ in ops if op.name == "GLOBAL"]
    return sorted(found)


@pytest.mark.parametrize("saver", ["torch", "fastserial"])
@pytest.mark.parametrize("name", list(NEEDS_UNSAFE))
def test_objects_needing_weights_only_false(name, saver):
    obj = _wrap(name, NEEDS_UNSAFE[name])
    data = torch_save_bytes(obj) if saver == "torch" else fs_save_bytes(obj)
    got, want = _loads(data, weights_only=False)
    assert_same(got, want)
    with pytest.raises(pickle.UnpicklingError):
        fastserial.load(io.BytesIO(data))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(io.BytesIO(data))


def test_tensor_subclass_and_attributes_with_safe_globals():
    obj = {"sub": _subclass(), "attrs": _tensor_with_attrs()}
    data = torch_save_bytes(obj)
    with pytest.raises(pickle.UnpicklingError, match="MyTensor"):
        fastserial.load(io.BytesIO(data))
    with fastserial.safe_globals([MyTensor]), torch.serialization.safe_globals([MyTensor]):
        got, want = _loads(data, weights_only=True)
    assert_same(got, want)
    assert type(got["sub"]) is MyTensor and got["sub"].tag == "sub"
    assert got["attrs"].note == "calibrated" and got["attrs"].stats == {"mean": 1.0, "n": 3}


@pytest.mark.parametrize("name", ["sparse.pt", "quantized.pt"])
def test_sparse_and_quantized_fixtures(name):
    for weights_only in (True, False):
        got = fastserial.load(fixture_path(name), weights_only=weights_only)
        assert_matches_manifest(got, expected_for(name))
        assert_same(got, torch.load(fixture_path(name), weights_only=weights_only))


def test_module_fixture():
    path = fixture_path("module.pt")
    with pytest.raises(pickle.UnpicklingError, match="torch.nn.modules.linear.Linear"):
        fastserial.load(path)
    got = fastserial.load(path, weights_only=False)
    assert_matches_manifest(got, expected_for("module.pt"))
    assert_same(got, torch.load(path, weights_only=False))
    with fastserial.safe_globals([torch.nn.Linear]):
        assert_same(fastserial.load(path), got)


def test_invalid_sparse_tensor_is_rejected_like_torch():
    """With sparse invariant checks on, torch validates loaded sparse tensors
    (indices in range) after unpickling; so must fastserial."""
    bad = torch.sparse_coo_tensor(
        torch.tensor([[0, 5]]), torch.tensor([1.0, 2.0]), (3,), check_invariants=False
    )
    data = torch_save_bytes({"bad": bad})
    with torch.sparse.check_sparse_tensor_invariants():
        with pytest.raises(RuntimeError, match="index 5"):
            torch.load(io.BytesIO(data))
        with pytest.raises(RuntimeError, match="index 5"):
            fastserial.load(io.BytesIO(data))
        with pytest.raises(RuntimeError, match="index 5"):
            fastserial.load(io.BytesIO(data), weights_only=False)


# --------------------------------------------------------------------------- pickle_protocol


def _protocol_sample():
    base = torch.arange(6.0)
    return {
        "base": base,
        "view": base[1:4],
        "size": torch.Size([1, 2]),
        "dtype": torch.float16,
        "set": {1, 2},
        "big": 2**2100,
        "text": "x" * 300,
        "blob": b"y" * 300,
        "od": collections.OrderedDict(a=torch.ones(1)),
        "tuple": (1, (2, 3)),
        "many": [str(i) for i in range(300)],
    }


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_fastserial_save_protocol_reads_in_torch(protocol):
    obj = _protocol_sample()
    data = fs_save_bytes(obj, pickle_protocol=protocol)
    pkl = read_records(data)[1]["data.pkl"]
    assert pkl[:2] == bytes([0x80, protocol])
    assert_same(torch.load(io.BytesIO(data), weights_only=False), obj)
    assert_same(fastserial.load(io.BytesIO(data)), obj)
    assert_same(fastserial.load(io.BytesIO(data), weights_only=False), obj)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_torch_save_protocol_loads_safely(protocol):
    obj = _protocol_sample()
    data = torch_save_bytes(obj, pickle_protocol=protocol)
    want = torch.load(io.BytesIO(data), weights_only=False)
    assert_same(fastserial.load(io.BytesIO(data)), want)
    if protocol >= 4:
        # torch 2.13's weights-only unpickler refuses FRAME; fastserial must not.
        assert "FRAME" in _opcodes(data)
    # torch 2.13's weights-only unpickler also refuses LONG4 (the 2**2100 here), at
    # every protocol; fastserial must load it.
    assert "LONG4" in _opcodes(data)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(io.BytesIO(data))


def _opcodes(data):
    return {op.name for op, _, _ in pickletools.genops(read_records(data)[1]["data.pkl"])}


def test_protocol_1_loads_like_torch():
    obj = {"a": torch.arange(3.0), "n": [1, 2]}
    data = torch_save_bytes(obj, pickle_protocol=1)
    for weights_only in (True, False):
        assert_same(fastserial.load(io.BytesIO(data), weights_only=weights_only), obj)
    assert_same(torch.load(io.BytesIO(data), weights_only=False), obj)


def test_protocol_0_persistent_ids_are_refused():
    # Protocol 0 writes persistent ids as text (the repr of the tuple); torch fails
    # with an AssertionError, fastserial with a clear UnpicklingError.
    data = torch_save_bytes({"a": torch.arange(3.0)}, pickle_protocol=0)
    for weights_only in (True, False):
        with pytest.raises(pickle.UnpicklingError, match="persistent id"):
            fastserial.load(io.BytesIO(data), weights_only=weights_only)


# --------------------------------------------------------------------------- pickle_module


def _recording_pickle_module(calls):
    class Pickler(pickle.Pickler):
        def __init__(self, *args, **kwargs):
            calls.append(("Pickler", args[1:], kwargs))
            super().__init__(*args, **kwargs)

    class Unpickler(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            calls.append(("Unpickler", args[1:], kwargs))
            super().__init__(*args, **kwargs)

    module = types.ModuleType("recording_pickle")
    module.Pickler, module.Unpickler = Pickler, Unpickler
    module.load, module.dump, module.loads, module.dumps = (
        pickle.load,
        pickle.dump,
        pickle.loads,
        pickle.dumps,
    )
    module.__version__ = "1.0"
    return module


def test_pickle_module_is_used_for_save_and_load():
    calls = []
    module = _recording_pickle_module(calls)
    obj = {"a": torch.arange(3.0), "n": 1}
    data = fs_save_bytes(obj, pickle_module=module, pickle_protocol=3)
    assert [c[0] for c in calls] == ["Pickler"]
    assert 3 in calls[0][1] or calls[0][2].get("protocol") == 3
    calls.clear()
    got = fastserial.load(io.BytesIO(data), pickle_module=module)  # implies weights_only=False
    assert [c[0] for c in calls] == ["Unpickler"] and calls[0][2]["encoding"] == "utf-8"
    assert_same(got, torch.load(io.BytesIO(data), pickle_module=module))


def test_pickle_module_loads_a_pickled_module_like_torch():
    calls = []
    module = _recording_pickle_module(calls)
    got = fastserial.load(fixture_path("module.pt"), pickle_module=module)
    assert_same(got, torch.load(fixture_path("module.pt"), pickle_module=module))


def test_pickle_module_with_weights_only_raises_like_torch():
    module = _recording_pickle_module([])
    data = torch_save_bytes({"a": torch.ones(1)})
    for load in (fastserial.load, torch.load):
        with pytest.raises(RuntimeError, match="pickle_module"):
            load(io.BytesIO(data), pickle_module=module, weights_only=True)


def test_unhashable_pickle_module_works_like_torch():
    module = types.SimpleNamespace(
        Pickler=pickle.Pickler,
        Unpickler=pickle.Unpickler,
        load=pickle.load,
        dump=pickle.dump,
        __version__="1",
        __name__="namespace_pickle",
    )
    obj = {"a": torch.arange(3.0)}
    data = torch_save_bytes(obj, pickle_module=module)
    assert_same(torch.load(io.BytesIO(data), pickle_module=module), obj)
    assert_same(fastserial.load(io.BytesIO(data), pickle_module=module), obj)
    assert_same(torch.load(io.BytesIO(fs_save_bytes(obj, pickle_module=module))), obj)


# --------------------------------------------------------------------------- pickle_load_args


def test_pickle_load_args_are_forwarded_with_weights_only_false():
    calls = []
    module = _recording_pickle_module(calls)
    data = torch_save_bytes({"a": torch.ones(1)})
    fastserial.load(
        io.BytesIO(data),
        pickle_module=module,
        encoding="latin1",
        errors="strict",
        fix_imports=False,
    )
    assert calls[-1][2] == {"encoding": "latin1", "errors": "strict", "fix_imports": False}


def test_unknown_pickle_load_arg_raises_type_error_like_torch():
    data = torch_save_bytes({"a": torch.ones(1)})
    for load in (fastserial.load, torch.load):
        with pytest.raises(TypeError, match="bogus"):
            load(io.BytesIO(data), weights_only=False, bogus=1)


def test_extra_pickle_load_args_with_weights_only_warn():
    data = torch_save_bytes({"a": torch.ones(1)})
    with pytest.warns(UserWarning, match="pickle_load_args only works"):
        got = fastserial.load(io.BytesIO(data), weights_only=True, buffers=None)
    assert torch.equal(got["a"], torch.ones(1))


# --------------------------------------------------------------------------- custom classes


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_custom_class_with_safe_globals(protocol):
    obj = {"p": Point(1, torch.ones(2))}
    if protocol >= 4:
        obj["k"] = KeywordOnly(value=3)  # NEWOBJ_EX (protocol 2 would need functools.partial)
    data = torch_save_bytes(obj, pickle_protocol=protocol)
    with pytest.raises(pickle.UnpicklingError, match="test_semantics_pickle.Point"):
        fastserial.load(io.BytesIO(data))
    with fastserial.safe_globals([Point, KeywordOnly]):
        got = fastserial.load(io.BytesIO(data))
    want = torch.load(io.BytesIO(data), weights_only=False)
    assert_same(got, want)
    if protocol < 4:
        with torch.serialization.safe_globals([Point, KeywordOnly]):
            assert_same(torch.load(io.BytesIO(data)), want)
    if protocol >= 4:
        assert "NEWOBJ_EX" in _opcodes(data)
        assert got["k"].value == 3
