"""What fuzz/unpickler_fuzz.py and the cargo-fuzz writer target found, as tests."""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict

import fastserial
import pytest
import torch
from fastserial import _fastserial as native


class _Rebuild:
    """Pickles as ``torch._utils._rebuild_tensor_v2`` with chosen arguments."""

    def __init__(self, t, *, metadata=None):
        self.t = t
        self.metadata = metadata

    def __reduce__(self):
        args = (self.t.untyped_storage(), 0, tuple(self.t.shape), self.t.stride(), False)
        return (torch._utils._rebuild_tensor_v2, (*args, OrderedDict(), self.metadata))


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_tensor_metadata_that_is_no_dict_is_a_refusal():
    data = _saved({"t": _Rebuild(torch.ones(2), metadata=[1, 2])})
    with pytest.raises(AssertionError):  # torch's own, untyped
        torch.load(io.BytesIO(data))
    with pytest.raises(pickle.UnpicklingError):
        fastserial.load(io.BytesIO(data))


def test_storage_location_that_is_no_string_is_a_refusal():
    data = _saved({"t": torch.ones(2)})
    # The location 'cpu' in the persistent id becomes the int 7 (BININT1).
    pkl_at = data.index(b"X\x03\x00\x00\x00cpu")
    crafted = io.BytesIO()

    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(crafted, "w") as dst:
        for info in src.infolist():
            body = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                body = body.replace(b"X\x03\x00\x00\x00cpu", b"K\x07", 1)
            dst.writestr(info.filename, body)
    assert pkl_at > 0
    with pytest.raises(pickle.UnpicklingError, match="location"):
        fastserial.load(io.BytesIO(crafted.getvalue()))


def test_writer_refuses_record_names_zip_cannot_hold():
    """A name over 65535 bytes does not fit the zip headers' 16-bit length field: the
    writer refuses it instead of finishing a corrupt archive."""
    w = native.ArchiveWriter(io.BytesIO(), "archive")
    w.write_record("data.pkl", b"x")
    with pytest.raises(Exception, match="65535"):
        w.write_record("x" * 70_000, b"x")


class _WithItems:
    """Pickles as ``callable(*args)`` followed by SETITEM(S) or APPEND(S) on the result."""

    def __init__(self, fn, args, *, items=None, appends=None):
        self.reduced = (fn, args, None, appends, items)

    def __reduce__(self):
        fn, args, state, appends, items = self.reduced
        return (
            fn,
            args,
            state,
            None if appends is None else iter(appends),
            None if items is None else iter(items),
        )


def _tensor_args(t):
    typed = torch.storage.TypedStorage(
        wrap_storage=t.untyped_storage(), dtype=t.dtype, _internal=True
    )
    return (typed, 0, tuple(t.shape), t.stride(), False, OrderedDict())


def _both(data: bytes):
    """(torch.load's exception, fastserial.load's exception) on the same bytes."""
    out = []
    for load in (torch.load, fastserial.load):
        with pytest.raises(Exception) as info:
            load(io.BytesIO(data), weights_only=True)
        out.append(info.value)
    return out


def _weights_only_outcomes(data: bytes):
    """What torch.load and fastserial.load do with the bytes under weights_only: the
    exception each raised, or the value each returned."""
    out = []
    for load in (torch.load, fastserial.load):
        try:
            out.append(load(io.BytesIO(data), weights_only=True))
        except Exception as e:  # noqa: BLE001 - compared below
            out.append(e)
    return out


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("n_items", [1, 2], ids=["SETITEM", "SETITEMS"])
def test_setitem_on_a_tensor_is_treated_as_torch_treats_it(n_items, legacy):
    """No BUILD in the pickle: only the scan can see that a SETITEM's target is no dict.
    torch >= 2.7 refuses it under weights_only; 2.6 runs it. fastserial follows the
    torch installed, and runs it on filled tensors only (the fuzzer's finding: it ran
    on a lazy tensor before its bytes were read, and the fill undid it)."""
    items = [(i, 7.0) for i in range(n_items)]
    t = torch.zeros(4)
    buf = io.BytesIO()
    obj = {"t": _WithItems(torch._utils._rebuild_tensor_v2, _tensor_args(t), items=items)}
    torch.save(obj, buf, _use_new_zipfile_serialization=not legacy)
    data = buf.getvalue()
    want = [7.0] * n_items + [0.0] * (4 - n_items)
    theirs, ours = _weights_only_outcomes(data)
    if isinstance(theirs, Exception):
        assert isinstance(theirs, pickle.UnpicklingError) and "SETITEM" in str(theirs)
        assert isinstance(ours, pickle.UnpicklingError) and "SETITEM" in str(ours)
    else:
        assert ours["t"].tolist() == theirs["t"].tolist()
    # Without weights_only both run it: on the filled tensor in a zip file; in a legacy
    # file, whose bytes follow the pickle, before the fill (which undoes it), in both.
    theirs = torch.load(io.BytesIO(data), weights_only=False)["t"].tolist()
    assert fastserial.load(io.BytesIO(data), weights_only=False)["t"].tolist() == theirs
    if not legacy:
        assert theirs == want


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_append_on_a_dict_is_refused_as_torch_refuses_it(legacy):
    buf = io.BytesIO()
    torch.save(
        {"d": _WithItems(OrderedDict, (), appends=[1])},
        buf,
        _use_new_zipfile_serialization=not legacy,
    )
    theirs, ours = _both(buf.getvalue())
    assert isinstance(theirs, pickle.UnpicklingError) and "append" in str(theirs).lower()
    assert isinstance(ours, pickle.UnpicklingError) and "APPEND" in str(ours)


def test_runtime_error_of_a_rebuild_is_typed_and_still_torchs_runtime_error():
    """An unknown qscheme: torch.load raises RuntimeError for it (protocol 2); a
    weights-only fastserial load raises an UnpicklingError that is that RuntimeError
    too, so that both `except` clauses catch it (the fuzzer's finding, in protocol 4,
    where torch refuses the file for its FRAME opcode)."""
    q = torch.quantize_per_tensor(torch.ones(4), 0.5, 0, torch.quint8)
    params = (133, 0.5, 0)  # qscheme 133 does not exist
    args = (q.untyped_storage(), 0, (4,), (1,), params, False, OrderedDict())
    for protocol in (2, 4):
        buf = io.BytesIO()
        torch.save(
            {"q": _WithItems(torch._utils._rebuild_qtensor, args)}, buf, pickle_protocol=protocol
        )
        data = buf.getvalue()
        theirs, ours = _both(data)
        expected = RuntimeError if protocol == 2 else pickle.UnpicklingError
        assert isinstance(theirs, expected), theirs
        assert isinstance(ours, RuntimeError) and isinstance(ours, pickle.UnpicklingError)
        assert "qscheme" in str(ours)
        with pytest.raises(RuntimeError, match="qscheme"):  # not weights_only: unchanged
            fastserial.load(io.BytesIO(data), weights_only=False)
