"""The README's Benchmarks section quotes only numbers found in ``bench/results/``.

A number with a unit (``212.5 ms``, ``1.200 s``, ``845 us``, ``30.55x``, ``19 MiB``,
``2.11 GiB/s``, ``12%``) anywhere in the section, prose or table, must appear with that
unit in a result file: in the text files (``.md``, ``.txt``) as written, or in a
``bench.py`` JSON as ``bench/report.py`` formats it (its README block, and every timed
run through the same ``fmt_time`` that wrote the ``.md``). Editing a number in the
README by hand makes this test fail; regenerate the table with
``python bench/report.py bench/results/RUN.json --readme README.md`` instead.

Not checked, on purpose:

- numbers without a unit: dates, versions, counts ("20,000 tensors"), shapes ("4096²"),
  option values (``--repeats 5``), and prose like "about 3 minutes";
- digits inside names ("gpt2", "float32", "H200", file names): a number must not
  follow a letter, digit or dot;
- targets, written after a comparison sign ("≥ 1.5x", "≤ 1.2x raw write"): they come
  from the project's goals, not from a measurement.
"""

from __future__ import annotations

import json
import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT / "bench"))

import report  # noqa: E402  (bench/report.py; imports neither torch nor safetensors)
from _fmt import fmt_duration, fmt_time  # noqa: E402

NUM = r"\d[\d,]*(?:\.\d+)?"
# "A unit" or "A–B unit" (a range: both ends carry the unit). "x" and "%" follow the
# number directly; the other units after at most one space.
QUOTED = re.compile(
    rf"(?<![\w.])(?P<a>{NUM})(?:\s?[–-]\s?(?P<b>{NUM}))?"
    r"(?:\s?(?P<unit>GiB/s|GB/s|MiB|GiB|KiB|ms|us|µs|s)|(?P<suffix>x|%))(?![\w/])"
)
COMPARATORS = ("≥", "≤", ">=", "<=", ">", "<")


def quoted_numbers(text, skip_targets=True):
    """The numbers with units in ``text``, normalized: ``"212.5 ms"``, ``"30.55x"``."""
    found = []
    for m in QUOTED.finditer(text):
        if skip_targets and text[: m.start()].rstrip().endswith(COMPARATORS):
            continue
        unit = m["unit"]
        for num in filter(None, (m["a"], m["b"])):
            if unit:
                found.append(f"{num} {'us' if unit == 'µs' else unit}")
            else:
                found.append(num + m["suffix"])
    return found


def benchmarks_section(readme_text):
    start = readme_text.index("\n## Benchmarks\n")
    end = readme_text.index("\n## ", start + 1)
    return readme_text[start:end]


def _timings(node):
    """Every timed run and best time in a bench.py JSON, in seconds."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "best" and isinstance(value, (int, float)):
                yield value
            elif key == "runs" and isinstance(value, list):
                yield from (v for v in value if isinstance(v, (int, float)))
            else:
                yield from _timings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _timings(value)


def results_text():
    """The result files' text, plus what report.py makes of each bench.py JSON."""
    parts = []
    for path in sorted(RESULTS.iterdir()):
        if path.suffix in (".md", ".txt"):
            parts.append(path.read_text(encoding="utf-8"))
        elif path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            parts += [fmt_time(t) for t in _timings(data)]
            if "workloads" in data and "meta" in data:  # written by bench.py
                parts.append(report.readme_block(data, str(path), base_dir=str(ROOT)))
                parts.append(fmt_duration(data["meta"]["total_elapsed_s"]))
    return "\n".join(parts)


@pytest.fixture(scope="module")
def section():
    return benchmarks_section((ROOT / "README.md").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def known():
    return set(quoted_numbers(results_text(), skip_targets=False))


def unsupported(section_text, known_numbers):
    return sorted(set(quoted_numbers(section_text)) - known_numbers)


def test_every_quoted_number_is_in_bench_results(section, known):
    missing = unsupported(section, known)
    assert not missing, (
        "the README's Benchmarks section quotes numbers found in no file under "
        f"bench/results/: {missing}"
    )


def test_the_section_quotes_numbers_at_all(section):
    # Guards the regex: a pattern that matched nothing would pass the test above.
    numbers = quoted_numbers(section)
    assert len(numbers) > 100
    for sample in ("213.3 ms", "1.041 s", "783 us", "25.34x", "29 MiB"):
        assert sample in numbers


def test_a_hand_edited_number_is_caught(section, known):
    edited = section.replace("213.3 ms", "211.7 ms")
    assert edited != section
    assert "211.7 ms" not in known
    assert unsupported(edited, known) == ["211.7 ms"]


def test_targets_and_names_are_skipped():
    text = "gpt2 float32 ≥ 1.5x, ≤ 1.2x raw write, 2.34x, 0.95–1.09x, 4096x4096, 845 µs"
    assert quoted_numbers(text) == ["2.34x", "0.95x", "1.09x", "845 us"]


def test_readme_table_is_what_report_py_writes():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(report.START) + len(report.START)
    block = text[start : text.index(report.END)].strip()
    chart = re.search(r"\]\((bench/results/[^)]+)\.svg\)", block)
    assert chart, "the README's table block embeds no chart from bench/results/"
    json_path = ROOT / (chart[1] + ".json")
    data = report.load_results(json_path)
    assert block == report.readme_block(data, str(json_path), base_dir=str(ROOT)), (
        f"the README's table differs from {json_path.name}: run "
        f"python bench/report.py {chart[1]}.json --readme README.md"
    )
    svg = (ROOT / (chart[1] + ".svg")).read_text(encoding="utf-8")
    assert svg == report.svg_chart(data), "the chart is out of date: rerun bench/report.py"
