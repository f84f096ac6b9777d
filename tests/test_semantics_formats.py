"""The other container formats: pre-1.6 legacy streams (load and save), the pre-0.4
tar layout (load), zips written by other tools (DEFLATE, no alignment), and the
Python 2 string encodings."""

import io
import pickle
import zipfile

import fastserial
import pytest
import torch
from conftest import (
    assert_matches_manifest,
    expected_for,
    fixture_entries,
    fixture_path,
    is_zip_checkpoint,
    load_with_mode,
)
from test_semantics_craft import (
    StorageRef,
    TensorRef,
    assert_same,
    fs_save_bytes,
    make_legacy,
    record_offsets,
    rezip,
    sample_tar,
    torch_save_bytes,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:TypedStorage is deprecated"),
    pytest.mark.filterwarnings("ignore:Detected pickle protocol"),
    pytest.mark.filterwarnings("ignore:pickle_load_args only works"),
]


def _views_sample():
    """Views, dtypes, a Parameter, odd shapes; a storage saved directly (typed: torch
    2.13 cannot load an UntypedStorage from a legacy file)."""
    base = torch.arange(20, dtype=torch.float32)
    return {
        "base": base,
        "slice": base[3:9],
        "strided": base[1::3],
        "matrix_t": base.view(4, 5).t(),
        "ints": torch.tensor([1, -2, 3], dtype=torch.int64),
        "half": torch.tensor([0.5, 2.0], dtype=torch.float16),
        "bool": torch.tensor([True, False]),
        "param": torch.nn.Parameter(torch.ones(3)),
        "scalar": torch.tensor(7.0),
        "empty": torch.empty(0, 3),
        "storage": torch.storage.TypedStorage([1, 2, 3], dtype=torch.int32),
        "meta": {"epoch": 3, "name": "ckpt", "size": torch.Size([2, 3])},
    }


# --------------------------------------------------------------------------- legacy.pt


def test_legacy_fixture_is_the_legacy_format():
    assert not is_zip_checkpoint(fixture_path("legacy.pt"))


@pytest.mark.parametrize("mode", ["path", "pathlike", "fileobj", "bytesio"])
@pytest.mark.parametrize("weights_only", [True, False])
def test_legacy_fixture_matches_manifest_and_torch(mode, weights_only):
    path = fixture_path("legacy.pt")
    got = load_with_mode(fastserial.load, path, mode, weights_only=weights_only)
    assert_matches_manifest(got, expected_for("legacy.pt"))  # shared storage included
    assert_same(got, torch.load(path, weights_only=weights_only))


def test_legacy_fixture_with_mmap_loads_eagerly():
    # torch raises for mmap=True on legacy files; fastserial reads them eagerly.
    path = fixture_path("legacy.pt")
    with pytest.raises(RuntimeError):
        torch.load(path, mmap=True)
    assert_matches_manifest(fastserial.load(path, mmap=True), expected_for("legacy.pt"))
    got = fastserial.load(io.BytesIO(path.read_bytes()), mmap=True)
    assert_matches_manifest(got, expected_for("legacy.pt"))


# --------------------------------------------------------------------------- legacy save


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_legacy_save_reads_back_in_torch_with_views_shared(protocol, tmp_path):
    obj = _views_sample()
    path = tmp_path / "legacy.pt"
    fastserial.save(obj, path, _use_new_zipfile_serialization=False, pickle_protocol=protocol)
    assert not is_zip_checkpoint(path)
    want = torch.load(path, weights_only=False)
    assert_same(want, obj)  # views share their base's storage, as saved
    assert want["slice"].untyped_storage().data_ptr() == want["base"].untyped_storage().data_ptr()
    assert_same(fastserial.load(path, weights_only=False), want)
    if protocol <= 3:  # torch 2.13's safe unpickler refuses protocols 4 and 5 (FRAME)
        assert_same(torch.load(path), want)
    assert_same(fastserial.load(path), want)


def test_legacy_save_to_file_object_and_bytesio(tmp_path):
    obj = _views_sample()
    buf = io.BytesIO()
    fastserial.save(obj, buf, _use_new_zipfile_serialization=False)
    assert_same(torch.load(io.BytesIO(buf.getvalue())), obj)
    with open(tmp_path / "f.pt", "wb") as fh:
        fastserial.save(obj, fh, _use_new_zipfile_serialization=False)
    assert_same(torch.load(tmp_path / "f.pt"), obj)


def test_torch_legacy_save_loads_like_torch():
    obj = _views_sample()
    data = torch_save_bytes(obj, _use_new_zipfile_serialization=False)
    for wo in (True, False):
        got = fastserial.load(io.BytesIO(data), weights_only=wo)
        assert_same(got, torch.load(io.BytesIO(data), weights_only=wo))
        assert_same(got, obj)


