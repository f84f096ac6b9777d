"""Helpers for the ``test_semantics_*`` files: crafting checkpoints and comparing loads.

The semantics tests compare ``fastserial`` with ``torch`` on the same files, many of
them crafted here by editing what ``torch.save`` writes: a storage re-tagged to
``cuda:1``, a big-endian copy, a DEFLATE-compressed copy, a hand-written pickle
that lies about a storage's size, the pre-0.4 tar layout. The tests at the bottom
check the crafting itself against ``torch.load``, so a broken helper cannot make a
fastserial test pass or fail for the wrong reason.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import struct
import tarfile
import zipfile

import pytest
import torch
from conftest import fixture_path, tensor_bytes
from fastserial import _fastserial as native

# --------------------------------------------------------------------------- bytes in, bytes out


def torch_save_bytes(obj, **kwargs) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf, **kwargs)
    return buf.getvalue()


def fs_save_bytes(obj, **kwargs) -> bytes:
    import fastserial

    buf = io.BytesIO()
    fastserial.save(obj, buf, **kwargs)
    return buf.getvalue()


def read_records(data: bytes) -> tuple[str, dict[str, bytes]]:
    """``(prefix, {record name without the prefix: bytes})``, in archive order."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        names = z.namelist()
        prefix = names[0].split("/", 1)[0]
        return prefix, {n.split("/", 1)[1]: z.read(n) for n in names}


def write_records(records: dict[str, bytes], prefix: str = "archive") -> bytes:
    """A zip checkpoint holding ``records`` in the given order (fastserial's writer:
    stored, 64-byte aligned, as torch writes them)."""
    buf = io.BytesIO()
    writer = native.ArchiveWriter(buf, prefix, atomic=False, durable=False)
    for name, value in records.items():
        writer.write_record(name, value)
    writer.finish(fsync=False)
    return buf.getvalue()


def make_checkpoint(pkl: bytes, storages: dict[str, bytes], byteorder=b"little") -> bytes:
    """A zip checkpoint with torch's record order around a given ``data.pkl``."""
    buf = io.BytesIO()
    writer = native.ArchiveWriter(buf, "archive", atomic=False, durable=False)
    writer.write_record("data.pkl", pkl)
    writer.write_record(".format_version", b"1")
    writer.write_record(".storage_alignment", b"64")
    if byteorder is not None:
        writer.write_record("byteorder", byteorder)
    for key, value in storages.items():
        writer.write_record(f"data/{key}", value)
    writer.write_record("version", b"3\n")
    writer.write_record(".data/serialization_id", writer.serialization_id().encode())
    writer.finish(fsync=False)
    return buf.getvalue()


def rezip(data: bytes, compression=zipfile.ZIP_DEFLATED) -> bytes:
    """The same records rewritten by Python's zipfile (no alignment padding)."""
    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=compression) as z:
        for info in src.infolist():
            z.writestr(info.filename, src.read(info.filename))
    return out.getvalue()


def record_offsets(data: bytes) -> dict[str, int]:
    """``{record name without the prefix: offset of its data in the file}``."""
    out = {}
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        for info in z.infolist():
            name_len, extra_len = struct.unpack(
                "<HH", data[info.header_offset + 26 : info.header_offset + 30]
            )
            out[info.filename.split("/", 1)[1]] = info.header_offset + 30 + name_len + extra_len
    return out


