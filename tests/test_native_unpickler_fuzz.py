"""Differential fuzzing of the native unpickler (rust/src/python/unpickle.rs).

``fastserial.load`` runs a checkpoint's ``data.pkl`` through the native pickle machine
when ``_ZipLoader._native_globals`` resolves its globals, and through Python's
unpickler otherwise (or when the machine gives up). The Python path is the reference:
every pickle here is loaded twice, with the native machine allowed and with it
disabled (``_native_globals`` patched to return None), and the two loads must agree:

* nothing but an ``Exception`` escapes either load (pyo3's ``PanicException`` is a
  ``BaseException``);
* what the Python path rejects, the native-allowed load rejects too;
* what the Python path loads, the native-allowed load loads to an equal object: same
  structure, types and object identities, tensors with the same dtype, shape, stride,
  storage offset, flags, bits (NaN included) and storage-sharing pattern.

``test_mutants_load_alike`` mutates ``data.pkl`` of small torch-written checkpoints
(deterministically: mutant ``i`` of base ``b`` is ``_mutant(b, i)``), rebuilding the
zip so the record's CRC32 is right. ``test_pathological_pickles`` feeds hand-written
extreme but valid (and some invalid) pickles; the deepest nesting runs in a child
interpreter, as a crash there would take the test run down with it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import faulthandler
import functools
import gc
import io
import math
import os
import pickletools
import random
import reprlib
import struct
import types
import warnings
import zipfile
from typing import Any, Optional

import fastserial
import pytest
import torch
from conftest import run_python, tensor_bytes
from fastserial import serialization

pytestmark = [
    pytest.mark.filterwarnings("ignore:TypedStorage is deprecated"),
    pytest.mark.filterwarnings("ignore:Detected pickle protocol"),
]

# Mutants per base checkpoint (plus the unmutated one); FASTSERIAL_FUZZ_EXAMPLES=20000
# makes a long run (as for tests/test_corruption.py).
N_MUTANTS = int(os.environ.get("FASTSERIAL_FUZZ_EXAMPLES", "0") or 0) or 400
WATCHDOG_S = 300  # a hung test dumps every thread's stack and exits

# Opcodes (one byte each) the mutator splices in.
OPCODE_BYTES = b"()tq]}\x85\x86\x87hjKMJ\x8a\x88\x89NsueabRQc\x93\x94\x95X\x8cGC."

_repr = reprlib.Repr()
_repr.maxlevel = 3
_repr.maxstring = 60
_repr.maxother = 80
_repr.maxlist = _repr.maxtuple = _repr.maxdict = 6


def _short(obj) -> str:
    try:
        return " ".join(_repr.repr(obj).split())
    except Exception as e:  # noqa: BLE001 - a repr that fails is still described
        return f"<{type(obj).__name__}: repr failed with {type(e).__name__}>"


def _describe_exc(e: BaseException) -> str:
    return f"{type(e).__module__}.{type(e).__qualname__}: {str(e)[:300]}"


@pytest.fixture(autouse=True)
def _watchdog():
    """A load that never returns (the machine holds the GIL) cannot be interrupted from
    Python: dump the stacks and exit rather than hang the test run."""
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


# --------------------------------------------------------------------------- checkpoints


def _members(data: bytes) -> list:
    """``[(zip member name, bytes)]`` in archive order."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(info.filename, z.read(info.filename)) for info in z.infolist()]


def _pickle_member(members: list) -> str:
    names = [n for n, _ in members if n.endswith("/data.pkl") and n.count("/") == 1]
    assert len(names) == 1, names
    return names[0]


def _checkpoint(members: list, pkl: bytes) -> bytes:
    """The checkpoint ``members`` with ``<prefix>/data.pkl`` replaced by ``pkl`` (stored,
    names and order kept, CRC32s right)."""
    pkl_name = _pickle_member(members)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in members:
            z.writestr(name, pkl if name == pkl_name else data)
    return out.getvalue()


def _saved(obj, **kwargs) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


# --------------------------------------------------------------------------- loading


@dataclasses.dataclass
class _Outcome:
    kind: str  # "ok", "error" (an Exception) or "fatal" (any other BaseException)
    value: Any
    used: Optional[str]  # _ZipLoader.unpickler_used

    def __str__(self) -> str:
        if self.kind == "ok":
            return f"loaded ({self.used}) {_short(self.value)}"
        return f"raised {_describe_exc(self.value)}"


def _no_native(self, scan, unpickler):
    return None


class _Harness:
    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        # The loader of the load in progress (only that one: a loader holds its archive,
        # and so the checkpoint's file descriptor, open).
        self.loader = None
        original = serialization._ZipLoader.load
        harness = self

        def load(self):
            harness.loader = self
            return original(self)

        monkeypatch.setattr(serialization._ZipLoader, "load", load)

    def load(self, path, *, native: bool) -> _Outcome:
        self.loader = None
        with contextlib.ExitStack() as stack:
            if not native:
                patch = stack.enter_context(self.monkeypatch.context())
                patch.setattr(serialization._ZipLoader, "_native_globals", _no_native)
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")
            try:
                value, kind = fastserial.load(str(path)), "ok"
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - judged by the caller
                value, kind = e, "error"
            except BaseException as e:  # noqa: BLE001 - PanicException and the like
                value, kind = e, "fatal"
        used = None
        if self.loader is not None:
            used = self.loader.unpickler_used
            # A load that raises leaves its loader and tensor factory referring to each
            # other, which the cycle collector cannot see through (the factory is a
            # native object): each such load keeps its file open (see
            # test_failed_loads_release_the_checkpoint_file). Break the cycle so that
            # thousands of rejected mutants cannot run out of file descriptors.
            self.loader.factory = None
            self.loader = None
        return _Outcome(kind, value, used)

    def both(self, path) -> tuple:
        """``(python path outcome, native-allowed outcome)``."""
        return self.load(path, native=False), self.load(path, native=True)


