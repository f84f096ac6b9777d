"""Contract tests: one table of checkpoints through every front end.

Every checkpoint of the table (the fixtures in ``tests/data``, files ``torch.save``
writes during the run, and crafted pickles) goes through ``torch.load(weights_only=True)``
of the installed torch and through each fastserial front end:

* ``fastserial.load`` (eager) and ``fastserial.load(mmap=True)``,
* ``fastserial.numpy.load``,
* ``fastserial.open(framework="numpy")`` (keys, metadata, ``get_tensor`` of each key),
* ``fastserial inspect --json`` (its ``weights_only`` verdict and tensor list),
* ``fastserial verify`` (exit status and its weights-only note),
* ``fastserial.get_unsafe_globals_in_checkpoint`` (empty list <=> accepted).

They must agree with torch and with each other: the same verdict (accept or a typed
refusal), and for accepted files the same dtype, shape, stride, storage offset, bytes
and storage sharing for every dense tensor.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import json
import pickle
import pickletools
import sys
import types
import zipfile
from collections.abc import Mapping

import fastserial
import fastserial.numpy as fsnp
import numpy as np
import pytest
import torch
from conftest import DATA_DIR, fixture_entries, fixture_path, tensor_bytes
from fastserial.cli import main as cli_main

MISSING_MODULE = "fastserial_contract_missing_mod"

#: Kinds of tensor numpy cannot represent: fastserial.numpy may raise
#: UnsupportedTensorError for a file torch accepts only when it holds one of these.
NON_DENSE_KINDS = {"quantized", "sparse", "nested", "meta"}


# --------------------------------------------------------------------------- crafted objects


class MyT(torch.Tensor):
    """A tensor subclass: torch pickles it through ``_rebuild_from_type_v2`` naming it."""


class Thing:
    """A class of this test module: a global no allow-list knows."""

    def __init__(self, value=0):
        self.value = value


class ReduceTo:
    """Pickles as ``fn(*args)``: a hand-picked global with a REDUCE opcode."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _tensors(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 4, generator=g),
        "b": torch.arange(5, dtype=torch.int64),
    }


def _write_views_and_dtypes(path):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 6, generator=g)
    half = torch.randn(10, generator=g).to(torch.float16)
    bf = torch.randn(3, 5, generator=g).to(torch.bfloat16)
    torch.save(
        {
            "base": base,
            "row": base[1],
            "col": base[:, 2],
            "transposed": base.t(),
            "window": base[1:3, 2:5],
            "bfloat16": bf,
            "bfloat16_step": bf[:, ::2],
            "float16": half,
            "float16_tail": half[4:],
            "int8": torch.tensor([-128, -1, 0, 1, 127], dtype=torch.int8),
            "bool": torch.tensor([True, False, True]),
            "uint16": torch.tensor([0, 1, 300, 65535], dtype=torch.uint16),
            "float64": torch.linspace(-1, 1, 7, dtype=torch.float64),
        },
        path,
    )


def _write_parameters(path):
    g = torch.Generator().manual_seed(2)
    torch.save(
        {
            "trained": torch.nn.Parameter(torch.randn(3, 2, generator=g)),
            "frozen": torch.nn.Parameter(torch.ones(2), requires_grad=False),
            "plain": torch.zeros(4, dtype=torch.int32),
        },
        path,
    )


def _write_module_state_dict(path):
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)
    )
    sd = model.state_dict()
    assert hasattr(sd, "_metadata")
    torch.save(sd, path)


def _write_frozenset(path):
    torch.save({**_tensors(4), "tags": ReduceTo(frozenset, ["a", "b"])}, path)


def _write_set(path):
    torch.save({**_tensors(5), "tags": ReduceTo(set, ["a", "b"])}, path)


def _write_ordereddict(path):
    inner = _tensors(6)
    torch.save(
        {"od": ReduceTo(collections.OrderedDict, list(inner.items())), "n": 3},
        path,
    )


def _write_nested_tensor(path):
    nt = torch.nested.nested_tensor([torch.arange(3.0), torch.arange(5.0)])
    torch.save({**_tensors(7), "nested": nt}, path)


