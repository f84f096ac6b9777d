#!/usr/bin/env python3
"""Writes the seed corpora of the cargo-fuzz targets into fuzz/corpus/<target>.

container_reader seeds: the real checkpoints in tests/data (small ones only; libFuzzer mutates small
inputs faster), zips built with Python's zipfile (stored, deflated, zip64 end records,
a comment), bare pickles, and — when torch / fastserial are importable — fresh
torch.save / fastserial.save checkpoints. Needs only the standard library otherwise.

pickle_scanner seeds: every ``data.pkl`` record of those checkpoints (tests/data/*.pt of
any size, fresh saves) and the bare pickles.

container_writer seeds: a few record lists in the target's input encoding (see
fuzz_targets/container_writer.rs): torch's record names, repeated and case-changed
names, odd characters, empty and generated big records.

    python3 fuzz/make_corpus.py            # then: cd fuzz && cargo +nightly fuzz run <target>
"""

from __future__ import annotations

import hashlib
import io
import pathlib
import pickle
import sys
import zipfile
from collections import OrderedDict

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS = ROOT / "fuzz" / "corpus"
OUT = CORPUS / "container_reader"
MAX_SEED = 64 << 10
MAX_PICKLE_SEED = 256 << 10


def _zip(records, compression=zipfile.ZIP_STORED, comment=b"", force_zip64=False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as z:
        z.comment = comment
        for name, data in records.items():
            with z.open(name, "w", force_zip64=force_zip64) as f:
                f.write(data)
    return buf.getvalue()


def seeds():
    for p in sorted((ROOT / "tests" / "data").glob("*.pt")):
        if p.stat().st_size <= MAX_SEED:
            yield p.name, p.read_bytes()
    pkl = pickle.dumps(OrderedDict(a=1, b=[1.5, "x"]), protocol=2)
    floats = bytes(range(256)) * 4
    records = {
        "archive/data.pkl": pkl,
        "archive/.format_version": b"1",
        "archive/byteorder": b"little",
        "archive/data/0": floats,
        "archive/version": b"3\n",
    }
    yield "zip_stored", _zip(records)
    yield "zip_deflated", _zip(records, zipfile.ZIP_DEFLATED)
    yield "zip_comment", _zip(records, comment=b"a comment PK\x05\x06")
    yield "zip_zip64_entries", _zip(records, force_zip64=True)
    for proto in (0, 2, 4, 5):
        yield (
            f"pickle_p{proto}",
            pickle.dumps({"k": [1, 2.0, "s", b"b", (None, True)]}, protocol=proto),
        )
    try:
        import torch
    except ImportError:
        return
    obj = {
        "w": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.ones(3, dtype=torch.int64),
    }
    obj["v"] = obj["w"][1]
    buf = io.BytesIO()
    torch.save(obj, buf)
    yield "torch_save", buf.getvalue()
    try:
        import fastserial
    except ImportError:
        return
    buf = io.BytesIO()
    fastserial.save(obj, buf)
    yield "fastserial_save", buf.getvalue()


def _data_pkl(raw: bytes):
    """The ``<top>/data.pkl`` record of a zip checkpoint, or None."""
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            names = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            return z.read(names[0]) if len(names) == 1 else None
    except (zipfile.BadZipFile, OSError, KeyError, ValueError, EOFError):
        return None


def pickle_seeds():
    for p in sorted((ROOT / "tests" / "data").glob("*.pt")):
        pkl = _data_pkl(p.read_bytes())
        if pkl is not None and len(pkl) <= MAX_PICKLE_SEED:
            yield p.stem, pkl
    for name, data in seeds():
        if name.startswith("pickle_"):
            yield name, data
        elif not name.endswith(".pt"):
            pkl = _data_pkl(data)
            if pkl is not None and len(pkl) <= MAX_PICKLE_SEED:
                yield name, pkl


def _writer_record(kind: int, how: int, body: bytes = b"", extra: bytes = b"") -> bytes:
    """One record in container_writer's encoding: name kind (+ its bytes), data kind,
    then a 16-bit length and the data (for the plain data kind)."""
    out = bytes([kind]) + extra + bytes([how])
    if how % 8 not in (0, 1):
        out += len(body).to_bytes(2, "little") + body
    return out


def writer_seeds():
    pkl = pickle.dumps(OrderedDict(a=1), protocol=2)
    torch_like = (
        bytes([6])  # prefix "archive"
        + _writer_record(0, 2, pkl)  # data.pkl
        + _writer_record(3, 2, b"little")  # byteorder
        + _writer_record(1, 2, bytes(range(200)), extra=(0).to_bytes(2, "little"))  # data/0
        + _writer_record(1, 0, extra=(1).to_bytes(2, "little"))  # data/1, empty
        + _writer_record(2, 2, b"3\n")  # .data/version
    )
    yield "torch_like", torch_like
    yield (
        "repeated_name",
        bytes([6]) + _writer_record(0, 2, b"x") + _writer_record(4, 2, b"y", b"\0"),
    )
    yield (
        "case_variant",
        bytes([6]) + _writer_record(0, 2, b"x") + _writer_record(5, 2, b"y", b"\0\1"),
    )
    yield (
        "odd_names",
        (
            bytes([5])
            + _writer_record(10, 2, b"z", bytes([5, 11, 12, 13, 27, 3]))
            + _writer_record(7, 2, b"", bytes([4]) + "é\x00".encode())
            + _writer_record(9, 0)
            + _writer_record(6, 2, b"long", (300).to_bytes(2, "little") + bytes([12]))
        ),
    )
    yield (
        "big_record",
        bytes([6]) + _writer_record(0, 2, b"p") + bytes([1 | 16, 0x81]) + b"\xff\x0f\x07",
    )
    yield (
        "no_prefix",
        bytes([0]) + _writer_record(0, 2, b"p") + _writer_record(1, 2, b"q", b"\x05\x00"),
    )


def _write(out: pathlib.Path, items) -> int:
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    for name, data in items:
        digest = hashlib.sha1(data).hexdigest()[:12]
        (out / f"{name}-{digest}").write_bytes(data)
        n += 1
    print(f"wrote {n} seeds to {out}")
    return n


def main() -> int:
    _write(OUT, seeds())
    _write(CORPUS / "pickle_scanner", pickle_seeds())
    _write(CORPUS / "container_writer", writer_seeds())
    return 0


if __name__ == "__main__":
    sys.exit(main())
