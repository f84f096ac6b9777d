"""Small tensors of eager loads packed into shared blocks (rust/src/python/dlpack.rs).

An eager CPU load gives every dense tensor of at most 64 KiB (ndim <= 8, a dtype torch
exports through DLPack) memory carved from a 16 MiB anonymous block, 64-byte aligned,
made by ``torch._C._from_dlpack``; its storage is its own, of exactly its record's size,
and not resizable. Small ``data/`` records are prefetched into the blocks on a worker
thread while the pickle runs. A block lives as long as some tensor over it
(``_fastserial.packed_blocks_alive()``). Every load is compared with ``torch.load``.
"""

from __future__ import annotations

import copy
import gc
import io
import os
import re
import threading
import zipfile

import fastserial
import pytest
import torch
from conftest import fs_load, tensor_bytes
from fastserial import _fastserial as native
from fastserial import serialization
from test_semantics_craft import (
    assert_same,
    fs_save_bytes,
    read_records,
    record_offsets,
    to_big_endian,
    torch_save_bytes,
    write_records,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:TypedStorage is deprecated"),
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor"),
]

SAVERS = {"torch": torch_save_bytes, "fastserial": fs_save_bytes}


# --------------------------------------------------------------------------- helpers


def use_python_unpickler(monkeypatch):
    """Makes every load run its pickle through Python's unpickler."""
    monkeypatch.setattr(serialization._ZipLoader, "_native_globals", lambda *a, **k: None)


@pytest.fixture(autouse=True)
def restore_settings():
    threads, pack = fastserial.get_num_threads(), fastserial.get_pack_small_tensors()
    yield
    fastserial.set_num_threads(threads)
    fastserial.set_pack_small_tensors(pack)


def blocks() -> int:
    gc.collect()
    return native.packed_blocks_alive()


