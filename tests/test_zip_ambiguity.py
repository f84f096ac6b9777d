"""One zip reading, torch's, or a refusal (issue 13, item 4; issue 12's trailing bytes).

torch reads checkpoints with miniz 3.0.2 (``PyTorchStreamReader``): it takes the *last*
end-of-central-directory signature near the end of the file, whatever its comment
length; uses every field of the zip64 end record the locator points to; and looks names
up case-insensitively, in a sorted directory where duplicates are found in no defined
order. Archives that torch and other zip readers (or fastserial's former reader) read
differently are crafted here from a real ``torch.save`` output, and every front end —
``fastserial.load``, ``fastserial.get_unsafe_globals_in_checkpoint``,
``fastserial.numpy.load`` — must refuse them with a ``CheckpointError`` naming the file
and the ambiguity. Several hide a ``builtins.eval`` pickle where torch reads it while a
reader that takes the first-found (or classic, or strictly terminated) directory sees a
harmless one: the scan must never call those safe.

A checkpoint followed by trailing bytes is not ambiguous: it loads exactly as torch loads
it, including torch's refusal once the end record lies beyond its backward scan.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
import zlib

import fastserial
import fastserial.numpy as fsnp
import numpy as np
import pytest
import torch

# --------------------------------------------------------------------------- crafting


# eval("1 + 1"), as a protocol-2 pickle naming ``builtins.eval``.
EVIL = b"\x80\x02cbuiltins\neval\nq\x00X\x05\x00\x00\x001 + 1q\x01\x85q\x02Rq\x03."
assert b"builtins\neval" in EVIL


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def raw() -> bytes:
    return _saved({"w": torch.arange(6.0).reshape(2, 3), "i": torch.tensor([1, 2]), "step": 3})


def _tail(raw: bytes) -> dict:
    """Offsets of torch's end records (zip64 record, locator, classic record)."""
    eocd = len(raw) - 22
    loc = eocd - 20
    z64 = loc - 56
    assert raw[eocd : eocd + 4] == b"PK\x05\x06"
    assert raw[loc : loc + 4] == b"PK\x06\x07"
    assert raw[z64 : z64 + 4] == b"PK\x06\x06"
    entries, cd_size, cd = struct.unpack_from("<QQQ", raw, z64 + 32)
    return {"eocd": eocd, "z64": z64, "entries": entries, "cd": cd, "cd_size": cd_size}


def _entries(cd: bytes) -> list[tuple[bytes, bytes, int]]:
    """``(name, raw entry, local header offset)`` of each central-directory entry."""
    out, pos = [], 0
    while pos < len(cd):
        assert cd[pos : pos + 4] == b"PK\x01\x02"
        n, e, c = struct.unpack_from("<HHH", cd, pos + 28)
        end = pos + 46 + n + e + c
        out.append(
            (cd[pos + 46 : pos + 46 + n], cd[pos:end], struct.unpack_from("<I", cd, pos + 42)[0])
        )
        pos = end
    return out


def _local(name: bytes, data: bytes) -> bytes:
    crc, n = zlib.crc32(data), len(data)
    return (
        struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, crc, n, n, len(name), 0)
        + name
        + data
    )


def _central(name: bytes, offset: int, data: bytes) -> bytes:
    crc, n = zlib.crc32(data), len(data)
    fields = (0x02014B50, 20, 20, 0, 0, 0, 0, crc, n, n, len(name), 0, 0, 0, 0, 0, offset)
    return struct.pack("<IHHHHHHIIIHHHHHII", *fields) + name


def _end_records(at: int, n: int, cd_offset: int, cd_size: int) -> bytes:
    """What torch writes after a directory: zip64 end record (at ``at``), locator,
    classic end record (no comment)."""
    z64 = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 0x031E, 45, 0, 0, n, n, cd_size, cd_offset)
    locator = struct.pack("<IIQI", 0x07064B50, 0, at, 1)
    m16, m32 = min(n, 0xFFFF), 0xFFFFFFFF
    eocd = struct.pack(
        "<IHHHHIIH", 0x06054B50, 0, 0, m16, m16, min(cd_size, m32), min(cd_offset, m32), 0
    )
    return z64 + locator + eocd


def _evil_directory(raw: bytes, evil_at: int) -> bytes:
    """torch's directory again, with data.pkl pointing at a local record at ``evil_at``."""
    t = _tail(raw)
    return b"".join(
        _central(name, evil_at, EVIL) if name.endswith(b"/data.pkl") else entry
        for name, entry, _ in _entries(raw[t["cd"] : t["z64"]])
    )


