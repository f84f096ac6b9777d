"""Safe loading: weights_only=True by default, the allow-list API, refusal of
anything else (globals, calls, opcodes) before it runs, validation of what the
pickle claims against the archive, and every opcode protocols 2-5 produce."""

import collections
import io
import os
import pickle
import pickletools
import struct
import sys

import fastserial
import pytest
import torch
from conftest import (
    assert_matches_manifest,
    expected_for,
    fixture_entries,
    fixture_names,
    fixture_path,
)
from test_semantics_craft import (
    StorageRef,
    TensorRef,
    assert_same,
    craft_pickle,
    fs_save_bytes,
    make_checkpoint,
    read_records,
    torch_save_bytes,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:TypedStorage is deprecated"),
    pytest.mark.filterwarnings("ignore:Detected pickle protocol"),
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor"),
]

EVIL = fixture_names(malicious=True)


class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y


class KeywordOnly:
    def __new__(cls, *, value=0):
        obj = super().__new__(cls)
        obj.value = value
        return obj

    def __getnewargs_ex__(self):
        return (), {"value": self.value}


def boom_fire(what):
    Boom.fired.append(what)
    return what


class Boom:
    """Runs a side effect when unpickled (through __reduce__)."""

    fired: list = []

    def __reduce__(self):
        return (boom_fire, ("boom",))


@pytest.fixture(autouse=True)
def clean_allowlists():
    fastserial.clear_safe_globals()
    torch.serialization.clear_safe_globals()
    Boom.fired.clear()
    yield
    fastserial.clear_safe_globals()
    torch.serialization.clear_safe_globals()


def _raw(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype).numpy().tobytes()


# --------------------------------------------------------------------------- the allow-list API


def test_allowlist_starts_empty_and_add_get_clear():
    assert fastserial.get_safe_globals() == [] == torch.serialization.get_safe_globals()
    fastserial.add_safe_globals([Point])
    fastserial.add_safe_globals([(KeywordOnly, "custom.KeywordOnly"), Point])
    want = {Point, (KeywordOnly, "custom.KeywordOnly")}
    assert set(fastserial.get_safe_globals()) == want
    assert len(fastserial.get_safe_globals()) == 2
    fastserial.clear_safe_globals()
    assert fastserial.get_safe_globals() == []


def test_add_safe_globals_rejects_malformed_entries():
    with pytest.raises(ValueError):
        fastserial.add_safe_globals([(Point, "a.Point", "extra")])
    with pytest.raises(TypeError):
        fastserial.add_safe_globals([(Point, 3)])
    assert fastserial.get_safe_globals() == []


def test_safe_globals_context_manager():
    with fastserial.safe_globals([Point]) as ctx:
        assert fastserial.get_safe_globals() == [Point]
        assert ctx is not None
        with fastserial.safe_globals([KeywordOnly]):
            assert set(fastserial.get_safe_globals()) == {Point, KeywordOnly}
        assert fastserial.get_safe_globals() == [Point]
    assert fastserial.get_safe_globals() == []


def test_safe_globals_context_manager_exits_as_torchs_does():
    """On exit both remove every listed global, one added before the block too."""
    for api in (fastserial, torch.serialization):
        api.add_safe_globals([Point])
        with api.safe_globals([Point, KeywordOnly]):
            pass
        assert fastserial.get_safe_globals() == [] == torch.serialization.get_safe_globals()


def test_safe_globals_context_manager_restores_on_error():
    with pytest.raises(KeyError), fastserial.safe_globals([Point]):
        raise KeyError
    assert fastserial.get_safe_globals() == []


@pytest.mark.parametrize("how", ["add", "context", "tuple"])
def test_allowed_custom_class_loads(how):
    data = torch_save_bytes({"p": Point(1, torch.ones(2))})
    with pytest.raises(pickle.UnpicklingError, match="test_semantics_safe.Point"):
        fastserial.load(io.BytesIO(data))
    if how == "add":
        fastserial.add_safe_globals([Point])
        got = fastserial.load(io.BytesIO(data))
    elif how == "context":
        with fastserial.safe_globals([Point]):
            got = fastserial.load(io.BytesIO(data))
        with pytest.raises(pickle.UnpicklingError):
            fastserial.load(io.BytesIO(data))
    else:
        fastserial.add_safe_globals([(Point, "test_semantics_safe.Point")])
        got = fastserial.load(io.BytesIO(data))
    with torch.serialization.safe_globals([Point]):
        want = torch.load(io.BytesIO(data))
    assert_same(got, want)