@pytest.fixture
def harness(monkeypatch):
    return _Harness(monkeypatch)


def _judge(py: _Outcome, nat: _Outcome) -> Optional[str]:
    """What is wrong with this pair of loads of one file, or None."""
    for label, o in (("python-path", py), ("native-allowed", nat)):
        if o.kind == "fatal":
            return (
                f"the {label} load raised a BaseException that is not an Exception: "
                f"{_describe_exc(o.value)}"
            )
    if py.kind == "error" and nat.kind == "ok":
        return (
            f"the native-allowed load (unpickler_used={nat.used!r}) accepted a pickle the "
            f"Python path rejects with {_describe_exc(py.value)}; it returned "
            f"{_short(nat.value)}"
        )
    if py.kind == "ok" and nat.kind == "error":
        return (
            f"the native-allowed load raised {_describe_exc(nat.value)} where the Python "
            f"path loads {_short(py.value)}"
        )
    if py.kind == "ok" and nat.kind == "ok":
        problem = _compare(nat.value, py.value)
        if problem is not None:
            return f"results differ (unpickler_used={nat.used!r}): {problem}"
    return None


# --------------------------------------------------------------------------- comparing


def _where(node) -> str:
    steps = []
    while node is not None:
        node, step = node
        steps.append(step)
    steps.reverse()

    def text(step):
        kind = step[0]
        if kind == "root":
            return "obj"
        if kind == "item":
            return f"[{step[1]}]"
        if kind == "value":
            return f"[{_short(step[1])}]"
        if kind == "key":
            return f".keys()[{step[1]}]"
        return ".__dict__"

    if len(steps) > 14:
        head, tail = steps[:4], steps[-8:]
        return (
            "".join(map(text, head))
            + f"...<{len(steps) - 12} levels>..."
            + "".join(map(text, tail))
        )
    return "".join(map(text, steps))


_EQ_TYPES = (
    int,
    bool,
    str,
    bytes,
    bytearray,
    complex,
    set,
    frozenset,
    type(None),
    torch.dtype,
    torch.device,
    torch.layout,
    torch.memory_format,
)


def _tensor_problem(g: torch.Tensor, w: torch.Tensor) -> Optional[str]:
    checks = [
        ("layout", g.layout, w.layout),
        ("device", g.device, w.device),
        ("dtype", g.dtype, w.dtype),
        ("shape", tuple(g.shape), tuple(w.shape)),
    ]
    for name, a, b in checks:
        if a != b:
            return f"{name} {a!r} != {b!r}"
    if w.layout != torch.strided:
        return None if tensor_bytes(g.to_dense()) == tensor_bytes(w.to_dense()) else "values"
    checks = [
        ("stride", g.stride(), w.stride()),
        ("storage_offset", g.storage_offset(), w.storage_offset()),
        ("requires_grad", g.requires_grad, w.requires_grad),
        ("is_leaf", g.is_leaf, w.is_leaf),
        ("is_conj", g.is_conj(), w.is_conj()),
        ("is_neg", g.is_neg(), w.is_neg()),
        ("is_quantized", g.is_quantized, w.is_quantized),
        ("storage nbytes", g.untyped_storage().nbytes(), w.untyped_storage().nbytes()),
        (
            "tensor metadata",
            torch._C._get_tensor_metadata(g),
            torch._C._get_tensor_metadata(w),
        ),
    ]
    for name, a, b in checks:
        if a != b:
            return f"{name} {a!r} != {b!r}"
    if w.device.type == "meta":
        return None
    # Bit-exact values (NaN payloads included), then the whole storage (bytes outside
    # the view too).
    if tensor_bytes(g) != tensor_bytes(w):
        return f"values differ: {_short(g)} != {_short(w)}"
    if bytes(g.untyped_storage().cpu()) != bytes(w.untyped_storage().cpu()):
        return "storage bytes differ outside the tensor's view"
    return None