def two_end_records(raw: bytes) -> bytes:
    """A second directory (reading the eval pickle) and end records appended, then 5
    bytes; the first end record's comment stretched to the end of the file. torch takes
    the last end record; a strict reader (comment must end the file) the first."""
    t = _tail(raw)
    out = bytearray(raw)
    evil_at = len(out)
    out += _local(b"archive/data.pkl", EVIL)
    cd = _evil_directory(raw, evil_at)
    cd_at = len(out)
    out += cd
    out += _end_records(len(out), t["entries"], cd_at, len(cd))
    out += b"\x99" * 5
    struct.pack_into("<H", out, t["eocd"] + 20, len(out) - len(raw))
    return bytes(out)


def zip64_classic_disagree(raw: bytes) -> bytes:
    """The zip64 end record points to a directory reading the eval pickle, the classic
    record (not 0xFFFFFFFF) to torch's original one, at a larger offset."""
    t = _tail(raw)
    out = bytearray(raw[: t["cd"]])
    evil_at = len(out)
    out += _local(b"archive/data.pkl", EVIL)
    original = raw[t["cd"] : t["z64"]]
    evil = _evil_directory(raw, evil_at)
    assert len(evil) == len(original)
    evil_cd = len(out)
    out += evil
    original_cd = len(out)
    out += original
    end = bytearray(_end_records(len(out), t["entries"], evil_cd, len(evil)))
    struct.pack_into("<I", end, len(end) - 22 + 16, original_cd)
    return bytes(out + end)


def _with_extra_entry(raw: bytes, name: bytes, data: bytes, *, first: bool, pad: int = 0) -> bytes:
    """torch's records plus one more, its directory entry first or last, and ``pad``
    harmless empty records (``archive/pad/N``) before it."""
    t = _tail(raw)
    out = bytearray(raw[: t["cd"]])
    added = []
    for i in range(pad):
        added.append(_central(b"archive/pad/%d" % i, len(out), b""))
        out += _local(b"archive/pad/%d" % i, b"")
    at = len(out)
    out += _local(name, data)
    entries = [entry for _, entry, _ in _entries(raw[t["cd"] : t["z64"]])] + added
    extra = _central(name, at, data)
    cd = b"".join([extra, *entries] if first else [*entries, extra])
    cd_at = len(out)
    out += cd
    return bytes(out + _end_records(len(out), len(entries) + 1, cd_at, len(cd)))


def _torch_reads_eval(data: bytes) -> bool:
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError as e:
        return "eval" in str(e)
    return False


def _colliding(raw: bytes, names: list[bytes]) -> bytes:
    """A second data.pkl (the eval pickle) under one of ``names``, placed where torch's
    reader finds it. miniz sorts the directory case-insensitively (heap sort, not
    stable) and binary-searches it, so which of two colliding entries it returns depends
    on the entry count and order: the placement is searched, with torch as the oracle."""
    for pad in range(8):
        for name in names:
            for first in (False, True):
                data = _with_extra_entry(raw, name, EVIL, first=first, pad=pad)
                if _torch_reads_eval(data):
                    return data
    raise AssertionError("no placement makes torch read the colliding entry")


def duplicate_name(raw: bytes) -> bytes:
    """A second ``archive/data.pkl`` (the eval pickle), placed where torch finds it."""
    return _colliding(raw, [b"archive/data.pkl"])


def case_collision(raw: bytes) -> bytes:
    """``archive/DATA.PKL`` (or another casing; the eval pickle) beside
    ``archive/data.pkl``: an exact-name lookup finds the harmless original, torch's
    case-insensitive lookup the eval one."""
    return _colliding(raw, [b"archive/DATA.PKL", b"archive/Data.pkl", b"archive/data.PKL"])


def case_collision_either_way(raw: bytes) -> bytes:
    """Colliding names are refused wherever torch's search happens to land."""
    return _with_extra_entry(raw, b"archive/Data.pkl", EVIL, first=True)


