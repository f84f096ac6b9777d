"""mmap=True: lazy (page-fault driven) loading and copy-on-write semantics.

Each test runs with fastserial.load and, as the reference proving the
expectation is torch's behaviour, with torch.load.
"""

import hashlib
import json

import fastserial
import pytest
import torch
from conftest import run_python

N_TENSORS = 4
NUMEL = 16 * 1024 * 1024  # 4 x 64 MiB float32 = 256 MiB of tensor data

LOADERS = {"fastserial": fastserial.load, "torch": torch.load}


def _sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    """A 256 MiB torch.save checkpoint and the sha256 of each tensor's bytes."""
    d = tmp_path_factory.mktemp("big")
    gen = torch.Generator().manual_seed(1234)
    tensors = {f"t{i}": torch.randn(NUMEL, generator=gen) for i in range(N_TENSORS)}
    shas = {k: hashlib.sha256(v.numpy()).hexdigest() for k, v in tensors.items()}
    sums = {k: float(v.sum(dtype=torch.float64)) for k, v in tensors.items()}
    path = d / "big.pt"
    torch.save(tensors, path)
    del tensors
    small = d / "small.pt"
    torch.save({"x": torch.ones(3)}, small)
    return path, small, shas, sums


_RSS_SCRIPT = r"""
import gc, hashlib, json, sys
import psutil, torch
import fastserial

path, small, loader = sys.argv[1], sys.argv[2], sys.argv[3]
load = fastserial.load if loader == "fastserial" else torch.load
proc = psutil.Process()

load(small, mmap=True)  # warm-up: lazy imports and one-off allocations
gc.collect()
rss_before = proc.memory_info().rss
obj = load(path, mmap=True)
rss_loaded = proc.memory_info().rss

info = {k: {"nbytes": v.untyped_storage().nbytes(), "shape": list(v.shape), "dtype": str(v.dtype)}
        for k, v in obj.items()}
sums = {k: float(v.sum(dtype=torch.float64)) for k, v in obj.items()}  # touches every page
shas = {k: hashlib.sha256(v.numpy()).hexdigest() for k, v in obj.items()}
rss_touched = proc.memory_info().rss
print("RESULT " + json.dumps(dict(rss_before=rss_before, rss_loaded=rss_loaded,
      rss_touched=rss_touched, info=info, sums=sums, shas=shas, keys=list(obj))))
"""


@pytest.mark.parametrize("loader", list(LOADERS))
def test_mmap_load_is_lazy(loader, big_checkpoint):
    path, small, shas, sums = big_checkpoint
    file_size = path.stat().st_size
    assert file_size > N_TENSORS * NUMEL * 4

    proc = run_python(_RSS_SCRIPT, path, small, loader, timeout=180)
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT ") :])

    grown_on_load = res["rss_loaded"] - res["rss_before"]
    grown_on_touch = res["rss_touched"] - res["rss_before"]
    assert grown_on_load < 0.25 * file_size, (
        f"mmap load grew RSS by {grown_on_load / 2**20:.1f} MiB for a {file_size / 2**20:.0f} MiB file"
    )
    # sanity check of the measurement itself: touching the data does fault it in
    assert grown_on_touch > 0.5 * file_size, f"RSS grew only {grown_on_touch / 2**20:.1f} MiB"

    assert res["keys"] == [f"t{i}" for i in range(N_TENSORS)]
    for k in res["keys"]:
        assert res["info"][k] == {"nbytes": NUMEL * 4, "shape": [NUMEL], "dtype": "torch.float32"}
        assert res["shas"][k] == shas[k], k
        assert res["sums"][k] == sums[k], k


@pytest.mark.parametrize("loader", list(LOADERS))
def test_writing_to_mmap_tensor_does_not_touch_file(loader, tmp_path):
    numbers = torch.arange(1, 10)
    obj = {"numbers": numbers, "evens": numbers[1::2], "w": torch.randn(64, 64)}
    path = tmp_path / "cow.pt"
    torch.save(obj, path)
    before = _sha256_file(path)

    loaded = LOADERS[loader](path, mmap=True)
    loaded["evens"] *= 2
    loaded["w"].zero_()
    # the writes are visible in this process, through the shared storage
    assert torch.equal(loaded["numbers"], torch.tensor([1, 4, 3, 8, 5, 12, 7, 16, 9]))
    assert not loaded["w"].any()
    del loaded

    assert _sha256_file(path) == before
    again = LOADERS[loader](path, mmap=True)
    assert torch.equal(again["numbers"], numbers)
    assert torch.equal(again["w"], obj["w"])


@pytest.mark.parametrize("loader", list(LOADERS))
def test_mmap_of_fastserial_saved_file(loader, tmp_path):
    gen = torch.Generator().manual_seed(7)
    obj = {
        "a": torch.randn(1000, generator=gen),
        "b": torch.randint(0, 100, (17, 3), generator=gen),
        "c": torch.randn(5, 5, generator=gen).to(torch.bfloat16),
    }
    obj["a_view"] = obj["a"][10:20]
    path = tmp_path / "fs.pt"
    fastserial.save(obj, path)
    loaded = LOADERS[loader](path, mmap=True)
    for k, v in obj.items():
        assert torch.equal(loaded[k], v), k
        assert loaded[k].untyped_storage().nbytes() == v.untyped_storage().nbytes(), k
    assert loaded["a_view"].untyped_storage().data_ptr() == loaded["a"].untyped_storage().data_ptr()
