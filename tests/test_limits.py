"""Bounded resources: hostile sizes and counts are refused before any large allocation.

Each hostile checkpoint is built from a real one by editing its pickle (element
counts, view offsets and sizes, memo indices) or its zip records (declared sizes,
entry counts). Every one must raise ``fastserial.CheckpointError`` naming the file
(and the record where there is one) — quickly, and without the memory it declares:
the loads run in a child process whose address space is capped a little above what
it already uses, so any attempt to allocate the declared size fails the test, and
whose peak RSS must not jump.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import sys

import fastserial
import pytest
import torch
from conftest import run_python
from fastserial import _fastserial as native

# --------------------------------------------------------------------------- crafting


class _Storage:
    """Pickles as torch's storage persistent id ``('storage', type, key, location, numel)``."""

    def __init__(self, numel: int, key: str = "0", storage_type: str = "FloatStorage"):
        self.numel, self.key, self.storage_type = numel, key, storage_type


class _Tensor:
    """Pickles exactly like a dense tensor: ``_rebuild_tensor_v2(storage, offset, ...)``."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        args = (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict())
        return (torch._utils._rebuild_tensor_v2, args)


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", getattr(torch, obj.storage_type), obj.key, "cpu", obj.numel)
        return None


def _pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def checkpoint(data_pkl: bytes, storages: dict[str, bytes]) -> bytes:
    """A checkpoint laid out exactly as torch lays it out, with the given pickle."""
    out = io.BytesIO()
    w = native.ArchiveWriter(out, "archive")
    w.write_record("data.pkl", data_pkl)
    w.write_record(".format_version", b"1")
    w.write_record(".storage_alignment", b"64")
    w.write_record("byteorder", b"little")
    for key, data in storages.items():
        w.write_record(f"data/{key}", data)
    w.write_record("version", b"3\n")
    w.write_record(".data/serialization_id", w.serialization_id().encode())
    w.finish(fsync=False)
    return out.getvalue()


FOUR_FLOATS = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)


def tensor_checkpoint(numel=4, offset=0, size=(4,), stride=(1,), data=FOUR_FLOATS) -> bytes:
    return checkpoint(_pickle({"t": _Tensor(_Storage(numel), offset, size, stride)}), {"0": data})


# The tail of every torch / fastserial checkpoint: zip64 end record, locator, end record.
_EOCD = struct.Struct("<IHHHHIIH")
_LOCATOR = struct.Struct("<IIQI")
_ZIP64_EOCD = struct.Struct("<IQHHIIQQQQ")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")


def _tail(raw: bytes):
    eocd = list(_EOCD.unpack_from(raw, len(raw) - _EOCD.size))
    loc_at = len(raw) - _EOCD.size - _LOCATOR.size
    loc = list(_LOCATOR.unpack_from(raw, loc_at))
    assert loc[0] == 0x07064B50, "expected zip64 end records (torch always writes them)"
    z = list(_ZIP64_EOCD.unpack_from(raw, loc[2]))
    return eocd, loc, z


def with_zip64_entry_count(raw: bytes, entries: int) -> bytes:
    """``raw`` with its zip64 end record claiming ``entries`` records."""
    eocd, loc, z = _tail(raw)
    z[6] = z[7] = entries
    out = bytearray(raw)
    _ZIP64_EOCD.pack_into(out, loc[2], *z)
    eocd[3] = eocd[4] = 0xFFFF
    _EOCD.pack_into(out, len(out) - _EOCD.size, *eocd)
    return bytes(out)


def with_record_size(raw: bytes, record: str, size: int) -> bytes:
    """``raw`` with the central directory declaring ``size`` bytes for ``record``
    (through a zip64 extra field, so any 64-bit size can be declared)."""
    eocd, loc, z = _tail(raw)
    cd_size, cd_offset = z[8], z[9]
    pos, entries = cd_offset, []
    while pos < cd_offset + cd_size:
        fields = list(_CENTRAL.unpack_from(raw, pos))
        name_len, extra_len, comment_len = fields[10], fields[11], fields[12]
        var = raw[pos + _CENTRAL.size : pos + _CENTRAL.size + name_len + extra_len + comment_len]
        entries.append((fields, var))
        pos += _CENTRAL.size + len(var)
    cd = bytearray()
    found = False
    for fields, var in entries:
        name = var[: fields[10]].decode()
        if name.endswith("/" + record):
            found = True
            extra = struct.pack("<HHQQ", 1, 16, size, size)
            fields[8] = fields[9] = 0xFFFFFFFF
            fields[11] = len(extra)
            var = var[: fields[10]] + extra
            fields[12] = 0
        cd += _CENTRAL.pack(*fields) + var
    assert found, record
    new_z_at = cd_offset + len(cd)
    z[8] = len(cd)
    loc[2] = new_z_at
    eocd[5] = min(len(cd), 0xFFFFFFFF)
    return (
        raw[:cd_offset] + bytes(cd) + _ZIP64_EOCD.pack(*z) + _LOCATOR.pack(*loc) + _EOCD.pack(*eocd)
    )


def write(tmp_path, name: str, raw: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(raw)
    return str(path)


def assert_refused(path: str, *needles: str, **load_kwargs) -> str:
    for mmap in (False, True):
        with pytest.raises(fastserial.CheckpointError) as info:
            fastserial.load(path, mmap=mmap, **load_kwargs)
        msg = str(info.value)
        assert path in msg, f"message does not name the file: {msg!r}"
        for needle in needles:
            assert needle in msg, f"message does not mention {needle!r}: {msg!r}"
    with open(path, "rb") as fh, pytest.raises(fastserial.CheckpointError):
        fastserial.load(io.BytesIO(fh.read()), **load_kwargs)
    return msg


# --------------------------------------------------------------------------- sanity


def test_crafted_checkpoint_is_valid_for_torch_and_fastserial(tmp_path):
    path = write(tmp_path, "ok.pt", tensor_checkpoint(size=(2, 2), stride=(2, 1)))
    want = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.equal(torch.load(path)["t"], want)
    for mmap in (False, True):
        assert torch.equal(fastserial.load(path, mmap=mmap, verify=True)["t"], want)


def test_edited_zip_sizes_keep_the_archive_parseable(tmp_path):
    # Guard for the size edits below: rewriting the directory with the true size
    # through a zip64 extra field still gives a loadable checkpoint.
    raw = with_record_size(tensor_checkpoint(), "data/0", len(FOUR_FLOATS))
    path = write(tmp_path, "same.pt", raw)
    assert torch.equal(fastserial.load(path, verify=True)["t"], torch.tensor([1.0, 2.0, 3.0, 4.0]))


# --------------------------------------------------------------------------- 2**40 elements

HUGE = 2**40


def test_pickle_declaring_2_40_elements(tmp_path):
    path = write(tmp_path, "numel.pt", tensor_checkpoint(numel=HUGE))
    msg = assert_refused(path, "data/0")
    assert str(HUGE) in msg


def test_zip_declaring_2_40_element_storage(tmp_path):
    path = write(tmp_path, "zipsize.pt", with_record_size(tensor_checkpoint(), "data/0", 4 * HUGE))
    assert_refused(path, "data/0")


def test_pickle_and_zip_both_declaring_2_40_elements(tmp_path):
    raw = tensor_checkpoint(numel=HUGE, size=(HUGE,))
    path = write(tmp_path, "both.pt", with_record_size(raw, "data/0", 4 * HUGE))
    assert_refused(path, "data/0")
    assert_refused(path, "data/0", weights_only=False)


def test_data_pkl_declaring_2_40_bytes(tmp_path):
    path = write(tmp_path, "pkl.pt", with_record_size(tensor_checkpoint(), "data.pkl", HUGE))
    assert_refused(path, "data.pkl")


def test_view_of_2_40_elements_over_a_small_storage(tmp_path):
    path = write(tmp_path, "view.pt", tensor_checkpoint(size=(HUGE,)))
    assert_refused(path, "data/0")


# Children load every hostile file under an address-space cap; a load that tried to
# allocate what the file declares would fail with MemoryError, a torch allocation
# RuntimeError or an abort instead of CheckpointError.
_BOUNDED_CHILD = r"""
import io, json, resource, sys, time
import torch, fastserial