def _write_tensor_subclass(path):
    torch.save({**_tensors(8), "sub": torch.arange(4.0).as_subclass(MyT)}, path)


def _write_unknown_global(path):
    torch.save({**_tensors(9), "thing": Thing(1)}, path)


def _write_missing_module(path):
    # A GLOBAL naming a module that cannot be imported: pickle needs the module while
    # it writes the file, so it lives in sys.modules only for the save.
    module = types.ModuleType(MISSING_MODULE)

    class Missing:
        pass

    Missing.__module__, Missing.__qualname__, Missing.__name__ = MISSING_MODULE, "Thing", "Thing"
    module.Thing = Missing
    sys.modules[MISSING_MODULE] = module
    try:
        torch.save({**_tensors(10), "thing": ReduceTo(Missing)}, path)
    finally:
        del sys.modules[MISSING_MODULE]
    assert importlib.util.find_spec(MISSING_MODULE) is None
    with zipfile.ZipFile(path) as zf:
        data_pkl = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        ops = [(op.name, arg) for op, arg, _ in pickletools.genops(zf.read(data_pkl))]
    assert ("GLOBAL", f"{MISSING_MODULE} Thing") in ops


GENERATED = {
    "gen_views_dtypes.pt": _write_views_and_dtypes,
    "gen_parameters.pt": _write_parameters,
    "gen_module_state_dict.pt": _write_module_state_dict,
    "craft_frozenset.pt": _write_frozenset,
    "craft_set.pt": _write_set,
    "craft_ordereddict.pt": _write_ordereddict,
    "craft_nested_tensor.pt": _write_nested_tensor,
    "craft_tensor_subclass.pt": _write_tensor_subclass,
    "craft_unknown_global.pt": _write_unknown_global,
    "craft_missing_module.pt": _write_missing_module,
}

FIXTURES = sorted(p.name for p in DATA_DIR.glob("*.pt"))
assert set(FIXTURES) == {n for n in fixture_entries()}, "tests/data and its manifest differ"
CASES = FIXTURES + list(GENERATED)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """Case name -> path; generated files are written once per run."""
    folder = tmp_path_factory.mktemp("contract")
    paths = {name: fixture_path(name) for name in FIXTURES}
    for name, write in GENERATED.items():
        paths[name] = folder / name
        write(paths[name])
    return paths


# --------------------------------------------------------------------------- observing


class Outcome:
    """What one front end did with one file: accepted (``value``), refused with a typed
    error, raised UnsupportedTensorError, or raised something untyped."""

    def __init__(self, kind: str, value=None, error: BaseException | None = None):
        self.kind, self.value, self.error = kind, value, error

    @property
    def accepted(self) -> bool:
        return self.kind == "accept"

    def __repr__(self) -> str:
        if self.error is None:
            return self.kind
        return f"{self.kind} ({type(self.error).__name__}: {str(self.error)[:200]})"


def attempt(fn) -> Outcome:
    try:
        return Outcome("accept", fn())
    except fsnp.UnsupportedTensorError as e:
        return Outcome("unsupported", error=e)
    except (pickle.UnpicklingError, fastserial.CheckpointError) as e:
        return Outcome("refuse", error=e)
    except Exception as e:  # an untyped error is a finding, reported by the tests
        return Outcome("untyped", error=e)


def cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli_main([str(a) for a in argv], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def open_numpy(path):
    with fastserial.open(path, framework="numpy") as ckpt:
        return {name: (ckpt.metadata(name), ckpt.get_tensor(name)) for name in ckpt.keys()}


_OBSERVED: dict[str, dict] = {}


def observe(name: str, path) -> dict:
    """Every front end's outcome for one file (computed once per run)."""
    if name not in _OBSERVED:
        path = str(path)
        code, out, err = cli("inspect", "--json", path)
        try:
            report = json.loads(out)
        except json.JSONDecodeError:
            report = None
        vcode, vout, verr = cli("verify", path)
        _OBSERVED[name] = {
            "torch": attempt(lambda: torch.load(path, weights_only=True)),
            "fastserial.load": attempt(lambda: fastserial.load(path)),
            "fastserial.load(mmap=True)": attempt(lambda: fastserial.load(path, mmap=True)),
            "fastserial.numpy.load": attempt(lambda: fsnp.load(path)),
            "fastserial.open(numpy)": attempt(lambda: open_numpy(path)),
            "unsafe_globals": attempt(lambda: fastserial.get_unsafe_globals_in_checkpoint(path)),
            "inspect": (code, report, err),
            "verify": (vcode, vout, verr),
            "legacy": not zipfile.is_zipfile(path),
        }
    return _OBSERVED[name]


# --------------------------------------------------------------------------- flattening


def leaves(obj, prefix=""):
    """``(dotted name, value)`` of every tensor / array leaf, named the way
    ``fastserial.numpy.iter_leaves`` (and so ``open`` and ``inspect``) names them."""
    seen: set[int] = set()
    out = []

    def walk(name, value):
        if isinstance(value, (torch.Tensor, np.ndarray)):
            out.append((name, value))
            return
        if isinstance(value, (dict, list, tuple)):
            if id(value) in seen:
                return
            seen.add(id(value))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for k, v in items:
                k = k.decode("utf-8", "replace") if isinstance(k, bytes) else str(k)
                walk(f"{name}.{k}" if name else k, v)

    walk(prefix, obj)
    return out


def tensor_kind(t: torch.Tensor) -> str:
    if t.is_nested:
        return "nested"
    if t.is_quantized:
        return "quantized"
    if t.layout != torch.strided:
        return "sparse"
    if t.device.type == "meta":
        return "meta"
    return "dense"


def torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def torch_desc(t: torch.Tensor) -> dict:
    storage = t.untyped_storage()
    return {
        "dtype": torch_dtype_name(t.dtype),
        "shape": tuple(t.shape),
        "stride": tuple(t.stride()),
        "storage_offset": t.storage_offset(),
        "storage_nbytes": storage.nbytes(),
        "bytes": tensor_bytes(t),
    }


def numpy_desc(a: np.ndarray) -> dict:
    assert a.dtype.isnative, f"array of non-native byte order {a.dtype}"
    base = a.base if a.base is not None else a
    itemsize = a.itemsize
    offset = a.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    return {
        "dtype": fsnp.torch_dtype_for(a.dtype).name,
        "shape": tuple(a.shape),
        "stride": tuple(s // itemsize for s in a.strides),
        "storage_offset": offset // itemsize,
        "storage_nbytes": base.nbytes,
        "bytes": np.ascontiguousarray(a).tobytes(),
    }


def sharing(keys: dict[str, object], skip: set[str]) -> set[frozenset]:
    """Names grouped by storage key: the partition two front ends must agree on."""
    groups: dict[object, set] = {}
    for name, key in keys.items():
        if name not in skip:
            groups.setdefault(key, set()).add(name)
    return {frozenset(g) for g in groups.values()}


# --------------------------------------------------------------------------- the contract


@pytest.mark.parametrize("name", CASES)
def test_verdicts_agree(table, name):
    seen = observe(name, table[name])
    reference = seen["torch"]
    problems = []
    if reference.kind not in ("accept", "refuse"):
        pytest.fail(f"{name}: torch.load(weights_only=True) raised untyped {reference!r}")
    accepted = reference.accepted
    non_dense = set()
    if accepted:
        non_dense = {tensor_kind(t) for _, t in leaves(reference.value)} - {"dense"}

    # Loaders: accept exactly what torch accepts; refusals are typed.
    for front in ("fastserial.load", "fastserial.load(mmap=True)"):
        got = seen[front]
        if got.kind not in ("accept", "refuse") or got.accepted != accepted:
            problems.append(f"{front}: {got!r}")
    for front in ("fastserial.numpy.load", "fastserial.open(numpy)"):
        got = seen[front]
        if accepted:
            ok = got.accepted or (got.kind == "unsupported" and non_dense & NON_DENSE_KINDS)
            if front == "fastserial.open(numpy)" and not isinstance(reference.value, Mapping):
                ok = ok or (got.kind == "untyped" and isinstance(got.error, TypeError))
        else:
            ok = got.kind == "refuse"
        if not ok:
            problems.append(f"{front}: {got!r}")

    # inspect --json: runs, and its weights_only verdict is torch's.
    code, report, err = seen["inspect"]
    if code != 0:
        problems.append(f"inspect --json: exit {code}: {err.strip()}")
    if report is not None:
        if report["weights_only"] is not accepted:
            problems.append(
                f"inspect --json: weights_only={report['weights_only']} "
                f"(not_allowed_globals={report['pickle']['not_allowed_globals']})"
            )
        if report["error"] is not None:
            problems.append(f"inspect --json: error {report['error']}")

    # get_unsafe_globals_in_checkpoint: empty <=> accepted (zip files; it refuses legacy).
    unsafe = seen["unsafe_globals"]
    if seen["legacy"]:
        if not (unsafe.kind == "untyped" and isinstance(unsafe.error, ValueError)):
            problems.append(f"get_unsafe_globals_in_checkpoint on a legacy file: {unsafe!r}")
    elif not unsafe.accepted:
        problems.append(f"get_unsafe_globals_in_checkpoint: {unsafe!r}")
    else:
        opcodes = report["pickle"]["unsafe_opcodes"] if report is not None else []
        if (unsafe.value == []) is not accepted and not opcodes:
            problems.append(f"get_unsafe_globals_in_checkpoint: {unsafe.value!r}")

    # verify: every file of the table is intact; a refused file gets the refusal note.
    vcode, vout, verr = seen["verify"]
    if vcode != 0:
        problems.append(f"verify: exit {vcode}: {vout.strip()} {verr.strip()}")
    elif ("a weights-only load refuses it" in vout) is accepted:
        problems.append(f"verify: weights-only note disagrees with torch: {vout.strip()}")

    assert not problems, (
        f"{name}: torch.load(weights_only=True) -> {reference!r}, but\n  " + "\n  ".join(problems)
    )


@pytest.mark.parametrize("name", CASES)
def test_tensors_agree(table, name):
    if name == "craft_nested_tensor.pt" and not hasattr(
        torch.serialization, "_get_storage_alignment"
    ):
        pytest.skip("torch 2.6 accepts nested tensors; their values are not compared here")
    seen = observe(name, table[name])
    reference = seen["torch"]
    if not reference.accepted:
        pytest.skip("torch refuses this file: nothing to compare")
    ref_leaves = leaves(reference.value)
    ref = {n: t for n, t in ref_leaves if tensor_kind(t) == "dense"}
    others = [n for n, t in ref_leaves if tensor_kind(t) != "dense"]
    ref_desc = {n: torch_desc(t) for n, t in ref.items()}
    empty = {n for n, d in ref_desc.items() if d["storage_nbytes"] == 0}
    ref_sharing = sharing({n: t.untyped_storage().data_ptr() for n, t in ref.items()}, empty)
    problems = []

    def compare(front, got_desc, got_sharing, fields):
        if list(got_desc) != list(ref_desc):
            problems.append(f"{front}: tensors {list(got_desc)} != torch's {list(ref_desc)}")
        for n in ref_desc.keys() & got_desc.keys():
            for field in fields:
                want, got = ref_desc[n][field], got_desc[n][field]
                if want != got:
                    shown = (
                        (f"{len(got)} bytes", f"{len(want)} bytes")
                        if field == "bytes"
                        else (got, want)
                    )
                    problems.append(f"{front}: {n!r} {field} {shown[0]} != torch's {shown[1]}")
        if got_sharing is not None and got_sharing != ref_sharing:
            problems.append(
                f"{front}: storage sharing {sorted(map(sorted, got_sharing))} "
                f"!= torch's {sorted(map(sorted, ref_sharing))}"
            )

    all_fields = ("dtype", "shape", "stride", "storage_offset", "storage_nbytes", "bytes")

    # fastserial.load, eager and mmap: the same objects as torch's, dense or not.
    for front in ("fastserial.load", "fastserial.load(mmap=True)"):
        got = seen[front]
        if not got.accepted:
            continue  # reported by test_verdicts_agree
        got_leaves = leaves(got.value)
        dense = {n: t for n, t in got_leaves if tensor_kind(t) == "dense"}
        compare(
            front,
            {n: torch_desc(t) for n, t in dense.items()},
            sharing({n: t.untyped_storage().data_ptr() for n, t in dense.items()}, empty),
            all_fields,
        )
        for n, t in dense.items():
            r = ref.get(n)
            if r is not None and (type(t) is not type(r) or t.requires_grad != r.requires_grad):
                problems.append(
                    f"{front}: {n!r} is {type(t).__name__}(requires_grad={t.requires_grad}), "
                    f"torch's is {type(r).__name__}(requires_grad={r.requires_grad})"
                )
        got_others = {n: t for n, t in got_leaves if tensor_kind(t) != "dense"}
        if list(got_others) != others:
            problems.append(f"{front}: non-dense tensors {list(got_others)} != torch's {others}")
        for n, t in got_others.items():
            r = dict(ref_leaves).get(n)
            if r is None:
                continue
            if (tensor_kind(t), t.dtype, t.shape, t.layout) != (
                tensor_kind(r),
                r.dtype,
                r.shape,
                r.layout,
            ):
                problems.append(f"{front}: {n!r} is {t!r}, torch's is {r!r}")
            elif tensor_kind(t) == "sparse" and not torch.equal(t.to_dense(), r.to_dense()):
                problems.append(f"{front}: sparse {n!r} differs from torch's")
            elif tensor_kind(t) == "quantized" and (
                not torch.equal(t.int_repr(), r.int_repr())
                or (t.q_scale(), t.q_zero_point()) != (r.q_scale(), r.q_zero_point())
            ):
                problems.append(f"{front}: quantized {n!r} differs from torch's")

    # fastserial.numpy.load: arrays over one buffer per storage.
    got = seen["fastserial.numpy.load"]
    if got.accepted:
        arrays = {n: a for n, a in leaves(got.value) if isinstance(a, np.ndarray)}
        compare(
            "fastserial.numpy.load",
            {n: numpy_desc(a) for n, a in arrays.items()},
            sharing({n: id(a.base if a.base is not None else a) for n, a in arrays.items()}, empty),
            all_fields,
        )

    # fastserial.open(framework="numpy"): metadata, and each tensor read on its own.
    got = seen["fastserial.open(numpy)"]
    if got.accepted:
        meta_desc, array_desc, keys = {}, {}, {}
        for n, (meta, arr) in got.value.items():
            meta_desc[n] = {
                "dtype": meta.torch_dtype,
                "shape": tuple(meta.shape),
                "stride": tuple(meta.stride),
                "storage_offset": meta.storage_offset,
                "storage_nbytes": meta.storage_nbytes,
            }
            d = numpy_desc(arr)
            array_desc[n] = {k: d[k] for k in ("dtype", "shape", "stride", "bytes")}
            keys[n] = meta.storage
        compare("fastserial.open metadata", meta_desc, sharing(keys, empty), all_fields[:5])
        compare(
            "fastserial.open get_tensor", array_desc, None, ("dtype", "shape", "stride", "bytes")
        )

    # inspect --json: the tensor list, and storage keys shared as torch shares storages.
    _, report, _ = seen["inspect"]
    if report is not None:
        listed = {
            t["name"]: {
                "dtype": t["dtype"],
                "shape": tuple(t["shape"]),
                "stride": tuple(t["stride"]),
                "storage_offset": t["storage_offset"],
                "storage_nbytes": t["storage_nbytes"],
            }
            for t in report["tensors"]
        }
        storage_keys = {t["name"]: t["storage"] for t in report["tensors"]}
        compare("inspect --json", listed, sharing(storage_keys, empty), all_fields[:5])
        listed_others = [o["name"] for o in report["other_tensors"]]
        if listed_others != others:
            problems.append(f"inspect --json: other_tensors {listed_others} != torch's {others}")

    assert not problems, f"{name}: front ends disagree with torch.load:\n  " + "\n  ".join(problems)


def test_missing_module_stays_missing(table):
    """Nothing imported the unimportable module while the table was loaded."""
    for name in CASES:
        observe(name, table[name])
    assert MISSING_MODULE not in sys.modules
    assert importlib.util.find_spec(MISSING_MODULE) is None