def _rezipped(raw: bytes, rename=None, replace=None) -> bytes:
    """torch's records written again by Python's zipfile (offsets from its own start)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            name, data = info.filename, src.read(info.filename)
            if replace and name.endswith(replace[0]):
                data = replace[1]
            if rename and name.endswith(rename[0]):
                name, data = name.replace(rename[0], rename[1]), rename[2]
            dst.writestr(name, data)
    return out.getvalue()


def concatenated(raw: bytes) -> bytes:
    """``cat a.pt b.zip``: b (reading the eval pickle) counts offsets from its own start.
    Readers that allow for prepended data (Python's zipfile) read b; torch reads b's
    offsets as they are."""
    return raw + _rezipped(raw, replace=("/data.pkl", EVIL))


def overlapping_records(raw: bytes) -> bytes:
    """``data/0`` declares enough bytes to cover the next record's local header."""
    t = _tail(raw)
    out = bytearray(raw)
    entries = _entries(raw[t["cd"] : t["z64"]])
    offsets = sorted(off for _, _, off in entries)
    pos = t["cd"]
    for name, entry, off in entries:
        if name.endswith(b"/data/0"):
            nxt = next(o for o in offsets if o > off)
            size = nxt - off  # from its header to the next header: surely past it
            struct.pack_into("<II", out, pos + 20, size, size)
        pos += len(entry)
    return bytes(out)


def outside_top_folder(raw: bytes) -> bytes:
    """A record outside the top folder (torch.load refuses these too)."""
    return _with_extra_entry(raw, b"ARCHIVE/data.pkl", EVIL, first=False)


# name -> (builder, what the refusal names, whether torch reads the eval pickle)
CASES = {
    "two_end_records": (two_end_records, "two end-of-central-directory records", True),
    "zip64_classic_disagree": (
        zip64_classic_disagree,
        "zip64 and classic end records disagree on the central directory's offset",
        True,
    ),
    "duplicate_name": (duplicate_name, "two records are named 'archive/data.pkl'", True),
    "case_collision": (case_collision, "differ only in case", True),
    "case_collision_either_way": (case_collision_either_way, "differ only in case", False),
    "concatenated": (concatenated, "bytes lie between the central directory", False),
    "overlapping_records": (overlapping_records, "overlap", False),
    "outside_top_folder": (outside_top_folder, "not inside the archive's top folder", False),
}


# ------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("case", sorted(CASES))
def test_crafted_archive_is_refused_by_every_front_end(case, raw, tmp_path):
    build, needle, _ = CASES[case]
    data = build(raw)
    path = tmp_path / "crafted.pt"
    path.write_bytes(data)
    calls = {
        "load": lambda: fastserial.load(path),
        "load(BytesIO)": lambda: fastserial.load(io.BytesIO(data)),
        "load(mmap=True)": lambda: fastserial.load(path, mmap=True),
        "load(weights_only=False)": lambda: fastserial.load(path, weights_only=False),
        "get_unsafe_globals_in_checkpoint": lambda: fastserial.get_unsafe_globals_in_checkpoint(
            path
        ),
        "get_unsafe_globals_in_checkpoint(BytesIO)": (
            lambda: fastserial.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
        ),
        "numpy.load": lambda: fsnp.load(path),
        "numpy.load(mmap=True)": lambda: fsnp.load(path, mmap=True),
    }
    for what, call in calls.items():
        with pytest.raises(fastserial.CheckpointError) as info:
            call()
        msg = str(info.value)
        assert needle in msg, f"{what}: {msg}"
        assert ("<BytesIO>" if "BytesIO" in what else "crafted.pt") in msg, f"{what}: {msg}"


@pytest.mark.parametrize("case", sorted(c for c, (_, _, evil) in CASES.items() if evil))
def test_torch_reads_the_hidden_eval_pickle(case, raw):
    """Why these files matter: torch's reader finds the eval pickle in each, so a scan
    that reported them safe would send users to load them with weights_only=False."""
    build, _, _ = CASES[case]
    with pytest.raises(pickle.UnpicklingError, match="eval"):
        torch.load(io.BytesIO(build(raw)), weights_only=True)


def test_the_hidden_pickle_is_what_the_first_found_entry_hides(raw):
    """In the case collision, the entry an exact-name (first-found) lookup returns is
    torch's harmless pickle; the eval one only torch's case-insensitive lookup finds."""
    data = case_collision(raw)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        names = [n for n in z.namelist() if n.lower() == "archive/data.pkl"]
        assert len(names) == 2 and "archive/data.pkl" in names
        assert b"eval" not in z.read("archive/data.pkl")
        (other,) = [n for n in names if n != "archive/data.pkl"]
        assert b"builtins\neval" in z.read(other)
    with pytest.raises(fastserial.CheckpointError, match="differ only in case"):
        fastserial.get_unsafe_globals_in_checkpoint(io.BytesIO(data))


def test_ambiguities_are_named_as_such(raw):
    for case in ("two_end_records", "zip64_classic_disagree", "duplicate_name", "concatenated"):
        with pytest.raises(fastserial.CheckpointError, match="ambiguous archive"):
            fastserial.load(io.BytesIO(CASES[case][0](raw)))


def test_torch_written_files_are_never_refused(raw, tmp_path):
    # Upper-case stems name the top folder; many records use zip64 end records.
    objs = [
        {"w": torch.arange(6.0)},
        {f"T{i}": torch.full((3,), float(i)) for i in range(300)},
        [torch.zeros(0), torch.ones(2, dtype=torch.float16), "text", {"nested": (1, 2)}],
    ]
    for i, obj in enumerate(objs):
        path = tmp_path / f"Model_V{i}.pt"
        torch.save(obj, path)
        got = fastserial.load(path)
        want = torch.load(path)
        assert type(got) is type(want)
        assert fastserial.get_unsafe_globals_in_checkpoint(path) == []
        fsnp.load(path)


def test_a_case_only_record_name_reads_as_torch_reads_it(raw, tmp_path):
    """``BYTEORDER`` (no ``byteorder``) saying "big": torch's case-insensitive lookup
    finds it and swaps every tensor, and so does fastserial."""
    data = _rezipped(raw, rename=("/byteorder", "/BYTEORDER", b"big"))
    path = tmp_path / "case.pt"
    path.write_bytes(data)
    want = torch.load(path)
    assert not torch.equal(want["w"], torch.arange(6.0).reshape(2, 3))
    got = fastserial.load(path)
    assert torch.equal(got["w"], want["w"]) and torch.equal(got["i"], want["i"])
    arrays = fsnp.load(path)
    assert np.array_equal(arrays["w"], want["w"].numpy())


# -------------------------------------------------------------------- trailing bytes


def _junk(n: int) -> bytes:
    junk = bytes(((i * 7 + 3) & 0xFF) | 0x80 for i in range(n))
    assert b"PK\x05\x06" not in junk
    return junk


SMALL = {"w": torch.arange(6.0).reshape(2, 3), "i": torch.tensor([1, 2]), "step": 3}
BIG = {**SMALL, "big": torch.arange(40_000, dtype=torch.float32)}

# (object, trailing bytes, whether torch 2.15 loads it). torch's reader scans back 4096
# bytes at a time, at most ~68 KiB; in a small file it stops once its next read would
# start before offset 0, so a 1.5 KiB checkpoint tolerates only 4074 trailing bytes.
TRAILING = [
    ("small", 100, True),
    ("small", 4074, True),
    ("small", 4075, False),
    ("small", 70 * 1024, False),
    ("big", 100, True),
    ("big", 65_536, True),
    ("big", 69_562, True),
    ("big", 69_563, False),
    ("big", 70 * 1024, False),
]


def _load_file(path):
    with open(path, "rb") as fh:
        return fastserial.load(fh)


def _same(got, want) -> None:
    assert list(got) == list(want)
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


@pytest.mark.parametrize(("which", "n", "torch_loads"), TRAILING)
def test_trailing_bytes_load_as_torch_loads_them(which, n, torch_loads, tmp_path):
    obj = SMALL if which == "small" else BIG
    path = tmp_path / "trailing.pt"
    data = _saved(obj) + _junk(n)
    path.write_bytes(data)
    try:
        want = torch.load(path)
    except (RuntimeError, OSError, ValueError):
        want = None
    assert (want is not None) == torch_loads, "torch's behaviour changed"
    calls = {
        "load": lambda: fastserial.load(path),
        "load(BytesIO)": lambda: fastserial.load(io.BytesIO(data)),
        "load(mmap=True)": lambda: fastserial.load(path, mmap=True),
        "load(open file)": lambda: _load_file(path),
    }
    if want is None:
        for what, call in {
            **calls,
            "scan": lambda: fastserial.get_unsafe_globals_in_checkpoint(path),
            "numpy.load": lambda: fsnp.load(path),
        }.items():
            with pytest.raises(fastserial.CheckpointError, match="end-of-central-directory") as e:
                call()
            assert "trailing.pt" in str(e.value) or "BytesIO" in str(e.value), what
        return
    for what, call in calls.items():
        got = call()
        try:
            _same(got, want)
        except AssertionError as e:
            raise AssertionError(f"{what}: {e}") from e
    assert fastserial.get_unsafe_globals_in_checkpoint(path) == (
        torch.serialization.get_unsafe_globals_in_checkpoint(path)
    )
    arrays = fsnp.load(path)
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert np.array_equal(arrays[key], value.numpy()), key
        else:
            assert arrays[key] == value