def test_allowlist_is_torchs_both_ways():
    """A global allowed on torch opens fastserial's loads, and the other way round:
    frameworks configure torch, and fastserial must follow (issue 12)."""
    data = torch_save_bytes({"p": Point(1, torch.ones(2))})
    torch.serialization.add_safe_globals([Point])
    got = fastserial.load(io.BytesIO(data))
    assert_same(got, torch.load(io.BytesIO(data)))
    torch.serialization.clear_safe_globals()
    with pytest.raises(pickle.UnpicklingError):
        fastserial.load(io.BytesIO(data))
    fastserial.add_safe_globals([Point])
    assert_same(torch.load(io.BytesIO(data)), fastserial.load(io.BytesIO(data)))
    assert torch.serialization.get_safe_globals() == [Point]


def test_torch_safe_globals_context_opens_fastserial_loads():
    data = torch_save_bytes({"p": Point(1, torch.ones(2))})
    with torch.serialization.safe_globals([Point]):
        got = fastserial.load(io.BytesIO(data))
        assert fastserial.get_unsafe_globals_in_checkpoint(io.BytesIO(data)) == []
    assert_same(got, torch.load(io.BytesIO(data), weights_only=False))
    with pytest.raises(pickle.UnpicklingError):
        fastserial.load(io.BytesIO(data))


def test_refusal_names_torchs_api():
    data = torch_save_bytes({"p": Point(1, 2)})
    with pytest.raises(pickle.UnpicklingError, match="torch.serialization.add_safe_globals"):
        fastserial.load(io.BytesIO(data))


# --------------------------------------------------------------------------- get_unsafe_globals_in_checkpoint


def _unsafe_cases():
    return {
        "state_dict": fixture_path("state_dict.pt").read_bytes(),
        "module": fixture_path("module.pt").read_bytes(),
        "point": torch_save_bytes({"p": Point(1, torch.ones(1)), "t": torch.ones(1)}),
        "subclass_and_boom": torch_save_bytes([Boom(), collections.Counter(a=1)]),
        **{name: fixture_path(name).read_bytes() for name in EVIL},
    }


@pytest.mark.parametrize("case", list(_unsafe_cases()))
def test_get_unsafe_globals_matches_torch(case):
    data = _unsafe_cases()[case]
    ours = fastserial.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
    theirs = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
    assert sorted(ours) == sorted(theirs)
    assert len(ours) == len(set(ours))
    assert not Boom.fired


def test_get_unsafe_globals_from_a_path_and_after_allowing(tmp_path):
    path = tmp_path / "p.pt"
    torch.save({"p": Point(1, 2)}, path)
    assert fastserial.get_unsafe_globals_in_checkpoint(path) == ["test_semantics_safe.Point"]
    assert fastserial.get_unsafe_globals_in_checkpoint(str(path)) == ["test_semantics_safe.Point"]
    with fastserial.safe_globals([Point]):
        assert fastserial.get_unsafe_globals_in_checkpoint(path) == []


@pytest.mark.parametrize("name", ["dtypes.pt", "untyped"])
def test_get_unsafe_globals_accepts_untyped_storages(name):
    if name == "untyped":
        data = torch_save_bytes({"s": torch.ones(2).untyped_storage()})
    else:
        data = fixture_path(name).read_bytes()
    fastserial.load(io.BytesIO(data))  # a safe load accepts the file
    assert torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data)) == []
    assert fastserial.get_unsafe_globals_in_checkpoint(io.BytesIO(data)) == []


def test_get_unsafe_globals_protocol_4():
    # torch 2.13 cannot scan protocol-4 pickles ("Unsupported operand 149", FRAME).
    data = torch_save_bytes({"p": Point(1, 2), "k": KeywordOnly(value=1)}, pickle_protocol=4)
    assert sorted(fastserial.get_unsafe_globals_in_checkpoint(io.BytesIO(data))) == [
        "test_semantics_safe.KeywordOnly",
        "test_semantics_safe.Point",
    ]


def test_get_unsafe_globals_rejects_legacy_files_like_torch():
    for f in (fixture_path("legacy.pt"), fixture_path("py2_strings.pt")):
        with pytest.raises(ValueError):
            fastserial.get_unsafe_globals_in_checkpoint(f)
        with pytest.raises(ValueError):
            torch.serialization.get_unsafe_globals_in_checkpoint(f)


