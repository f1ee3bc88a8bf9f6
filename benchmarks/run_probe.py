"""A quick probe of `ctr run --rm IMAGE /bin/true` start to exit: cowstore against overlayfs
under one private containerd, in pairs (the order alternating), after one import each.

    python -m benchmarks.run_probe [--pairs 20] [--image bench-2g]

Prints both medians, the ratio of the medians and the median of the pairs' ratios (the
machine drifts: a pair shares its moment). Needs root and what vs_containerd needs. It
measures and prints; it asserts nothing. The full comparison is vs_containerd.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import vs_containerd
from tests.containerd import images, plugin

CONTENDERS = ("overlayfs", plugin.NAME)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=20, help="runs of each contender, alternating")
    p.add_argument("--image", choices=sorted(vs_containerd.SPECS), default=images.BENCH_200M.name)
    args = p.parse_args(argv)
    image = images.bench_image(vs_containerd.SPECS[args.image])
    times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    with (
        tempfile.TemporaryDirectory(prefix="cowstore-run-probe-", dir="/var/tmp") as work,
        vs_containerd.contenders(CONTENDERS, Path(work), print) as (ctrd, lineup),
    ):
        for who in lineup:
            ctrd.ctr("images", "import", "--snapshotter", who.name, str(image.archive))
        for i in range(args.pairs + 1):  # the first pair warms up
            for who in lineup if i % 2 else lineup[::-1]:
                start = time.perf_counter()
                ctrd.run_container(image.ref, f"probe-{i}", "/bin/true", snapshotter=who.name, capture=False)
                if i:
                    times[who.name].append(time.perf_counter() - start)
    base, mine = times["overlayfs"], times[plugin.NAME]
    print(
        f"{image.ref}, {args.pairs} pairs: overlayfs {statistics.median(base) * 1e3:.1f} ms, "
        f"cowstore {statistics.median(mine) * 1e3:.1f} ms; ratio of medians "
        f"{statistics.median(mine) / statistics.median(base):.2f}, median of pair ratios "
        f"{statistics.median(m / b for m, b in zip(mine, base, strict=True)):.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
