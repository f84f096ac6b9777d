"""map_location in every form torch accepts, and the register_package registry.

Every load here is compared with ``torch.load`` on the same bytes: the fixtures,
and crafted checkpoints whose storages are tagged ``cuda:1``, ``mydev`` or other
locations this CPU-only machine cannot restore.
"""

import io

import fastserial
import pytest
import torch
from conftest import (
    assert_matches_manifest,
    expected_for,
    fixture_path,
    manifest_weights_only,
    requires_cuda,
)
from fastserial import location as fs_location
from test_semantics_craft import (
    assert_same,
    read_records,
    retag,
    storage_locations,
    torch_save_bytes,
)

FIXTURES = ["state_dict.pt", "views.pt", "dtypes.pt", "parameters.pt", "edge.pt", "legacy.pt"]

CPU_FORMS = {
    "None": None,
    "str": "cpu",
    "device": torch.device("cpu"),
    "dict-empty": {},
    "dict-identity": {"cpu": "cpu"},
    "callable-identity": lambda storage, location: storage,
    "callable-none": lambda storage, location: None,
}

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")


def _sample():
    base = torch.arange(12, dtype=torch.float32)
    return {
        "base": base,
        "view": base[3:7],
        "matrix": base.view(3, 4).t(),
        "ints": torch.tensor([1, -2, 3], dtype=torch.int16),
        "half": torch.tensor([0.5, 1.5], dtype=torch.float16),
        "param": torch.nn.Parameter(torch.ones(2)),
    }


@pytest.fixture
def cuda1_file():
    """A checkpoint whose storages say they were saved from cuda:1."""
    data = retag(torch_save_bytes(_sample()), "cuda:1")
    assert storage_locations(data) == ["cuda:1"] * 4
    return data


@pytest.fixture
def registry():
    """Restores the registry (torch's, which fastserial uses) after the test."""
    theirs = list(torch.serialization._package_registry)
    yield
    torch.serialization._package_registry[:] = theirs


def _both(data, **kwargs):
    """(fastserial.load, torch.load) of the same bytes with the same arguments."""
    got = fastserial.load(io.BytesIO(data), **kwargs)
    want = torch.load(io.BytesIO(data), **kwargs)
    return got, want


# --------------------------------------------------------------------------- CPU forms


@pytest.mark.parametrize("form", list(CPU_FORMS))
@pytest.mark.parametrize("name", FIXTURES)
def test_cpu_forms_on_fixtures_match_torch(name, form):
    data = fixture_path(name).read_bytes()
    wo = manifest_weights_only(name)
    got, want = _both(data, map_location=CPU_FORMS[form], weights_only=wo)
    assert_matches_manifest(got, expected_for(name))
    assert_same(got, want)


