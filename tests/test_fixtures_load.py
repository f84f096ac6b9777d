"""fastserial.load on the checkpoints written by real torch 2.13 (tests/data)."""

import gzip
import io
import json
import pickle

import fastserial
import pytest
import torch
from conftest import (
    assert_matches_manifest,
    expected_for,
    fixture_entries,
    fixture_names,
    fixture_path,
    load_with_mode,
    manifest_weights_only,
    requires_cuda,
    run_python,
)

BENIGN = fixture_names()
EVIL = fixture_names(malicious=True)


@pytest.mark.parametrize("name", BENIGN)
def test_fixture_matches_manifest(name, load_mode):
    obj = load_with_mode(
        fastserial.load, fixture_path(name), load_mode, weights_only=manifest_weights_only(name)
    )
    assert_matches_manifest(obj, expected_for(name))


@pytest.mark.parametrize("name", BENIGN)
def test_fixture_matches_manifest_with_weights_only_false(name):
    obj = fastserial.load(fixture_path(name), weights_only=False)
    assert_matches_manifest(obj, expected_for(name))


def test_default_is_weights_only_and_refuses_a_pickled_module():
    # module.pt pickles torch.nn.Linear by class; like torch 2.x, the default
    # (weights_only=True) must refuse it, and weights_only=False must load it.
    assert not manifest_weights_only("module.pt")
    with pytest.raises(pickle.UnpicklingError):
        fastserial.load(fixture_path("module.pt"))
    with pytest.raises(pickle.UnpicklingError):
        fastserial.load(fixture_path("module.pt"), weights_only=True)
    obj = fastserial.load(fixture_path("module.pt"), weights_only=False)
    assert_matches_manifest(obj, expected_for("module.pt"))
    assert isinstance(obj.weight, torch.nn.Parameter) and obj.weight.requires_grad


@pytest.mark.parametrize("encoding", [None, "utf-8", "latin1", "bytes"])
def test_py2_strings_encoding(encoding):
    name = "py2_strings.pt"
    kwargs = {} if encoding is None else {"encoding": encoding}
    obj = fastserial.load(fixture_path(name), weights_only=manifest_weights_only(name), **kwargs)
    assert_matches_manifest(obj, expected_for(name, encoding or "utf-8"))
    by_enc = fixture_entries()[name]["expect_by_encoding"]
    if encoding == "bytes":
        assert obj[0] == bytes.fromhex(by_enc["bytes_hex"])
    else:
        assert obj[0] == by_enc[encoding or "utf-8"]


@pytest.mark.parametrize("name", ["views.pt", "state_dict.pt", "legacy.pt"])
def test_load_from_gzip_stream(name, tmp_path):
    raw = fixture_path(name).read_bytes()
    stream = gzip.GzipFile(fileobj=io.BytesIO(gzip.compress(raw)), mode="rb")
    obj = fastserial.load(stream, weights_only=manifest_weights_only(name))
    assert_matches_manifest(obj, expected_for(name))

    gz_path = tmp_path / (name + ".gz")
    gz_path.write_bytes(gzip.compress(raw))
    with gzip.open(gz_path, "rb") as fh:
        obj = fastserial.load(fh, weights_only=manifest_weights_only(name))
    assert_matches_manifest(obj, expected_for(name))


@pytest.mark.parametrize(
    "map_location",
    [
        "cpu",
        torch.device("cpu"),
        {"cpu": "cpu"},
        lambda storage, location: storage,
    ],
    ids=["str", "device", "dict", "callable"],
)
@pytest.mark.parametrize("name", ["views.pt", "dtypes.pt", "legacy.pt"])
def test_map_location_cpu(name, map_location):
    obj = fastserial.load(fixture_path(name), map_location=map_location)
    assert_matches_manifest(obj, expected_for(name))


@requires_cuda
@pytest.mark.parametrize("map_location", ["cuda", "cuda:0", torch.device("cuda", 0)], ids=str)
@pytest.mark.parametrize("name", ["views.pt", "dtypes.pt", "state_dict.pt"])
def test_map_location_cuda(name, map_location):
    obj = fastserial.load(fixture_path(name), map_location=map_location)
    assert_matches_manifest(obj, expected_for(name), device="cuda")


# --------------------------------------------------------------------------
# Malicious pickles: refused under weights_only=True, never executed.
# Run in a fresh interpreter so a successful exploit cannot leak into (or be
# masked by) this process.
# --------------------------------------------------------------------------

_EVIL_SCRIPT = r"""
import io, json, os, pickle, sys
import fastserial

path = sys.argv[1]
env_var = sys.argv[2]
results = []
for mode in ("path", "fileobj", "bytesio", "mmap", "explicit_weights_only"):
    assert env_var not in os.environ
    res = {"mode": mode, "raised": None}
    try:
        if mode == "path":
            fastserial.load(path)
        elif mode == "fileobj":
            with open(path, "rb") as fh:
                fastserial.load(fh)
        elif mode == "bytesio":
            with open(path, "rb") as fh:
                fastserial.load(io.BytesIO(fh.read()))
        elif mode == "mmap":
            fastserial.load(path, mmap=True)
        else:
            fastserial.load(path, weights_only=True)
    except BaseException as exc:  # report everything, judge in the parent
        res["raised"] = type(exc).__module__ + "." + type(exc).__qualname__
        res["is_unpickling_error"] = isinstance(exc, pickle.UnpicklingError)
        res["message"] = str(exc)
    res["pwned"] = os.environ.get(env_var)
    results.append(res)
print("RESULT " + json.dumps(results))
"""


@pytest.mark.parametrize("name", EVIL)
def test_malicious_pickle_is_refused(name):
    env_var = fixture_entries()[name]["env_var"]
    proc = run_python(_EVIL_SCRIPT, fixture_path(name), env_var)
    assert proc.returncode == 0, proc.stderr
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    results = json.loads(line[len("RESULT ") :])
    assert len(results) == 5
    for res in results:
        assert res["pwned"] is None, f"{res['mode']}: the malicious pickle was executed"
        assert res["raised"] is not None, f"{res['mode']}: load did not raise"
        assert res["is_unpickling_error"], (
            f"{res['mode']}: raised {res['raised']}: {res['message']}"
        )
        # The first forbidden global is builtins.getattr (then os.environ).
        msg = res["message"]
        assert "getattr" in msg or "environ" in msg, (
            f"{res['mode']}: message names no global: {msg!r}"
        )