def _binunicode(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def retag(data: bytes, location: str, old: str = "cpu") -> bytes:
    """Every storage of a torch/fastserial checkpoint re-tagged from ``old`` to
    ``location`` (the pickle stores the tag once, as BINUNICODE, and memoizes it)."""
    prefix, records = read_records(data)
    pkl = records["data.pkl"]
    assert pkl.count(_binunicode(old)) >= 1, "no location tag to rewrite"
    records["data.pkl"] = pkl.replace(_binunicode(old), _binunicode(location))
    return write_records(records, prefix)


def storage_locations(data: bytes) -> list:
    """The location of each storage in a zip checkpoint's pickle, in key order of
    first appearance."""
    _, records = read_records(data)
    found: dict = {}

    class Unpickler(pickle.Unpickler):
        def persistent_load(self, pid):
            found.setdefault(pid[2], pid[3])
            return None

        def find_class(self, module, name):
            return lambda *args, **kwargs: None

    Unpickler(io.BytesIO(records["data.pkl"])).load()
    return list(found.values())


def storage_dtypes(pkl: bytes) -> dict:
    """``{storage key: dtype of the tensors over it}``, from a checkpoint's pickle."""
    found: dict = {}

    class Pid:
        def __init__(self, pid):
            self.pid = pid

    class Unpickler(pickle.Unpickler):
        def persistent_load(self, pid):
            return Pid(pid)

        def find_class(self, module, name):
            if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor_v3"):

                def rebuild(storage, offset, size, stride, requires_grad, hooks, *rest):
                    pid = storage.pid
                    dtype = rest[0] if name.endswith("v3") else pid[1]._dtype
                    found.setdefault(pid[2], dtype)

                return rebuild
            return super().find_class(module, name)

    Unpickler(io.BytesIO(pkl)).load()
    return found


def byteswapped(raw: bytes, dtype) -> bytes:
    """``raw`` with each element of ``dtype`` byte-reversed (complex: per component)."""
    size = dtype.itemsize // (2 if dtype.is_complex else 1)
    if size <= 1 or not raw:
        return raw
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(-1, size).flip(1)
    return t.contiguous().numpy().tobytes()


def to_big_endian(data: bytes, byteorder_record: bool = True) -> bytes:
    """A little-endian zip checkpoint rewritten as a big-endian machine would have
    written it: every storage byte-swapped by its tensors' dtype, and the byteorder
    record b'big' (or no byteorder record at all)."""
    prefix, records = read_records(data)
    assert records.get("byteorder", b"little") == b"little"
    for key, dtype in storage_dtypes(records["data.pkl"]).items():
        records[f"data/{key}"] = byteswapped(records[f"data/{key}"], dtype)
    records.pop("byteorder", None)
    out: dict[str, bytes] = {}
    for name, value in records.items():
        if name.startswith("data/") and byteorder_record and "byteorder" not in out:
            out["byteorder"] = b"big"
        out[name] = value
    return write_records(out, prefix)


# --------------------------------------------------------------------------- hand-written pickles


class StorageRef:
    """Pickles as a storage persistent id (zip form, or the legacy 6-tuple)."""

    def __init__(self, key, storage_type, numel, location="cpu", legacy=False):
        self.key, self.storage_type, self.numel = key, storage_type, numel
        self.location, self.legacy = location, legacy

    def pid(self):
        pid = ("storage", self.storage_type, self.key, self.location, self.numel)
        return pid + (None,) if self.legacy else pid


class TensorRef:
    """Pickles as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``,
    whatever the numbers say."""

    def __init__(self, storage, offset, size, stride, requires_grad=False):
        self.args = (
            storage,
            offset,
            tuple(size),
            tuple(stride),
            requires_grad,
            collections.OrderedDict(),
        )

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


class _RefPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, StorageRef):
            return obj.pid()
        return None


