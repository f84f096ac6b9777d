"""Number formatting shared by the benchmark reports (no torch import).

``bench.py`` writes its tables with these functions and ``report.py`` writes the
README table and the chart with them, so a number quoted in the README reads exactly
as it does in the files under ``bench/results/`` (``tests/test_readme_numbers.py``
relies on that).
"""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


def fmt_size(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    if n >= KiB:
        return f"{n / KiB:.1f} KiB"
    return f"{int(n)} B"


def fmt_time(s) -> str:
    if s is None:
        return "-"
    if s >= 1.0:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def fmt_ratio(a, b) -> str:
    if a is None or b is None or b <= 0 or a < 0:
        return "-"
    return f"{a / b:.2f}x"


def fmt_duration(s: float) -> str:
    """A whole run's wall time, e.g. ``220 s``."""
    return f"{s:.0f} s"
