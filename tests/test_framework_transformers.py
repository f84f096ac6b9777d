"""A real framework through ``fastserial.patch_torch()``: Hugging Face transformers and
accelerate, with a tiny model built from a config (no download) and a tiny in-memory
dataset.

- ``save_pretrained`` / ``from_pretrained`` of a ``pytorch_model.bin`` inside the patch;
- a ``Trainer`` run checkpointed every 2 steps and resumed from ``checkpoint-2`` inside
  the patch (``rng_state.pth`` holds a numpy random state that transformers allows
  through ``torch.serialization.safe_globals``; ``optimizer.pt``, ``scheduler.pt``),
  equal to the same run without the patch;
- accelerate's ``save_state`` / ``load_state``, which swallows a failed load of the
  random states (logging "Could not load random states" at INFO).

Skipped cleanly when transformers / accelerate are not installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import os
import pathlib
import random
import zipfile

import fastserial
import fastserial.serialization
import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")

# Signs in the frameworks' logs that a resume silently lost state.
BAD_LOG_SIGNS = (
    "unpickling",
    "skipping",
    "could not load",
    "reproducibility is not guaranteed",
    "weights_only",
)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _tiny_model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=16,
        vocab_size=64,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )  # default dropout (0.1) stays on: a lost RNG state changes the resumed run
    return transformers.GPT2LMHeadModel(config).eval()


class _TinyDataset(torch.utils.data.Dataset):
    """16 seeded sequences of 8 tokens, labels = input_ids."""

    def __init__(self, n: int = 16, length: int = 8):
        g = torch.Generator().manual_seed(1234)
        self.ids = torch.randint(0, 64, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


class _Calls:
    """Counts (by file name) what fastserial.serialization.save / load were called
    with; patch_torch's trampolines look those names up at each call."""

    def __init__(self, monkeypatch):
        self.saved: list[str] = []
        self.loaded: list[str] = []
        real_save, real_load = fastserial.serialization.save, fastserial.serialization.load

        def save(obj, f, *args, **kwargs):
            self.saved.append(_name(f))
            return real_save(obj, f, *args, **kwargs)

        def load(f, *args, **kwargs):
            self.loaded.append(_name(f))
            return real_load(f, *args, **kwargs)

        monkeypatch.setattr(fastserial.serialization, "save", save)
        monkeypatch.setattr(fastserial.serialization, "load", load)


def _name(f) -> str:
    if isinstance(f, (str, os.PathLike)):
        return pathlib.Path(f).name
    return type(f).__name__