def _compare(got, want) -> Optional[str]:
    """Where ``got`` (native-allowed load) differs from ``want`` (Python path), or None.

    Iterative (no recursion limit: the hand-written pickles nest 10,000 deep) and
    cycle-safe. Lists, tuples, dicts and tensors must have the same identity structure
    (an object reached twice in one is reached twice in the other); tensors must share
    storages in the same pattern.
    """
    seen_want: dict = {}
    seen_got: dict = {}
    keep: list = []  # keeps visited objects (and so their ids) alive
    storages: list = []  # (got data_ptr, want data_ptr, node)
    todo = [(got, want, (None, ("root",)))]
    while todo:
        g, w, node = todo.pop()
        if type(g) is not type(w):
            return f"{_where(node)}: type {type(g).__qualname__} != {type(w).__qualname__}"
        if isinstance(w, (dict, list, tuple, torch.Tensor)):
            a, b = seen_want.get(id(w)), seen_got.get(id(g))
            if a is not None or b is not None:
                if a is not g or b is not w:
                    return f"{_where(node)}: object identity differs (shared in one load only)"
                continue
            seen_want[id(w)] = g
            seen_got[id(g)] = w
            keep.append((g, w))
        if isinstance(w, torch.Tensor):
            problem = _tensor_problem(g, w)
            if problem is not None:
                return f"{_where(node)}: tensor {problem}"
            if w.layout == torch.strided and w.untyped_storage().nbytes():
                storages.append(
                    (g.untyped_storage().data_ptr(), w.untyped_storage().data_ptr(), node)
                )
            todo.append((vars(g), vars(w), (node, ("attrs",))))
        elif isinstance(w, dict):
            gk, wk = list(g.keys()), list(w.keys())
            if len(gk) != len(wk):
                return f"{_where(node)}: {len(gk)} keys != {len(wk)}"
            if hasattr(w, "__dict__") or hasattr(g, "__dict__"):
                if hasattr(w, "__dict__") != hasattr(g, "__dict__"):
                    return f"{_where(node)}: __dict__ in one load only"
                todo.append((vars(g), vars(w), (node, ("attrs",))))
            for i in reversed(range(len(wk))):
                todo.append((g[gk[i]], w[wk[i]], (node, ("value", wk[i]))))
                todo.append((gk[i], wk[i], (node, ("key", i))))
        elif isinstance(w, (list, tuple)):
            if len(g) != len(w):
                return f"{_where(node)}: length {len(g)} != {len(w)}"
            for i in reversed(range(len(w))):
                todo.append((g[i], w[i], (node, ("item", i))))
        elif isinstance(w, torch.storage.TypedStorage):
            # A storage the mutated pickle let escape (no tensor rebuild took it).
            if (g.dtype, g._size(), g.device) != (w.dtype, w._size(), w.device):
                return (
                    f"{_where(node)}: storage {(g.dtype, g._size(), g.device)} != "
                    f"{(w.dtype, w._size(), w.device)}"
                )
            todo.append((g._untyped_storage, w._untyped_storage, (node, ("attrs",))))
        elif isinstance(w, torch.UntypedStorage):
            if (g.nbytes(), g.device) != (w.nbytes(), w.device):
                return (
                    f"{_where(node)}: storage {(g.nbytes(), g.device)} != {(w.nbytes(), w.device)}"
                )
            if w.device.type != "meta" and bytes(g.cpu()) != bytes(w.cpu()):
                return f"{_where(node)}: storage bytes differ"
            if w.nbytes():
                storages.append((g.data_ptr(), w.data_ptr(), node))
        elif isinstance(w, types.MethodType):
            # A loader's bound method (what find_class resolves a rebuild function to)
            # escaped: each load has its own loader.
            if g.__func__ is not w.__func__ or type(g.__self__) is not type(w.__self__):
                return f"{_where(node)}: {_short(g)} != {_short(w)}"
        elif isinstance(w, types.BuiltinMethodType) and not isinstance(
            w.__self__, types.ModuleType
        ):
            if (w.__qualname__, type(w.__self__)) != (g.__qualname__, type(g.__self__)):
                return f"{_where(node)}: {_short(g)} != {_short(w)}"
        elif isinstance(w, serialization._StorageType):  # a storage class, resolved
            if (g.name, g.dtype) != (w.name, w.dtype):
                return f"{_where(node)}: {g!r} != {w!r}"
        elif isinstance(w, float):
            same = (math.isnan(g) and math.isnan(w)) or struct.pack("<d", g) == struct.pack("<d", w)
            if not same:
                return f"{_where(node)}: {g!r} != {w!r}"
        elif isinstance(w, _EQ_TYPES):
            if not g == w:
                return f"{_where(node)}: {_short(g)} != {_short(w)}"
        else:
            try:
                same = bool(g == w)
            except Exception as e:  # noqa: BLE001
                return f"{_where(node)}: cannot compare {type(w).__qualname__}: {e}"
            if not same:
                return f"{_where(node)}: {_short(g)} != {_short(w)}"
    first_got: dict = {}
    first_want: dict = {}
    for i, (gp, wp, node) in enumerate(storages):
        a = first_got.setdefault(gp, i)
        b = first_want.setdefault(wp, i)
        if a != b:
            return (
                f"{_where(node)}: storage sharing differs (the native-allowed load shares "
                f"with tensor #{a} at {_where(storages[a][2])}, the Python path with "
                f"#{b} at {_where(storages[b][2])})"
            )
    return None


# --------------------------------------------------------------------------- base checkpoints


def _tensors_object():
    g = torch.Generator().manual_seed(1234)
    base = torch.randn(12, generator=g)
    mat = torch.randn(3, 4, generator=g)
    with_nan = torch.tensor([1.0, float("nan"), -0.0, float("inf")])
    return {
        "f32": mat,
        "f32_t": torch.randn(4, 3, generator=g).t(),  # transposed: stride (1, 3)
        "base": base,
        "base_view": base[2:8].view(2, 3),  # shares 'base''s storage, offset 2
        "i64": torch.arange(-3, 2),
        "f16": torch.randn(2, 2, 2, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "bool": torch.tensor([True, False, True, True]),
        "u8": torch.arange(6, dtype=torch.uint8).view(3, 2),
        "f64_0d": torch.tensor(2.5, dtype=torch.float64),
        "i8_empty": torch.empty(0, dtype=torch.int8),
        "c64": torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
        "nan": with_nan,
        "i32_col": torch.arange(12, dtype=torch.int32).view(3, 4)[:, 1],  # stride (4,)
    }


def _state_dict_object():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 2)
    )
    model(torch.randn(5, 3))  # BatchNorm running stats, num_batches_tracked
    sd = model.state_dict()
    assert type(sd) is collections.OrderedDict and hasattr(sd, "_metadata")
    return sd


