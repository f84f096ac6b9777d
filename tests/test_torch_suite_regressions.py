"""Cases where torch's own serialization test suite passed with torch.load/torch.save
and failed through fastserial. Each case is rebuilt here with our own code and
checked against torch itself."""

from __future__ import annotations

import io
import pickle
import struct

import fastserial
import pytest
import torch
from fastserial import CheckpointError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _legacy_stream_with_bytes_keys() -> tuple[bytes, torch.Tensor]:
    """A legacy (pre-1.6) checkpoint whose storage keys are ``bytes``, as Python 2
    wrote them (str keys come back as bytes under ``encoding='bytes'``)."""
    tensor = torch.arange(6, dtype=torch.float32).reshape(2, 3)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, torch.storage.TypedStorage):
                return ("storage", torch.FloatStorage, "k0", "cpu", obj.size(), None)
            return None

    def py2_strings(data: bytes) -> bytes:
        # BINUNICODE -> SHORT_BINSTRING (Python 2's str), same memo layout.
        for text in (b"k0", b"label"):
            data = data.replace(
                b"X" + struct.pack("<I", len(text)) + text, b"U" + bytes([len(text)]) + text
            )
        return data

    out = io.BytesIO()
    for header in (_LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(header, out, protocol=2)
    obj = io.BytesIO()
    Pickler(obj, protocol=2).dump(["label", tensor])
    out.write(py2_strings(obj.getvalue()))
    out.write(py2_strings(pickle.dumps(["k0"], protocol=2)))
    out.write(struct.pack("<q", tensor.numel()))
    out.write(tensor.numpy().tobytes())
    return out.getvalue(), tensor


@pytest.mark.parametrize("weights_only", [True, False])
def test_legacy_bytes_storage_keys_load_like_torch(weights_only):
    data, tensor = _legacy_stream_with_bytes_keys()
    expected = torch.load(io.BytesIO(data), weights_only=weights_only, encoding="bytes")
    got = fastserial.load(io.BytesIO(data), weights_only=weights_only, encoding="bytes")
    assert expected[0] == got[0] == b"label"
    assert torch.equal(expected[1], tensor)
    assert torch.equal(got[1], tensor)


class _ThrowingUnpickler(pickle.Unpickler):
    def load(self, *args, **kwargs):
        raise RuntimeError("from the user's unpickler")


class _ThrowingModule:
    Unpickler = _ThrowingUnpickler
    load = _ThrowingUnpickler.load


@pytest.mark.parametrize("zip_format", [True, False])
def test_custom_pickle_module_error_passes_through(zip_format):
    buf = io.BytesIO()
    torch.save(torch.eye(2), buf, _use_new_zipfile_serialization=zip_format)
    for load in (torch.load, fastserial.load):
        buf.seek(0)
        with pytest.raises(RuntimeError, match="from the user's unpickler"):
            load(buf, pickle_module=_ThrowingModule)


class _ReadOnlyStream:
    """A stream with read() only: no seek, no tell."""

    def __init__(self, data: bytes):
        self._inner = io.BytesIO(data)

    def read(self, size=-1):
        return self._inner.read(size)

    def readline(self, size=-1):
        return self._inner.readline(size)


def test_unseekable_non_checkpoint_raises_torchs_attribute_error():
    with pytest.raises(AttributeError, match="seekable"):
        torch.load(_ReadOnlyStream(b"data"))
    with pytest.raises(
        AttributeError, match="You can only torch.load from a file that is seekable"
    ):
        fastserial.load(_ReadOnlyStream(b"data"))
    # ... and it is still the CheckpointError saying what the bytes are.
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        fastserial.load(_ReadOnlyStream(b"data"))


def test_unseekable_checkpoint_still_loads():
    buf = io.BytesIO()
    torch.save([torch.ones(3)], buf, _use_new_zipfile_serialization=False)
    loaded = fastserial.load(_ReadOnlyStream(buf.getvalue()))
    assert torch.equal(loaded[0], torch.ones(3))


@pytest.mark.parametrize("kwargs", [{}, {"weights_only": False}, {"mmap": True}])
@pytest.mark.parametrize(
    "obj",
    [
        {"w": torch.randn(3)},
        [torch.tensor([]), torch.tensor([], dtype=torch.int64)],
    ],
    ids=["state_dict", "empty_tensors"],
)
def test_bytesio_closes_while_result_lives(obj, kwargs):
    """``with io.BytesIO() as f: ...; r = torch.load(f)``: leaving the block closes
    the buffer, which must not still be exported to the loaded result."""
    import gc

    gc.disable()  # the buffer must be released without the garbage collector
    try:
        # torch refuses mmap=True on a buffer (a documented difference).
        loads = (fastserial.load,) if kwargs.get("mmap") else (torch.load, fastserial.load)
        for load in loads:
            with io.BytesIO() as f:
                torch.save(obj, f)
                f.seek(0)
                result = load(f, **kwargs)
            assert result is not None
            with io.BytesIO() as f:  # and resizing it afterwards works
                torch.save(obj, f)
                f.seek(0)
                result = load(f, **kwargs)
                f.seek(0)
                f.write(b"x" * (len(f.getvalue()) + 10))
    finally:
        gc.enable()


@pytest.mark.parametrize(
    "wrap", [lambda t: t, lambda t: [t], lambda t: {"t": t}], ids=["tensor", "list", "state_dict"]
)
def test_zerotensor_save_raises_torchs_error(wrap):
    t = torch._efficientzerotensor((4, 5))
    for save in (torch.save, fastserial.save):
        with pytest.raises(RuntimeError, match="ZeroTensor is not serializable"):
            save(wrap(t), io.BytesIO())
