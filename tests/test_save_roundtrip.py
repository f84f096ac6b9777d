"""fastserial.save: output readable by torch.load and laid out exactly like torch.save's.

Each benign fixture is loaded with torch.load, saved with fastserial.save and
then checked (a) semantically, by loading it back with torch.load and
fastserial.load and matching the manifest, and (b) structurally, against a
torch.save of the same object: same record names in the same order, 64-byte
aligned stored (uncompressed) records, valid CRCs, same metadata records and
the same storage bytes.
"""

import functools
import io
import pickle
import re
import struct
import zipfile

import fastserial
import pytest
import torch
from conftest import (
    assert_matches_manifest,
    expected_for,
    fixture_names,
    fixture_path,
    load_with_mode,
    manifest_weights_only,
    requires_cuda,
    tensor_bytes,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

BENIGN = fixture_names()
META_RECORDS = (".format_version", ".storage_alignment", "byteorder", "version")


def _torch_loaded(name):
    return torch.load(fixture_path(name), weights_only=manifest_weights_only(name))


@functools.cache
def reload_weights_only(name, protocol=2) -> bool:
    """Whether a re-saved copy of ``name`` can be loaded with weights_only=True (asks torch).

    False for module.pt (pickled by class) and, e.g., for nested.pt at pickle
    protocol >= 3, whose bytes objects use opcodes torch's weights-only
    unpickler refuses.
    """
    buf = io.BytesIO()
    torch.save(_torch_loaded(name), buf, pickle_protocol=protocol)
    buf.seek(0)
    try:
        torch.load(buf, weights_only=True)
    except pickle.UnpicklingError:
        return False
    return True


# --------------------------------------------------------------------------
# Zip inspection
# --------------------------------------------------------------------------


def zip_records(raw: bytes):
    """[(name, data_offset, size)] in central-directory order, with sanity checks."""
    zf = zipfile.ZipFile(io.BytesIO(raw))
    assert zf.testzip() is None, "CRC check failed"
    records = []
    for info in zf.infolist():
        off = info.header_offset
        assert raw[off : off + 4] == b"PK\x03\x04", f"{info.filename}: no local header at {off}"
        name_len, extra_len = struct.unpack_from("<HH", raw, off + 26)
        assert raw[off + 30 : off + 30 + name_len].decode("utf-8") == info.filename
        start = off + 30 + name_len + extra_len
        assert info.compress_type == zipfile.ZIP_STORED, f"{info.filename} is compressed"
        assert raw[start : start + info.file_size] == zf.read(info), f"{info.filename}: data offset"
        records.append((info.filename, start, info.file_size))
    return zf, records


def expected_torch_order(n_storages: int) -> list:
    # torch >= 2.7 writes .format_version and .storage_alignment; 2.6 does not.
    versioned = hasattr(torch.serialization, "_get_storage_alignment")
    format_records = [".format_version", ".storage_alignment"] if versioned else []
    keys = [str(i) for i in range(n_storages)]  # 2.6 writes them sorted as strings
    return (
        ["data.pkl", *format_records, "byteorder"]
        + [f"data/{k}" for k in (keys if versioned else sorted(keys))]
        + ["version", ".data/serialization_id"]
    )


def assert_torch_layout(raw: bytes, prefix: str, reference_raw: bytes, *, protocol: int = 2):
    """Assert that ``raw`` (fastserial.save output) is laid out like ``reference_raw`` (torch.save)."""
    zf, records = zip_records(raw)
    ref_zf, ref_records = zip_records(reference_raw)
    names = [r[0] for r in records]

    # one top folder, named like torch names it
    for name in names:
        assert name.startswith(prefix + "/"), f"record {name!r} is not under {prefix!r}/"
    assert ref_records[0][0] == prefix + "/data.pkl", "reference prefix mismatch"
    rel = [n[len(prefix) + 1 :] for n in names]
    ref_rel = [n.split("/", 1)[1] for n, _, _ in ref_records]

    # torch's order (also compared with torch.save's actual output)
    n_data = sum(1 for n in rel if n.startswith("data/"))
    assert rel == ref_rel
    if "byteorder" in rel[:4]:
        assert rel == expected_torch_order(n_data)

    # 64-byte aligned storage records (the alignment torch records)
    # (torch 2.6 writes no .storage_alignment record; it aligns to 64 all the same)
    alignment = int(zf.read(prefix + "/.storage_alignment")) if ".storage_alignment" in rel else 64
    assert alignment == 64
    for name, start, _size in records:
        if name[len(prefix) + 1 :].startswith("data/"):
            assert start % alignment == 0, f"{name} data starts at {start}, not {alignment}-aligned"

    # metadata records identical to torch's
    for meta in META_RECORDS:
        if meta in ref_rel:
            assert zf.read(f"{prefix}/{meta}") == ref_zf.read(
                ref_records[ref_rel.index(meta)][0]
            ), meta

    sid = zf.read(prefix + "/.data/serialization_id")
    assert re.fullmatch(rb"[0-9]{40}", sid), f"serialization_id {sid!r}"

    pkl = zf.read(prefix + "/data.pkl")
    assert pkl[:2] == b"\x80" + bytes([protocol]), f"data.pkl starts with {pkl[:2]!r}"

    # the same storage bytes (storage numbering may differ; compare as multisets)
    def storage_blobs(z, recs):
        return sorted(z.read(n) for n, _, _ in recs if n.split("/", 1)[1].startswith("data/"))

    assert storage_blobs(zf, records) == storage_blobs(ref_zf, ref_records)


def _check_loads(target, name, *, fs_modes=("path", "bytesio", "mmap"), protocol=2):
    """torch.load and fastserial.load of ``target`` (path or bytes) match the manifest."""
    wo = reload_weights_only(name, protocol)
    expect = expected_for(name)
    if isinstance(target, bytes):
        assert_matches_manifest(torch.load(io.BytesIO(target), weights_only=wo), expect)
        assert_matches_manifest(fastserial.load(io.BytesIO(target), weights_only=wo), expect)
        return
    assert_matches_manifest(torch.load(target, weights_only=wo), expect)
    assert_matches_manifest(torch.load(target, weights_only=wo, mmap=True), expect)
    for mode in fs_modes:
        assert_matches_manifest(
            load_with_mode(fastserial.load, target, mode, weights_only=wo), expect
        )


# --------------------------------------------------------------------------
# Fixture round trips
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", BENIGN)
def test_save_to_path(name, tmp_path):
    obj = _torch_loaded(name)
    out = tmp_path / "ckpt.pt"
    ret = fastserial.save(obj, out)
    assert ret is None
    (tmp_path / "ref").mkdir()
    torch.save(obj, tmp_path / "ref" / "ckpt.pt")

    raw = out.read_bytes()
    assert_torch_layout(raw, "ckpt", (tmp_path / "ref" / "ckpt.pt").read_bytes())
    _check_loads(out, name)


@pytest.mark.parametrize("name", BENIGN)
def test_save_to_bytesio(name):
    obj = _torch_loaded(name)
    buf = io.BytesIO()
    fastserial.save(obj, buf)
    ref = io.BytesIO()
    torch.save(obj, ref)

    raw = buf.getvalue()
    assert_torch_layout(raw, "archive", ref.getvalue())
    _check_loads(raw, name)


@pytest.mark.parametrize("name", ["views.pt", "state_dict.pt", "nested.pt", "module.pt"])
def test_save_to_open_file_object(name, tmp_path):
    obj = _torch_loaded(name)
    out = tmp_path / "fobj.pt"
    with open(out, "wb") as fh:
        fastserial.save(obj, fh)
    ref = tmp_path / "ref.pt"
    with open(ref, "wb") as fh:
        torch.save(obj, fh)
    # torch names the top folder 'archive' for file objects
    prefix = zipfile.ZipFile(ref).namelist()[0].split("/")[0]
    assert_torch_layout(out.read_bytes(), prefix, ref.read_bytes())
    _check_loads(out, name)


def test_save_to_bytesio_at_nonzero_position():
    # Like torch, writing into a buffer that already holds bytes appends the
    # checkpoint at the current position; loading from that position works.
    obj = _torch_loaded("views.pt")
    buf = io.BytesIO()
    buf.write(b"HEADER--")
    fastserial.save(obj, buf)
    buf.seek(8)
    assert_matches_manifest(torch.load(buf), expected_for("views.pt"))
    buf.seek(8)
    assert_matches_manifest(fastserial.load(buf), expected_for("views.pt"))


@pytest.mark.parametrize("filename", ["ckpt.pt", "model", "weights.v2.pth", "x.tar"])
@pytest.mark.parametrize("as_pathlike", [False, True], ids=["str", "pathlike"])
def test_top_folder_named_after_file_stem(filename, as_pathlike, tmp_path):
    obj = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    (tmp_path / "fs").mkdir()
    (tmp_path / "ref").mkdir()
    out = tmp_path / "fs" / filename
    fastserial.save(obj, out if as_pathlike else str(out))
    torch.save(obj, str(tmp_path / "ref" / filename))
    ref_prefix = zipfile.ZipFile(tmp_path / "ref" / filename).namelist()[0].split("/")[0]
    if filename == "ckpt.pt":
        assert ref_prefix == "ckpt"
    assert_torch_layout(out.read_bytes(), ref_prefix, (tmp_path / "ref" / filename).read_bytes())


# --------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["views.pt", "dtypes.pt"])
def test_disable_byteorder_record(name, tmp_path):
    # fastserial omits the record entirely, as the flag's name says (a documented
    # difference: torch 2.13's writer still appends a trailing 'byteorder' record,
    # see tests/data/no_byteorder.pt). Files without it must load in both libraries.
    obj = _torch_loaded(name)
    buf = io.BytesIO()
    fastserial.save(obj, buf, _disable_byteorder_record=True)
    raw = buf.getvalue()
    rel = [n.split("/", 1)[1] for n in zipfile.ZipFile(io.BytesIO(raw)).namelist()]
    assert "byteorder" not in rel
    n_data = sum(1 for n in rel if n.startswith("data/"))
    assert rel == [n for n in expected_torch_order(n_data) if n != "byteorder"]
    _check_loads(raw, name)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("name", ["nested.pt", "state_dict.pt", "views.pt"])
def test_pickle_protocol(name, protocol):
    obj = _torch_loaded(name)
    buf = io.BytesIO()
    fastserial.save(obj, buf, pickle_protocol=protocol)
    ref = io.BytesIO()
    torch.save(obj, ref, pickle_protocol=protocol)
    raw = buf.getvalue()
    assert_torch_layout(raw, "archive", ref.getvalue(), protocol=protocol)
    _check_loads(raw, name, protocol=protocol)


def test_pickle_module_argument():
    obj = _torch_loaded("views.pt")
    buf = io.BytesIO()
    fastserial.save(obj, buf, pickle_module=pickle, pickle_protocol=4)
    raw = buf.getvalue()
    assert zipfile.ZipFile(io.BytesIO(raw)).read("archive/data.pkl")[:2] == b"\x80\x04"
    _check_loads(raw, "views.pt", protocol=4)


@pytest.mark.parametrize("name", ["views.pt", "legacy.pt", "state_dict.pt"])
def test_legacy_format_save(name, tmp_path):
    obj = _torch_loaded(name)
    out = tmp_path / "old.pt"
    fastserial.save(obj, out, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(out)
    wo = reload_weights_only(name)
    assert_matches_manifest(torch.load(out, weights_only=wo), expected_for(name))
    assert_matches_manifest(fastserial.load(out, weights_only=wo), expected_for(name))


@requires_cuda
def test_save_cuda_tensors(tmp_path):
    obj = _torch_loaded("views.pt")
    cuda_obj = {k: v.to("cuda") for k, v in obj.items()}
    cuda_obj["evens_view"] = cuda_obj["numbers"][1::2]
    buf = io.BytesIO()
    fastserial.save(cuda_obj, buf)
    ref = io.BytesIO()
    torch.save(cuda_obj, ref)
    assert_torch_layout(buf.getvalue(), "archive", ref.getvalue())
    for load in (torch.load, fastserial.load):
        for map_location, device in ((None, "cuda"), ("cpu", "cpu")):
            loaded = load(io.BytesIO(buf.getvalue()), map_location=map_location)
            assert list(loaded) == list(cuda_obj)
            for k, v in cuda_obj.items():
                assert loaded[k].device.type == device, k
                assert loaded[k].stride() == v.stride() and torch.equal(loaded[k].cpu(), v.cpu()), k
            ptr = loaded["numbers"].untyped_storage().data_ptr()
            assert loaded["evens_view"].untyped_storage().data_ptr() == ptr


# --------------------------------------------------------------------------
# Property test: arbitrary dtypes, shapes and views, both directions
# --------------------------------------------------------------------------

DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64,
    torch.complex128, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64,
    torch.bool, torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn,
    torch.float8_e5m2,
]  # fmt: skip


@st.composite
def tensors_and_views(draw):
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 5), min_size=0, max_size=3))
    numel = 1
    for s in shape:
        numel *= s
    esize = torch.empty((), dtype=dtype).element_size()
    data = draw(st.binary(min_size=numel * esize, max_size=numel * esize))
    base = (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.empty(0, dtype=torch.uint8)
    )
    if dtype == torch.bool:
        base = base & 1
    t = base.view(dtype).reshape(shape) if numel else torch.empty(shape, dtype=dtype)
    view = t
    if t.dim() >= 2:
        view = t.transpose(0, 1)
    if t.dim() >= 1 and t.shape[0] > 1:
        view = view[..., ::2] if draw(st.booleans()) else t[1:]
    return t, view


def _assert_same_tensors(loaded, original):
    assert list(loaded) == ["t", "view", "again"]
    for key in ("t", "view"):
        a, b = loaded[key], original[key]
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.stride() == b.stride() and a.storage_offset() == b.storage_offset()
        assert tensor_bytes(a) == tensor_bytes(b)
    assert loaded["again"] is loaded["t"]
    if loaded["t"].untyped_storage().nbytes():
        ptr = loaded["t"].untyped_storage().data_ptr()
        assert loaded["view"].untyped_storage().data_ptr() == ptr


@settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(tensors_and_views())
def test_property_roundtrip_with_torch(pair):
    t, view = pair
    obj = {"t": t, "view": view, "again": t}

    buf = io.BytesIO()
    fastserial.save(obj, buf)
    buf.seek(0)
    _assert_same_tensors(torch.load(buf), obj)
    buf.seek(0)
    _assert_same_tensors(fastserial.load(buf), obj)

    ref = io.BytesIO()
    torch.save(obj, ref)
    ref.seek(0)
    _assert_same_tensors(fastserial.load(ref), obj)