# --------------------------------------------------------------------------- refusal


@pytest.mark.parametrize("name", EVIL)
@pytest.mark.parametrize("weights_only", [None, True])
def test_evil_fixtures_are_refused_and_run_nothing(name, weights_only, monkeypatch):
    env_var = fixture_entries()[name]["env_var"]
    monkeypatch.setenv(env_var, "x")  # so that monkeypatch restores the variable afterwards
    monkeypatch.delenv(env_var)
    kwargs = {} if weights_only is None else {"weights_only": True}
    for source in (fixture_path(name), io.BytesIO(fixture_path(name).read_bytes())):
        with pytest.raises(pickle.UnpicklingError, match="builtins.getattr") as info:
            fastserial.load(source, **kwargs)
        assert "add_safe_globals" in str(info.value) or "never be allowed" in str(info.value)
        assert env_var not in os.environ
    with pytest.raises(pickle.UnpicklingError):
        torch.load(fixture_path(name), **kwargs)
    assert env_var not in os.environ


@pytest.mark.parametrize("name", EVIL)
def test_evil_fixtures_stay_refused_even_with_getattr_allowed(name, monkeypatch):
    env_var = fixture_entries()[name]["env_var"]
    monkeypatch.setenv(env_var, "x")
    monkeypatch.delenv(env_var)
    # os.environ itself is unhashable, which torch's list refuses; any object named
    # "os.environ" stands for it: the module is blocked whatever the object is.
    with fastserial.safe_globals([getattr, (os.getenv, "os.environ")]):
        with pytest.raises(pickle.UnpicklingError, match="os.environ"):
            fastserial.load(fixture_path(name))
    assert env_var not in os.environ


@pytest.mark.parametrize("name", EVIL)
def test_weights_only_false_is_the_explicit_opt_in(name, monkeypatch):
    env_var = fixture_entries()[name]["env_var"]
    monkeypatch.setenv(env_var, "untouched")  # restored by monkeypatch afterwards
    fastserial.load(fixture_path(name), weights_only=False)
    assert os.environ[env_var] != "untouched"  # the pickle ran, as it does in torch


