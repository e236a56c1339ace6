"""What every bench module shares: quiet logging, timers, and the JSON line format.

Each measurement is printed as one JSON object on its own line, so that ``run.py`` (or
any other tool) can collect them from the modules it runs, in-process or as
subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import structlog

LOGGING_NOTE = (
    "structlog configured with make_filtering_bound_logger(logging.CRITICAL): "
    "log events are filtered out, so logging is not measured"
)

clock = time.perf_counter
clock_ns = time.perf_counter_ns


def quiet_logging() -> None:
    """Filter out every otpy log event below CRITICAL, so logging is not measured."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))


def emit(name: str, value: float, unit: str, **extra: Any) -> dict[str, Any]:
    """Print one measurement as a JSON line and return it."""
    record: dict[str, Any] = {"bench": name, "value": value, "unit": unit, **extra}
    print(json.dumps(record), flush=True)
    return record


def summary(rates: list[float]) -> dict[str, float]:
    """Best and median of several repeats (rates: higher is better)."""
    return {"best": max(rates), "median": statistics.median(rates), "runs": len(rates)}


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of an already sorted list, nearest rank."""
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


def python_info() -> dict[str, Any]:
    """The interpreter, and a fingerprint of the otpy sources that were measured (the
    tree may hold uncommitted edits, so a commit id alone would not say)."""
    src = Path(__file__).resolve().parent.parent / "otpy"
    digest = hashlib.sha256()
    for path in sorted(src.rglob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return {"python": sys.version.split()[0], "cpus": os.cpu_count(),
            "otpy_sources_sha256": digest.hexdigest()[:16]}
