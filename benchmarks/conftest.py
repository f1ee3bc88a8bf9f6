"""Fixtures of the micro-benchmarks: the engines, and the recorder that writes benchmarks/results/.

Each benchmark hands its pytest-benchmark statistics and its size (operations and bytes
per timed call) to `record`; at the end of the session the recorder merges them into the
`micro` section of results/latest.json and re-renders latest.md and depth.png. Runs with
`--benchmark-disable` record nothing.
"""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from typing import Any

import pytest

import cowstore
from benchmarks import peers, results
from cowstore import engines
from tests import conftest as suite

engine_module = suite.engine_module
engine = suite.engine
"""The test suite's one engine fixture: each benchmark runs once per engine."""


class Recorder:
    """Figures of one session: timings (per call and per operation) and other figures (memory)."""

    def __init__(self) -> None:
        self.benchmarks: dict[str, dict[str, Any]] = {}
        self.figures: dict[str, dict[str, Any]] = {}

    @staticmethod
    def key(name: str, engine: str, params: dict[str, Any] | None = None) -> str:
        return f"{name}[{'-'.join([engine, *(str(v) for v in (params or {}).values())])}]"

    def timing(
        self,
        benchmark: Any,
        name: str,
        engine: str,
        *,
        ops: int,
        nbytes: int = 0,
        params: dict[str, Any] | None = None,
        group: str | None = None,
    ) -> None:
        """Record `benchmark`'s statistics; each timed call did `ops` operations moving `nbytes`."""
        meta = getattr(benchmark, "stats", None)
        if meta is None:
            return
        s = meta.stats
        median = s.median
        key = self.key(name, engine, params)
        self.benchmarks[key] = {
            "group": group or name,
            "name": name,
            "engine": engine,
            "params": params or {},
            "ops": ops,
            "bytes": nbytes,
            "rounds": s.rounds,
            "mean_s": s.mean,
            "median_s": median,
            "min_s": s.min,
            "stddev_s": s.stddev,
            "per_op_s": median / ops,
            "bytes_per_s": nbytes / median if nbytes and median else None,
        }

    def figure(self, name: str, engine: str, **values: Any) -> None:
        self.figures[self.key(name, engine)] = {"engine": engine, **values}


RECORDER = Recorder()
BUILD = peers.build_identity()


@pytest.fixture(scope="session")
def record() -> Recorder:
    return RECORDER


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not (RECORDER.benchmarks or RECORDER.figures):
        return
    meta = {
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "engines": sorted(engines.ENGINES),
        "cowstore": cowstore.__version__,
        "platform": platform.platform(),
        "build": BUILD,
        "build_changed": not peers.same_build(BUILD, peers.build_identity()),
    }
    results.update(
        "micro", {"meta": meta, "benchmarks": RECORDER.benchmarks, "figures": RECORDER.figures}, merge=True
    )


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not (RECORDER.benchmarks or RECORDER.figures):
        return
    doc = results.load()
    terminalreporter.section("cowstore targets")
    for target in results.targets(doc):
        terminalreporter.write_line(f"{target.status:>12}  {target.goal}: {target.measured}")
    terminalreporter.write_line(f"results: {results.RESULTS_DIR / results.MD_NAME}")