def _nested_object():
    t = torch.arange(6.0).view(2, 3)
    return {
        "config": {
            "lr": 0.001,
            "name": "run-7",
            "steps": [1, 2, 300, 70000, -5, 2**40],
            "betas": (0.9, 0.999),
            "flags": [True, False, None],
            "nan": float("nan"),
            "neg_zero": -0.0,
            "unicode": "héllo",
        },
        "tensors": [t, (t[1], torch.ones(3, dtype=torch.int16)), {"deep": [torch.zeros(2)]}],
        "pair": (1, "two", 3.0, None),
        "empty": ([], {}, ()),
        "epoch": 12,
        "done": False,
    }


_OBJECTS = {
    "tensors": _tensors_object,
    "state_dict": _state_dict_object,
    "nested": _nested_object,
}
BASES = [f"{name}-p{protocol}" for name in _OBJECTS for protocol in (2, 4)]


@dataclasses.dataclass
class _Base:
    name: str
    members: list
    pkl: bytes
    ops: list  # (opcode name, arg, start, end) of every opcode of the pickle

    def of(self, *names) -> list:
        return [op for op in self.ops if op[0] in names]


@functools.cache
def _base(name: str) -> _Base:
    obj_name, protocol = name.rsplit("-p", 1)
    kwargs = {} if protocol == "2" else {"pickle_protocol": int(protocol)}
    members = _members(_saved(_OBJECTS[obj_name](), **kwargs))
    pkl = dict(members)[_pickle_member(members)]
    ops = []
    for op, arg, pos in pickletools.genops(pkl):
        if ops:
            ops[-1][3] = pos
        ops.append([op.name, arg, pos, len(pkl)])
    ops[-1][3] = ops[-1][2] + 1
    return _Base(name, members, pkl, [tuple(op) for op in ops])


# --------------------------------------------------------------------------- mutations
#
# Each mutator takes (rng, base) and returns (new pickle, description). Byte-level ones
# mostly make pickles the scan refuses; the opcode-aligned and targeted ones (memo
# indices, the ints of sizes/strides/offsets/numels, FRAME lengths) mostly make pickles
# both unpicklers run.


def _rand_pos(rng, n: int) -> int:
    return rng.randrange(max(n, 1))


def _m_flip_bit(rng, b):
    p = bytearray(b.pkl)
    i, bit = _rand_pos(rng, len(p)), rng.randrange(8)
    p[i] ^= 1 << bit
    return bytes(p), f"flip bit {bit} of byte {i}"


def _m_set_byte(rng, b):
    p = bytearray(b.pkl)
    i, v = _rand_pos(rng, len(p)), rng.randrange(256)
    old, p[i] = p[i], v
    return bytes(p), f"byte {i}: {old:#04x} -> {v:#04x}"


def _m_insert_byte(rng, b):
    i, v = rng.randrange(len(b.pkl) + 1), rng.randrange(256)
    return b.pkl[:i] + bytes([v]) + b.pkl[i:], f"insert {v:#04x} at {i}"


def _m_delete_range(rng, b):
    i = _rand_pos(rng, len(b.pkl))
    n = rng.randint(1, 8)
    return b.pkl[:i] + b.pkl[i + n :], f"delete bytes [{i}, {i + n})"


def _m_duplicate_range(rng, b):
    i = _rand_pos(rng, len(b.pkl))
    n = rng.randint(1, 16)
    j = rng.randrange(len(b.pkl) + 1)
    chunk = b.pkl[i : i + n]
    return b.pkl[:j] + chunk + b.pkl[j:], f"copy bytes [{i}, {i + n}) to {j}"


def _m_truncate(rng, b):
    i = rng.randrange(len(b.pkl))
    return b.pkl[:i], f"truncate at {i}"


def _m_opcode_anywhere(rng, b):
    p = bytearray(b.pkl)
    i, v = _rand_pos(rng, len(p)), rng.choice(OPCODE_BYTES)
    old, p[i] = p[i], v
    return bytes(p), f"byte {i}: {old:#04x} -> opcode {bytes([v])!r}"


def _m_replace_opcode(rng, b):
    name, _, start, _ = rng.choice(b.ops)
    v = rng.choice(OPCODE_BYTES)
    p = bytearray(b.pkl)
    p[start] = v
    return bytes(p), f"opcode {name} at {start} -> {bytes([v])!r}"


def _m_insert_opcode(rng, b):
    _, _, start, _ = rng.choice(b.ops)
    v = rng.choice(OPCODE_BYTES)
    if v in b"KqhC\x8c":  # give one-byte-argument opcodes their argument
        ins = bytes([v, rng.randrange(256) if v != ord("q") else rng.randrange(64)])
    else:
        ins = bytes([v])
    return b.pkl[:start] + ins + b.pkl[start:], f"insert {ins!r} before byte {start}"


def _m_delete_opcodes(rng, b):
    i = rng.randrange(len(b.ops) - 1)  # never the STOP
    k = rng.choice((1, 1, 1, 2, 3))
    start, end = b.ops[i][2], b.ops[min(i + k, len(b.ops) - 1) - 1][3]
    names = [op[0] for op in b.ops[i : i + k]]
    return b.pkl[:start] + b.pkl[end:], f"delete opcodes {names} at [{start}, {end})"


