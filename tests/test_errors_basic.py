"""Malformed inputs raise fastserial.CheckpointError (a RuntimeError) naming file and record."""

import io
import json
import random
import zipfile

import fastserial
import pytest
import torch
from conftest import fixture_path, run_python


def test_checkpoint_error_is_a_runtime_error():
    assert issubclass(fastserial.CheckpointError, RuntimeError)


# --------------------------------------------------------------------------
# Building malformed files
# --------------------------------------------------------------------------


def _torch_checkpoint_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _rezip(raw: bytes, drop: str) -> bytes:
    """Copy the zip ``raw`` record by record (stored, same order) without record ``drop``."""
    src = zipfile.ZipFile(io.BytesIO(raw))
    names = src.namelist()
    assert drop in names, (drop, names)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        for name in names:
            if name != drop:
                dst.writestr(name, src.read(name))
    return out.getvalue()


# A checkpoint with a single storage, so that dropping data/0 leaves no other
# (possibly misaligned after re-zipping) storage record around.
ONE_STORAGE = {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4)}
ONE_STORAGE["w_row"] = ONE_STORAGE["w"][1]


def _good_bytes() -> bytes:
    return fixture_path("state_dict.pt").read_bytes()


def _cut_points(n):
    return {
        "cut_1": 1,
        "cut_4": 4,
        "cut_30": 30,
        "cut_third": n // 3,
        "cut_half": n // 2,
        "cut_minus_100": n - 100,
        "cut_minus_22": n - 22,  # end-of-central-directory record removed
        "cut_minus_1": n - 1,
    }


def malformed_cases():
    """name -> (bytes, [strings the message must contain besides the path])."""
    rnd = random.Random(20240607)
    good = _good_bytes()
    cases = {
        "random_bytes": (bytes(rnd.getrandbits(8) for _ in range(4096)), []),
        "empty": (b"", []),
        "not_a_checkpoint_zip": (_zip_of({"readme.txt": b"hello"}), []),
    }
    for label, n in _cut_points(len(good)).items():
        cases["truncated_" + label] = (good[:n], [])
    one = _torch_checkpoint_bytes(ONE_STORAGE)
    cases["missing_data_pkl"] = (_rezip(one, "archive/data.pkl"), ["data.pkl"])
    cases["missing_storage_record"] = (_rezip(one, "archive/data/0"), ["data/0"])
    return cases


def _zip_of(records) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as z:
        for name, data in records.items():
            z.writestr(name, data)
    return out.getvalue()


CASES = malformed_cases()


def test_rezipped_checkpoint_is_otherwise_valid():
    # Guard for the two "missing record" cases: re-zipping without dropping
    # anything essential keeps a loadable checkpoint (for torch and fastserial).
    one = _torch_checkpoint_bytes(ONE_STORAGE)
    kept = _rezip(one, "archive/.data/serialization_id")
    for load in (torch.load, fastserial.load):
        obj = load(io.BytesIO(kept))
        assert torch.equal(obj["w"], ONE_STORAGE["w"])
        assert torch.equal(obj["w_row"], ONE_STORAGE["w_row"])


def test_torch_also_rejects_the_malformed_inputs():
    # Reference: none of these inputs is loadable by torch either.
    for name, (raw, _) in CASES.items():
        with pytest.raises(Exception):  # noqa: B017 - torch raises assorted types
            torch.load(io.BytesIO(raw))
        assert name


@pytest.mark.parametrize("mmap", [False, True], ids=["eager", "mmap"])
@pytest.mark.parametrize("case", list(CASES))
def test_malformed_path_raises_checkpoint_error(case, mmap, tmp_path):
    raw, must_name = CASES[case]
    path = tmp_path / f"{case}.pt"
    path.write_bytes(raw)
    with pytest.raises(fastserial.CheckpointError) as info:
        fastserial.load(str(path), mmap=mmap)
    assert isinstance(info.value, RuntimeError)
    msg = str(info.value)
    assert str(path) in msg, f"message does not name the file: {msg!r}"
    for needle in must_name:
        assert needle in msg, f"message does not name {needle!r}: {msg!r}"


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_pathlike_and_fileobj(case, tmp_path):
    raw, must_name = CASES[case]
    path = tmp_path / f"{case}.pt"
    path.write_bytes(raw)
    with pytest.raises(fastserial.CheckpointError) as info:
        fastserial.load(path)
    assert str(path) in str(info.value)
    with open(path, "rb") as fh, pytest.raises(fastserial.CheckpointError) as info:
        fastserial.load(fh)
    for needle in must_name:
        assert needle in str(info.value)


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_bytesio_raises_checkpoint_error(case):
    raw, must_name = CASES[case]
    with pytest.raises(fastserial.CheckpointError) as info:
        fastserial.load(io.BytesIO(raw))
    for needle in must_name:
        assert needle in str(info.value), str(info.value)


def test_missing_record_also_under_weights_only_false(tmp_path):
    raw, _ = CASES["missing_storage_record"]
    path = tmp_path / "missing.pt"
    path.write_bytes(raw)
    with pytest.raises(fastserial.CheckpointError, match="data/0") as info:
        fastserial.load(path, weights_only=False)
    assert str(path) in str(info.value)


_NO_CRASH_SCRIPT = r"""
import io, json, sys
import fastserial

results = {}
for path in sys.argv[1:]:
    outcome = []
    for how in ("path", "mmap", "bytesio"):
        try:
            if how == "path":
                fastserial.load(path)
            elif how == "mmap":
                fastserial.load(path, mmap=True)
            else:
                with open(path, "rb") as fh:
                    fastserial.load(io.BytesIO(fh.read()))
            outcome.append("loaded")
        except fastserial.CheckpointError:
            outcome.append("CheckpointError")
        except BaseException as exc:
            outcome.append(type(exc).__name__)
    results[path] = outcome
print("RESULT " + json.dumps(results))
"""


def test_malformed_inputs_never_crash_the_interpreter(tmp_path):
    paths = []
    for case, (raw, _) in CASES.items():
        p = tmp_path / f"{case}.pt"
        p.write_bytes(raw)
        paths.append(str(p))
    proc = run_python(_NO_CRASH_SCRIPT, *paths, timeout=120)
    assert proc.returncode == 0, f"interpreter exited with {proc.returncode}: {proc.stderr[-2000:]}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    results = json.loads(line[len("RESULT ") :])
    assert sorted(results) == sorted(paths)
    for path, outcome in results.items():
        assert outcome == ["CheckpointError"] * 3, (path, outcome)
