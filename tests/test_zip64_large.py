"""Checkpoints past 4 GiB: a record larger than 4 GiB and records at offsets past
4 GiB (zip64 sizes, offsets, local extras and 24-byte data descriptors), in both
directions with torch.

Opt-in: it needs ~9 GiB of memory and disk and about a minute, so it runs only with
FASTSERIAL_LARGE_TESTS=1 (the layout itself is unit-tested in rust/src/container/writer.rs).
"""

import os
import zipfile

import fastserial
import pytest
import torch

pytestmark = pytest.mark.skipif(
    os.environ.get("FASTSERIAL_LARGE_TESTS") != "1",
    reason="set FASTSERIAL_LARGE_TESTS=1 to run the >4 GiB checkpoint test",
)


def test_checkpoints_past_4_gib_round_trip_with_torch(tmp_path):
    n = (4 << 30) + 12345
    big = torch.empty(n, dtype=torch.uint8)
    big[: 1 << 20].copy_(torch.arange(1 << 20) % 251)
    big[-(1 << 20) :].copy_(torch.arange(1 << 20) % 241)
    obj = {"big": big, "after": torch.arange(10)}

    ours = tmp_path / "ours.pt"
    fastserial.save(obj, ours, fsync=False)
    with zipfile.ZipFile(ours) as z:
        offsets = {i.filename: i.header_offset for i in z.infolist()}
        assert offsets["ours/data/1"] > 0xFFFFFFFF
        assert z.read("ours/data/1") == obj["after"].numpy().tobytes()  # CRC checked
    for load in (torch.load, fastserial.load):
        r = load(ours, mmap=True, weights_only=True)
        assert r["big"].numel() == n
        assert torch.equal(r["big"][-(1 << 20) :], big[-(1 << 20) :])
        assert torch.equal(r["after"], obj["after"])
        del r
    os.remove(ours)

    theirs = tmp_path / "theirs.pt"
    torch.save(obj, theirs)
    r = fastserial.load(theirs, mmap=True)
    assert torch.equal(r["big"][-(1 << 20) :], big[-(1 << 20) :])
    assert torch.equal(r["after"], obj["after"])