def _m_duplicate_opcodes(rng, b):
    i = rng.randrange(len(b.ops) - 1)
    k = rng.choice((1, 1, 2, 3, 5))
    start, end = b.ops[i][2], b.ops[min(i + k, len(b.ops) - 1) - 1][3]
    j = rng.choice(b.ops)[2]
    names = [op[0] for op in b.ops[i : i + k]]
    return b.pkl[:j] + b.pkl[start:end] + b.pkl[j:], f"copy opcodes {names} to {j}"


def _m_swap_opcode_ranges(rng, b):
    n = len(b.ops) - 1
    i, j = sorted(rng.sample(range(n), 2))
    ki = rng.randint(1, min(3, j - i))
    kj = rng.randint(1, min(3, n - j))
    a0, a1 = b.ops[i][2], b.ops[i + ki - 1][3]
    b0, b1 = b.ops[j][2], b.ops[j + kj - 1][3]
    p = b.pkl
    out = p[:a0] + p[b0:b1] + p[a1:b0] + p[a0:a1] + p[b1:]
    return out, f"swap opcodes [{a0}, {a1}) and [{b0}, {b1})"


def _max_memo(b) -> int:
    idx = [op[1] for op in b.of("BINPUT", "LONG_BINPUT", "BINGET", "LONG_BINGET")]
    return max(idx + [len(b.of("MEMOIZE"))])


def _m_memo_index(rng, b):
    """A BINPUT/BINGET/LONG_BINPUT/LONG_BINGET index changed, or a MEMOIZE replaced."""
    memo_ops = b.of("BINPUT", "BINGET", "LONG_BINPUT", "LONG_BINGET", "MEMOIZE")
    name, arg, start, end = rng.choice(memo_ops)
    top = _max_memo(b)
    p = b.pkl
    if name == "MEMOIZE":
        how = rng.randrange(4)
        if how == 0:
            new = bytes([ord("q"), rng.choice([0, 1, top, top + 1, rng.randrange(top + 2)])])
        elif how == 1:
            new = b"h" + bytes([rng.randrange(top + 1)])
        elif how == 2:
            new = b""
        else:
            new = b"\x94\x94"
        return p[:start] + new + p[end:], f"MEMOIZE at {start} -> {new!r}"
    width = 1 if name in ("BINPUT", "BINGET") else 4
    choices = [0, 1, arg - 1, arg + 1, top, top + 1, rng.randrange(top + 2)]
    choices += [255] if width == 1 else [top * 2, rng.randrange(1 << 17)]
    new = rng.choice(choices) % (1 << (8 * width))
    kind = p[start : start + 1]
    if rng.random() < 0.25:  # a put becomes a get and the other way round
        kind = {b"q": b"h", b"h": b"q", b"r": b"j", b"j": b"r"}[kind]
    out = p[:start] + kind + new.to_bytes(width, "little") + p[end:]
    return out, f"{name}({arg}) at {start} -> {kind!r}({new})"


def _int_op(v: int) -> bytes:
    if 0 <= v < 256:
        return b"K" + bytes([v])
    if 0 <= v < 65536:
        return b"M" + struct.pack("<H", v)
    if -(2**31) <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    return pickle_long1(v)


def pickle_long1(v: int) -> bytes:
    n = (v.bit_length() + 8) // 8
    return b"\x8a" + bytes([n]) + v.to_bytes(n, "little", signed=True)


def _m_int_value(rng, b):
    """An int (a storage numel, offset, size or stride entry, or a plain int) changed:
    in place, re-encoded, or replaced by another type."""
    name, arg, start, end = rng.choice(b.of("BININT1", "BININT2", "BININT", "LONG1"))
    p = b.pkl
    how = rng.randrange(10)
    if how < 5:  # same opcode, new value
        width = {"BININT1": 1, "BININT2": 2, "BININT": 4}.get(name)
        if width is None:  # LONG1: re-encode
            v = rng.choice([0, -1, arg + 1, 2**62, -(2**63), 2**63 - 1])
            new = pickle_long1(v)
        else:
            bits = 8 * width
            v = rng.choice([0, 1, 2, arg - 1, arg + 1, (1 << bits) - 1, rng.randrange(1 << bits)])
            if width == 4:
                v = rng.choice([v, -1, -(2**31), 2**31 - 1])
            v %= 1 << bits
            new = p[start : start + 1] + v.to_bytes(width, "little")
            v = v - (1 << bits) if width == 4 and v >= 2**31 else v
    elif how < 8:  # another encoding of a nearby or extreme value
        v = rng.choice([arg, arg + 1, arg - 1, -arg, 0, -1, arg * 2 + 1, 2**31, 2**40, -(2**40)])
        new = rng.choice([_int_op(v), pickle_long1(v)])
    else:  # another type
        v = None
        new = rng.choice(
            [
                b"N",
                b"\x88",
                b"\x89",
                b"G" + struct.pack(">d", float(arg)),
                b"X\x01\x00\x00\x000",
                b")",
                b"K\x01\x85",
            ]
        )
    return p[:start] + new + p[end:], f"{name}({arg}) at {start} -> {new!r} ({v})"


def _m_frame(rng, b):
    frames = b.of("FRAME")
    if not frames:
        return _m_int_value(rng, b)
    _, arg, start, end = rng.choice(frames)
    v = rng.choice([0, 1, arg - 1, arg + 1, arg + 100, 2**63 - 1, rng.randrange(2 * arg + 2)])
    v = max(v, 0)
    out = b.pkl[: start + 1] + v.to_bytes(8, "little") + b.pkl[end:]
    return out, f"FRAME({arg}) at {start} -> {v}"