def test_refused_global_is_never_imported(tmp_path, monkeypatch):
    """No silent fallback: a refused global's module is not even imported."""
    module = "fastserial_semantics_canary"
    (tmp_path / f"{module}.py").write_text(
        "import os\nos.environ['FASTSERIAL_CANARY'] = 'imported'\ndef hello(*a):\n    return 'hi'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("FASTSERIAL_CANARY", "not imported")  # restored afterwards
    pkl = b"\x80\x02c" + module.encode() + b"\nhello\n)R."
    data = make_checkpoint(pkl, {})
    with pytest.raises(pickle.UnpicklingError, match=f"{module}.hello"):
        fastserial.load(io.BytesIO(data))
    assert module not in sys.modules
    assert os.environ["FASTSERIAL_CANARY"] == "not imported"
    assert fastserial.get_unsafe_globals_in_checkpoint(io.BytesIO(data)) == [f"{module}.hello"]
    assert module not in sys.modules
    try:
        assert fastserial.load(io.BytesIO(data), weights_only=False) == "hi"
        assert os.environ["FASTSERIAL_CANARY"] == "imported"
    finally:
        sys.modules.pop(module, None)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_reduce_of_a_disallowed_callable_never_runs(protocol):
    data = torch_save_bytes({"t": torch.ones(1), "boom": Boom()}, pickle_protocol=protocol)
    with pytest.raises(pickle.UnpicklingError, match="test_semantics_safe.boom_fire"):
        fastserial.load(io.BytesIO(data))
    assert Boom.fired == []
    assert fastserial.load(io.BytesIO(data), weights_only=False)["boom"] == "boom"
    assert Boom.fired == ["boom"]


@pytest.mark.parametrize(
    "pkl,name",
    [
        (b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.", "builtins.eval"),
        (b"\x80\x04\x8c\x08builtins\x8c\x04exec\x93X\x01\x00\x00\x00x\x85R.", "builtins.exec"),
        (b"\x80\x02cposix\nsystem\nX\x04\x00\x00\x00true\x85R.", "posix.system"),
        (b"\x80\x02ctorch\nload\nX\x01\x00\x00\x00x\x85R.", "torch.load"),
        (b"\x80\x02c__builtin__\napply\n.", "builtins.apply"),  # Python 2 names map
        (b"\x80\x02(cbuiltins\nprint\nX\x01\x00\x00\x00xo.", "builtins.print"),  # OBJ
        (b"\x80\x02(X\x01\x00\x00\x00xibuiltins\nprint\n.", "builtins.print"),  # INST
    ],
    ids=["GLOBAL", "STACK_GLOBAL", "posix", "torch.load", "py2-name", "OBJ", "INST"],
)
def test_disallowed_globals_raise_unpickling_error_naming_them(pkl, name):
    data = make_checkpoint(pkl, {})
    with pytest.raises(pickle.UnpicklingError, match=name.replace(".", r"\.")):
        fastserial.load(io.BytesIO(data))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(io.BytesIO(data))


@pytest.mark.parametrize(
    "ops,name",
    [
        (b"\x82\x01", "EXT1"),
        (b"\x83\x01\x00", "EXT2"),
        (b"\x84\x01\x00\x00\x00", "EXT4"),
        (b"\x97", "NEXT_BUFFER"),
        (b"C\x02ab\x98", "READONLY_BUFFER"),
    ],
)
def test_opcodes_outside_the_safe_subset_are_refused(ops, name):
    data = make_checkpoint(b"\x80\x05" + ops + b".", {})
    with pytest.raises(pickle.UnpicklingError, match=name):
        fastserial.load(io.BytesIO(data))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(io.BytesIO(data))


@pytest.mark.parametrize(
    "module,name,target",
    [
        ("collections", "Counter", collections.Counter),
        ("torch._utils", "_rebuild_sparse_tensor", torch._utils._rebuild_sparse_tensor),
        ("test_semantics_safe", "Point", Point),
    ],
    ids=["builtin-allowed-class", "allowed-function", "user-allowed-class"],
)
def test_build_on_a_global_is_refused(module, name, target):
    attr = "fastserial_semantics_pwned"
    state = (
        b"N}X" + struct.pack("<I", len(attr)) + attr.encode() + b"K\x01s\x86"
    )  # (None, {attr: 1})
    pkl = b"\x80\x02c" + f"{module}\n{name}\n".encode() + state + b"b."
    data = make_checkpoint(pkl, {})
    try:
        with fastserial.safe_globals([Point]):
            with pytest.raises(pickle.UnpicklingError):
                fastserial.load(io.BytesIO(data))
        assert not hasattr(target, attr)
    finally:
        if attr in vars(target):
            delattr(target, attr)
    with torch.serialization.safe_globals([Point]), pytest.raises(pickle.UnpicklingError):
        torch.load(io.BytesIO(data))
    assert not hasattr(target, attr)


# --------------------------------------------------------------------------- weights_only defaults


def test_weights_only_defaults_to_true():
    with pytest.raises(pickle.UnpicklingError):
        fastserial.load(fixture_path("module.pt"))
    assert_matches_manifest(
        fastserial.load(fixture_path("state_dict.pt")), expected_for("state_dict.pt")
    )


def test_force_weights_only_env_var(monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    for kwargs in ({}, {"weights_only": False}):
        with pytest.raises(pickle.UnpicklingError):
            fastserial.load(fixture_path("module.pt"), **kwargs)
        with pytest.raises(pickle.UnpicklingError):
            torch.load(fixture_path("module.pt"), **kwargs)


def test_force_no_weights_only_env_var(monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "true")
    got = fastserial.load(fixture_path("module.pt"))  # only when weights_only is not passed
    assert_matches_manifest(got, expected_for("module.pt"))
    with pytest.raises(pickle.UnpicklingError):
        fastserial.load(fixture_path("module.pt"), weights_only=True)
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    for load in (fastserial.load, torch.load):
        with pytest.raises(RuntimeError, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
            load(fixture_path("state_dict.pt"))


# --------------------------------------------------------------------------- every opcode of protocols 2-5


def _every_opcode_object(protocol):
    recursive_list: list = []
    small = (recursive_list, 1)  # POP (tuple recursion through a list)
    recursive_list.append(small)
    other: list = []
    large = (other, 1, 2, 3)  # POP_MARK
    other.append(large)
    strings = [f"s{i}" for i in range(300)]  # LONG_BINPUT, LONG_BINGET
    base = torch.arange(6.0)
    obj = {
        "tensor": base,
        "view": base[2:],
        "param": torch.nn.Parameter(torch.ones(1)),
        "none": None,
        "bools": (True, False),
        "ints": [1, 300, 70000, -5, 2**40, 2**2100],
        "float": 1.5,
        "complex": 1 + 2j,
        "text": "é",
        "long_text": "u" * 300,
        "bytes": b"ab",
        "long_bytes": b"x" * 300,
        "bytearray": bytearray(b"cd"),
        "set": {1, 2},
        "tuples": ((), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4)),
        "od": collections.OrderedDict(a=1),
        "small_rec": small,
        "large_rec": large,
        "strings": strings,
        "again": strings[-1],
        "size": torch.Size([1, 2]),
        "dtype": torch.float16,
        "device": torch.device("cpu"),
        "point": Point(1, torch.ones(1)),
    }
    if protocol >= 4:
        obj["frozenset"] = frozenset({3})
        obj["kw"] = KeywordOnly(value=2)
    return obj


_EXPECTED_OPCODES = {
    2: {
        "PROTO",
        "GLOBAL",
        "BINPUT",
        "LONG_BINPUT",
        "BINGET",
        "LONG_BINGET",
        "BINPERSID",
        "REDUCE",
        "BUILD",
        "NEWOBJ",
        "MARK",
        "TUPLE",
        "TUPLE1",
        "TUPLE2",
        "TUPLE3",
        "EMPTY_TUPLE",
        "EMPTY_LIST",
        "APPEND",
        "APPENDS",
        "EMPTY_DICT",
        "SETITEM",
        "SETITEMS",
        "NONE",
        "NEWTRUE",
        "NEWFALSE",
        "BININT",
        "BININT1",
        "BININT2",
        "LONG1",
        "LONG4",
        "BINFLOAT",
        "BINUNICODE",
        "POP",
        "POP_MARK",
        "STOP",
    },
}
_EXPECTED_OPCODES[3] = _EXPECTED_OPCODES[2] | {"SHORT_BINBYTES", "BINBYTES"}
_EXPECTED_OPCODES[4] = (_EXPECTED_OPCODES[3] - {"GLOBAL", "BINPUT", "LONG_BINPUT"}) | {
    "FRAME",
    "STACK_GLOBAL",
    "MEMOIZE",
    "SHORT_BINUNICODE",
    "EMPTY_SET",
    "ADDITEMS",
    "FROZENSET",
    "NEWOBJ_EX",
}
_EXPECTED_OPCODES[5] = _EXPECTED_OPCODES[4] | {"BYTEARRAY8"}


@pytest.mark.parametrize("saver", ["torch", "fastserial"])
@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_every_opcode_of_protocols_2_to_5_loads_safely(protocol, saver):
    obj = _every_opcode_object(protocol)
    save = torch_save_bytes if saver == "torch" else fs_save_bytes
    data = save(obj, pickle_protocol=protocol)
    pkl = read_records(data)[1]["data.pkl"]
    ops = {op.name for op, _, _ in pickletools.genops(pkl)}
    assert _EXPECTED_OPCODES[protocol] <= ops, sorted(_EXPECTED_OPCODES[protocol] - ops)
    with fastserial.safe_globals([Point, KeywordOnly]):
        got = fastserial.load(io.BytesIO(data))
    want = torch.load(io.BytesIO(data), weights_only=False)
    assert_same(got, want)
    assert got["small_rec"][0][0] is got["small_rec"] and got["large_rec"][0][0] is got["large_rec"]
    assert got["again"] is got["strings"][-1]
    # torch 2.13's weights-only unpickler refuses these files (LONG4, and FRAME at 4+).
    with (
        torch.serialization.safe_globals([Point, KeywordOnly]),
        pytest.raises(pickle.UnpicklingError),
    ):
        torch.load(io.BytesIO(data))


def test_8_byte_length_opcodes_load_safely():
    """BINUNICODE8 and BINBYTES8 (protocol 4 writes them for >4 GiB values)."""
    body = (
        b"\x8d"
        + struct.pack("<Q", 3)
        + b"abc"
        + b"\x8e"
        + struct.pack("<Q", 2)
        + b"xy"
        + b"\x96"
        + struct.pack("<Q", 1)
        + b"z"
        + b"\x87"
    )
    pkl = b"\x80\x04\x95" + struct.pack("<Q", len(body) + 1) + body + b"."
    data = make_checkpoint(pkl, {})
    assert fastserial.load(io.BytesIO(data)) == ("abc", b"xy", bytearray(b"z"))


def test_protocol_4_state_dict_loads_safely_and_fast_path_matches():
    sd = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).state_dict()
    data = torch_save_bytes(sd, pickle_protocol=4)
    assert_same(fastserial.load(io.BytesIO(data)), sd)
    assert_same(fastserial.load(io.BytesIO(data), weights_only=False), sd)


# --------------------------------------------------------------------------- validation against the archive


def _tensor_file(numel=4, offset=0, size=(4,), stride=(1,), record_values=(0.0, 1.0, 2.0, 3.0)):
    pkl = craft_pickle(
        {"t": TensorRef(StorageRef("0", torch.FloatStorage, numel), offset, size, stride)}
    )
    return make_checkpoint(pkl, {"0": _raw(list(record_values))})


LOAD_VARIANTS = {
    "safe": {},
    "unsafe": {"weights_only": False},
    "mmap": {"mmap": True},
    "callable": {"map_location": lambda s, l: s},
    "meta": {"map_location": "meta"},
}

BAD_FILES = {
    "numel_larger_than_record": lambda: _tensor_file(numel=5),
    "numel_smaller_than_record": lambda: _tensor_file(numel=3, size=(3,)),
    "view_past_the_end": lambda: _tensor_file(offset=1),
    "stride_past_the_end": lambda: _tensor_file(size=(2, 2), stride=(3, 1)),
    "negative_offset": lambda: _tensor_file(offset=-1, size=(2,)),
    "negative_stride": lambda: _tensor_file(size=(2,), stride=(-1,)),
    "size_stride_mismatch": lambda: _tensor_file(size=(2, 2), stride=(1,)),
}


@pytest.mark.parametrize("variant", list(LOAD_VARIANTS))
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_claims_that_do_not_match_the_archive_raise_checkpoint_error(case, variant, tmp_path):
    if variant == "meta" and not case.startswith("numel"):
        pytest.skip("views over meta storages have no bytes to check")
    data = BAD_FILES[case]()
    path = tmp_path / "bad.pt"
    path.write_bytes(data)
    with pytest.raises(fastserial.CheckpointError):
        fastserial.load(path, **LOAD_VARIANTS[variant])
    if case.startswith("numel") and variant in ("mmap", "meta"):
        return  # torch 2.13 does not check record sizes when mapping or on meta
    if case.startswith("numel") and not hasattr(torch.serialization, "_get_storage_alignment"):
        return  # torch 2.6 does not check record sizes at all (it reads past them)
    with pytest.raises(RuntimeError):  # torch refuses these too (with less precise errors)
        torch.load(path, **LOAD_VARIANTS[variant])


def test_valid_crafted_file_loads():
    got = fastserial.load(io.BytesIO(_tensor_file(offset=1, size=(3,))))
    assert got["t"].tolist() == [1.0, 2.0, 3.0]
    empty = fastserial.load(io.BytesIO(_tensor_file(offset=4, size=(0,))))
    assert empty["t"].shape == (0,)


def test_view_checks_use_the_tensor_dtype_for_untyped_storages():
    """_rebuild_tensor_v3 over an UntypedStorage: bounds are checked in elements of
    the tensor's dtype, not bytes."""

    class V3:
        def __init__(self, size):
            self.size = size

        def __reduce__(self):
            storage = StorageRef("0", torch.UntypedStorage, 8)
            return (
                torch._utils._rebuild_tensor_v3,
                (storage, 0, self.size, (1,), False, collections.OrderedDict(), torch.uint16),
            )

    raw = torch.tensor([1, 2, 3, 4], dtype=torch.int16).numpy().tobytes()
    ok = make_checkpoint(craft_pickle({"t": V3((4,))}), {"0": raw})
    assert fastserial.load(io.BytesIO(ok))["t"].tolist() == [1, 2, 3, 4]
    bad = make_checkpoint(craft_pickle({"t": V3((5,))}), {"0": raw})
    for kwargs in ({}, {"weights_only": False}, {"map_location": lambda s, l: s}):
        with pytest.raises(fastserial.CheckpointError):
            fastserial.load(io.BytesIO(bad), **kwargs)


def test_missing_storage_record_raises_checkpoint_error():
    pkl = craft_pickle({"t": TensorRef(StorageRef("7", torch.FloatStorage, 4), 0, (4,), (1,))})
    data = make_checkpoint(pkl, {"0": _raw([0, 1, 2, 3])})
    with pytest.raises(fastserial.CheckpointError, match="data/7"):
        fastserial.load(io.BytesIO(data))


def test_malformed_persistent_ids_raise_unpickling_error():
    class BadPid:
        def __init__(self, pid):
            self.pid = pid

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return obj.pid if isinstance(obj, BadPid) else None

    for pid in [
        ("storage", torch.FloatStorage, "0", "cpu"),
        ("module", 1, 2, 3, 4),
        ("storage", torch.FloatStorage, 0, "cpu", 4),
        ("storage", torch.FloatStorage, "0", "cpu", -1),
        "just-a-string",
    ]:
        buf = io.BytesIO()
        P(buf, 2).dump({"x": BadPid(pid)})
        data = make_checkpoint(buf.getvalue(), {"0": _raw([0, 1, 2, 3])})
        with pytest.raises(pickle.UnpicklingError):
            fastserial.load(io.BytesIO(data))


def test_a_storage_pid_naming_a_non_storage_type_is_refused():
    pkl = craft_pickle({"t": TensorRef(StorageRef("0", collections.OrderedDict, 4), 0, (4,), (1,))})
    data = make_checkpoint(pkl, {"0": _raw([0, 1, 2, 3])})
    with pytest.raises(pickle.UnpicklingError):
        fastserial.load(io.BytesIO(data))


class _QuantizedRef:
    """Pickles as torch._utils._rebuild_qtensor over a 4-element qint8 storage."""

    def __init__(self, size, offset=0):
        self.size, self.offset = size, offset

    def __reduce__(self):
        storage = StorageRef("0", torch.QInt8Storage, 4)
        qparams = (torch.per_tensor_affine, 0.5, 0)
        args = (storage, self.offset, self.size, (1,), qparams, False, collections.OrderedDict())
        return (torch._utils._rebuild_qtensor, args)


def test_quantized_view_inside_its_storage_loads():
    data = make_checkpoint(craft_pickle({"q": _QuantizedRef((4,))}), {"0": bytes([1, 2, 3, 4])})
    got = fastserial.load(io.BytesIO(data))
    assert got["q"].int_repr().tolist() == [1, 2, 3, 4]
    assert_same(got, torch.load(io.BytesIO(data)))


@pytest.mark.parametrize("size,offset", [((8,), 0), ((4,), 2)])
def test_quantized_view_outside_its_storage_raises_checkpoint_error(size, offset):
    data = make_checkpoint(
        craft_pickle({"q": _QuantizedRef(size, offset)}), {"0": bytes([1, 2, 3, 4])}
    )
    for weights_only in (True, False):
        with pytest.raises(fastserial.CheckpointError):
            fastserial.load(io.BytesIO(data), weights_only=weights_only)


# --------------------------------------------------------------------------- the policy without torch


@pytest.mark.skipif(
    tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) != (2, 15),
    reason="the names without torch are torch 2.15's allow-list",
)
def test_policy_without_torch_is_torch_2_15s_allow_list():
    from fastserial.allowlist import DEFAULT_ALLOWED_NAMES
    from torch._weights_only_unpickler import _get_allowed_globals

    assert set(_get_allowed_globals()) == set(DEFAULT_ALLOWED_NAMES)


def test_numpy_front_end_without_torch_refuses_what_torch_refuses(tmp_path):
    """With torch not importable, the verdicts come from the same policy (torch 2.15's
    names): frozenset is refused, set and OrderedDict are accepted."""
    import subprocess
    import sys

    refused = tmp_path / "frozen.pt"
    accepted = tmp_path / "set.pt"
    torch.save({"f": frozenset({1}), "t": torch.ones(1)}, refused)
    torch.save({"s": {1}, "o": collections.OrderedDict(a=1), "t": torch.ones(1)}, accepted)
    code = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError("blocked")
sys.meta_path.insert(0, Block())
import pickle, fastserial.numpy as fsnp
try:
    fsnp.load({str(refused)!r})
    print("frozenset loaded")
except pickle.UnpicklingError:
    print("frozenset refused")
print(sorted(fsnp.load({str(accepted)!r})))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["frozenset refused", "['o', 's', 't']"]
