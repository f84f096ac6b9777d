#!/usr/bin/env python3
"""The README's benchmark table and a chart, from a results JSON written by bench.py.

    python bench/report.py bench/results/RUN.json                     # table to stdout, RUN.svg
    python bench/report.py bench/results/RUN.json --readme README.md  # also rewrite the README table

The README table lives between the markers ``<!-- bench-table:start -->`` and
``<!-- bench-table:end -->``; everything between them is replaced. The chart
(``RUN.svg`` beside the JSON) is plain hand-written SVG: no plotting library needed.
Needs neither torch nor safetensors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from xml.sax.saxutils import escape

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _fmt import fmt_duration, fmt_ratio, fmt_size, fmt_time  # noqa: E402

PEERS = ("tensorizer", "runai-model-streamer", "fastsafetensors")
LIBS = ("torch", "safetensors", "fastserial") + PEERS
FLOOR = "floor"  # bench.py's pseudo-library: the same bytes, one writev / readinto / mmap
WORKLOADS = ("big", "gpt2", "many")
TABLE_OPS = {
    "save": "save",
    "save_durable": "save + fsync (default)",
    "load": "eager load",
    "mmap": "mmap load",
    "mmap_touch": "mmap load + touch",
}
CHART_OPS = ("save", "load", "mmap", "mmap_touch")
SMALL_OPS = {"p50": "eager load p50", "p99": "eager load p99"}  # bench.py --small
COLORS = {
    "torch": "#e4572e",
    "safetensors": "#f2b134",
    "fastserial": "#2e6fba",
    "tensorizer": "#76b041",
    "runai-model-streamer": "#9b5de5",
    "fastsafetensors": "#17becf",
    FLOOR: "#9a9a9a",
}
START = "<!-- bench-table:start -->"
END = "<!-- bench-table:end -->"
NONE = "–"  # a cell with no number (not measured, or not applicable)

# bench.py's defaults: options left at them are not repeated in the command line.
DEFAULT_ARGS = {
    "workloads": "big,gpt2,many",
    "ops": "save,load,mmap,mmap_touch,load_other,raw,memory",
    "only": None,
    "repeats": 3,
    "quick": False,
    "impl_module": "fastserial",
    "threads": None,
    "torch_threads": 1,
    "sync": True,
    "mallopt": True,
    "small": 200,
}
FLAG = {"sync": "--no-sync", "mallopt": "--no-mallopt", "quick": "--quick"}


# --------------------------------------------------------------------------
# Reading the results
# --------------------------------------------------------------------------


def load_results(path):
    with open(path) as f:
        return json.load(f)


def best(res, op, lib):
    """Best time in seconds, or None when not measured or failed."""
    d = res["times"].get(op, {}).get(lib)
    return None if d is None or "error" in d else d["best"]


def cell(res, op, lib):
    d = res["times"].get(op, {}).get(lib)
    if d is None:
        return NONE
    return "ERR" if "error" in d else fmt_time(d["best"])


def libs_of(data):
    return [lib for lib in LIBS if lib in data["meta"].get("libs", {})]


def has_floor(data):
    """Whether the run measured the floor (bench.py --ops raw, since the peers were added)."""
    return any(
        FLOOR in d for res in data["workloads"].values() for d in res["times"].values()
    ) or FLOOR in (data.get("small_files") or {}).get("latency", {})


def small_times(data):
    """The small-files latencies in the shape of a workload's ``times``: op -> lib -> best."""
    small = data.get("small_files")
    if not small:
        return None
    times = {op: {} for op in SMALL_OPS}
    for lib, lat in small["latency"].items():
        for op in SMALL_OPS:
            times[op][lib] = {"best": lat[op]}
    for lib in small.get("errors", {}):
        for op in SMALL_OPS:
            times[op][lib] = {"error": small["errors"][lib]}
    return {"times": times}


def fastest_other(res, op, libs):
    """ "0.82x name": the fastest library other than fastserial, its time / fastserial's."""
    fs = best(res, op, "fastserial")
    others = [(best(res, op, lib), lib) for lib in libs if lib != "fastserial"]
    others = [(t, lib) for t, lib in others if t is not None]
    if fs is None or not others:
        return ""
    t, lib = min(others)
    return f"{fmt_ratio(t, fs)} {lib}"