def test_legacy_uint16_roundtrip():
    # torch 2.13 cannot load a legacy file holding uint16 tensors (AttributeError:
    # UntypedStorage has no attribute 'dtype'); fastserial reads its own and torch's.
    obj = {"u16": torch.tensor([1, 0x1234, 65535], dtype=torch.uint16), "f": torch.ones(2)}
    for data in (
        fs_save_bytes(obj, _use_new_zipfile_serialization=False),
        torch_save_bytes(obj, _use_new_zipfile_serialization=False),
    ):
        assert_same(fastserial.load(io.BytesIO(data)), obj)


def test_legacy_save_of_a_whole_module_reads_in_torch():
    module = torch.nn.Linear(3, 2)
    data = fs_save_bytes(module, _use_new_zipfile_serialization=False)
    want = torch.load(io.BytesIO(data), weights_only=False)
    assert_same(want, module)
    assert_same(fastserial.load(io.BytesIO(data), weights_only=False), want)


def test_legacy_map_location_callable_sees_cpu_storages():
    data = torch_save_bytes(_views_sample(), _use_new_zipfile_serialization=False)
    ours, theirs = [], []

    def recorder(calls):
        def map_location(storage, location):
            calls.append((type(storage), storage.device.type, location, storage.nbytes()))
            return None

        return map_location

    got = fastserial.load(io.BytesIO(data), map_location=recorder(ours))
    want = torch.load(io.BytesIO(data), map_location=recorder(theirs))
    assert sorted(ours, key=repr) == sorted(theirs, key=repr)
    assert all(c[1:3] == ("cpu", "cpu") for c in ours)
    assert_same(got, want)


def test_legacy_view_outside_its_storage_raises_checkpoint_error():
    raw = torch.arange(4, dtype=torch.float32).numpy().tobytes()
    ref = StorageRef("k", torch.FloatStorage, 4, legacy=True)
    data = make_legacy({"t": TensorRef(ref, 2, (4,), (1,))}, {"k": (torch.FloatStorage, raw)})
    for wo in (True, False):
        with pytest.raises(fastserial.CheckpointError):
            fastserial.load(io.BytesIO(data), weights_only=wo)


def test_legacy_storage_count_mismatch_raises_checkpoint_error():
    raw = torch.arange(4, dtype=torch.float32).numpy().tobytes()
    ref = StorageRef("k", torch.FloatStorage, 4, legacy=True)
    data = make_legacy(
        {"t": TensorRef(ref, 0, (4,), (1,))}, {"k": (torch.FloatStorage, raw)}, counts={"k": 5}
    )
    with pytest.raises(fastserial.CheckpointError):
        fastserial.load(io.BytesIO(data))


def test_legacy_refuses_unsafe_globals():
    data = torch_save_bytes(torch.nn.Linear(2, 2), _use_new_zipfile_serialization=False)
    with pytest.raises(pickle.UnpicklingError, match="torch.nn.modules.linear.Linear"):
        fastserial.load(io.BytesIO(data))
    with pytest.raises(pickle.UnpicklingError):
        torch.load(io.BytesIO(data))


# --------------------------------------------------------------------------- the tar format


@pytest.fixture
def tar_path(tmp_path):
    path = tmp_path / "old.tar.pt"
    path.write_bytes(sample_tar())
    return path


@pytest.mark.parametrize("source", ["path", "fileobj"])
def test_tar_format_matches_torch(tar_path, source):
    if source == "path":
        got = fastserial.load(tar_path, weights_only=False)
    else:
        with open(tar_path, "rb") as fh:
            got = fastserial.load(fh, weights_only=False)
    want = torch.load(tar_path, weights_only=False)
    assert_same(got, want)
    assert got["matrix"].tolist() == [[0, 1, 2], [3, 4, 5]]
    # The tensor over the storage view shares the root storage at an offset.
    root = got["matrix"].untyped_storage().data_ptr()
    assert got["of_view"].untyped_storage().data_ptr() == root + 8
    assert got["storage"]._data_ptr() == root


def test_tar_format_from_bytesio(tar_path):
    # torch only tries the tar layout on real files; fastserial also reads buffers.
    got = fastserial.load(io.BytesIO(tar_path.read_bytes()), weights_only=False)
    assert_same(got, torch.load(tar_path, weights_only=False))


@pytest.mark.parametrize("weights_only", [None, True])
def test_tar_format_refuses_weights_only(tar_path, weights_only):
    kwargs = {} if weights_only is None else {"weights_only": weights_only}
    with pytest.raises(RuntimeError, match="weights_only"):
        fastserial.load(tar_path, **kwargs)
    with pytest.raises(RuntimeError, match="weights_only"):
        torch.load(tar_path, **kwargs)


