"""fastserial.patch_torch(): torch.save / torch.load (and torch.serialization.save /
load) routed through fastserial, as a context manager or a call with an undo."""

import io
import pickle

import fastserial
import pytest
import torch
import torch.serialization as ts
from conftest import assert_matches_manifest, expected_for, fixture_path
from test_semantics_craft import assert_same, read_records

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")

ORIGINALS = (torch.save, torch.load, ts.save, ts.load)
ORIGINAL_CODE = (torch.save.__code__, torch.load.__code__)


def _current():
    return (torch.save, torch.load, ts.save, ts.load)


def _code():
    return (torch.save.__code__, torch.load.__code__)


def _patched():
    """torch's own functions run fastserial (their code is swapped, so every reference
    to them is patched), or, where that cannot be done, the names are rebound."""
    if _current() == ORIGINALS:
        return all(now is not was for now, was in zip(_code(), ORIGINAL_CODE))
    return _current() == (fastserial.save, fastserial.load, fastserial.save, fastserial.load)


def _unpatched():
    return _current() == ORIGINALS and _code() == ORIGINAL_CODE


@pytest.fixture(autouse=True)
def restore_torch():
    assert _unpatched()
    yield
    if not _unpatched():  # a failed test must not leave torch patched
        torch.save, torch.load, ts.save, ts.load = ORIGINALS
        torch.save.__code__, torch.load.__code__ = ORIGINAL_CODE
        pytest.fail("torch was left patched")


def test_context_manager_patches_and_restores():
    with fastserial.patch_torch() as patch:
        assert _patched()
        assert patch is not None
    assert _unpatched()


def test_context_manager_restores_on_error():
    with pytest.raises(ValueError), fastserial.patch_torch():
        assert _patched()
        raise ValueError("boom")
    assert _unpatched()


def test_call_form_with_undo_and_call():
    undo = fastserial.patch_torch()
    assert _patched()
    undo()
    assert _unpatched()
    undo()  # a second undo is harmless
    assert _unpatched()
    patch = fastserial.patch_torch()
    assert _patched()
    patch.undo()
    assert _unpatched()


def test_nested_patches_restore_on_the_outermost_undo():
    outer = fastserial.patch_torch()
    with fastserial.patch_torch():
        assert _patched()
    assert _patched()  # the outer patch is still active
    inner = fastserial.patch_torch()
    outer()
    assert _patched()  # undone out of order: still one patch left
    inner()
    assert _unpatched()


def test_patched_torch_save_and_load_roundtrip(tmp_path):
    obj = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2)}
    path = tmp_path / "ckpt.pt"
    with fastserial.patch_torch():
        torch.save(obj, path)
        ts.save(obj, tmp_path / "again.pt")
        got = torch.load(path, map_location="cpu")
        via_module = ts.load(tmp_path / "again.pt")
    assert_same(got, obj)
    assert_same(via_module, obj)
    # What the patched functions wrote, torch's own load reads.
    assert_same(torch.load(path), obj)
    assert_same(torch.load(tmp_path / "again.pt"), obj)


def test_patched_torch_load_has_fastserial_semantics():
    # torch 2.13's own safe loader refuses protocol-4 pickles; patched, torch.load loads them.
    buf = io.BytesIO()
    fastserial.save({"t": torch.ones(2)}, buf, pickle_protocol=4)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(io.BytesIO(buf.getvalue()))
    with fastserial.patch_torch():
        got = torch.load(io.BytesIO(buf.getvalue()))
        # ... and keeps torch's defaults: weights_only=True refuses a pickled module.
        with pytest.raises(pickle.UnpicklingError):
            torch.load(fixture_path("module.pt"))
        module = torch.load(fixture_path("module.pt"), weights_only=False)
    assert torch.equal(got["t"], torch.ones(2))
    assert_matches_manifest(module, expected_for("module.pt"))


def test_patched_save_writes_a_torch_archive(tmp_path):
    with fastserial.patch_torch():
        torch.save({"a": torch.ones(1)}, tmp_path / "model.pth")
    prefix, records = read_records((tmp_path / "model.pth").read_bytes())
    assert prefix == "model"
    assert {"data.pkl", "byteorder", "version", "data/0"} <= set(records)
