"""The native state-dict pickler writes what the general pickler would.

``fastserial.save`` pickles dict / OrderedDict state dicts (str -> plain tensor) natively.
Each case here saves the same object through both paths and checks that torch.load
reads identical structures: keys and order, container type and ``_metadata``, dtypes,
shapes, strides, offsets, storage sharing and object identity. Objects of any other
shape must fall back to the general pickler.
"""

import io
import pickle
from collections import OrderedDict

import fastserial
import pytest
import torch
from fastserial import serialization


def _general_path_bytes(obj) -> bytes:
    """Saves ``obj`` with the native fast path disabled (as a non-default protocol-2
    pickle module would)."""
    buf = io.BytesIO()

    class PickleModule:
        Pickler = pickle.Pickler
        Unpickler = pickle.Unpickler

    fastserial.save(obj, buf, pickle_module=PickleModule)
    return buf.getvalue()


def _fast_path_bytes(obj) -> bytes:
    assert serialization._save_helper().fast_state_dict(obj) is not None, "fast path not taken"
    buf = io.BytesIO()
    fastserial.save(obj, buf)
    return buf.getvalue()


def _describe(obj):
    """Everything torch.load gives back that a user could observe."""
    items = list(obj.items())
    ptrs = {}
    out = [type(obj).__name__, getattr(obj, "_metadata", None)]
    for k, t in items:
        ptr = t.untyped_storage().data_ptr()
        ptrs.setdefault(ptr, len(ptrs))
        same_as = next(j for j, (_, u) in enumerate(items) if u is t)
        out.append(
            (
                k,
                t.dtype,
                tuple(t.shape),
                t.stride(),
                t.storage_offset(),
                t.requires_grad,
                t.untyped_storage().nbytes(),
                ptrs[ptr],
                same_as,
                t.cpu().contiguous().view(-1).view(torch.uint8).tolist() if t.numel() else [],
            )
        )
    return out


def _state_dicts():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)
    )
    sd = model.state_dict()
    yield "module state_dict with _metadata", sd
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tied = OrderedDict(a=base, view=base[1:, ::2], t=base.t(), again=base)
    yield "views, transposes and the same object twice", tied
    yield (
        "plain dict, many dtypes",
        {
            "f16": torch.ones(3, dtype=torch.float16),
            "bf16": torch.ones(3, dtype=torch.bfloat16),
            "u16": torch.arange(4, dtype=torch.int32).to(torch.uint16),
            "u64": torch.arange(4, dtype=torch.int64).to(torch.uint64),
            "f8": torch.zeros(2, dtype=torch.float8_e4m3fn),
            "c64": torch.ones(2, dtype=torch.complex64),
            "bool": torch.tensor([True, False]),
            "scalar": torch.tensor(3.5),
            "empty": torch.empty(0, 3),
            "grad": torch.ones(2, requires_grad=True),
            "big_offset": torch.arange(70_000)[65_600:],
        },
    )
    yield "more than one SETITEMS batch", {f"k{i}": torch.full((2,), float(i)) for i in range(2500)}


@pytest.mark.parametrize("name,obj", list(_state_dicts()), ids=[n for n, _ in _state_dicts()])
def test_fast_path_loads_like_the_general_pickler(name, obj):
    fast = torch.load(io.BytesIO(_fast_path_bytes(obj)), weights_only=True)
    general = torch.load(io.BytesIO(_general_path_bytes(obj)), weights_only=True)
    assert _describe(fast) == _describe(general)
    ours = fastserial.load(io.BytesIO(_fast_path_bytes(obj)))
    assert _describe(ours) == _describe(general)


@pytest.mark.parametrize(
    "obj",
    [
        {"w": torch.nn.Parameter(torch.ones(2))},  # a Parameter, not a plain tensor
        {"w": torch.ones(2), "step": 3},  # a non-tensor value
        {1: torch.ones(2)},  # a non-str key
        {"w": torch.ones(2, dtype=torch.complex64).conj()},  # tensor metadata (conj bit)
        OrderedDict(w=torch.ones(2)),  # (fast) - then an attribute other than _metadata:
    ],
    ids=["parameter", "int value", "int key", "conj", "ordered-plain"],
)
def test_other_shapes_fall_back_or_match(obj):
    helper = serialization._save_helper()
    fast = helper.fast_state_dict(obj)
    if isinstance(obj, OrderedDict):
        assert fast is not None
    else:
        assert fast is None
    # Whatever path is taken, torch reads back the same thing fastserial saved.
    buf = io.BytesIO()
    fastserial.save(obj, buf)
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert list(loaded) == list(obj)
    for k in obj:
        if isinstance(obj[k], torch.Tensor):
            assert type(loaded[k]) is type(obj[k])
            assert torch.equal(loaded[k].resolve_conj(), obj[k].resolve_conj())
        else:
            assert loaded[k] == obj[k]


def test_ordered_dict_with_other_attributes_falls_back():
    od = OrderedDict(w=torch.ones(2))
    od.note = "not _metadata"
    assert serialization._save_helper().fast_state_dict(od) is None
    buf = io.BytesIO()
    fastserial.save(od, buf)
    assert torch.load(io.BytesIO(buf.getvalue()), weights_only=True).note == "not _metadata"
