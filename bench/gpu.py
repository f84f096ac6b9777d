"""GPU checks and timings: loading straight to CUDA, saving CUDA tensors.

    python bench/gpu.py            # needs a CUDA device; exits 0 with a note otherwise

Checks (each prints ok / FAIL):
  * fastserial.save of CUDA tensors -> torch.load(map_location='cuda') is identical,
    and the reverse;
  * map_location='cuda', torch.device('cuda:0'), {'cuda:1': 'cuda:0'} and a callable;
  * a checkpoint tagged 'cuda:<n>' for a device that does not exist raises RuntimeError
    telling the user to pass map_location (as torch does).
Timings (best of N, one process, same files): torch.load vs fastserial.load with
map_location='cuda', eager and mmap=True, for the big (1 GiB) and gpt2 workloads,
and the peak CPU memory each adds (measured in fresh processes): loading to the GPU
must not stage a full CPU copy of the checkpoint.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def workload(name: str):
    import torch

    g = torch.Generator().manual_seed(0)
    if name == "big":
        return {f"w{i}": torch.randn(4096, 4096, generator=g) for i in range(16)}
    if name == "gpt2":
        sd = {
            "wte": torch.randn(50257, 768, generator=g),
            "wpe": torch.randn(1024, 768, generator=g),
        }
        for i in range(12):
            p = f"h.{i}."
            sd[p + "ln_1.weight"] = torch.randn(768, generator=g)
            sd[p + "ln_1.bias"] = torch.randn(768, generator=g)
            sd[p + "attn.c_attn.weight"] = torch.randn(768, 2304, generator=g)
            sd[p + "attn.c_attn.bias"] = torch.randn(2304, generator=g)
            sd[p + "attn.c_proj.weight"] = torch.randn(768, 768, generator=g)
            sd[p + "attn.c_proj.bias"] = torch.randn(768, generator=g)
            sd[p + "ln_2.weight"] = torch.randn(768, generator=g)
            sd[p + "ln_2.bias"] = torch.randn(768, generator=g)
            sd[p + "mlp.c_fc.weight"] = torch.randn(768, 3072, generator=g)
            sd[p + "mlp.c_fc.bias"] = torch.randn(3072, generator=g)
            sd[p + "mlp.c_proj.weight"] = torch.randn(3072, 768, generator=g)
            sd[p + "mlp.c_proj.bias"] = torch.randn(768, generator=g)
        sd["ln_f.weight"] = torch.randn(768, generator=g)
        sd["ln_f.bias"] = torch.randn(768, generator=g)
        return sd
    raise ValueError(name)


def check(label: str, ok: bool, detail: str = "") -> bool:
    print(f"  {'ok  ' if ok else 'FAIL'} {label}{(': ' + detail) if detail else ''}")
    return ok


def correctness(tmp: str) -> bool:
    import fastserial
    import torch

    good = True
    print("correctness")
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 64, generator=g).cuda()
    obj = {
        "a": base,
        "view": base[::2, 1:],
        "half": torch.randn(33, generator=g).half().cuda(),
        "u16": torch.arange(10, dtype=torch.int32).to(torch.uint16).cuda(),
        "cpu": torch.ones(3),
    }
    obj["tied"] = obj["a"]
    p = os.path.join(tmp, "cuda.pt")
    fastserial.save(obj, p)
    for who, loaded in (
        ("torch.load", torch.load(p)),
        ("fastserial.load", fastserial.load(p)),
    ):
        same = all(
            loaded[k].device == obj[k].device and torch.equal(loaded[k].cpu(), obj[k].cpu())
            for k in obj
        )
        good &= check(f"fastserial.save of CUDA tensors -> {who}: values and devices", same)
        good &= check(
            f"{who}: view and tied tensors still share storage",
            loaded["a"].untyped_storage().data_ptr() == loaded["view"].untyped_storage().data_ptr()
            and loaded["a"] is loaded["tied"],
        )
    tp = os.path.join(tmp, "torch_cpu.pt")
    torch.save({k: v.cpu() for k, v in obj.items()}, tp)
    for label, ml in (
        ("'cuda'", "cuda"),
        ("torch.device('cuda:0')", torch.device("cuda:0")),
        ("{'cpu': 'cuda:0'}", {"cpu": "cuda:0"}),
        ("callable", lambda s, loc: s.cuda()),
    ):
        for mmap in (False, True):
            ours = fastserial.load(tp, map_location=ml, mmap=mmap)
            ref = torch.load(tp, map_location=ml, mmap=mmap)
            same = all(
                ours[k].device == ref[k].device and torch.equal(ours[k].cpu(), ref[k].cpu())
                for k in ref
            )
            good &= check(
                f"map_location={label}, mmap={mmap}: same devices and values as torch", same
            )
    missing = torch.cuda.device_count()
    tagged = os.path.join(tmp, "tagged.pt")
    fastserial.save({"x": torch.ones(2)}, tagged)
    # Re-tag the storage as living on a device this machine does not have.
    import zipfile

    with zipfile.ZipFile(tagged) as z:
        pkl = z.read("tagged/data.pkl")
    assert b"cpu" in pkl
    pkl2 = pkl.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:" + str(missing).encode())
    retagged = os.path.join(tmp, "retagged.pt")
    with zipfile.ZipFile(tagged) as zin, zipfile.ZipFile(retagged, "w") as zout:
        for info in zin.infolist():
            data = pkl2 if info.filename.endswith("data.pkl") else zin.read(info)
            zout.writestr(info.filename.replace("tagged/", "retagged/"), data)
    for who, fn in (("torch", torch.load), ("fastserial", fastserial.load)):
        try:
            fn(retagged)
            good &= check(f"{who}: cuda:{missing}-tagged file without map_location raises", False)
        except RuntimeError as e:
            good &= check(
                f"{who}: cuda:{missing}-tagged file raises RuntimeError mentioning map_location",
                "map_location" in str(e),
                str(e).splitlines()[0][:100],
            )
    ours = fastserial.load(retagged, map_location={f"cuda:{missing}": "cuda:0"})
    good &= check("dict map_location remaps the missing device", ours["x"].device.type == "cuda")
    return good


def child(spec: dict) -> None:
    """Loads once in a fresh process and reports time and the CPU memory it added."""
    import fastserial
    import torch

    torch.cuda.init()
    torch.zeros(1, device="cuda")
    fn = torch.load if spec["lib"] == "torch" else fastserial.load

    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])  # kB
        return 0

    # Reset the high-water mark after CUDA's own start-up, so the peak is the load's.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    t = time.perf_counter()
    r = fn(spec["path"], map_location="cuda", mmap=spec["mmap"], weights_only=True)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t
    peak = status("VmHWM")
    assert all(v.is_cuda for v in r.values())
    print(json.dumps({"secs": secs, "cpu_peak_delta_mib": (peak - before) / 1024}))


def timings(tmp: str, repeats: int) -> list:
    import fastserial
    import torch

    rows = []
    for name in ("big", "gpt2"):
        sd = workload(name)
        nbytes = sum(t.numel() * t.element_size() for t in sd.values())
        tpath = os.path.join(tmp, f"{name}_torch.pt")
        torch.save(sd, tpath)
        ref = {k: v for k, v in sd.items()}
        del sd
        gc.collect()
        print(
            f"\n{name}: {len(ref)} tensors, {nbytes / 2**20:.0f} MiB (file written by torch.save)"
        )
        for mmap in (False, True):
            times = {}
            for lib, fn in (("torch", torch.load), ("fastserial", fastserial.load)):
                best = float("inf")
                for _ in range(repeats):
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    r = fn(tpath, map_location="cuda", mmap=mmap, weights_only=True)
                    torch.cuda.synchronize()
                    best = min(best, time.perf_counter() - t)
                    del r
                    torch.cuda.empty_cache()
                times[lib] = best
            r = fastserial.load(tpath, map_location="cuda", mmap=mmap)
            ok = all(torch.equal(r[k].cpu(), ref[k]) for k in ref)
            del r
            mem = {}
            for lib in ("torch", "fastserial"):
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        json.dumps({"lib": lib, "path": tpath, "mmap": mmap}),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                mem[lib] = json.loads(out.stdout.strip().splitlines()[-1])["cpu_peak_delta_mib"]
            row = {
                "workload": name,
                "mmap": mmap,
                "torch_s": times["torch"],
                "fastserial_s": times["fastserial"],
                "ratio": times["torch"] / times["fastserial"],
                "torch_cpu_peak_mib": mem["torch"],
                "fastserial_cpu_peak_mib": mem["fastserial"],
                "values_equal": ok,
                "data_mib": nbytes / 2**20,
            }
            rows.append(row)
            print(
                f"  load to cuda, mmap={str(mmap):5}: torch {times['torch'] * 1e3:8.1f} ms | fastserial "
                f"{times['fastserial'] * 1e3:8.1f} ms | torch/fastserial {row['ratio']:.2f}x | CPU peak "
                f"torch {mem['torch']:.0f} MiB, fastserial {mem['fastserial']:.0f} MiB | values "
                f"{'equal' if ok else 'DIFFER'}"
            )
        os.remove(tpath)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--child")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (run this on a machine with a GPU)")
        return 0
    print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory(prefix="fastserial-gpu-") as tmp:
        good = correctness(tmp)
        rows = timings(tmp, args.repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"device": torch.cuda.get_device_name(0), "rows": rows, "correct": good},
                f,
                indent=1,
            )
    return 0 if good and all(r["values_equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