_MUTATORS = [
    (_m_flip_bit, 2),
    (_m_set_byte, 1),
    (_m_insert_byte, 1),
    (_m_delete_range, 1),
    (_m_duplicate_range, 1),
    (_m_truncate, 1),
    (_m_opcode_anywhere, 2),
    (_m_replace_opcode, 3),
    (_m_insert_opcode, 2),
    (_m_delete_opcodes, 3),
    (_m_duplicate_opcodes, 3),
    (_m_swap_opcode_ranges, 2),
    (_m_memo_index, 5),
    (_m_int_value, 8),
    (_m_frame, 1),
]
_BYTE_MUTATORS = [(_m_flip_bit, 1), (_m_set_byte, 1), (_m_opcode_anywhere, 1)]


def _mutant(base_name: str, i: int) -> tuple:
    """Mutant ``i`` of base ``base_name``: ``(pickle bytes, description)``; mutant 0
    is the unmutated pickle. Deterministic: a failure names ``(base_name, i)``."""
    b = _base(base_name)
    if i == 0:
        return b.pkl, "unmutated"
    rng = random.Random(f"{base_name}:{i}")
    fns, weights = zip(*_MUTATORS)
    pkl, desc = rng.choices(fns, weights)[0](rng, b)
    if rng.random() < 0.15:  # now and then a second, byte-level damage on top
        fns2, weights2 = zip(*_BYTE_MUTATORS)
        b2 = dataclasses.replace(b, pkl=pkl)
        pkl, desc2 = rng.choices(fns2, weights2)[0](rng, b2)
        desc = f"{desc}; then {desc2}"
    return pkl, desc


# --------------------------------------------------------------------------- 1. mutants


@pytest.mark.parametrize("base_name", BASES)
def test_mutants_load_alike(harness, tmp_path, base_name):
    b = _base(base_name)
    path = tmp_path / "mutant.pt"
    failures = []
    tally: collections.Counter = collections.Counter()
    for i in range(N_MUTANTS + 1):
        pkl, desc = _mutant(base_name, i)
        path.write_bytes(_checkpoint(b.members, pkl))
        py, nat = harness.both(path)
        if i == 0:  # the unmutated checkpoint: the machine runs it, equal to Python
            assert py.kind == nat.kind == "ok", f"unmutated {base_name}: {py} / {nat}"
            assert nat.used == "native", f"unmutated {base_name}: unpickler_used {nat.used!r}"
            assert _judge(py, nat) is None, _judge(py, nat)
            continue
        tally[f"python {py.kind}, native-allowed {nat.kind} ({nat.used})"] += 1
        problem = _judge(py, nat)
        if problem is not None:
            failures.append(
                f"base {base_name!r}, mutant {i} (seed {base_name}:{i}) [{desc}]: {problem}"
                f"\n    reproduce: _mutant({base_name!r}, {i}) -> data.pkl {pkl!r:.300}"
            )
    native_ok = sum(n for k, n in tally.items() if k.endswith("ok (native)"))
    summary = ", ".join(f"{k}: {n}" for k, n in sorted(tally.items()))
    assert not failures, (
        f"{len(failures)} of {N_MUTANTS} mutants of {base_name} load differently "
        f"({summary}):\n" + "\n".join(failures[:20])
    )
    assert native_ok > 0, f"no mutant of {base_name} ran on the native machine ({summary})"


def test_mutants_are_deterministic():
    for name in BASES[:2]:
        assert [_mutant(name, i) for i in range(1, 30)] == [_mutant(name, i) for i in range(1, 30)]


def test_comparison_notices_differences():
    t = torch.arange(6.0)
    base = {"a": t, "b": t[1:3], "c": [1, (2, 3.0)], "n": float("nan")}
    assert _compare(base, {"a": t, "b": t[1:3], "c": [1, (2, 3.0)], "n": float("nan")}) is None
    other = torch.arange(6.0)
    for changed in (
        {"a": t, "b": other[1:3], "c": [1, (2, 3.0)], "n": float("nan")},  # sharing
        {"a": t, "b": t[1:4], "c": [1, (2, 3.0)], "n": float("nan")},  # shape
        {"a": t, "b": t[1:3].clone(), "c": [1, (2, 3.0)], "n": float("nan")},  # offset
        {"a": t, "b": t[1:3], "c": [1, [2, 3.0]], "n": float("nan")},  # type
        {"a": t, "b": t[1:3], "c": [1, (2, -0.0)], "n": float("nan")},  # value
        {"a": t, "b": t[1:3], "c": [1, (2, 3.0)], "n": 0.0},  # nan
        {"a": t.double(), "b": t[1:3], "c": [1, (2, 3.0)], "n": float("nan")},  # dtype
    ):
        assert _compare(changed, base) is not None, changed
    shared = [1]
    assert _compare([shared, shared], [[1], [1]]) is not None  # identity
    deep_a, deep_b = (1,), (1,)
    for _ in range(20_000):
        deep_a, deep_b = (deep_a,), (deep_b,)
    assert _compare(deep_a, deep_b) is None
    nan_a = torch.tensor([float("nan"), 1.0])
    assert _compare(nan_a, nan_a.clone()) is None
    assert _compare(nan_a, torch.tensor([float("nan"), 2.0])) is not None


# --------------------------------------------------------------------------- 2. hand-written


