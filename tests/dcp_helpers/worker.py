"""One rank of the multi-process DCP tests (gloo on the CPU).

    python worker.py SCENARIO ROOT      (env: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)

Each named check runs in turn; its outcome ("ok" or a traceback) goes to
ROOT/results-{SCENARIO}-{rank}.json, which the pytest side reads. The crash scenarios
end with this process killed (SIGKILL) or with the collective error a surviving rank
gets, recorded the same way.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import sys
import time
import traceback
import warnings
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from fastserial.dcp import FileSystemReader, FileSystemWriter, FsspecReader, FsspecWriter  # noqa: E402
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner  # noqa: E402
from torch.distributed.checkpoint.planner import WriteItemType  # noqa: E402

try:  # torch >= 2.7: the thread and the process executors
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType  # noqa: E402
except ImportError:
    AsyncCheckpointerType = None
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.tensor import DTensor, Shard  # noqa: E402

from dcp_helpers import state  # noqa: E402

warnings.filterwarnings("ignore")

RANK = int(os.environ["RANK"])
WORLD = int(os.environ["WORLD_SIZE"])
MESH = None


def sharded_state(version: int = 0, dim: int = 0, values: bool = True) -> dict:
    """This rank's state: DTensors Shard(dim) of the full tensors, plain replicated
    tensors, and the non-tensor extras (zeroed destinations when values=False)."""
    full = state.full_tensors(version)
    sd = {}
    for name in state.SHARDED:
        t = full[name] if values else torch.zeros_like(full[name])
        d = dim if t.dim() > dim else 0
        local = t.chunk(WORLD, dim=d)[RANK].clone()
        sd[name] = DTensor.from_local(
            local, MESH, [Shard(d)], run_check=False, shape=t.shape, stride=t.stride()
        )
    for name in state.PLAIN:
        sd[name] = full[name].clone() if values else torch.zeros_like(full[name])
    sd.update(state.extras(version) if values else {"step": -1, "opt": {"lr": 0, "names": 0}})
    return sd


def check_loaded(sd: dict, version: int = 0, dim: int = 0) -> None:
    full = state.full_tensors(version)
    for name in state.SHARDED:
        d = dim if full[name].dim() > dim else 0
        want = full[name].chunk(WORLD, dim=d)[RANK]
        got = sd[name].to_local()
        assert state.bitwise_equal(got, want), (name, got.shape, want.shape)
    for name in state.PLAIN:
        assert state.bitwise_equal(sd[name], full[name]), name
    assert sd["step"] == state.extras(version)["step"], sd["step"]
    assert sd["opt"] == state.extras(version)["opt"], sd["opt"]


def load_with(reader, dim: int = 0) -> dict:
    sd = sharded_state(values=False, dim=dim)
    dcp.load(sd, storage_reader=reader)
    return sd


def shard_files(path: str) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.endswith(".distcp"))


# --------------------------------------------------------------------------- scenarios


def main_checks(root: str) -> dict:
    ours, theirs = f"{root}/ours", f"{root}/torch"
    checks = {}

    def save_ours():
        dcp.save(sharded_state(), storage_writer=FileSystemWriter(ours))
        dist.barrier()
        names = shard_files(ours)
        assert len(names) == WORLD and all("-" in n for n in names), names

    def save_torch():
        dcp.save(sharded_state(), storage_writer=dcp.FileSystemWriter(theirs))

    def load_ours_at_world():
        check_loaded(load_with(FileSystemReader(ours)))

    def torch_reader_on_ours():
        a = load_with(dcp.FileSystemReader(ours))
        check_loaded(a)

    def ours_on_torch():
        check_loaded(load_with(FileSystemReader(theirs)))

    def column_shards():
        # Shard(1) destinations: boxes that are not row runs take the copy path.
        check_loaded(load_with(FileSystemReader(ours), dim=1), dim=1)
        check_loaded(load_with(dcp.FileSystemReader(ours), dim=1), dim=1)

    def resave_cleans_up():
        before = shard_files(ours)
        dcp.save(sharded_state(1), storage_writer=FileSystemWriter(ours))
        dist.barrier()
        after = shard_files(ours)
        assert len(after) == WORLD and not set(before) & set(after), (before, after)
        sd = sharded_state(values=False)
        dcp.load(sd, storage_reader=FileSystemReader(ours))
        check_loaded(sd, version=1)
        # back to version 0 for the world-size-4 and world-size-1 loads
        dcp.save(sharded_state(0), storage_writer=FileSystemWriter(ours))
        dist.barrier()
        assert len(shard_files(ours)) == WORLD

    def plan_caching():
        # DCP replays cached final plans (storage_data included) on the second save:
        # file names must still be fresh, and the data the new one.
        if "enable_plan_caching" not in inspect.signature(DefaultSavePlanner).parameters:
            return  # torch < 2.7 caches no plans
        path = f"{root}/cached"
        for version in (0, 1):
            planner = DefaultSavePlanner(enable_plan_caching=True)
            dcp.save(sharded_state(version), storage_writer=FileSystemWriter(path), planner=planner)
            dist.barrier()
        assert len(shard_files(path)) == WORLD, shard_files(path)
        sd = sharded_state(values=False)
        dcp.load(sd, storage_reader=FileSystemReader(path))
        check_loaded(sd, version=1)

    def file_url():
        url = f"file://{root}/url"
        dcp.save(sharded_state(), storage_writer=FsspecWriter(url))
        check_loaded(load_with(FsspecReader(url)))
        check_loaded(load_with(dcp.FileSystemReader(f"{root}/url")))

    def async_thread():
        path = f"{root}/async_thread"
        kind = (
            {}
            if AsyncCheckpointerType is None
            else {"async_checkpointer_type": AsyncCheckpointerType.THREAD}
        )
        fut = dcp.async_save(sharded_state(), storage_writer=FileSystemWriter(path), **kind)
        fut.result(timeout=60)
        check_loaded(load_with(FileSystemReader(path)))

    def async_process():
        if AsyncCheckpointerType is None:
            return  # torch < 2.7 has only the thread executor
        path = f"{root}/async_process"
        fut = dcp.async_save(
            sharded_state(),
            storage_writer=FileSystemWriter(path),
            async_checkpointer_type=AsyncCheckpointerType.PROCESS,
        )
        fut.result(timeout=90)
        check_loaded(load_with(FileSystemReader(path)))
        check_loaded(load_with(dcp.FileSystemReader(path)))

    for fn in (
        save_ours,
        save_torch,
        load_ours_at_world,
        torch_reader_on_ours,
        ours_on_torch,
        column_shards,
        resave_cleans_up,
        plan_caching,
        file_url,
        async_thread,
        async_process,
    ):
        checks[fn.__name__] = run_check(fn)
    return checks


def load4_checks(root: str) -> dict:
    checks = {}

    def ours_at_4():
        check_loaded(load_with(FileSystemReader(f"{root}/ours")))

    def torch_reader_on_ours_at_4():
        check_loaded(load_with(dcp.FileSystemReader(f"{root}/ours")))

    def ours_on_torch_at_4():
        check_loaded(load_with(FileSystemReader(f"{root}/torch")))

    def column_shards_at_4():
        check_loaded(load_with(FileSystemReader(f"{root}/ours"), dim=1), dim=1)

    for fn in (ours_at_4, torch_reader_on_ours_at_4, ours_on_torch_at_4, column_shards_at_4):
        checks[fn.__name__] = run_check(fn)
    return checks


class KillingPlanner(DefaultSavePlanner):
    """Resolves one tensor, lets its write land, then SIGKILLs this process."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors = 0

    def resolve_data(self, write_item):
        if write_item.type != WriteItemType.BYTE_IO:
            self.tensors += 1
            if self.tensors == 2:
                time.sleep(0.3)
                os.kill(os.getpid(), signal.SIGKILL)
        return super().resolve_data(write_item)