def test_tar_format_map_location(tar_path):
    ours, theirs = [], []
    got = fastserial.load(tar_path, weights_only=False, map_location=lambda s, l: ours.append(l))
    want = torch.load(tar_path, weights_only=False, map_location=lambda s, l: theirs.append(l))
    assert ours == theirs == ["cpu", "cpu"]
    assert_same(got, want)
    assert_same(fastserial.load(tar_path, weights_only=False, map_location="cpu"), want)


# --------------------------------------------------------------------------- zips from other writers


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
@pytest.mark.parametrize("name", ["views.pt", "dtypes.pt", "state_dict.pt", "big_endian.pt"])
def test_rezipped_checkpoints_match_torch(name, compression, tmp_path):
    data = rezip(fixture_path(name).read_bytes(), compression)
    path = tmp_path / name
    path.write_bytes(data)
    want = torch.load(path)
    assert_matches_manifest(want, expected_for(name))
    variants = [{}, {"verify": True}, {"weights_only": False}]
    if compression == zipfile.ZIP_DEFLATED:
        # Unaligned stored records with mmap=True: test_mmap_of_unaligned_records_is_aligned.
        variants.append({"mmap": True})
    for kwargs in variants:
        got = fastserial.load(path, **kwargs)
        assert_matches_manifest(got, expected_for(name))
        assert_same(got, want)
    assert_same(fastserial.load(io.BytesIO(data)), want)
    # torch 2.13 with mmap=True on a DEFLATE-compressed record maps the compressed
    # bytes and returns garbage; fastserial decompresses.


@pytest.mark.parametrize("weights_only", [True, False])
def test_mmap_of_unaligned_records_is_aligned(tmp_path, weights_only):
    # Python's zipfile does not pad records to 64 bytes as torch does. Reading such a
    # tensor through a misaligned pointer segfaults (torch 2.13's own mmap=True does),
    # so fastserial must copy misaligned records. Only pointers are checked here:
    # touching the data would crash the test run.
    obj = {
        "pad": torch.zeros(1, dtype=torch.uint8),
        "f64": torch.arange(3, dtype=torch.float64),
        "c128": torch.ones(2, dtype=torch.complex128),
        "f32": torch.ones(3),
    }
    data = rezip(torch_save_bytes(obj), zipfile.ZIP_STORED)
    offsets = record_offsets(data)
    assert offsets["data/1"] % 8 and offsets["data/2"] % 8  # f64 and c128 are misaligned
    path = tmp_path / "unaligned.pt"
    path.write_bytes(data)
    got = fastserial.load(path, mmap=True, weights_only=weights_only)
    misaligned = {
        k: t.data_ptr() % t.element_size()
        for k, t in got.items()
        if t.data_ptr() % t.element_size()
    }
    assert not misaligned


def test_deflated_fastserial_save_reads_back():
    obj = _views_sample()
    data = rezip(fs_save_bytes(obj))
    assert_same(fastserial.load(io.BytesIO(data)), obj)
    assert_same(torch.load(io.BytesIO(data)), obj)


# --------------------------------------------------------------------------- Python 2 strings


@pytest.mark.parametrize("weights_only", [True, False])
@pytest.mark.parametrize("encoding", [None, "utf-8", "latin1", "bytes"])
def test_py2_strings_match_torch(encoding, weights_only):
    path = fixture_path("py2_strings.pt")
    kwargs = {"weights_only": weights_only}
    if encoding is not None:
        kwargs["encoding"] = encoding
    got = fastserial.load(path, **kwargs)
    want = torch.load(path, **kwargs)
    assert_same(got, want)
    assert_matches_manifest(got, expected_for("py2_strings.pt", encoding or "utf-8"))
    by_encoding = fixture_entries()["py2_strings.pt"]["expect_by_encoding"]
    if encoding == "bytes":
        assert got[0] == bytes.fromhex(by_encoding["bytes_hex"])
    else:
        assert got[0] == by_encoding[encoding or "utf-8"]


def test_py2_strings_ascii_fails_like_torch_and_errors_is_forwarded():
    path = fixture_path("py2_strings.pt")
    # torch raises the UnicodeDecodeError itself; fastserial may wrap it.
    for weights_only in (True, False):
        with pytest.raises(Exception, match="'ascii' codec can't decode"):
            fastserial.load(path, weights_only=weights_only, encoding="ascii")
        with pytest.raises(UnicodeDecodeError):
            torch.load(path, weights_only=weights_only, encoding="ascii")
    got = fastserial.load(path, weights_only=False, encoding="ascii", errors="replace")
    assert_same(got, torch.load(path, weights_only=False, encoding="ascii", errors="replace"))
    assert set(got[0]) == {"\ufffd"}
