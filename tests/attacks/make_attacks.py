"""The attack corpus of issue 13: small crafted checkpoints, one or more per class.

Every case is a function returning the bytes of one file (< 1 MiB), built by hand
from pickle opcodes and zip records, so that the corpus does not depend on any
writer under test (the sparse and nested-tensor cases edit what ``torch.save``
writes). ``CASES`` lists them with what the tests do with each file;
``tests/test_attacks.py`` loads every file in a child process and checks that
fastserial refuses it with a typed error or reads exactly what ``torch.load``
reads.

Run as a script to write the files to a directory::

    python tests/attacks/make_attacks.py OUTDIR

Importable without torch: only the sparse and nested cases and the save-side objects
(``save_attack_object``) import it, when called.
"""

from __future__ import annotations

import functools
import io
import json
import os
import struct
import sys
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Callable

# --------------------------------------------------------------------------- pickle opcodes

PROTO2 = b"\x80\x02"
MARK = b"("
STOP = b"."
TUPLE = b"t"
EMPTY_TUPLE = b")"
TUPLE1 = b"\x85"
TUPLE2 = b"\x86"
TUPLE3 = b"\x87"
EMPTY_DICT = b"}"
EMPTY_LIST = b"]"
LIST = b"l"
SETITEM = b"s"
SETITEMS = b"u"
APPENDS = b"e"
REDUCE = b"R"
BUILD = b"b"
BINPERSID = b"Q"
NONE = b"N"
NEWTRUE = b"\x88"
NEWFALSE = b"\x89"


def glob(module: str, name: str) -> bytes:
    """GLOBAL module.name"""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def text(value: str) -> bytes:
    """BINUNICODE"""
    data = value.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def integer(n: int) -> bytes:
    """BININT1 / BININT2 / BININT / LONG1 / LONG4, the shortest that holds ``n``."""
    if 0 <= n < 0x100:
        return b"K" + bytes([n])
    if 0 <= n < 0x10000:
        return b"M" + struct.pack("<H", n)
    if -(2**31) <= n < 2**31:
        return b"J" + struct.pack("<i", n)
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    if len(data) < 256:
        return b"\x8a" + bytes([len(data)]) + data
    return b"\x8b" + struct.pack("<I", len(data)) + data


def put(k: int) -> bytes:
    return b"q" + bytes([k]) if k < 256 else b"r" + struct.pack("<I", k)


def get(k: int) -> bytes:
    return b"h" + bytes([k]) if k < 256 else b"j" + struct.pack("<I", k)


def tup(*items: bytes) -> bytes:
    return MARK + b"".join(items) + TUPLE


def ints(values) -> bytes:
    return tup(*(integer(v) for v in values))


def call(func: bytes, *args: bytes) -> bytes:
    return func + tup(*args) + REDUCE