def _u(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _tuple_op(values) -> bytes:
    return b"(" + b"".join(_int_op(v) for v in values) + b"t"


@functools.cache
def _tensor_checkpoint() -> tuple:
    """(members, protocol-2 pickle) of ``{"t": torch.arange(4.0)}`` (storage '0')."""
    members = _members(_saved({"t": torch.arange(4.0)}))
    pkl = dict(members)[_pickle_member(members)]
    puts = [arg for op, arg, _ in pickletools.genops(pkl) if op.name == "BINPUT"]
    assert pkl.endswith(b"s.") and max(puts) < 20, pkl
    return members, pkl


def _with_x(value: bytes) -> bytes:
    """The tensor checkpoint's pickle with ``"x": <value>`` added (memo 20+ is free)."""
    head = _tensor_checkpoint()[1][:-1]  # ends with the SETITEM of "t"
    return head + _u("x") + value + b"s."


def _rebuild(offset, size, stride, key="0", numel=4, storage="FloatStorage") -> bytes:
    """A ``_rebuild_tensor_v2`` call on storage ``key`` with the given view."""
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n(("
        + _u("storage")
        + b"ctorch\n"
        + storage.encode()
        + b"\n"
        + _u(key)
        + _u("cpu")
        + _int_op(numel)
        + b"tQ"
        + _int_op(offset)
        + _tuple_op(size)
        + _tuple_op(stride)
        + b"\x89ccollections\nOrderedDict\n)RtR"
    )


def _memo_chain(n: int) -> bytes:
    """A tuple of n + 1 values, each the BINGET of the previous one's BINPUT."""
    ops = [b"(K\x07q\x14"]
    for i in range(20, 20 + n):
        get = b"h" + bytes([i]) if i < 256 else b"j" + struct.pack("<I", i)
        put = b"q" + bytes([i + 1]) if i + 1 < 256 else b"r" + struct.pack("<I", i + 1)
        ops.append(get + put)
    return b"".join(ops) + b"t"


DEPTH = 10_000

# name -> (pickle, expectation, the native machine must run it)
#   expectation "load": the Python path loads it; "raise": it rejects it; both loads
#   must agree either way.
_CASES = {
    # deep nesting, long containers, memo chains: valid, and the machine's own, except
    # tuples nested deeper than it makes recursively (it hands those to Python's)
    "nested_tuple1": (_with_x(b"K\x01" + b"\x85" * DEPTH), "load", False),
    "nested_mark_tuple": (_with_x(b"(" * DEPTH + b"K\x01" + b"t" * DEPTH), "load", False),
    "nested_lists": (_with_x(b"]" * DEPTH + b"a" * (DEPTH - 1)), "load", True),
    "nested_dicts": (_with_x((b"}" + _u("k")) * DEPTH + b"N" + b"s" * DEPTH), "load", True),
    "list_100k_appends": (
        _with_x(b"](" + b"".join(_int_op(i * 7 % 70_000) for i in range(100_000)) + b"e"),
        "load",
        True,
    ),
    "list_100k_append": (_with_x(b"]" + b"K\x07a" * 100_000), "load", True),
    "dict_20k_setitems": (
        _with_x(b"}(" + b"".join(_int_op(i) + _int_op(-i) for i in range(20_000)) + b"u"),
        "load",
        True,
    ),
    "memo_chain_binput": (_with_x(_memo_chain(230)), "load", True),
    "memo_chain_long_binput": (_with_x(_memo_chain(3000)), "load", True),
    "memoize_chain": (
        b"\x80\x04(K\x07\x94" + b"".join(b"h" + bytes([i]) + b"\x94" for i in range(200)) + b"t.",
        "load",
        True,
    ),
    "memo_shared_tuple": (_with_x(b"K\x01K\x02\x86q\x14h\x14\x86"), "load", True),
    "self_referential_list": (_with_x(b"]q\x14h\x14a"), "load", True),
    "self_referential_dict": (_with_x(b"}q\x14K\x01h\x14s"), "load", True),
    "long_binput_within_slack": (
        _with_x(b"K\x07r" + struct.pack("<I", 60_000) + b"j" + struct.pack("<I", 60_000) + b"\x86"),
        "load",
        False,
    ),
    # tensor views over the storage 't' also uses
    "view_in_bounds": (_with_x(_rebuild(1, (3,), (1,))), "load", True),
    "view_expanded": (_with_x(_rebuild(0, (2, 3), (0, 1))), "load", True),
    "view_transposed": (_with_x(_rebuild(0, (2, 2), (1, 2))), "load", True),
    "view_zero_size_huge_stride": (
        _with_x(_rebuild(3, (0, 2**62), (2**62, 2**62))),
        None,
        False,
    ),
    "view_storage_reused_as_other_type": (
        _with_x(_rebuild(0, (2,), (1,), numel=2, storage="DoubleStorage")),
        "load",
        True,
    ),
    "view_past_end": (_with_x(_rebuild(1, (4,), (1,))), "raise", False),
    "view_negative_offset": (_with_x(_rebuild(-1, (2,), (1,))), "raise", False),
    "view_negative_stride": (_with_x(_rebuild(0, (2,), (-1,))), "raise", False),
    "view_overflowing_extent": (
        _with_x(_rebuild(0, (2**62, 2**62), (2**62, 1))),
        "raise",
        False,
    ),
    "view_rank_mismatch": (_with_x(_rebuild(0, (2, 2), (1,))), "raise", False),
    "storage_record_missing": (_with_x(_rebuild(0, (2,), (1,), key="9")), "raise", False),
    # invalid pickles
    "huge_long_binput": (
        _with_x(b"K\x07r\xf0\xff\xff\xff" + b"j\xf0\xff\xff\xff"),
        "raise",
        False,
    ),
    "binget_unset": (_with_x(b"h\x63"), "raise", False),
    "long_binget_unset": (_with_x(b"j\xff\xff\xff\xff"), "raise", False),
    "empty_pickle": (b"", "raise", False),
    "stop_only": (b".", "raise", False),
    "stop_empty_stack": (b"\x80\x02.", "raise", False),
    "stop_above_mark": (b"\x80\x02K\x01(.", "raise", False),
    "setitems_odd": (_with_x(b"}(K\x01K\x02K\x03u"), "raise", False),
    "appends_on_dict": (_with_x(b"}(K\x01e"), "raise", False),
    "append_on_dict": (_with_x(b"}K\x01a"), "raise", False),
    "setitem_on_list": (_with_x(b"]K\x00K\x01s"), "raise", False),
    "setitem_on_tuple": (_with_x(b")K\x00K\x01s"), "raise", False),
    "tuple2_across_mark": (_with_x(b"K\x01(K\x02\x86t"), "raise", False),
    "frame_past_end": (b"\x80\x04\x95" + struct.pack("<Q", 100) + b"K\x01.", "raise", False),
    "proto_too_high": (b"\x80\x09K\x01.", "raise", False),
    # the memo around a MARK and mixed BINPUT/MEMOIZE numbering
    "binput_after_mark": (b"\x80\x02K\x05(q\x00th\x00.", "raise", False),
    "binput_after_mark_in_checkpoint": (
        _with_x(b"K\x05(q\x14t\x86h\x14\x86"),
        "raise",
        False,
    ),
    "memoize_after_mark": (b"\x80\x04K\x05(\x94th\x00.", "raise", False),
    "memoize_after_sparse_binput": (b"\x80\x04K\x01q\x01K\x02\x94h\x01.", "load", False),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_pathological_pickles(harness, tmp_path, case):
    pkl, expect, native = _CASES[case]
    path = tmp_path / "case.pt"
    path.write_bytes(_checkpoint(_tensor_checkpoint()[0], pkl))
    py, nat = harness.both(path)
    problem = _judge(py, nat)
    assert problem is None, f"{case}: {problem}\n    data.pkl: {pkl!r:.300}"
    if expect == "load":
        assert py.kind == "ok", f"{case}: expected the Python path to load it: {py}"
    elif expect == "raise":
        assert py.kind == "error", f"{case}: expected the Python path to reject it: {py}"
    if native:
        assert nat.used == "native", f"{case}: unpickler_used is {nat.used!r}, not 'native'"


_DEEP_CHILD = r"""
import sys, warnings
warnings.simplefilter("ignore")
import fastserial
from fastserial import serialization

seen = []
original = serialization._ZipLoader.load

def load(self):
    seen.append(self)
    return original(self)

serialization._ZipLoader.load = load
real_native_globals = serialization._ZipLoader._native_globals

def depth_of(x):
    depth = 0
    while type(x) is tuple:
        assert len(x) == 1
        x, depth = x[0], depth + 1
    return depth, x

for mode in ("python", "native"):
    serialization._ZipLoader._native_globals = (
        real_native_globals if mode == "native" else (lambda self, scan, unpickler: None)
    )
    obj = fastserial.load(sys.argv[1])
    print(mode, seen[-1].unpickler_used, sorted(obj), *depth_of(obj["x"]), flush=True)
"""


@pytest.mark.parametrize("depth", [100_000])
def test_very_deep_nesting_does_not_crash(tmp_path, depth):
    """Nesting deeper than the machine's recursion can take on the main thread's stack:
    Python's unpickler builds it iteratively; the native-allowed load must not crash
    (run in a child interpreter, which a stack overflow kills)."""
    path = tmp_path / "deep.pt"
    path.write_bytes(_checkpoint(_tensor_checkpoint()[0], _with_x(b"K\x01" + b"\x85" * depth)))
    proc = run_python(_DEEP_CHILD, path, timeout=120)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, (
        f"nested TUPLE1 x {depth}: the child exited with {proc.returncode} after "
        f"{lines} (a negative code is the signal that killed it)\n{proc.stderr[-2000:]}"
    )
    # The machine may run it or hand it to Python's unpickler; either way, the same.
    assert len(lines) == 2 and lines[0] == f"python python ['t', 'x'] {depth} 1", lines
    mode, used, rest = lines[1].split(" ", 2)
    assert (mode, rest) == ("native", f"['t', 'x'] {depth} 1"), lines
    assert used in ("native", "python"), lines


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts /proc/self/fd")
@pytest.mark.parametrize("case", ["view_past_end", "setitems_odd"])
def test_failed_loads_release_the_checkpoint_file(tmp_path, case):
    """A load that raises must not keep the checkpoint open. (Found by the mutants:
    thousands of rejected loads ran the process out of file descriptors.)"""
    path = tmp_path / "bad.pt"
    path.write_bytes(_checkpoint(_tensor_checkpoint()[0], _CASES[case][0]))
    for native in (False, True):
        with contextlib.ExitStack() as stack:
            if not native:
                patch = stack.enter_context(pytest.MonkeyPatch.context())
                patch.setattr(serialization._ZipLoader, "_native_globals", _no_native)
            gc.collect()
            before = len(os.listdir("/proc/self/fd"))
            for _ in range(20):
                with contextlib.suppress(Exception), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fastserial.load(str(path))
            gc.collect()
            after = len(os.listdir("/proc/self/fd"))
        assert after <= before, (
            f"{case} ({'native allowed' if native else 'python path'}): 20 failed loads "
            f"left {after - before} more file descriptors open"
        )
