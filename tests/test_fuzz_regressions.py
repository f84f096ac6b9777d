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