def odict() -> bytes:
    return glob("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE


def dict_(*pairs: tuple[bytes, bytes]) -> bytes:
    if not pairs:
        return EMPTY_DICT
    return EMPTY_DICT + MARK + b"".join(k + v for k, v in pairs) + SETITEMS


def list_(*items: bytes) -> bytes:
    """EMPTY_LIST, then APPENDS (torch's safe unpickler has no LIST opcode)."""
    if not items:
        return EMPTY_LIST
    return EMPTY_LIST + MARK + b"".join(items) + APPENDS


def pickled(body: bytes) -> bytes:
    return PROTO2 + body + STOP


def storage(key: str, numel: int, stype: str = "FloatStorage", location: str = "cpu") -> bytes:
    """The persistent id torch.save writes for a storage (zip format)."""
    module = "torch.storage" if stype == "UntypedStorage" else "torch"
    return (
        MARK
        + text("storage")
        + glob(module, stype)
        + text(key)
        + text(location)
        + (integer(numel) + TUPLE + BINPERSID)
    )


def tensor(storage_ops: bytes, offset: int, size, stride, requires_grad: bool = False) -> bytes:
    """``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, rg, OrderedDict())``"""
    return call(
        glob("torch._utils", "_rebuild_tensor_v2"),
        storage_ops,
        integer(offset),
        ints(size),
        ints(stride),
        NEWTRUE if requires_grad else NEWFALSE,
        odict(),
    )


def floats(values) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def int64s(values) -> bytes:
    return struct.pack(f"<{len(values)}q", *values)


# --------------------------------------------------------------------------- zip records


@dataclass
class Record:
    """A local record written into a :class:`ZipBuilder`; central entries point at it."""

    name: str
    offset: int
    crc: int
    csize: int
    size: int
    method: int


@functools.lru_cache(maxsize=8)
def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


class ZipBuilder:
    """Writes zip bytes piece by piece, so that crafted archives can hold two end
    records, duplicate names, overlapping entries or disagreeing zip64 fields."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def tell(self) -> int:
        return len(self.buf)

    def raw(self, data: bytes) -> None:
        self.buf += data

    def add(self, name: str, data: bytes, *, deflate: bool = False, align: int = 64) -> Record:
        """A local header and its data, the data aligned to ``align`` bytes with torch's
        ``FB`` padding extra field."""
        crc = zlib.crc32(data)
        payload = data
        method = 0
        if deflate:
            payload = _deflate(data)
            method = 8
        raw_name = name.encode()
        offset = self.tell()
        extra = b""
        if align and not deflate:
            start = offset + 30 + len(raw_name)
            pad = (-(start + 4)) % align
            extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
        self.raw(
            struct.pack(
                "<IHHHHHIIIHH",
                0x04034B50,
                20,
                0,
                method,
                0,
                0x21,
                crc,
                len(payload),
                len(data),
                len(raw_name),
                len(extra),
            )
            + raw_name
            + extra
            + payload
        )
        return Record(name, offset, crc, len(payload), len(data), method)

    @staticmethod
    def central_entry(rec: Record, name: str | None = None) -> bytes:
        raw_name = (rec.name if name is None else name).encode()
        return (
            struct.pack(
                "<IHHHHHHIIIHHHHHII",
                0x02014B50,
                20,
                20,
                0,
                rec.method,
                0,
                0x21,
                rec.crc,
                rec.csize,
                rec.size,
                len(raw_name),
                0,
                0,
                0,
                0,
                0,
                rec.offset,
            )
            + raw_name
        )

    def central(self, records) -> tuple[int, int, int]:
        """Writes a central directory; returns (entries, size, offset)."""
        start = self.tell()
        for rec in records:
            if isinstance(rec, tuple):  # (record, name it is listed under)
                self.raw(self.central_entry(rec[0], rec[1]))
            else:
                self.raw(self.central_entry(rec))
        return len(records), self.tell() - start, start

    def eocd(self, entries: int, size: int, offset: int, comment_len: int = 0) -> int:
        """An end-of-central-directory record (its comment is whatever follows)."""
        pos = self.tell()
        self.raw(
            struct.pack(
                "<IHHHHIIH",
                0x06054B50,
                0,
                0,
                min(entries, 0xFFFF),
                min(entries, 0xFFFF),
                min(size, 0xFFFFFFFF),
                min(offset, 0xFFFFFFFF),
                comment_len,
            )
        )
        return pos

    def zip64_end(self, entries: int, size: int, offset: int) -> None:
        """A zip64 end record followed by its locator."""
        pos = self.tell()
        self.raw(
            struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, entries, entries, size, offset)
        )
        self.raw(struct.pack("<IIQI", 0x07064B50, 0, pos, 1))

    def finish(self, records) -> bytes:
        """A plain central directory and end record for ``records``."""
        n, size, offset = self.central(records)
        self.eocd(n, size, offset)
        return bytes(self.buf)

    def bytes(self) -> bytes:
        return bytes(self.buf)


PREFIX = "archive"


def head_records(z: ZipBuilder, pkl: bytes) -> list[Record]:
    """data.pkl and the small records torch.save writes before the storages."""
    return [
        z.add(f"{PREFIX}/data.pkl", pkl),
        z.add(f"{PREFIX}/.format_version", b"1"),
        z.add(f"{PREFIX}/.storage_alignment", b"64"),
        z.add(f"{PREFIX}/byteorder", b"little"),
    ]


def tail_records(z: ZipBuilder) -> list[Record]:
    return [
        z.add(f"{PREFIX}/version", b"3\n"),
        z.add(f"{PREFIX}/.data/serialization_id", b"1234567890123456789012345678901234567890"),
    ]


def checkpoint(pkl: bytes, storages: dict[str, bytes], *, deflate_keys=()) -> bytes:
    """A zip checkpoint laid out as torch.save lays one out."""
    z = ZipBuilder()
    recs = head_records(z, pkl)
    for key, data in storages.items():
        recs.append(z.add(f"{PREFIX}/data/{key}", data, deflate=key in deflate_keys))
    recs += tail_records(z)
    return z.finish(recs)


# --------------------------------------------------------------------------- legacy format

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def legacy_storage(key: str, numel: int, stype: str = "FloatStorage", view: bytes = NONE) -> bytes:
    """The 6-tuple persistent id of the pre-1.6 format."""
    return (
        MARK
        + text("storage")
        + glob("torch", stype)
        + text(key)
        + text("cpu")
        + (integer(numel) + view + TUPLE + BINPERSID)
    )


def legacy_file(main: bytes, keys: list[str], storages: list[tuple[int, bytes]]) -> bytes:
    """magic, protocol version, sys info, the object, the key list, then each storage
    as an int64 element count and its bytes."""
    sys_info = dict_(
        (text("protocol_version"), integer(1001)),
        (text("little_endian"), NEWTRUE),
        (
            text("type_sizes"),
            dict_(
                (text("short"), integer(2)), (text("int"), integer(4)), (text("long"), integer(4))
            ),
        ),
    )
    out = pickled(integer(LEGACY_MAGIC)) + pickled(integer(1001)) + pickled(sys_info)
    out += pickled(main)
    out += pickled(list_(*(text(k) for k in keys)))
    for count, data in storages:
        out += struct.pack("<q", count) + data
    return out


# --------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One crafted file and how the tests exercise it.

    ``check`` names the child-side check in test_attacks.py: ``load`` (fastserial.load
    against torch.load), ``zip`` (load, the scanner and the numpy front end against
    torch), ``rss`` (a load whose peak memory is bounded), ``open`` / ``inspect``
    (the lazy reader and the CLI, bounded in time and memory), ``save`` and
    ``native`` (no file: an object or a native call). ``modes`` are fastserial's
    load modes for ``load``/``zip``/``rss``.
    """

    name: str
    group: str
    check: str
    build: Callable[[], bytes] | None
    modes: tuple[str, ...] = ("path", "bytesio", "mmap")
    suffix: str = ".pt"
    doc: str = ""
    options: dict = field(default_factory=dict)


CASES: dict[str, Case] = {}


def case(group: str, check: str = "load", **kw):
    if group == "memory":  # the loaders fill memory differently for each source
        kw.setdefault("modes", ("path", "bytesio", "mmap", "fileobj"))

    def register(fn):
        name = fn.__name__
        CASES[name] = Case(name, group, check, fn, doc=(fn.__doc__ or "").strip(), **kw)
        return fn

    return register


# -- memory corruption on load ------------------------------------------------------

BIG = 65536  # floats: a 256 KiB storage, past the 64 KiB packed-tensor limit


def _big_values(n: int = BIG, start: float = 1.0) -> bytes:
    return floats([start + (i % 1000) for i in range(n)])


@case("memory")
def build_sets_tensor_to_another_tensor():
    """BUILD on a freshly rebuilt tensor with state (other_tensor, 0, (2,), (1,)):
    Tensor.__setstate__ / torch's safe BUILD calls set_, freeing the 256 KiB storage
    the loader queued for filling. torch: 'a' is a 2-element view of 'b'."""
    b = tensor(storage("1", 4), 0, (4,), (1,)) + put(1)
    a = tensor(storage("0", BIG), 0, (BIG,), (1,)) + tup(get(1), integer(0), ints((2,)), ints((1,)))
    body = dict_((text("b"), b), (text("a"), a + BUILD))
    return checkpoint(pickled(body), {"0": _big_values(), "1": floats([5, 6, 7, 8])})


HUGE = 10 * 1024 * 1024  # floats: 40 MiB, always mmap-allocated by glibc; zeros deflate to ~40 KB


@case("memory")
def build_sets_huge_tensor_to_another_tensor():
    """The same with a 40 MiB storage (a deflated record of zeros): freed, it is
    unmapped, so filling it afterwards faults."""
    b = tensor(storage("1", 4), 0, (4,), (1,)) + put(1)
    a = tensor(storage("0", HUGE), 0, (HUGE,), (1,))
    a += tup(get(1), integer(0), ints((2,)), ints((1,)))
    body = dict_((text("b"), b), (text("a"), a + BUILD))
    return checkpoint(
        pickled(body), {"0": bytes(4 * HUGE), "1": floats([5, 6, 7, 8])}, deflate_keys=("0",)
    )


@case("memory")
def build_swaps_huge_tensor_data():
    """Tensor.__setstate__'s ``self.data = other`` on a tensor over a 40 MiB deflated
    storage."""
    b = tensor(storage("1", 4), 0, (4,), (1,)) + put(1)
    a = tensor(storage("0", HUGE), 0, (HUGE,), (1,))
    state = tup(get(1), NONE, NONE, NEWFALSE, NONE)
    body = dict_((text("b"), b), (text("a"), a + state + BUILD))
    return checkpoint(
        pickled(body), {"0": bytes(4 * HUGE), "1": floats([5, 6, 7, 8])}, deflate_keys=("0",)
    )


@case("memory")
def build_sets_tensor_to_a_storage():
    """BUILD with state (storage, 0, (2,), (1,)): set_ to a storage from a persistent
    id, freeing the big storage first created for the tensor."""
    a = tensor(storage("0", BIG), 0, (BIG,), (1,))
    state = tup(storage("1", 4), integer(0), ints((2,)), ints((1,)))
    body = dict_((text("a"), a + state + BUILD))
    return checkpoint(pickled(body), {"0": _big_values(), "1": floats([5, 6, 7, 8])})


@case("memory")
def build_swaps_tensor_data():
    """BUILD with a 5-tuple state: Python's Tensor.__setstate__ runs ``self.data =
    state[0]``, dropping the big storage; torch's safe unpickler calls set_(*state)
    and refuses."""
    b = tensor(storage("1", 4), 0, (4,), (1,)) + put(1)
    a = tensor(storage("0", BIG), 0, (BIG,), (1,))
    state = tup(get(1), NONE, NONE, NEWFALSE, NONE)
    body = dict_((text("b"), b), (text("a"), a + state + BUILD))
    return checkpoint(pickled(body), {"0": _big_values(), "1": floats([5, 6, 7, 8])})


@case("memory")
def build_shrinks_template():
    """Two tensors of one layout; BUILD shrinks the first (set_ to a 1-element
    storage) before the second is created, so a loader that makes the second with
    empty_like(first) gets 4 bytes and fills 256 KiB into them."""
    one = tensor(storage("1", 1), 0, (1,), (1,)) + put(1)
    a = tensor(storage("0", BIG), 0, (BIG,), (1,)) + tup(get(1), integer(0), ints((1,)), ints((1,)))
    c = tensor(storage("2", BIG), 0, (BIG,), (1,))
    body = dict_((text("one"), one), (text("a"), a + BUILD), (text("c"), c))
    return checkpoint(
        pickled(body),
        {"0": _big_values(), "1": floats([42]), "2": _big_values(start=3.0)},
    )


@case("memory")
def build_shrinks_template_many():
    """The template case with eight big tensors after the shrunk one."""
    one = tensor(storage("1", 1), 0, (1,), (1,)) + put(1)
    n = 20000  # 80 KB: past the packed-tensor limit
    a = tensor(storage("0", n), 0, (n,), (1,)) + tup(get(1), integer(0), ints((1,)), ints((1,)))
    pairs = [(text("one"), one), (text("a"), a + BUILD)]
    stores = {"0": _big_values(n), "1": floats([42])}
    for k in range(8):
        pairs.append((text(f"c{k}"), tensor(storage(str(k + 2), n), 0, (n,), (1,))))
        stores[str(k + 2)] = _big_values(n, start=float(k))
    return checkpoint(pickled(dict_(*pairs)), stores)


# -- uninitialized memory -----------------------------------------------------------

ZN = 12000  # int64: 96 KB, unpacked and under glibc's mmap threshold (heap reuse)


@case("uninit", options={"dirty_heap": True})
def torch_size_of_tensor():
    """{'s': torch.Size(t)} where t views a zero-filled storage: torch.Size iterates
    t while the pickle runs, before a deferred fill; the file holds zeros."""
    t = tensor(storage("0", ZN, "LongStorage"), 0, (64,), (1,))
    body = dict_((text("s"), call(glob("torch", "Size"), t)))
    return checkpoint(pickled(body), {"0": bytes(8 * ZN)})


@case("uninit", options={"dirty_heap": True})
def counter_of_tensor():
    """{'c': collections.Counter(t), 't': t}: Counter iterates t's elements during
    unpickling; every element in the file is zero."""
    t = tensor(storage("0", ZN, "LongStorage"), 0, (16,), (1,)) + put(1)
    body = dict_((text("t"), t), (text("c"), call(glob("collections", "Counter"), get(1))))
    return checkpoint(pickled(body), {"0": bytes(8 * ZN)})


@case("uninit", options={"dirty_heap": True})
def complex_of_tensor():
    """{'c': complex(t)} for a 1-element float64 view of a zero-filled storage:
    complex() reads the element while the pickle runs."""
    t = tensor(storage("0", ZN, "DoubleStorage"), 5, (1,), (1,))
    body = dict_((text("c"), call(glob("builtins", "complex"), t)))
    return checkpoint(pickled(body), {"0": bytes(8 * ZN)})


@case("uninit", options={"dirty_heap": True})
def bytearray_of_tensor():
    """{'b': bytearray(t)} for 32 uint8 elements of a zero-filled storage: bytearray()
    takes each element's __index__."""
    t = tensor(storage("0", 8 * ZN, "ByteStorage"), 0, (32,), (1,))
    body = dict_((text("b"), call(glob("builtins", "bytearray"), t)))
    return checkpoint(pickled(body), {"0": bytes(8 * ZN)})


@case("uninit", options={"dirty_heap": True})
def torch_size_of_small_tensor():
    """torch.Size of a 16-element zero tensor that owns its storage (a packed small
    tensor, filled by a worker thread)."""
    t = tensor(storage("0", 16, "LongStorage"), 0, (16,), (1,))
    body = dict_((text("s"), call(glob("torch", "Size"), t)))
    return checkpoint(pickled(body), {"0": bytes(8 * 16)})


# -- invalid sparse tensors under weights_only=True ----------------------------------


def _torch_save_bytes(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@case("sparse")
def sparse_coo_index_out_of_range():
    """A COO tensor of size (3,) with index 1000 (saved without checking invariants):
    torch 2.15 validates it under weights_only=True and refuses."""
    import torch

    t = torch.sparse_coo_tensor(
        torch.tensor([[0, 1000]]), torch.tensor([1.0, 2.0]), (3,), check_invariants=False
    )
    return _torch_save_bytes({"s": t})


@case("sparse")
def sparse_coo_negative_index():
    """A COO tensor whose indices hold -5."""
    import torch

    t = torch.sparse_coo_tensor(
        torch.tensor([[0, -5], [1, 1]]), torch.tensor([1.0, 2.0]), (3, 3), check_invariants=False
    )
    return _torch_save_bytes({"s": t})


@case("sparse")
def sparse_csr_crow_not_monotone():
    """A CSR tensor whose crow_indices go 0, 2, 1, 3: torch 2.15 refuses it."""
    import torch

    t = torch.sparse_csr_tensor(
        torch.tensor([0, 2, 1, 3]),
        torch.tensor([0, 1, 2]),
        torch.tensor([1.0, 2.0, 3.0]),
        (3, 3),
        check_invariants=False,
    )
    return _torch_save_bytes({"s": t})


@case("sparse")
def sparse_csr_column_out_of_range():
    """A CSR tensor with column index 7 in a 3x3 matrix."""
    import torch

    t = torch.sparse_csr_tensor(
        torch.tensor([0, 1, 2, 3]),
        torch.tensor([0, 7, 2]),
        torch.tensor([1.0, 2.0, 3.0]),
        (3, 3),
        check_invariants=False,
    )
    return _torch_save_bytes({"s": t})


# -- the zip reader disagreeing with torch's ----------------------------------------

EVAL_PKL = pickled(dict_((text("w"), call(glob("builtins", "eval"), text("'evil'")))))


def _benign_pkl(key: str = "0") -> bytes:
    return pickled(dict_((text("w"), tensor(storage(key, 4), 0, (4,), (1,)))))


GOOD = floats([1, 2, 3, 4])
OTHER = floats([-1, -2, -3, -4])


def _two_pickles(evil_first: bool, evil: bool = True):
    """(first data.pkl, second data.pkl): one benign, the other calling builtins.eval
    (or, with evil=False, reading storage '1' instead of '0')."""
    bad = EVAL_PKL if evil else _benign_pkl("1")
    return (bad, _benign_pkl()) if evil_first else (_benign_pkl(), bad)


def _two_eocd(evil_first: bool, trailing: bool) -> bytes:
    """Records for two complete archives, then two central directories and two end
    records. The first end record's comment covers everything after it. With
    ``trailing``, one byte follows the second end record, whose comment length is 0:
    a reader that wants an end record whose comment reaches the end of the file
    takes the first; one that takes the last signature takes the second."""
    p1, p2 = _two_pickles(evil_first)
    z = ZipBuilder()
    set1 = head_records(z, p1)
    set2 = [z.add(f"{PREFIX}/data.pkl", p2)] + set1[1:]
    data = z.add(f"{PREFIX}/data/0", GOOD)
    tail = tail_records(z)
    set1 += [data] + tail
    set2 += [data] + tail
    n1, s1, o1 = z.central(set1)
    eocd1 = z.eocd(n1, s1, o1)
    n2, s2, o2 = z.central(set2)
    z.eocd(n2, s2, o2)
    if trailing:
        z.raw(b"\0")
    out = bytearray(z.bytes())
    comment = len(out) - (eocd1 + 22)
    struct.pack_into("<H", out, eocd1 + 20, comment)
    return bytes(out)


@case("zip", check="zip")
def two_eocd_evil_last():
    """Two end records; the last (which miniz finds first, searching backwards) lists
    a data.pkl calling builtins.eval."""
    return _two_eocd(evil_first=False, trailing=False)


@case("zip", check="zip")
def two_eocd_evil_first():
    """Two end records; the first lists the data.pkl calling builtins.eval."""
    return _two_eocd(evil_first=True, trailing=False)


@case("zip", check="zip")
def two_eocd_trailing_byte_evil_last():
    """Two end records, one stray byte after the last: only the first has a comment
    length reaching the end of the file; the last lists the eval pickle."""
    return _two_eocd(evil_first=False, trailing=True)


@case("zip", check="zip")
def two_eocd_trailing_byte_evil_first():
    """As above with the eval pickle listed by the first end record."""
    return _two_eocd(evil_first=True, trailing=True)


def _zip64_disagree(zip64_lists_evil: bool, evil: bool = True) -> bytes:
    """Two central directories; the classic end record points at one, the zip64 end
    record (with its locator) at the other, so a reader trusting either field set, or
    the larger value, reads a different data.pkl."""
    p_evil, p_good = _two_pickles(True, evil)
    z = ZipBuilder()
    good = head_records(z, p_good)
    bad = [z.add(f"{PREFIX}/data.pkl", p_evil)] + good[1:]
    data0 = z.add(f"{PREFIX}/data/0", GOOD)
    extra = [z.add(f"{PREFIX}/data/1", OTHER)] if not evil else []
    tail = tail_records(z)
    good += [data0] + extra + tail
    bad += [data0] + extra + tail
    first = z.central(good)
    second = z.central(bad)
    classic, z64 = (first, second) if zip64_lists_evil else (second, first)
    z.zip64_end(*z64)
    z.eocd(*classic)
    return z.bytes()


@case("zip", check="zip")
def zip64_offset_points_at_evil_directory():
    """The zip64 end record's directory offset (smaller than the classic one) lists
    the eval pickle; the classic fields list a benign one."""
    return _zip64_disagree(zip64_lists_evil=True)


@case("zip", check="zip")
def zip64_classic_offset_points_at_evil_directory():
    """The classic end record lists the eval pickle, the zip64 one a benign one."""
    return _zip64_disagree(zip64_lists_evil=False)


@case("zip", check="zip")
def zip64_disagreeing_directories_values():
    """zip64 and classic end records list data.pkl files reading different storages:
    the tensor loaded is [1,2,3,4] or [-1,-2,-3,-4] depending on the reader."""
    return _zip64_disagree(zip64_lists_evil=True, evil=False)


def _duplicate(evil_first: bool, second_name: str, evil: bool = True) -> bytes:
    """Two central entries for data.pkl (the second under ``second_name``)."""
    p1, p2 = _two_pickles(evil_first, evil)
    z = ZipBuilder()
    recs = head_records(z, p1)
    second = z.add(second_name, p2)
    recs.insert(1, second)
    recs.append(z.add(f"{PREFIX}/data/0", GOOD))
    if not evil:
        recs.append(z.add(f"{PREFIX}/data/1", OTHER))
    recs += tail_records(z)
    return z.finish(recs)


@case("zip", check="zip")
def duplicate_data_pkl_evil_first():
    """Two records named archive/data.pkl, the first calling builtins.eval."""
    return _duplicate(True, f"{PREFIX}/data.pkl")


@case("zip", check="zip")
def duplicate_data_pkl_evil_second():
    """Two records named archive/data.pkl, the second calling builtins.eval."""
    return _duplicate(False, f"{PREFIX}/data.pkl")


@case("zip", check="zip")
def duplicate_data_pkl_values():
    """Two records named archive/data.pkl reading different storages."""
    return _duplicate(True, f"{PREFIX}/data.pkl", evil=False)


@case("zip", check="zip")
def case_colliding_data_pkl_evil_upper():
    """archive/data.pkl (benign) and archive/DATA.pkl (calls builtins.eval): torch's
    zip reader looks names up case-insensitively."""
    return _duplicate(False, f"{PREFIX}/DATA.pkl")


@case("zip", check="zip")
def case_colliding_data_pkl_evil_lower():
    """archive/data.pkl (calls builtins.eval) and archive/Data.pkl (benign)."""
    return _duplicate(True, f"{PREFIX}/Data.pkl")


@case("zip", check="zip")
def case_colliding_data_pkl_values():
    """archive/data.pkl and archive/DATA.PKL reading different storages."""
    return _duplicate(True, f"{PREFIX}/DATA.PKL", evil=False)


@case("zip", check="zip")
def duplicate_storage_record():
    """Two records named archive/data/0 holding different bytes."""
    z = ZipBuilder()
    recs = head_records(z, _benign_pkl())
    recs.append(z.add(f"{PREFIX}/data/0", GOOD))
    recs.append(z.add(f"{PREFIX}/data/0", OTHER))
    recs += tail_records(z)
    return z.finish(recs)


@case("zip", check="zip")
def overlapping_storage_records():
    """archive/data/0 and archive/data/1 are two central entries for one local
    record (the same bytes twice)."""
    pkl = pickled(
        dict_(
            (text("a"), tensor(storage("0", 4), 0, (4,), (1,))),
            (text("b"), tensor(storage("1", 4), 0, (4,), (1,))),
        )
    )
    z = ZipBuilder()
    recs = head_records(z, pkl)
    rec = z.add(f"{PREFIX}/data/0", GOOD)
    recs += [rec, (rec, f"{PREFIX}/data/1")]
    recs += tail_records(z)
    return z.finish(recs)


@case("zip", check="zip")
def data_pkl_hidden_inside_another_record():
    """The central entry of data.pkl points at a local record that lies inside the
    data of archive/data/1 (a record within a record); a reader scanning local
    headers in order sees a different pickle than one following the directory."""
    z = ZipBuilder()
    recs = [
        z.add(f"{PREFIX}/.format_version", b"1"),
        z.add(f"{PREFIX}/byteorder", b"little"),
    ]
    inner = ZipBuilder()
    inner.add(f"{PREFIX}/data.pkl", EVAL_PKL, align=0)
    nested = inner.bytes()
    # data/1 holds the hidden record; data.pkl's central entry points into it.
    outer = z.add(f"{PREFIX}/data/1", nested, align=0)
    hidden_offset = outer.offset + 30 + len(outer.name)
    hidden = Record(
        f"{PREFIX}/data.pkl", hidden_offset, zlib.crc32(EVAL_PKL), len(EVAL_PKL), len(EVAL_PKL), 0
    )
    z.add(f"{PREFIX}/data.pkl", _benign_pkl())  # a local record the directory omits
    recs += [(hidden, f"{PREFIX}/data.pkl"), outer]
    recs.append(z.add(f"{PREFIX}/data/0", GOOD))
    recs += tail_records(z)
    return z.finish(recs)


# -- denial of service ---------------------------------------------------------------


@case("dos", check="rss", modes=("path", "bytesio"), options={"max_seconds": 4})
def many_unused_records():
    """One 4-float tensor and 3,000 unused records data/1..data/3000, each 64 KiB of
    zeros compressed to a few bytes: nothing needs them, torch never reads them."""
    z = ZipBuilder()
    recs = head_records(z, _benign_pkl())
    recs.append(z.add(f"{PREFIX}/data/0", GOOD))
    for k in range(1, 3001):
        recs.append(z.add(f"{PREFIX}/data/{k}", bytes(65536), deflate=True))
    recs += tail_records(z)
    return z.finish(recs)


def _dag(levels: int, first_memo: int = 10) -> bytes:
    """A tuple DAG: x0 = (), x(k+1) = (xk, xk); printing it walks 2**levels nodes."""
    out = EMPTY_TUPLE + put(first_memo)
    for k in range(levels):
        out += get(first_memo + k) + get(first_memo + k) + TUPLE2 + put(first_memo + k + 1)
    return out


@case("dos", modes=("path", "bytesio"), options={"max_seconds": 4})
def persistent_id_dag():
    """A persistent id ('storage', FloatStorage, '0', 'cpu', 4, DAG) with one element
    too many; its last element is a 60-level tuple DAG. torch refuses at once (the
    tuple does not unpack); formatting the id in an error message never ends."""
    pid = MARK + text("storage") + glob("torch", "FloatStorage") + text("0") + text("cpu")
    pid += integer(4) + _dag(60) + TUPLE + BINPERSID
    body = dict_((text("w"), tensor(pid, 0, (4,), (1,))))
    return checkpoint(pickled(body), {"0": GOOD})


@case("dos", modes=("path", "bytesio"), options={"max_seconds": 4})
def persistent_id_deep():
    """The same with a 200,000-deep nested tuple as the extra element: repr() of it
    raises RecursionError, which must not escape as such."""
    pid = MARK + text("storage") + glob("torch", "FloatStorage") + text("0") + text("cpu")
    pid += integer(4) + NONE + TUPLE1 * 200_000 + TUPLE + BINPERSID
    body = dict_((text("w"), tensor(pid, 0, (4,), (1,))))
    return checkpoint(pickled(body), {"0": GOOD})


@case("dos", modes=("path",), options={"max_seconds": 4})
def persistent_id_dag_not_a_tuple():
    """A persistent id that is a list holding a 60-level tuple DAG."""
    pid = list_(text("storage"), _dag(60)) + BINPERSID
    body = dict_((text("w"), tensor(pid, 0, (4,), (1,))))
    return checkpoint(pickled(body), {"0": GOOD})


@case("dos", check="rss", modes=("path", "bytesio"), options={"max_seconds": 4})
def legacy_view_offset_list():
    """A legacy file whose storage view's offset is a 900,000-element list:
    ``offset * itemsize`` (complex128: 16) repeats it into 14 million references
    before any type check. torch multiplies too; fastserial must refuse cheaply."""
    offset = EMPTY_LIST + MARK + NONE * 900_000 + APPENDS
    view = tup(text("v"), offset, integer(1))
    main = dict_(
        (text("w"), tensor(legacy_storage("0", 2, "ComplexDoubleStorage", view), 0, (1,), (1,)))
    )
    return legacy_file(main, ["0"], [(2, bytes(32))])


@case("dos", check="rss", modes=("path",), options={"max_seconds": 4})
def legacy_huge_view_offset():
    """A legacy file whose storage view starts 2**62 elements into a 4-element
    storage."""
    view = tup(text("v"), integer(2**62), integer(1))
    main = dict_((text("w"), tensor(legacy_storage("0", 4, "FloatStorage", view), 0, (1,), (1,))))
    return legacy_file(main, ["0"], [(4, GOOD)])


def _deep_dict(depth: int, key: str) -> bytes:
    """{key: {key: ... {key: {'w': tensor}} ...}}, ``depth`` levels; the key string is
    memoized, so each level costs 4 bytes of pickle whatever the key's length."""
    out = EMPTY_DICT + text(key) + put(1) + (EMPTY_DICT + get(1)) * (depth - 1)
    out += dict_((text("w"), tensor(storage("0", 4), 0, (4,), (1,))))
    out += SETITEM * depth
    return pickled(out)


DEEP_DEPTH = 200_000
DEEP_KEY = "k" * 64


@case("dos", check="open", options={"max_seconds": 4, "depth": DEEP_DEPTH, "key": DEEP_KEY})
def deep_nested_keys():
    """A state dict nested 200,000 dicts deep under one 64-letter key, one tensor at
    the bottom: its one dotted name is 13 MB, but building each level's name from
    the one above copies 200,000**2 * 65 / 2 bytes (1.3 TB)."""
    return checkpoint(_deep_dict(DEEP_DEPTH, DEEP_KEY), {"0": GOOD})


@case("dos", check="inspect", options={"max_seconds": 4, "modes": ("json",)})
def deep_nested_keys_inspect():
    """The same shape for ``fastserial inspect`` (keys of 64 'i')."""
    return checkpoint(_deep_dict(DEEP_DEPTH, "i" * 64), {"0": GOOD})


def _wide_deep_dict(depth: int, key: str) -> bytes:
    """Every level also holds a small int leaf: the names of all leaves together are
    quadratic in the depth, so the file must be refused or its names bounded."""
    out = (EMPTY_DICT + MARK + text("x") + integer(0) + text(key)) * depth
    out += dict_((text("w"), tensor(storage("0", 4), 0, (4,), (1,))))
    out += SETITEMS * depth
    return pickled(out)


@case("dos", check="inspect", options={"max_seconds": 4})
def deep_nested_keys_with_leaves_inspect():
    """20,000 levels, each with an int leaf besides the next level: every leaf's
    dotted name repeats the path above it (some 1.2 GB of names)."""
    return checkpoint(_wide_deep_dict(20_000, "kkkk"), {"0": GOOD})


def safetensors_file(header: str, data: bytes = b"") -> bytes:
    raw = header.encode()
    return struct.pack("<Q", len(raw)) + raw + data


@case("dos", check="inspect", suffix=".safetensors", options={"max_seconds": 4})
def safetensors_shape_of_lists():
    """A header whose shape is [[0], 1000, 1000, 60]: multiplying the element count
    by each entry repeats a list to 60 million entries."""
    header = {"w": {"dtype": "F32", "shape": [[0], 1000, 1000, 60], "data_offsets": [0, 16]}}
    return safetensors_file(json.dumps(header), GOOD)


@case("dos", check="inspect", suffix=".safetensors", options={"max_seconds": 4})
def safetensors_giant_shape_list():
    """A shape of 60,000 entries of 2**62: the element count is a 3.7-million-bit
    integer, multiplied up one entry at a time."""
    shape = ",".join([str(2**62)] * 45_000)
    header = '{"w": {"dtype": "F32", "shape": [' + shape + '], "data_offsets": [0, 16]}}'
    return safetensors_file(header, GOOD)


@case("dos", check="inspect", suffix=".safetensors", options={"max_seconds": 4})
def safetensors_huge_ints():
    """data_offsets and shape entries of 4,000 digits each."""
    big = "9" * 4000
    header = (
        '{"w": {"dtype": "F32", "shape": [' + ",".join([big] * 100) + "], "
        '"data_offsets": [0, ' + big + "]}}"
    )
    return safetensors_file(header, GOOD)


# -- untyped exceptions --------------------------------------------------------------


@case("untyped")
def untyped_storage_negative_size():
    """{'s': torch.storage.UntypedStorage(-5)}: a negative size."""
    body = dict_((text("s"), call(glob("torch.storage", "UntypedStorage"), integer(-5))))
    return checkpoint(pickled(body), {})


@case("untyped")
def untyped_storage_negative_size_torch_alias():
    """{'s': torch.UntypedStorage(-5)}, the class named through its ``torch`` alias
    (torch's safe unpickler refuses the global)."""
    body = dict_((text("s"), call(glob("torch", "UntypedStorage"), integer(-5))))
    return checkpoint(pickled(body), {})


@case("untyped")
def untyped_storage_persistent_id_negative():
    """A persistent id ('storage', torch.UntypedStorage, '0', 'cpu', -4)."""
    body = dict_((text("s"), storage("0", -4, "UntypedStorage")))
    return checkpoint(pickled(body), {"0": GOOD})


@case("untyped")
def sparse_bad_layout():
    """_rebuild_sparse_tensor(torch.strided, ...): torch.load raises
    NotImplementedError."""
    layout = call(glob("torch.serialization", "_get_layout"), text("torch.strided"))
    idx = tensor(storage("0", 2, "LongStorage"), 0, (1, 2), (2, 1))
    val = tensor(storage("1", 2), 0, (2,), (1,))
    data = tup(idx, val, ints((3,)), NEWFALSE)
    body = dict_((text("s"), call(glob("torch._utils", "_rebuild_sparse_tensor"), layout, data)))
    return checkpoint(pickled(body), {"0": int64s([0, 1]), "1": floats([1, 2])})


@case("untyped")
def sparse_coo_wrong_arity():
    """_rebuild_sparse_tensor(torch.sparse_coo, (indices,)): the data tuple does not
    unpack."""
    layout = call(glob("torch.serialization", "_get_layout"), text("torch.sparse_coo"))
    idx = tensor(storage("0", 2, "LongStorage"), 0, (1, 2), (2, 1))
    body = dict_(
        (text("s"), call(glob("torch._utils", "_rebuild_sparse_tensor"), layout, tup(idx)))
    )
    return checkpoint(pickled(body), {"0": int64s([0, 1])})


def _nested(offsets: list[int]) -> bytes:
    """What torch.save writes for a strided nested tensor of components [0, 1, 2, 3]
    and [10, 11, 12], with its offsets record (int64 [0, 4]) replaced."""
    import zipfile

    import torch

    nt = torch.nested.nested_tensor([torch.arange(4.0), torch.arange(3.0) + 10])
    with zipfile.ZipFile(io.BytesIO(_torch_save_bytes({"n": nt}))) as zf:
        records = {n.split("/", 1)[1]: zf.read(n) for n in zf.namelist()}
    storages = {
        name[len("data/") :]: data for name, data in records.items() if name.startswith("data/")
    }
    found = [k for k, v in storages.items() if v == int64s([0, 4])]
    if len(found) != 1:
        raise AssertionError(f"torch's nested tensor layout changed: {sorted(storages)}")
    storages[found[0]] = int64s(offsets)
    return checkpoint(records["data.pkl"], storages)


@case("untyped", options={"weights_only": False})
def nested_tensor_offsets_past_buffer():
    """A nested tensor whose second component starts at offset 1000 of a 7-element
    buffer."""
    return _nested([0, 1000])


@case("untyped", options={"weights_only": False})
def nested_tensor_negative_offset():
    """A nested tensor whose first component starts at offset -3."""
    return _nested([-3, 4])


@case("untyped", modes=("path", "bytesio"), options={"refuse": True})
def legacy_storage_missing_from_key_list():
    """A legacy file whose pickle uses storage '0' but whose key list is empty (no
    data follows): the storage is never filled. torch.load returns it uninitialized,
    so only a refusal is right."""
    main = dict_((text("w"), tensor(legacy_storage("0", 4), 0, (4,), (1,))))
    return legacy_file(main, [], [])


@case("untyped", modes=("path", "bytesio"))
def legacy_key_list_not_a_list():
    """A legacy file whose key list is a dict."""
    main = dict_((text("w"), tensor(legacy_storage("0", 4), 0, (4,), (1,))))
    out = legacy_file(main, ["0"], [(4, GOOD)])
    keys = pickled(list_(text("0")))
    return out.replace(keys, pickled(dict_((text("0"), integer(0)))), 1)


# -- save writing freed memory (objects, not files) ---------------------------------

SAVE_SPECS = {
    # name: (tensor numel (float32), new storage nbytes, fill value after resize or None)
    "save_shrink_big_storage": (4 * 1024 * 1024, 4000, None),
    "save_shrink_to_zero": (4 * 1024 * 1024, 0, None),
    "save_grow_storage": (1024 * 1024, 8 * 1024 * 1024, 7),
    "save_shrink_small_storage": (1000, 40, None),
}


def save_attack_object(name: str):
    """A fresh object for a save case: {'t': t, 'evil': Evil(t)} where Evil's
    ``__reduce__`` resizes t's storage after t was pickled (and returns an empty
    OrderedDict, which weights-only loads accept)."""
    import collections

    import torch

    numel, new_nbytes, fill = SAVE_SPECS[name]

    class Evil:
        def __init__(self, t):
            self.t = t

        def __reduce__(self):
            s = self.t.untyped_storage()
            s.resize_(new_nbytes)
            if fill is not None:
                torch.empty(0, dtype=torch.uint8).set_(s).fill_(fill)
            return (collections.OrderedDict, ())

    t = torch.arange(numel, dtype=torch.float32)
    return {"t": t, "evil": Evil(t)}


for _name, (_numel, _nbytes, _fill) in SAVE_SPECS.items():
    CASES[_name] = Case(
        _name,
        "save",
        "save",
        None,
        modes=("bytesio", "path"),
        doc=f"an object whose __reduce__ resizes a {_numel * 4}-byte storage to {_nbytes} "
        "bytes after it was pickled",
    )

# -- raw addresses in the native module ---------------------------------------------

for _name, _doc in {
    "native_byteswap_address": "fastserial._fastserial.byteswap_address(int address, ...)",
    "native_read_into_address": "Archive.read_into with an integer destination address",
    "native_write_storages_address": "ArchiveWriter.write_storages with an integer address",
    "native_open_fd_keeps_fd": "Archive.open_fd(fd) must leave fd open",
}.items():
    CASES[_name] = Case(_name, "native", "native", None, modes=("call",), doc=_doc)


# --------------------------------------------------------------------------- driver


def build(name: str) -> bytes:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's beta/prototype notes for sparse, nested
        data = CASES[name].build()
    if len(data) >= 1 << 20:
        raise AssertionError(f"{name}: {len(data)} bytes, more than 1 MiB")
    return data


def write_all(outdir: str) -> dict[str, str]:
    """Writes every file case to ``outdir``; returns {case name: path}."""
    os.makedirs(outdir, exist_ok=True)
    paths = {}
    for name, c in CASES.items():
        if c.build is None:
            continue
        path = os.path.join(outdir, name + c.suffix)
        with open(path, "wb") as fh:
            fh.write(build(name))
        paths[name] = path
    return paths


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "attack-corpus"
    for p in write_all(target).values():
        print(f"{os.path.getsize(p):9d}  {p}")