def command_line(data):
    """The bench.py command that produced the run (output options left out)."""
    args = data.get("args", {})
    parts = ["python bench/bench.py"]
    for key, default in DEFAULT_ARGS.items():
        value = args.get(key, default)
        if value == default:
            continue
        if key in FLAG:
            parts.append(FLAG[key])
        else:
            parts.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(parts)


def machine(meta):
    return f"{meta['cpu_model']}, {meta['cpu_count']} cores, {fmt_size(meta['ram_bytes'])} RAM"


def best_of(meta):
    n = meta["repeats"]
    return f"best of {n} runs" if n > 1 else "time of a single run"


def versions(meta):
    return f"Python {meta['python']}, torch {meta['torch']}, safetensors {meta['safetensors']}"


# --------------------------------------------------------------------------
# The README table
# --------------------------------------------------------------------------


def readme_table(data):
    """One row per workload and operation, one column per library, then ratios.

    Runs with peers get "vs torch", "vs safetensors" and "vs fastest other" (the fastest
    of all the other libraries in that row, named); runs without them "vs" every other
    library, as before. Runs that measured the floor get its column and fastserial / floor.
    Runs with ``--small`` get two more rows: p50 and p99 of the small-file loads."""
    libs = libs_of(data)
    fs = "fastserial" in libs
    others = [lib for lib in libs if lib != "fastserial"] if fs else []
    peers = any(lib in PEERS for lib in libs)
    vs = [lib for lib in others if lib in ("torch", "safetensors")] if peers else others
    floor = has_floor(data)
    head = libs + ([FLOOR] if floor else []) + [f"vs {o}" for o in vs]
    head += (["vs fastest other"] if peers and fs else []) + (
        ["fastserial / floor"] if floor and fs else []
    )
    lines = [
        "| workload | operation | " + " | ".join(head) + " |",
        "|---|---|" + "---:|" * len(head),
    ]

    def row(label, op_label, res, op):
        cells = [cell(res, op, lib) for lib in libs] + ([cell(res, op, FLOOR)] if floor else [])
        b = best(res, op, "fastserial")
        for other in vs:
            a = best(res, op, other)
            cells.append(fmt_ratio(a, b) if a is not None and b is not None else "")
        if peers and fs:
            cells.append(fastest_other(res, op, libs))
        if floor and fs:
            f = best(res, op, FLOOR)
            cells.append(fmt_ratio(b, f) if b is not None and f is not None else "")
        return f"| {label} | {op_label} | " + " | ".join(cells) + " |"

    for name in WORKLOADS:
        res = data["workloads"].get(name)
        if res is None:
            continue
        label = f"**{name}** ({res['n_tensors']:,} tensors, {fmt_size(res['data_bytes'])})"
        for op, op_label in TABLE_OPS.items():
            if op not in res["times"]:
                continue
            lines.append(row(label, op_label, res, op))
            label = ""
    small = small_times(data)
    if small:
        sf = data["small_files"]
        label = (
            f"**small files** ({sf['n_tensors']:,} tensors, {fmt_size(sf['data_bytes'])}; "
            f"{sf['iterations']:,} loads in a row)"
        )
        for op, op_label in SMALL_OPS.items():
            lines.append(row(label, op_label, small, op))
            label = ""
    return "\n".join(lines)


def readme_block(data, json_path, base_dir="."):
    """The text that goes between the README's markers: run line, chart, table."""
    meta = data["meta"]
    stem = os.path.splitext(json_path)[0]

    def rel(p):
        return os.path.relpath(p, base_dir).replace(os.sep, "/")

    run = (
        f"Measured **{meta['date'][:10]}**; machine: {machine(meta)}; {versions(meta)}. "
        f"Command: `{command_line(data)}` ({fmt_duration(meta['total_elapsed_s'])} in all). "
        f"Each time is the {best_of(meta)}, page cache warm. "
    )
    if os.path.exists(stem + ".md"):
        md = rel(stem + ".md")
        run += f"Full output: [`{md}`]({md}), every run in the `.json` beside it."
    else:
        run += f"Every run: [`{rel(json_path)}`]({rel(json_path)})."
    if meta.get("quick"):
        run += " Quick sizes (`--quick`), not the full workloads."
    fsm = meta.get("libs", {}).get("fastserial", {})
    if fsm.get("stand_in"):
        run += f" The fastserial column is the stand-in module `{fsm['impl_module']}`."
    peers = [lib for lib in PEERS if lib in meta.get("libs", {})]
    if peers:
        run += " Peers: " + ", ".join(f"{lib} {meta['libs'][lib]['version']}" for lib in peers)
        run += "; each call is listed in the full output"
        if "tensorizer" in peers:
            run += " (tensorizer has no mmap mode: its mmap rows are its `lazy_load=True`)"
        if "fastsafetensors" in peers and "runai-model-streamer" in peers:
            run += "; fastsafetensors and runai-model-streamer load the file safetensors writes"
        run += "."
    if meta.get("unavailable"):
        run += " Not measured (not installed/unavailable): " + ", ".join(meta["unavailable"]) + "."
    if has_floor(data):
        run += (
            " Floor: the same bytes with no format: one `os.writev` (save), one `readinto` "
            "into a preallocated buffer (eager load), one `mmap` (+ one `.sum()` for touch)."
        )
    title = f"Save and load times, {meta['date'][:10]}"
    chart = f"![{title}]({rel(stem + '.svg')})"
    return "\n\n".join([run, chart, readme_table(data)])