@contextlib.contextmanager
def _captured_logs():
    """Collects every record (INFO and up) of the transformers and accelerate loggers,
    whose handlers do not propagate to pytest's caplog by default."""
    records: list[logging.LogRecord] = []

    class _Handler(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = _Handler(logging.INFO)
    loggers = [logging.getLogger("transformers"), logging.getLogger("accelerate")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    try:
        yield records
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def _bad_records(records) -> list[str]:
    messages = [r.getMessage() for r in records]
    return [m for m in messages if any(sign in m.lower() for sign in BAD_LOG_SIGNS)]


def _assert_state_dicts_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------
# save_pretrained / from_pretrained
# --------------------------------------------------------------------------


def test_save_pretrained_bin_roundtrip_through_patch(tmp_path, monkeypatch):
    model = _tiny_model()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    calls = _Calls(monkeypatch)
    bin_path = tmp_path / transformers.utils.WEIGHTS_NAME  # pytorch_model.bin

    with fastserial.patch_torch():
        if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
            # transformers 4.x: writes pytorch_model.bin through its save_function
            # (default: torch.save, captured when transformers was imported).
            model.save_pretrained(tmp_path, safe_serialization=False)
        else:
            # transformers 5 always writes model.safetensors (safe_serialization is
            # gone, swallowed by **kwargs); write the .bin as 4.x did, with torch.save.
            model.save_pretrained(tmp_path)
            (tmp_path / transformers.utils.SAFE_WEIGHTS_NAME).unlink()
            torch.save(model.state_dict(), bin_path)
    assert calls.saved.count(bin_path.name) == 1, calls.saved
    assert not (tmp_path / transformers.utils.SAFE_WEIGHTS_NAME).exists()

    # The file is a zip checkpoint that torch's own (unpatched) load reads.
    assert zipfile.is_zipfile(bin_path)
    from_torch = torch.load(bin_path, map_location="cpu", weights_only=True)
    assert len(calls.loaded) == 0
    for key, value in from_torch.items():
        assert torch.equal(value, expected[key]), key

    with fastserial.patch_torch():
        reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    assert calls.loaded.count(bin_path.name) >= 1, calls.loaded  # 4.57 reads it twice
    _assert_state_dicts_equal(reloaded.state_dict(), expected)


# --------------------------------------------------------------------------
# Trainer: checkpoint, resume
# --------------------------------------------------------------------------


def _training_args(output_dir) -> transformers.TrainingArguments:
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        report_to=[],
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    kwargs["use_cpu" if "use_cpu" in fields else "no_cuda"] = True
    if "save_safetensors" in fields:  # gone in transformers 5 (always safetensors)
        kwargs["save_safetensors"] = False
    return transformers.TrainingArguments(**kwargs)


def _trainer(output_dir) -> transformers.Trainer:
    return transformers.Trainer(
        model=_tiny_model().train(),
        args=_training_args(output_dir),
        train_dataset=_TinyDataset(),
    )


def _run(output_dir, patched: bool):
    """Trains 4 steps (checkpoints at 2 and 4), then a fresh Trainer resumes from
    checkpoint-2. Returns (weights, loss log) of the uninterrupted run and of the
    resumed one, and the frameworks' log records."""
    patch = fastserial.patch_torch() if patched else contextlib.nullcontext()
    with patch, _captured_logs() as records:
        first = _trainer(output_dir)
        first.train()
        checkpoint = pathlib.Path(output_dir) / "checkpoint-2"
        # Move every random generator away from the saved state: only a real
        # restore of rng_state.pth brings the resumed run back onto it.
        random.seed(99)
        np.random.seed(99)
        torch.manual_seed(99)
        resumed = _trainer(output_dir)
        resumed.train(resume_from_checkpoint=str(checkpoint))
    return _outcome(first), _outcome(resumed), records


def _outcome(trainer):
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    # log_history: the resumed run's starts with the checkpoint's (trainer_state.json)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return weights, losses


def test_trainer_resume_through_patch_equals_torch(tmp_path, monkeypatch):
    ref_full, ref_resumed, ref_records = _run(tmp_path / "torch", patched=False)

    calls = _Calls(monkeypatch)
    full, resumed, records = _run(tmp_path / "fastserial", patched=True)

    # The patched run really went through fastserial for every training-state file.
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        # checkpoint-2 and -4 of the first run, checkpoint-4 again by the resumed one
        assert calls.saved.count(name) == 3, (name, calls.saved)
        assert calls.loaded.count(name) == 1, (name, calls.loaded)  # the resume
    # What fastserial wrote loads in torch (unpatched), numpy random state included.
    ckpt = tmp_path / "fastserial" / "checkpoint-2"
    np_core = np._core if int(np.__version__.split(".")[0]) >= 2 else np.core
    numpy_state = [np_core.multiarray._reconstruct, np.ndarray, np.dtype]
    with torch.serialization.safe_globals([*numpy_state, type(np.dtype(np.uint32))]):
        rng = torch.load(ckpt / "rng_state.pth", weights_only=True)
    assert rng["numpy"][0] == "MT19937"

    # No state silently dropped on resume (accelerate / transformers log and go on).
    assert _bad_records(ref_records) == []
    assert _bad_records(records) == []

    # Bitwise, not allclose: both runs execute the same ops in the same order on this
    # machine, from states that must come back bit for bit (weights, Adam moments,
    # scheduler, RNG). Any difference is a restored state that differs, not rounding.
    # Dropout is on (p=0.1), so a lost or altered random state changes the result.
    assert len(resumed[1]) == len(ref_resumed[1]) == 4  # 2 from trainer_state.json
    assert resumed[1] == ref_resumed[1]
    _assert_state_dicts_equal(resumed[0], ref_resumed[0])
    # The patched uninterrupted run equals torch's too, and resuming from checkpoint-2
    # reproduces it: the resume really restored everything.
    assert full[1] == ref_full[1]
    _assert_state_dicts_equal(full[0], ref_full[0])
    assert resumed[1] == full[1]
    _assert_state_dicts_equal(resumed[0], full[0])


# --------------------------------------------------------------------------
# accelerate: save_state / load_state
# --------------------------------------------------------------------------


def test_accelerate_load_state_restores_random_states_through_patch(tmp_path, monkeypatch):
    accelerator = accelerate.Accelerator(cpu=True)
    model = _tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    calls = _Calls(monkeypatch)
    with fastserial.patch_torch(), _captured_logs() as records:
        accelerator.save_state(str(tmp_path))
        random.seed(6)
        np.random.seed(6)
        torch.manual_seed(6)
        accelerator.load_state(str(tmp_path))

    rng_file = "random_states_0.pkl"  # holds numpy's state, loaded with weights_only
    assert calls.saved.count(rng_file) == 1 and calls.loaded.count(rng_file) == 1
    assert _bad_records(records) == []  # load_state swallows the error, logs at INFO
    assert random.getstate() == saved[0]
    now = np.random.get_state()
    assert now[0] == saved[1][0] and np.array_equal(now[1], saved[1][1]) and now[2:] == saved[1][2:]
    assert torch.equal(torch.get_rng_state(), saved[2])
