#!/usr/bin/env python3
"""Writes the seed corpus for `cargo fuzz run container_reader` into fuzz/corpus/container_reader.

Seeds: the real checkpoints in tests/data (small ones only; libFuzzer mutates small
inputs faster), zips built with Python's zipfile (stored, deflated, zip64 end records,
a comment), bare pickles, and — when torch / fastserial are importable — fresh
torch.save / fastserial.save checkpoints. Needs only the standard library otherwise.

    python3 fuzz/make_corpus.py            # then: cd fuzz && cargo +nightly fuzz run container_reader
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
OUT = ROOT / "fuzz" / "corpus" / "container_reader"
MAX_SEED = 64 << 10


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


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    n = 0
    for name, data in seeds():
        digest = hashlib.sha1(data).hexdigest()[:12]
        (OUT / f"{name}-{digest}").write_bytes(data)
        n += 1
    print(f"wrote {n} seeds to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