def vm_bytes():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")

ok = fastserial.load(sys.argv[1])   # warm up every code path and allocator first
cap = vm_bytes() + (1 << 30)
resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))
results = {}
for path in sys.argv[2:]:
    for mmap in (False, True):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t0 = time.perf_counter()
        try:
            fastserial.load(path, mmap=mmap)
            outcome = "loaded"
        except fastserial.CheckpointError as e:
            outcome = "CheckpointError"
        except BaseException as e:
            outcome = f"{type(e).__name__}: {e}"[:300]
        seconds = time.perf_counter() - t0
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        results[f"{path} mmap={mmap}"] = [outcome, seconds, grew]
print("RESULT " + json.dumps(results))
"""


def hostile_files(tmp_path) -> list[str]:
    memo = b"\x80\x02}r\x00\x00\x00\x80."  # EMPTY_DICT, LONG_BINPUT 2**31, STOP
    return [
        write(tmp_path, "numel.pt", tensor_checkpoint(numel=HUGE)),
        write(tmp_path, "zipsize.pt", with_record_size(tensor_checkpoint(), "data/0", 4 * HUGE)),
        write(
            tmp_path,
            "both.pt",
            with_record_size(tensor_checkpoint(numel=HUGE, size=(HUGE,)), "data/0", 4 * HUGE),
        ),
        write(tmp_path, "pkl.pt", with_record_size(tensor_checkpoint(), "data.pkl", HUGE)),
        write(tmp_path, "view.pt", tensor_checkpoint(size=(HUGE,))),
        write(tmp_path, "entries.pt", with_zip64_entry_count(tensor_checkpoint(), 2**31)),
        write(tmp_path, "memo.pt", checkpoint(memo, {})),
    ]


def test_hostile_sizes_fail_fast_without_allocating(tmp_path):
    good = write(tmp_path, "good.pt", tensor_checkpoint())
    paths = hostile_files(tmp_path)
    proc = run_python(_BOUNDED_CHILD, good, *paths, timeout=120)
    assert proc.returncode == 0, f"child exited with {proc.returncode}: {proc.stderr[-3000:]}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    results = json.loads(line[len("RESULT ") :])
    assert len(results) == 2 * len(paths)
    # The child's timeout bounds the time (touching 4 TiB would never end); memory is
    # what is measured: a refusal allocates next to nothing.
    for case, (outcome, _seconds, grew) in results.items():
        assert outcome == "CheckpointError", (case, outcome)
        assert grew < 64 << 20, (case, f"peak RSS grew by {grew} bytes")


# --------------------------------------------------------------------------- entry counts


def test_zip64_end_record_claiming_2_31_entries(tmp_path):
    path = write(tmp_path, "entries.pt", with_zip64_entry_count(tensor_checkpoint(), 2**31))
    msg = assert_refused(path)
    assert "entries" in msg


def test_entry_count_larger_than_the_directory(tmp_path):
    # Below the hard cap, but more than the central directory's bytes can describe.
    path = write(tmp_path, "entries.pt", with_zip64_entry_count(tensor_checkpoint(), 2**20))
    assert_refused(path, "entries")


# --------------------------------------------------------------------------- memo abuse


def test_long_binput_memo_index_2_31(tmp_path):
    path = write(tmp_path, "memo.pt", checkpoint(b"\x80\x02}r\x00\x00\x00\x80.", {}))
    assert_refused(path, "data.pkl", "memo")
    assert_refused(path, "data.pkl", "memo", weights_only=False)


def test_long_binput_inside_a_real_pickle(tmp_path):
    # A real state dict's pickle whose first BINPUT becomes LONG_BINPUT 2**31.
    pkl = _pickle({"t": _Tensor(_Storage(4), 0, (4,), (1,))})
    at = pkl.index(b"q\x00")
    evil = pkl[:at] + b"r\x00\x00\x00\x80" + pkl[at + 2 :]
    path = write(tmp_path, "memo2.pt", checkpoint(evil, {"0": FOUR_FLOATS}))
    assert_refused(path, "memo")


def test_memo_get_before_put(tmp_path):
    path = write(tmp_path, "get.pt", checkpoint(b"\x80\x02j\x00\x00\x00\x80.", {}))
    assert_refused(path, "data.pkl")


# --------------------------------------------------------------------------- inconsistencies


@pytest.mark.parametrize("numel", [3, 5, 0])
def test_storage_size_differs_from_pickle(tmp_path, numel):
    path = write(tmp_path, f"size{numel}.pt", tensor_checkpoint(numel=numel, size=(min(numel, 1),)))
    assert_refused(path, "data/0")
    assert_refused(path, "data/0", weights_only=False)


@pytest.mark.parametrize(
    "offset,size,stride",
    [
        (1, (4,), (1,)),  # one element too far
        (4, (1,), (1,)),  # starts at the end
        (0, (2, 3), (2, 1)),  # last row runs past
        (0, (2,), (4,)),  # stride jumps past
        (2**62, (1,), (1,)),  # offset overflows byte arithmetic
        (0, (2, 2**62), (1, 2**62)),  # extent overflows 64 bits
        (-1, (1,), (1,)),  # negative offset
        (0, (-4,), (1,)),  # negative size
    ],
)
def test_view_reaching_past_its_storage(tmp_path, offset, size, stride):
    path = write(tmp_path, "view.pt", tensor_checkpoint(offset=offset, size=size, stride=stride))
    assert_refused(path, "data/0")


def test_two_views_one_past_the_end(tmp_path):
    s = _Storage(4)
    obj = {"a": _Tensor(s, 0, (4,), (1,)), "b": _Tensor(s, 2, (3,), (1,))}
    path = write(tmp_path, "views.pt", checkpoint(_pickle(obj), {"0": FOUR_FLOATS}))
    assert_refused(path, "data/0")


@pytest.mark.skipif(sys.byteorder != "little", reason="crafted files are little-endian")
def test_view_errors_under_weights_only_false(tmp_path):
    path = write(tmp_path, "view.pt", tensor_checkpoint(offset=1))
    assert_refused(path, "data/0", weights_only=False)


# --------------------------------------------------------------------------- legacy format


def legacy_checkpoint(numel: int) -> bytes:
    """A pre-1.6 (non-zip) checkpoint with one float storage declaring ``numel``
    elements but holding four."""
    from fastserial import legacy

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                return ("storage", torch.FloatStorage, "k0", "cpu", obj.numel, None)
            return None

    buf = io.BytesIO()
    for header in (legacy.MAGIC_NUMBER, legacy.PROTOCOL_VERSION, legacy._SYS_INFO):
        pickle.dump(header, buf, protocol=2)
    Pickler(buf, protocol=2).dump({"t": _Tensor(_Storage(numel), 0, (4,), (1,))})
    pickle.dump(["k0"], buf, protocol=2)
    buf.write(struct.pack("<q", 4) + FOUR_FLOATS)
    return buf.getvalue()


def test_legacy_checkpoint_is_valid(tmp_path):
    path = write(tmp_path, "legacy.pt", legacy_checkpoint(4))
    assert torch.equal(fastserial.load(path)["t"], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.equal(torch.load(path)["t"], torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_legacy_checkpoint_declaring_2_40_elements(tmp_path):
    path = write(tmp_path, "legacy_huge.pt", legacy_checkpoint(HUGE))
    with pytest.raises(fastserial.CheckpointError) as info:
        fastserial.load(path)
    assert path in str(info.value)