def update_readme(readme_path, block):
    with open(readme_path, encoding="utf-8") as f:
        text = f.read()
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        raise SystemExit(f"{readme_path}: markers {START} ... {END} not found")
    new = text[: i + len(START)] + "\n" + block + "\n" + text[j:]
    with open(readme_path, "w", encoding="utf-8") as f:
        f.write(new)


# --------------------------------------------------------------------------
# The chart: horizontal bars on a log time axis, one group per workload and operation
# --------------------------------------------------------------------------

W = 1000  # picture width
LABEL_X = 20  # operation labels start here
X0, X1 = 190, 830  # the plot area (the rest on the right holds value labels)
BAR, GAP, PAD = 11, 2, 10  # bar height, gap between bars, padding around a group
HEAD = 30  # height of a workload's heading
FONT = "DejaVu Sans, Helvetica, Arial, sans-serif"


def _tick_label(t):
    if t >= 1:
        return f"{t:g} s"
    if t >= 1e-3:
        return f"{t * 1e3:g} ms"
    return f"{t * 1e6:g} us"


def _text(x, y, s, size=12, anchor="start", weight="normal", fill="#222"):
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
        f'font-weight="{weight}" fill="{fill}">{escape(s)}</text>'
    )


def svg_chart(data):
    meta = data["meta"]
    libs = libs_of(data)
    # One bar per library, and one for the floor when the run measured it.
    series = libs + ([FLOOR] if has_floor(data) else [])
    workloads = [w for w in WORKLOADS if w in data["workloads"]]
    # Sections: (heading, times-like dict, [(op, label)]); the small files come last.
    sections = []
    for w in workloads:
        res = data["workloads"][w]
        heading = f"{w}: {res['n_tensors']:,} tensors, {fmt_size(res['data_bytes'])}"
        sections.append(
            (heading, res, [(op, TABLE_OPS[op]) for op in CHART_OPS if op in res["times"]])
        )
    small = small_times(data)
    if small:
        sf = data["small_files"]
        heading = (
            f"small files: {sf['n_tensors']:,} tensors, {fmt_size(sf['data_bytes'])}, "
            f"{sf['iterations']:,} eager loads in a row"
        )
        sections.append((heading, small, list(SMALL_OPS.items())))
    times = [best(res, op, lib) for _, res, ops in sections for op, _ in ops for lib in series]
    times = [t for t in times if t]
    lo = 10 ** math.floor(math.log10(min(times))) if times else 1e-4
    hi = 10 ** math.ceil(math.log10(max(times))) if times else 10.0

    def x(t):
        return X0 + (X1 - X0) * math.log10(t / lo) / math.log10(hi / lo)

    # legend: entries left to right, wrapping onto more lines when the peers make it long
    legend, lx, ly = [], LABEL_X, 67
    for lib in series:
        if lx + 34 + 8 * len(lib) > W - LABEL_X:
            lx, ly = LABEL_X, ly + 22
        legend.append(f'<rect x="{lx}" y="{ly}" width="14" height="14" fill="{COLORS[lib]}"/>')
        legend.append(_text(lx + 20, ly + 12, lib, size=13))
        lx += 30 + 8 * len(lib) + 20
    note = "time per call, log scale: shorter is faster"
    if lx + 10 + 6.5 * len(note) > W - LABEL_X:
        lx, ly = LABEL_X - 10, ly + 22
    legend.append(_text(lx + 10, ly + 12, note, fill="#555"))

    group_h = len(series) * (BAR + GAP) - GAP + 2 * PAD
    top = 112 + (ly - 67)
    n_groups = sum(len(ops) for _, _, ops in sections)
    plot_bottom = top + len(sections) * HEAD + n_groups * group_h
    height = plot_bottom + 62

    if len(libs) > 3:
        title = f"fastserial and {len(libs) - 1} other libraries: checkpoint save and load, {meta['date'][:10]}"
    else:
        title = f"{' vs '.join(libs)}: checkpoint save and load, {meta['date'][:10]}"
    sub = f"{machine(meta)} · {versions(meta)} · {best_of(meta)}"
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" '
        f'viewBox="0 0 {W} {height}" font-family="{FONT}">',
        f'<rect width="{W}" height="{height}" fill="white"/>',
        _text(LABEL_X, 30, title, size=18, weight="bold"),
        _text(LABEL_X, 52, sub, size=12, fill="#555"),
    ]
    out += legend

    # grid: a line per decade, faint lines at 2x and 5x
    decades = round(math.log10(hi / lo))
    for k in range(decades + 1):
        t = lo * 10**k
        out.append(
            f'<line x1="{x(t):.1f}" y1="{top}" x2="{x(t):.1f}" y2="{plot_bottom}" '
            'stroke="#bbb" stroke-width="1"/>'
        )
        out.append(_text(x(t), plot_bottom + 18, _tick_label(t), anchor="middle"))
        if k < decades:
            for m in (2, 5):
                out.append(
                    f'<line x1="{x(t * m):.1f}" y1="{top}" x2="{x(t * m):.1f}" '
                    f'y2="{plot_bottom}" stroke="#e6e6e6" stroke-width="1"/>'
                )
    out.append(f'<line x1="{X0}" y1="{plot_bottom}" x2="{X1}" y2="{plot_bottom}" stroke="#444"/>')
    out.append(
        _text(
            (X0 + X1) / 2,
            plot_bottom + 42,
            "time per call (log scale)",
            size=13,
            anchor="middle",
            weight="bold",
        )
    )
    out.append(_text(LABEL_X, top - 6, "workload / operation", size=12, weight="bold"))

    y = top
    for heading, res, ops in sections:
        out.append(f'<rect x="0" y="{y}" width="{W}" height="{HEAD}" fill="#f1f3f6"/>')
        out.append(_text(LABEL_X, y + 20, heading, size=14, weight="bold"))
        y += HEAD
        for op, op_label in ops:
            mid = y + group_h / 2
            out.append(_text(LABEL_X + 10, mid + 4, op_label, size=13))
            by = y + PAD
            for lib in series:
                t = best(res, op, lib)
                if t is None:
                    out.append(_text(X0 + 4, by + BAR - 1, f"{lib}: {cell(res, op, lib)}", 11))
                else:
                    out.append(
                        f'<rect x="{X0}" y="{by}" width="{x(t) - X0:.1f}" height="{BAR}" '
                        f'fill="{COLORS[lib]}"><title>{lib}: {fmt_time(t)}</title></rect>'
                    )
                    label = fmt_time(t)
                    tt = best(res, op, "torch")
                    if lib == "fastserial" and tt is not None:
                        label += f"  ({fmt_ratio(tt, t)} vs torch)"
                    weight = "bold" if lib == "fastserial" else "normal"
                    out.append(_text(x(t) + 5, by + BAR - 1, label, 11, weight=weight))
                by += BAR + GAP
            y += group_h
            out.append(f'<line x1="{LABEL_X}" y1="{y}" x2="{W - LABEL_X}" y2="{y}" stroke="#eee"/>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def chart_path(json_path):
    return os.path.splitext(json_path)[0] + ".svg"


def write_chart(json_path, data=None):
    data = data if data is not None else load_results(json_path)
    path = chart_path(json_path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(svg_chart(data))
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", help="results JSON written by bench.py --json")
    p.add_argument("--readme", metavar="PATH", help="rewrite the table between the markers")
    a = p.parse_args(argv)
    data = load_results(a.json)
    base = os.path.dirname(os.path.abspath(a.readme)) if a.readme else "."
    block = readme_block(data, a.json, base_dir=base)
    print(block)
    svg = write_chart(a.json, data)
    print(f"chart written to {svg}", file=sys.stderr)
    if a.readme:
        update_readme(a.readme, block)
        print(f"table rewritten in {a.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