@pytest.mark.parametrize("form", ["None", "str", "device", "dict-identity", "callable-identity"])
def test_cpu_forms_from_a_path_with_mmap(form, tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save(_sample(), path)
    got = fastserial.load(path, map_location=CPU_FORMS[form], mmap=True)
    want = torch.load(path, map_location=CPU_FORMS[form], mmap=True)
    assert_same(got, want)


def test_bytes_location_string_is_accepted():
    data = torch_save_bytes(_sample())
    assert_same(fastserial.load(io.BytesIO(data), map_location=b"cpu"), _sample())


# --------------------------------------------------------------------------- callables


def _recording(calls, result=None):
    def map_location(storage, location):
        calls.append((type(storage), storage.device.type, location, storage.nbytes()))
        if result == "same":
            return storage
        if result == "zeros":
            return torch.zeros(storage.nbytes(), dtype=torch.uint8).untyped_storage()
        return None

    return map_location


@pytest.mark.parametrize(
    "retagged,result",
    # A cuda:1 file with a callable returning None: test_cuda1_callable_returning_none...
    [(False, None), (False, "same"), (False, "zeros"), (True, "same"), (True, "zeros")],
)
def test_callable_called_once_per_storage_with_cpu_storage(retagged, result):
    data = torch_save_bytes(_sample())
    if retagged:
        data = retag(data, "cuda:1")
    ours, theirs = [], []
    got = fastserial.load(io.BytesIO(data), map_location=_recording(ours, result))
    want = torch.load(io.BytesIO(data), map_location=_recording(theirs, result))
    assert ours == theirs
    location = "cuda:1" if retagged else "cpu"
    assert ours and all(c[:3] == (torch.UntypedStorage, "cpu", location) for c in ours)
    assert len(ours) == 4  # one call per storage: views share their base's storage
    assert_same(got, want)
    if result == "zeros":
        assert not got["base"].any() and not got["view"].any()


def test_callable_is_called_for_a_storage_saved_directly():
    data = torch_save_bytes({"s": torch.arange(3.0).untyped_storage(), "t": torch.ones(1)})
    ours, theirs = [], []
    got = fastserial.load(io.BytesIO(data), map_location=_recording(ours))
    want = torch.load(io.BytesIO(data), map_location=_recording(theirs))
    assert ours == theirs and len(ours) == 2
    assert_same(got, want)


@no_cuda
def test_cuda1_callable_returning_none_falls_back(cuda1_file):
    for load in (fastserial.load, torch.load):
        calls = []
        with pytest.raises(RuntimeError, match="map_location"):
            load(io.BytesIO(cuda1_file), map_location=_recording(calls))
        assert calls[0][:3] == (torch.UntypedStorage, "cpu", "cuda:1")


# --------------------------------------------------------------------------- unrestorable locations


@no_cuda
@pytest.mark.parametrize("weights_only", [True, False])
def test_cuda1_file_without_map_location_raises_like_torch(cuda1_file, weights_only):
    with pytest.raises(RuntimeError) as ours:
        fastserial.load(io.BytesIO(cuda1_file), weights_only=weights_only)
    with pytest.raises(RuntimeError) as theirs:
        torch.load(io.BytesIO(cuda1_file), weights_only=weights_only)
    assert isinstance(ours.value, type(theirs.value))
    assert "map_location" in str(ours.value)
    assert "CUDA" in str(ours.value)


@no_cuda
def test_cuda1_file_from_path_and_mmap_raises(cuda1_file, tmp_path):
    path = tmp_path / "cuda1.pt"
    path.write_bytes(cuda1_file)
    for kwargs in ({}, {"mmap": True}):
        with pytest.raises(RuntimeError, match="map_location"):
            fastserial.load(path, **kwargs)


@no_cuda
@pytest.mark.parametrize(
    "map_location", ["cuda:0", "cuda", torch.device("cuda", 0), {"cuda:1": "cuda:0"}]
)
def test_mapping_to_cuda_on_a_cpu_machine_raises_like_torch(cuda1_file, map_location):
    with pytest.raises(RuntimeError, match="map_location"):
        fastserial.load(io.BytesIO(cuda1_file), map_location=map_location)
    with pytest.raises(RuntimeError, match="map_location"):
        torch.load(io.BytesIO(cuda1_file), map_location=map_location)


@pytest.mark.parametrize(
    "map_location",
    [
        "cpu",
        torch.device("cpu"),
        {"cuda:1": "cpu"},
        {"cuda:1": "cpu", "cuda:0": "cuda:7"},
        lambda storage, location: storage,
    ],
    ids=["str", "device", "dict", "dict-extra", "callable"],
)
def test_cuda1_file_mapped_to_cpu_matches_torch(cuda1_file, map_location):
    got, want = _both(cuda1_file, map_location=map_location)
    assert_same(got, want)
    assert_same(got, _sample())


@pytest.mark.parametrize(
    "tag", ["privateuseone:0", "privateuseone", "xpu:0", "hpu", "mydev", "cuda", "mps"]
)
def test_unrestorable_tags_raise_runtime_error_like_torch(tag):
    if tag.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("cuda is restorable here")
    data = retag(torch_save_bytes(_sample()), tag)
    with pytest.raises(RuntimeError) as ours:
        fastserial.load(io.BytesIO(data))
    with pytest.raises(RuntimeError) as theirs:
        torch.load(io.BytesIO(data))
    assert isinstance(ours.value, type(theirs.value))  # CheckpointError is a RuntimeError
    if "map_location" in str(theirs.value):
        assert "map_location" in str(ours.value)
    # Mapped to the CPU, every such file loads.
    assert_same(fastserial.load(io.BytesIO(data), map_location="cpu"), _sample())


def test_invalid_map_location_type_raises_type_error():
    data = torch_save_bytes(_sample())
    with pytest.raises(TypeError):
        fastserial.load(io.BytesIO(data), map_location=5)
    with pytest.raises(TypeError):  # torch calls it, and an int is not callable
        torch.load(io.BytesIO(data), map_location=5)


# --------------------------------------------------------------------------- meta


@pytest.mark.parametrize("map_location", ["meta", torch.device("meta")], ids=["str", "device"])
@pytest.mark.parametrize("name", ["state_dict.pt", "views.pt", "dtypes.pt", "parameters.pt"])
def test_meta_map_location_matches_torch(name, map_location):
    data = fixture_path(name).read_bytes()
    got, want = _both(data, map_location=map_location)
    assert_same(got, want, check_sharing=False)
    tensors = [v for v in got.values() if isinstance(v, torch.Tensor)]
    assert tensors and all(t.device.type == "meta" for t in tensors)
    # Views keep their geometry on the meta device.
    for key, t in got.items():
        if isinstance(t, torch.Tensor):
            assert (
                t.stride() == want[key].stride()
                and t.storage_offset() == want[key].storage_offset()
            )


def test_meta_map_location_on_cuda1_file(cuda1_file):
    got, want = _both(cuda1_file, map_location="meta")
    assert_same(got, want, check_sharing=False)
    assert got["view"].device.type == "meta"


def test_meta_map_location_with_mmap(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(_sample(), path)
    got = fastserial.load(path, map_location="meta", mmap=True)
    assert all(t.device.type == "meta" for t in got.values())


def test_dict_can_send_cpu_to_meta():
    data = torch_save_bytes(_sample())
    got, want = _both(data, map_location={"cpu": "meta"})
    assert_same(got, want, check_sharing=False)
    assert got["base"].device.type == "meta"


# --------------------------------------------------------------------------- register_package


def _recording_package(name, calls, answer=True):
    def tagger(storage):
        return None

    def deserializer(storage, location):
        calls.append((name, storage.device.type, location))
        if answer and location.startswith("mydev"):
            return storage
        return None

    return tagger, deserializer


@pytest.mark.parametrize("api", ["fastserial", "torch"])
@pytest.mark.parametrize("priority", [5, 50])
def test_registered_deserializer_restores_a_custom_tag(registry, priority, api):
    """One registry: an entry registered on either API serves both loads."""
    data = retag(torch_save_bytes(_sample()), "mydev:3")
    calls = []
    register = (
        fastserial.register_package
        if api == "fastserial"
        else (torch.serialization.register_package)
    )
    register(priority, *_recording_package("pkg", calls))
    got = fastserial.load(io.BytesIO(data))
    ours = list(calls)
    want = torch.load(io.BytesIO(data))
    assert_same(got, want)
    assert ours == calls[len(ours) :] == [("pkg", "cpu", "mydev:3")] * 4


def test_registered_deserializer_used_with_map_location_dict(registry):
    calls = []
    fastserial.register_package(30, *_recording_package("d", calls))
    data = torch_save_bytes(_sample())
    got = fastserial.load(io.BytesIO(data), map_location={"cpu": "mydev"})
    assert_same(got, _sample())
    assert calls == [("d", "cpu", "mydev")] * 4


def test_lower_priority_number_runs_first_and_first_answer_wins(registry):
    data = retag(torch_save_bytes({"a": torch.arange(3.0)}), "mydev")
    calls = []

    def make(name, answer):
        def deserializer(storage, location):
            calls.append(name)
            if answer == "none":
                return None
            zeros = torch.zeros(storage.nbytes(), dtype=torch.uint8).untyped_storage()
            return zeros if answer == "zeros" else storage

        return (lambda storage: None), deserializer

    fastserial.register_package(40, *make("late", "same"))
    fastserial.register_package(3, *make("early-none", "none"))
    fastserial.register_package(7, *make("middle-zeros", "zeros"))
    got = fastserial.load(io.BytesIO(data))
    assert calls == ["early-none", "middle-zeros"]
    assert got["a"].tolist() == [0.0, 0.0, 0.0]  # the middle answer, used as is


def test_unregistered_custom_tag_raises_like_torch():
    data = retag(torch_save_bytes({"a": torch.ones(1)}), "mydev")
    with pytest.raises(RuntimeError, match="mydev"):
        fastserial.load(io.BytesIO(data))
    with pytest.raises(RuntimeError, match="mydev"):
        torch.load(io.BytesIO(data))


def test_registered_tagger_answers_before_the_builtins(registry):
    """The registry's location_tag: a tagger at priority 1 answers for a meta
    storage before the built-in meta entry (a meta storage has no data to save;
    saving device storages with a custom tag: test_custom_tagger_names_cuda_storages)."""
    seen = []

    def tagger(storage):
        seen.append(storage.device.type)
        return "mydev:0" if storage.device.type == "meta" else None

    fastserial.register_package(1, tagger, lambda storage, location: None)
    meta = torch.UntypedStorage(4, device="meta")
    assert fs_location.location_tag(meta) == "mydev:0"
    assert seen == ["meta"]


def test_builtin_taggers_and_deserializers():
    cpu = torch.UntypedStorage(8)
    assert fs_location.location_tag(cpu) == "cpu"
    assert fs_location.location_tag(torch.UntypedStorage(8, device="meta")) == "meta"
    assert fs_location.default_restore_location(cpu, "cpu") is cpu
    meta = fs_location.default_restore_location(cpu, "meta")
    assert meta.device.type == "meta" and meta.nbytes() == 8


def test_registered_tagger_with_lower_priority_tags_cpu_storages_on_save(registry):
    def tagger(storage):
        return "mydev" if storage.device.type == "cpu" else None

    def deserializer(storage, location):
        return storage if location == "mydev" else None

    torch.serialization.register_package(5, tagger, deserializer)
    obj = {"t": torch.arange(3.0), "s": torch.arange(2.0).untyped_storage()}
    assert storage_locations(torch_save_bytes(obj)) == ["mydev", "mydev"]
    buf = io.BytesIO()
    fastserial.save(obj, buf)
    assert storage_locations(buf.getvalue()) == ["mydev", "mydev"]


def test_registered_deserializer_with_lower_priority_sees_cpu_storages(registry):
    calls = []
    fastserial.register_package(1, *_recording_package("pkg", calls, answer=False))
    data = torch_save_bytes({"a": torch.ones(2), "b": torch.zeros(1)})
    torch.load(io.BytesIO(data))
    assert [c[1:] for c in calls] == [("cpu", "cpu")] * 2
    calls.clear()
    fastserial.load(io.BytesIO(data))
    assert [c[1:] for c in calls] == [("cpu", "cpu")] * 2


def test_register_package_validates_its_arguments(registry):
    with pytest.raises(TypeError):
        fastserial.register_package("10", lambda s: None, lambda s, l: None)
    with pytest.raises(TypeError):
        fastserial.register_package(10, None, lambda s, l: None)


# --------------------------------------------------------------------------- CUDA (device machines)


@requires_cuda
@pytest.mark.parametrize(
    "map_location",
    ["cuda:0", "cuda", torch.device("cuda", 0), {"cpu": "cuda:0"}, lambda s, l: s.cuda(0)],
    ids=["str", "str-noindex", "device", "dict", "callable"],
)
def test_cpu_file_to_cuda_matches_torch(map_location, tmp_path):
    path = tmp_path / "c.pt"
    torch.save(_sample(), path)
    # From a path (staged through a mapping of the file) and from a buffer.
    got = fastserial.load(path, map_location=map_location)
    assert_same(got, torch.load(path, map_location=map_location))
    assert got["view"].device == torch.device("cuda", 0)
    got, want = _both(path.read_bytes(), map_location=map_location)
    assert_same(got, want)


@requires_cuda
def test_cuda1_file_remapped_to_cuda0(cuda1_file):
    got, want = _both(cuda1_file, map_location={"cuda:1": "cuda:0"})
    assert_same(got, want)
    assert got["base"].device == torch.device("cuda", 0)


@requires_cuda
def test_cuda1_file_on_a_one_gpu_machine_raises_like_torch(cuda1_file):
    if torch.cuda.device_count() > 1:
        pytest.skip("cuda:1 exists here")
    with pytest.raises(RuntimeError, match="map_location"):
        fastserial.load(io.BytesIO(cuda1_file))
    with pytest.raises(RuntimeError, match="map_location"):
        torch.load(io.BytesIO(cuda1_file))


@requires_cuda
def test_saving_cuda_tensors_tags_them_and_callable_sees_cpu_storage():
    obj = {"a": torch.arange(4.0, device="cuda"), "b": torch.ones(2)}
    buf = io.BytesIO()
    fastserial.save(obj, buf)
    data = buf.getvalue()
    assert sorted(storage_locations(data)) == ["cpu", "cuda:0"]
    assert storage_locations(data) == storage_locations(torch_save_bytes(obj))
    calls = []
    got = fastserial.load(io.BytesIO(data), map_location=_recording(calls))
    assert sorted(c[2] for c in calls) == ["cpu", "cuda:0"]
    assert all(c[1] == "cpu" for c in calls)  # materialized on the CPU first
    assert got["a"].device.type == "cuda" and got["b"].device.type == "cpu"
    assert read_records(data)[1]["byteorder"] == b"little"


@requires_cuda
def test_custom_tagger_names_cuda_storages_on_save(registry):
    def tagger(storage):
        return "mydev:0" if storage.device.type == "cuda" else None

    def deserializer(storage, location):
        return storage if location.startswith("mydev") else None

    fastserial.register_package(1, tagger, deserializer)
    torch.serialization.register_package(1, tagger, deserializer)
    obj = {"a": torch.arange(4.0, device="cuda")}
    buf = io.BytesIO()
    fastserial.save(obj, buf)
    assert storage_locations(buf.getvalue()) == ["mydev:0"]
    assert storage_locations(torch_save_bytes(obj)) == ["mydev:0"]
    got = fastserial.load(io.BytesIO(buf.getvalue()))
    assert got["a"].device.type == "cpu" and got["a"].tolist() == [0.0, 1.0, 2.0, 3.0]