def craft_pickle(obj, protocol: int = 2) -> bytes:
    buf = io.BytesIO()
    _RefPickler(buf, protocol).dump(obj)
    return buf.getvalue()


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def make_legacy(obj, storages: dict, counts: dict | None = None, protocol: int = 2) -> bytes:
    """A pre-1.6 legacy stream: magic, version, sys info, the object (StorageRef
    with legacy=True), the key list, then each storage as <q count + bytes.
    ``counts`` overrides the element count written before a storage's bytes."""
    buf = io.BytesIO()
    for header in (
        LEGACY_MAGIC,
        1001,
        {
            "protocol_version": 1001,
            "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4},
        },
    ):
        pickle.dump(header, buf, protocol=protocol)
    _RefPickler(buf, protocol).dump(obj)
    keys = sorted(storages)
    pickle.dump(keys, buf, protocol=protocol)
    for key in keys:
        storage_type, raw = storages[key]
        count = (counts or {}).get(key, len(raw) // storage_type._dtype.itemsize)
        buf.write(struct.pack("<q", count))
        buf.write(raw)
    return buf.getvalue()


# --------------------------------------------------------------------------- the tar format (< 0.4)


class TarRef:
    """Pickles as a tar-format persistent id: the key of a storage or tensor."""

    def __init__(self, key: int):
        self.key = key


class _TarPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return str(obj.key) if isinstance(obj, TarRef) else None


def _tar_member(tar, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_tar(storages: dict, views: list, tensors: dict, obj, location="cpu", protocol=2) -> bytes:
    """torch's pre-0.4 tar layout (see ``legacy_load`` in torch/serialization.py).

    ``storages``: ``{key: (storage class, raw bytes)}``; ``views``: ``[(key, root key,
    offset, numel)]``; ``tensors``: ``{key: (storage key, tensor class, size, stride,
    offset)}``; ``obj`` refers to storages and tensors as ``TarRef(key)``.
    """
    s = io.BytesIO()
    pickle.dump(len(storages), s, protocol=protocol)
    for key, (storage_type, raw) in storages.items():
        pickle.dump((key, location, storage_type), s, protocol=protocol)
        s.write(struct.pack("<q", len(raw) // storage_type._dtype.itemsize))
        s.write(raw)
    pickle.dump(views, s, protocol=protocol)
    t = io.BytesIO()
    pickle.dump(len(tensors), t, protocol=protocol)
    for key, (storage_key, tensor_type, size, stride, offset) in tensors.items():
        pickle.dump((key, storage_key, tensor_type), t, protocol=protocol)
        t.write(struct.pack("<i", len(size)) + b"\0\0\0\0")
        t.write(struct.pack(f"<{len(size)}q", *size))
        t.write(struct.pack(f"<{len(stride)}q", *stride))
        t.write(struct.pack("<q", offset))
    p = io.BytesIO()
    _TarPickler(p, protocol).dump(obj)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        _tar_member(tar, "storages", s.getvalue())
        _tar_member(tar, "tensors", t.getvalue())
        _tar_member(tar, "pickle", p.getvalue())
    return out.getvalue()


def sample_tar() -> bytes:
    """A tar checkpoint: a float storage with a storage view, tensors over the root
    and over the view (one strided), a long tensor, the storage itself, a scalar."""
    floats = torch.arange(6, dtype=torch.float32).numpy().tobytes()
    longs = torch.arange(3, dtype=torch.int64).numpy().tobytes()
    return make_tar(
        {1: (torch.FloatStorage, floats), 2: (torch.LongStorage, longs)},
        [(3, 1, 2, 3)],
        {
            10: (1, torch.FloatTensor, (2, 3), (3, 1), 0),
            11: (3, torch.FloatTensor, (3,), (1,), 0),
            12: (1, torch.FloatTensor, (2,), (2,), 1),
            13: (2, torch.LongTensor, (3,), (1,), 0),
        },
        {
            "matrix": TarRef(10),
            "of_view": TarRef(11),
            "strided": TarRef(12),
            "longs": TarRef(13),
            "storage": TarRef(1),
            "n": 5,
        },
    )


# --------------------------------------------------------------------------- comparing loads


def assert_same(got, want, where: str = "obj", *, check_sharing: bool = True) -> None:
    """``got`` (from fastserial) equals ``want`` (from torch): types, structure,
    tensor metadata and values, Python attributes; with ``check_sharing``, tensors
    share storages exactly where ``want``'s do."""
    got_ptrs: list = []
    want_ptrs: list = []
    _same(got, want, where, got_ptrs, want_ptrs, {})
    if check_sharing:
        assert len(got_ptrs) == len(want_ptrs)
        first_got: dict = {}
        first_want: dict = {}
        for i, ((gp, w1), (wp, _)) in enumerate(zip(got_ptrs, want_ptrs)):
            a = first_got.setdefault(gp, i)
            b = first_want.setdefault(wp, i)
            assert a == b, (
                f"{w1}: storage sharing differs from torch's (fastserial shares with "
                f"{got_ptrs[a][1]}, torch with {want_ptrs[b][1]})"
            )


def _same(got, want, where, got_ptrs, want_ptrs, seen):
    assert type(got) is type(want), f"{where}: {type(got)} != {type(want)}"
    if isinstance(want, (list, tuple, dict)) or hasattr(want, "__dict__"):
        # Containers and objects: the same identity structure (and no infinite
        # recursion on self-referencing ones).
        if id(want) in seen:
            assert seen[id(want)][1] is got, f"{where}: object identity differs"
            return
        seen[id(want)] = (want, got)  # keeps both alive: ids stay unique
    if isinstance(want, torch.Tensor):
        _same_tensor(got, want, where, got_ptrs, want_ptrs)
        _same_attrs(got, want, where, got_ptrs, want_ptrs, seen)
    elif isinstance(want, torch.storage.TypedStorage):
        assert got.dtype == want.dtype and got._size() == want._size(), where
        device = want._untyped_storage.device.type
        assert got._untyped_storage.device.type == device, where
        if device != "meta":
            assert bytes(got._untyped_storage.cpu()) == bytes(want._untyped_storage.cpu()), where
    elif isinstance(want, torch.UntypedStorage):
        assert got.nbytes() == want.nbytes() and got.device.type == want.device.type, where
        if want.device.type != "meta":
            assert bytes(got.cpu()) == bytes(want.cpu()), where
    elif isinstance(want, dict):
        assert list(got.keys()) == list(want.keys()), f"{where}: keys differ"
        for k in want:
            _same(got[k], want[k], f"{where}[{k!r}]", got_ptrs, want_ptrs, seen)
        assert hasattr(got, "_metadata") == hasattr(want, "_metadata"), where
        if hasattr(want, "_metadata"):
            _same(got._metadata, want._metadata, f"{where}._metadata", got_ptrs, want_ptrs, seen)
    elif isinstance(want, (list, tuple)) and type(want) in (list, tuple, torch.Size):
        assert len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{where}[{i}]", got_ptrs, want_ptrs, seen)
    elif isinstance(want, float):
        assert (math.isnan(got) and math.isnan(want)) or got == want, f"{where}: {got} != {want}"
    elif isinstance(want, (int, str, bytes, bytearray, complex, set, frozenset, type(None))):
        assert got == want, f"{where}: {got!r} != {want!r}"
    elif isinstance(want, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        assert got == want, f"{where}: {got!r} != {want!r}"
    elif isinstance(want, torch.nn.Module):
        _same(
            got.state_dict(), want.state_dict(), f"{where}.state_dict()", got_ptrs, want_ptrs, seen
        )
        assert got.training == want.training, where
    elif hasattr(want, "__dict__"):
        _same_attrs(got, want, where, got_ptrs, want_ptrs, seen)
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


def _same_attrs(got, want, where, got_ptrs, want_ptrs, seen):
    gd, wd = dict(vars(got)), dict(vars(want))
    assert sorted(gd) == sorted(wd), f"{where}: attributes {sorted(gd)} != {sorted(wd)}"
    for k in wd:
        _same(gd[k], wd[k], f"{where}.{k}", got_ptrs, want_ptrs, seen)


def _same_tensor(got, want, where, got_ptrs, want_ptrs):
    assert got.is_nested == want.is_nested, f"{where}: is_nested differs"
    if want.is_nested:
        assert (got.dtype, got.device, got.requires_grad) == (
            want.dtype,
            want.device,
            want.requires_grad,
        )
        assert len(got.unbind()) == len(want.unbind()), where
        for i, (g, w) in enumerate(zip(got.unbind(), want.unbind())):
            _same_tensor(g, w, f"{where}.unbind()[{i}]", [], [])
        return
    for attr in ("dtype", "layout", "shape", "requires_grad", "is_quantized"):
        assert getattr(got, attr) == getattr(want, attr), (
            f"{where}: {attr} {getattr(got, attr)} != {getattr(want, attr)}"
        )
    assert got.device == want.device, f"{where}: device {got.device} != {want.device}"
    if want.device.type == "meta":
        return
    if want.layout == torch.sparse_coo:
        assert got.is_coalesced() == want.is_coalesced(), where
        assert torch.equal(got._indices(), want._indices()), where
        assert tensor_bytes(got._values()) == tensor_bytes(want._values()), where
        return
    if want.layout != torch.strided:
        assert tensor_bytes(got.to_dense()) == tensor_bytes(want.to_dense()), where
        return
    if want.is_quantized:
        assert got.qscheme() == want.qscheme(), where
        if want.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
            assert (got.q_scale(), got.q_zero_point()) == (want.q_scale(), want.q_zero_point())
        else:
            assert torch.equal(got.q_per_channel_scales(), want.q_per_channel_scales()), where
            assert torch.equal(got.q_per_channel_zero_points(), want.q_per_channel_zero_points())
            assert got.q_per_channel_axis() == want.q_per_channel_axis(), where
    assert got.stride() == want.stride(), f"{where}: stride {got.stride()} != {want.stride()}"
    assert got.storage_offset() == want.storage_offset(), f"{where}: storage_offset differs"
    assert got.untyped_storage().nbytes() == want.untyped_storage().nbytes(), (
        f"{where}: storage nbytes {got.untyped_storage().nbytes()} != "
        f"{want.untyped_storage().nbytes()}"
    )
    assert tensor_bytes(got) == tensor_bytes(want), f"{where}: values differ"
    if want.untyped_storage().nbytes() and not want.is_quantized:
        got_ptrs.append((got.untyped_storage().data_ptr(), where))
        want_ptrs.append((want.untyped_storage().data_ptr(), where))


# --------------------------------------------------------------------------- the helpers, checked


def test_retag_changes_every_location_and_torch_honours_it():
    data = retag(torch_save_bytes({"a": torch.ones(2), "b": torch.zeros(3)}), "cuda:1")
    assert storage_locations(data) == ["cuda:1", "cuda:1"]
    got = torch.load(io.BytesIO(data), map_location="cpu")
    assert torch.equal(got["a"], torch.ones(2)) and torch.equal(got["b"], torch.zeros(3))


def test_big_endian_copy_reads_back_in_torch_for_typed_storages():
    obj = {
        "f": torch.tensor([1.5, -2.0]),
        "c": torch.tensor([1 + 2j], dtype=torch.complex128),
        "i": torch.tensor([1, -300], dtype=torch.int16),
        "b": torch.tensor([True, False]),
    }
    original = torch_save_bytes(obj)
    big = to_big_endian(original)
    _, records = read_records(big)
    assert records["byteorder"] == b"big"
    head = list(records)[: list(records).index("byteorder") + 1]
    assert head[0] == "data.pkl" and set(head[1:-1]) <= {".format_version", ".storage_alignment"}
    assert records["data/0"] != read_records(original)[1]["data/0"]
    assert_same(torch.load(io.BytesIO(big)), obj)
    assert "byteorder" not in read_records(to_big_endian(original, byteorder_record=False))[1]


def test_crafted_pickle_reads_in_torch():
    raw = torch.arange(6, dtype=torch.float32).numpy().tobytes()
    pkl = craft_pickle({"t": TensorRef(StorageRef("0", torch.FloatStorage, 6), 1, (2, 2), (2, 1))})
    got = torch.load(io.BytesIO(make_checkpoint(pkl, {"0": raw})))
    assert got["t"].tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_crafted_legacy_stream_reads_in_torch():
    raw = torch.arange(4, dtype=torch.float32).numpy().tobytes()
    ref = StorageRef("k", torch.FloatStorage, 4, legacy=True)
    data = make_legacy({"t": TensorRef(ref, 1, (3,), (1,))}, {"k": (torch.FloatStorage, raw)})
    assert torch.load(io.BytesIO(data))["t"].tolist() == [1.0, 2.0, 3.0]


def test_crafted_tar_reads_in_torch(tmp_path):
    path = tmp_path / "old.tar.pt"
    path.write_bytes(sample_tar())
    got = torch.load(path, weights_only=False)
    assert got["matrix"].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert got["of_view"].tolist() == [2, 3, 4] and got["strided"].tolist() == [1, 3]
    assert got["longs"].dtype == torch.int64 and got["n"] == 5


def test_rezip_deflates_and_torch_reads_it():
    data = fixture_path("views.pt").read_bytes()
    deflated = rezip(data)
    assert {i.compress_type for i in zipfile.ZipFile(io.BytesIO(deflated)).infolist()} == {
        zipfile.ZIP_DEFLATED
    }
    assert_same(torch.load(io.BytesIO(deflated)), torch.load(io.BytesIO(data)))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.__setitem__("x", d["x"] + 1),
        lambda d: d.__setitem__("x", d["x"].t().contiguous().t()),
        lambda d: d.__setitem__("y", d["x"][0].clone()),
        lambda d: d.__setitem__("x", d["x"].double()),
        lambda d: setattr(d["x"], "note", 1),
        lambda d: d.__setitem__("s", torch.Size([4])),
    ],
)
def test_assert_same_notices_differences(mutate):
    base = torch.arange(6.0).view(2, 3)
    want = {"x": base, "y": base[0], "s": torch.Size([3])}
    got = {"x": base.clone(), "y": None, "s": torch.Size([3])}
    got["y"] = got["x"][0]
    assert_same(got, want)
    mutate(got)
    with pytest.raises(AssertionError):
        assert_same(got, want)