def crash_checks(root: str, where: str) -> dict:
    path = f"{root}/{where}"
    checks = {
        "previous_save": run_check(
            lambda: dcp.save(sharded_state(0), storage_writer=FileSystemWriter(path))
        )
    }
    dist.barrier()
    planner = None
    if where == "crash_write" and RANK == 1:
        planner = KillingPlanner()
    if where == "crash_finish" and RANK == 0:
        real_replace = os.replace

        def dying_replace(src, dst, *args, **kwargs):
            if str(dst).endswith(".metadata"):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst, *args, **kwargs)

        os.replace = dying_replace
    try:
        dcp.save(sharded_state(1), storage_writer=FileSystemWriter(path), planner=planner)
        checks["second_save"] = "completed (it should have died)"
    except BaseException as e:  # the surviving rank: the collective fails
        checks["second_save"] = f"failed: {type(e).__name__}"
    return checks


def run_check(fn) -> str:
    try:
        fn()
        return "ok"
    except BaseException:
        return traceback.format_exc()


def main() -> None:
    global MESH
    scenario, root = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    MESH = init_device_mesh("cpu", (WORLD,))
    if scenario == "main":
        checks = main_checks(root)
    elif scenario == "load4":
        checks = load4_checks(root)
    elif scenario.startswith("crash"):
        out = f"{root}/results-{scenario}-{RANK}.json"

        def record(c):
            with open(out, "w") as f:
                json.dump(c, f)

        record({"started": "ok"})
        checks = crash_checks(root, scenario)
        record(checks)
        os._exit(0)
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    with open(f"{root}/results-{scenario}-{RANK}.json", "w") as f:
        json.dump(checks, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