def write(tmp_path, data: bytes, name: str = "ckpt.pt"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def small_object(n=300, numel=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"t{i}": torch.randn(numel, generator=g) for i in range(n)}


def load_both(path, **kwargs):
    """``(fastserial.load, torch.load)`` of ``path``, checked equal."""
    got = fastserial.load(str(path), **kwargs)
    want = torch.load(str(path), weights_only=False, **kwargs)
    assert_same(got, want)
    return got, want


def assert_packed(t, where="tensor"):
    st = t.untyped_storage()
    resizable = st.resizable()
    assert not resizable, f"{where}: storage is resizable (not packed)"
    assert st.nbytes() == t.numel() * t.element_size(), where
    assert st.data_ptr() % 64 == 0, f"{where}: data_ptr {st.data_ptr():#x} not 64-aligned"


def random_bits(dtype, shape, g):
    """A tensor of ``dtype`` holding random bit patterns (bool: 0 or 1)."""
    n = dtype.itemsize * int(torch.Size(shape).numel())
    raw = torch.randint(0, 2 if dtype is torch.bool else 256, (n,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).view(shape)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("saver", list(SAVERS))
def test_many_small_tensors_are_packed(loaders, tmp_path, saver):
    """300 small float32 tensors load equal to torch, each on its own exact-size,
    64-aligned, non-resizable storage, through the native unpickler."""
    obj = small_object()
    path = write(tmp_path, SAVERS[saver](obj))
    base = blocks()
    got, used = fs_load(loaders, str(path))
    assert used == "native"
    assert_same(got, torch.load(str(path)))
    ptrs = set()
    for k, t in got.items():
        assert torch.equal(t, obj[k]), k
        assert_packed(t, k)
        ptrs.add(t.untyped_storage().data_ptr())
    assert len(ptrs) == len(obj)
    assert blocks() > base


def test_every_dlpack_dtype_loads_bit_identical(tmp_path):
    """Each dtype of the DLPack table (contiguous and transposed) is packed and loads
    bit-identical to torch, with dtype, shape and stride kept."""
    codes = serialization._TorchInfo.get().dlpack_codes
    assert {torch.bool, torch.bfloat16, torch.complex64, torch.float32} <= set(codes)
    g = torch.Generator().manual_seed(1)
    obj = {}
    for dt in codes:
        obj[f"{dt}"] = random_bits(dt, (3, 5), g)
        obj[f"{dt}_t"] = random_bits(dt, (4, 6), g).t()
        obj[f"{dt}_s"] = random_bits(dt, (), g)
    path = write(tmp_path, torch_save_bytes(obj))
    got, want = load_both(path)
    for k, t in got.items():
        w = want[k]
        assert (t.dtype, t.shape, t.stride()) == (w.dtype, w.shape, w.stride()), k
        assert tensor_bytes(t) == tensor_bytes(w) == tensor_bytes(obj[k]), k
        assert_packed(t, k)


def test_dtypes_outside_the_table_still_load(tmp_path):
    """Dtypes torch cannot export through DLPack (bits, float4, quantized) load as
    torch loads them, unpacked, next to packed float32 tensors."""
    codes = serialization._TorchInfo.get().dlpack_codes
    g = torch.Generator().manual_seed(4)
    obj = small_object(n=40, numel=16)
    others = [
        getattr(torch, n) for n in ("bits16", "bits8", "float4_e2m1fn_x2") if hasattr(torch, n)
    ]
    for dt in others:
        assert dt not in codes
        obj[f"{dt}"] = random_bits(torch.uint8, (12,), g).view(dt)
    got, _ = load_both(write(tmp_path, torch_save_bytes(obj)))
    for dt in others:
        assert got[f"{dt}"].untyped_storage().resizable(), dt
    assert_packed(got["t0"])
    quantized = {}
    for dt in (torch.quint8, torch.qint8, torch.qint32):
        assert dt not in codes
        try:
            quantized[f"{dt}"] = torch.quantize_per_tensor(torch.randn(10), 0.1, 3, dt)
            torch_save_bytes(quantized[f"{dt}"])
        except Exception as e:  # noqa: BLE001 - a torch build without quantization
            pytest.skip(f"torch cannot save {dt}: {e}")
    got, _ = load_both(write(tmp_path, torch_save_bytes(quantized), "q.pt"))
    assert got["torch.quint8"].is_quantized and got["torch.quint8"].dtype == torch.quint8


def test_block_lives_while_any_tensor_over_it_lives(tmp_path):
    """A kept tensor keeps its block (and values); freeing the last one unmaps it."""
    path = write(tmp_path, fs_save_bytes(small_object(n=200)))
    base = blocks()
    got = fastserial.load(str(path))
    kept = got["t123"]
    ref = kept.clone()
    del got
    assert blocks() >= base + 1
    torch.randn(1 << 20)  # churn the allocator
    assert torch.equal(kept, ref)
    del kept
    assert blocks() == base


def test_blocks_freed_from_another_thread(tmp_path):
    """Tensors freed on a thread other than the loading one release their blocks."""
    path = write(tmp_path, fs_save_bytes(small_object(n=200)))
    base = blocks()
    box = [fastserial.load(str(path))]
    assert blocks() > base
    worker = threading.Thread(target=box.clear)
    worker.start()
    worker.join()
    assert not box
    assert blocks() == base


def test_packing_off_gives_resizable_storages(tmp_path):
    """set_pack_small_tensors(False): no blocks, resizable storages, equal values."""
    path = write(tmp_path, fs_save_bytes(small_object(n=50)))
    fastserial.set_pack_small_tensors(False)
    assert fastserial.get_pack_small_tensors() is False
    base = blocks()
    got, _ = load_both(path)
    assert blocks() == base
    t = got["t7"]
    assert t.untyped_storage().resizable()
    ref = t.clone()
    t.resize_(2 * t.numel())
    assert torch.equal(t[: ref.numel()], ref)
    fastserial.set_pack_small_tensors(True)
    assert fastserial.get_pack_small_tensors() is True
    t = fastserial.load(str(path))["t7"]
    with pytest.raises(RuntimeError):
        t.resize_(2 * t.numel())


def test_packed_tensors_behave_like_ordinary_ones(tmp_path):
    """share_memory_, clone, deepcopy, numpy and saving again all work on packed tensors."""
    obj = small_object(n=40)
    path = write(tmp_path, fs_save_bytes(obj))
    got = fastserial.load(str(path))
    t = got["t3"]
    assert_packed(t)
    t.share_memory_()
    assert t.is_shared() and torch.equal(t, obj["t3"])
    assert torch.equal(got["t4"].clone(), obj["t4"])
    dc = copy.deepcopy(got)
    for k in obj:
        assert torch.equal(dc[k], obj[k]), k
    assert (got["t5"].numpy() == obj["t5"].numpy()).all()
    for name, data in (("torch", torch_save_bytes(got)), ("fs", fs_save_bytes(got))):
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            records = [n for n in z.namelist() if n.split("/", 1)[1].startswith("data/")]
        assert len(records) == len(obj), name
        back = torch.load(io.BytesIO(data))
        for k in obj:
            assert torch.equal(back[k], obj[k]), (name, k)


@pytest.mark.parametrize(
    "make",
    [
        lambda a: {"a": a, "b": a[8:]},
        lambda a: {"a": a, "v": a.view(8, 8)},
        lambda a: {"b": a[8:], "a": a},
    ],
    ids=["slice", "view", "slice-first"],
)
def test_shared_small_storage(tmp_path, make):
    """Tensors sharing one small storage still share it after the load."""
    obj = make(torch.arange(64.0))
    got, _ = load_both(write(tmp_path, torch_save_bytes(obj)))
    ptrs = {t.untyped_storage().data_ptr() for t in got.values()}
    assert len(ptrs) == 1
    assert got["a"].untyped_storage().nbytes() == 256


def test_layouts_and_sizes_decide_packing(tmp_path):
    """Transposed small tensors keep strides; ndim 9 and > 64 KiB are not packed."""
    g = torch.Generator().manual_seed(2)
    obj = {
        "t": torch.randn(8, 16, generator=g).t(),
        "nine": torch.randn(1, 1, 1, 1, 1, 1, 1, 2, 3, generator=g),
        "eight": torch.randn(1, 1, 1, 1, 1, 1, 2, 3, generator=g),
        "large": torch.randn(100_000, generator=g),
        "edge": torch.randn(16384, generator=g),  # exactly 64 KiB
        **small_object(n=20, numel=8),
    }
    got, _ = load_both(write(tmp_path, torch_save_bytes(obj)))
    assert got["t"].stride() == (1, 16)
    for k in ("t", "eight", "edge", "t0", "t19"):
        assert_packed(got[k], k)
    assert got["nine"].untyped_storage().resizable()
    assert got["large"].untyped_storage().resizable()


@pytest.mark.parametrize("saver", list(SAVERS))
def test_big_endian_file_packs_without_prefetch(tmp_path, saver):
    """A big-endian file's small tensors load equal to torch's and are still packed."""
    g = torch.Generator().manual_seed(3)
    obj = small_object(n=60, numel=32)
    obj.update({f"h{i}": random_bits(torch.float16, (4, 3), g) for i in range(20)})
    obj.update({f"c{i}": random_bits(torch.complex64, (5,), g) for i in range(20)})
    data = to_big_endian(SAVERS[saver](obj))
    assert read_records(data)[1]["byteorder"] == b"big"
    got, _ = load_both(write(tmp_path, data))
    for k in obj:
        assert tensor_bytes(got[k]) == tensor_bytes(obj[k]), k
        assert_packed(got[k], k)


def _data_records(data: bytes) -> list[str]:
    return [n for n in record_offsets(data) if n.startswith("data/")]


@pytest.mark.parametrize("unpickler", ["native", "python"])
def test_corrupt_small_record_named_in_error(loaders, monkeypatch, tmp_path, unpickler):
    """A flipped byte in a small record fails verify=True naming that record."""
    if unpickler == "python":
        use_python_unpickler(monkeypatch)
    data = bytearray(fs_save_bytes(small_object(n=100)))
    target = _data_records(bytes(data))[5]
    data[record_offsets(bytes(data))[target] + 17] ^= 0x40
    path = write(tmp_path, bytes(data))
    with pytest.raises(fastserial.CheckpointError) as e:
        fastserial.load(str(path), verify=True)
    assert re.search(re.escape(target) + r"(?!\d)", str(e.value)), str(e.value)
    assert loaders[-1].unpickler_used == unpickler


def test_corrupt_unreferenced_record_fails_nothing(tmp_path):
    """A corrupt data/ record the pickle never uses does not fail a verified load."""
    obj = small_object(n=100)
    prefix, records = read_records(torch_save_bytes(obj))
    out = {}
    for name, value in records.items():
        if name == "version":
            out["data/999"] = bytes(range(256)) * 4
        out[name] = value
    data = bytearray(write_records(out, prefix))
    data[record_offsets(bytes(data))["data/999"] + 10] ^= 0xFF
    path = write(tmp_path, bytes(data))
    with zipfile.ZipFile(path) as z:
        assert z.testzip() == f"{prefix}/data/999"  # the stored CRC is wrong
    try:
        want = torch.load(str(path))
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"torch.load refuses the crafted file: {e}")
    got = fastserial.load(str(path), verify=True)
    assert_same(got, want)
    for k in obj:
        assert_packed(got[k], k)


def test_truncated_file_is_checkpoint_error(tmp_path):
    """A file cut inside its data area raises CheckpointError."""
    data = fs_save_bytes(small_object(n=100))
    offsets = record_offsets(data)
    cut = offsets[_data_records(data)[50]] + 100
    path = write(tmp_path, data[:cut])
    with pytest.raises(fastserial.CheckpointError):
        fastserial.load(str(path))
    with pytest.raises(fastserial.CheckpointError):
        fastserial.load(str(path), verify=True)


def _failing_from_dlpack(monkeypatch, when, first=10, last=None):
    """Patches the factory's from_dlpack to raise on calls ``first..last`` (before or
    after torch made the tensor); returns the call counter."""
    info = serialization._TorchInfo.get()
    real, calls = info.from_dlpack, [0]

    def flaky(capsule):
        calls[0] += 1
        failing = first <= calls[0] and (last is None or calls[0] <= last)
        if failing and when == "before":
            raise RuntimeError("injected from_dlpack failure")
        t = real(capsule)
        if failing:
            raise RuntimeError("injected from_dlpack failure")
        return t

    monkeypatch.setattr(info, "from_dlpack", flaky)
    return calls


@pytest.mark.parametrize("unpickler", ["native", "python"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_failed_tensor_creation_leaks_no_block(monkeypatch, tmp_path, when, unpickler):
    """from_dlpack failing from its 10th call on fails the load, and every block
    (prefetched ones included) is unmapped afterwards."""
    if unpickler == "python":
        use_python_unpickler(monkeypatch)
    path = write(tmp_path, fs_save_bytes(small_object(n=200)))
    base = blocks()
    calls = _failing_from_dlpack(monkeypatch, when)
    with pytest.raises(RuntimeError, match="injected from_dlpack failure"):
        fastserial.load(str(path))
    assert calls[0] >= 10
    assert blocks() == base


@pytest.mark.parametrize("when", ["before", "after"])
def test_native_run_given_up_leaks_no_block(loaders, monkeypatch, tmp_path, when):
    """A single from_dlpack failure in the native machine makes the load start over in
    Python (by design); the result is right and the discarded run's blocks are freed."""
    obj = small_object(n=200)
    path = write(tmp_path, fs_save_bytes(obj))
    base = blocks()
    calls = _failing_from_dlpack(monkeypatch, when, first=10, last=10)
    got, used = fs_load(loaders, str(path))
    assert used == "python" and calls[0] == 10 + len(obj)
    for k in obj:
        assert torch.equal(got[k], obj[k]), k
        assert_packed(got[k], k)
    del got
    assert blocks() == base


def test_python_unpickler_packs_too(loaders, monkeypatch, tmp_path):
    """Through Python's unpickler, small tensors are packed and equal to torch's."""
    use_python_unpickler(monkeypatch)
    obj = small_object(n=100)
    path = write(tmp_path, torch_save_bytes(obj))
    got, used = fs_load(loaders, str(path))
    assert used == "python"
    assert_same(got, torch.load(str(path)))
    for k in obj:
        assert_packed(got[k], k)


def test_mmap_loads_are_not_packed(tmp_path):
    """mmap=True loads equal torch's (mmap=True) and create no blocks."""
    path = write(tmp_path, torch_save_bytes(small_object(n=100)))
    base = blocks()
    got, _ = load_both(path, mmap=True)
    assert blocks() == base
    assert got["t0"].untyped_storage().nbytes() == 1024


@pytest.mark.parametrize("pack", [True, False])
def test_mmap_tensors_keep_their_mapping_alive(tmp_path, pack):
    """mmap=True tensors are made over the file's mapping through DLPack, whose
    deleter holds the mapping: a tensor outlives its dict, the loader and the file's
    name, and stays a private copy-on-write view (writes never reach the file)."""
    fastserial.set_pack_small_tensors(pack)  # mmap loads view the file either way
    obj = small_object(n=50)
    path = write(tmp_path, torch_save_bytes(obj))
    got = fastserial.load(str(path), mmap=True)
    kept = got["t7"]
    assert not kept.untyped_storage().resizable()
    del got
    gc.collect()
    assert torch.equal(kept, obj["t7"])
    kept.add_(1)
    assert torch.equal(torch.load(str(path))["t7"], obj["t7"])  # the file is unchanged
    os.remove(path)
    gc.collect()
    assert torch.equal(kept, obj["t7"] + 1)


def test_single_thread_load(tmp_path):
    """With one thread, many small tensors still load equal and packed."""
    fastserial.set_num_threads(1)
    obj = small_object(n=500, numel=64)
    path = write(tmp_path, fs_save_bytes(obj))
    got, _ = load_both(path)
    for k in obj:
        assert_packed(got[k], k)
