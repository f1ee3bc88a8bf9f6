"""The peers and clients of the side-by-side: NBD servers (cowstore, qemu-nbd, nbdkit), fio, qemu-img bench.

Every server runs as a subprocess on a unix socket and is stopped when its `serving`
block ends, whatever happens inside. Every fio run is bounded by `--runtime` and
`--time_based`. The cowstore server's command line is built in one place,
`cowstore_serve_command`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cowstore

from .workload import run

START_TIMEOUT = 60.0
STOP_TIMEOUT = 300.0
TOOLS = ("qemu-img", "qemu-io", "qemu-nbd", "nbdkit", "fio")


def missing_tools(names: Sequence[str] = TOOLS) -> list[str]:
    return [name for name in names if shutil.which(name) is None]


def tool_versions() -> dict[str, str]:
    """First line of `--version` of every tool the side-by-side drives."""
    versions = {"python": sys.version.split()[0], "cowstore": cowstore.__version__}
    for name in TOOLS:
        try:
            out = subprocess.run([name, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        versions[name] = out.strip().splitlines()[0] if out.strip() else "?"
    return versions


def build_identity() -> dict[str, str | None]:
    """Which cowstore is measured: the checkout's commit, and digests of the package's Python
    sources and of the built extension.

    The package can change under a long run (servers start as new processes and would load
    the new code), so runs record this at the start and compare `sources` and `extension`
    at the end; `commit` is informational (other files may be committed meanwhile).
    """
    package = Path(cowstore.__file__).parent
    ident: dict[str, str | None] = {"commit": None, "sources": None, "extension": None}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "-C", _source_root(), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        ident["commit"] = done.stdout.strip() or None
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    ident["sources"] = digest.hexdigest()[:16]
    ext = next(package.glob("engines/_cengine*.so"), None)
    if ext is not None:
        ident["extension"] = hashlib.sha256(ext.read_bytes()).hexdigest()[:16]
    return ident


def same_build(a: dict[str, str | None], b: dict[str, str | None]) -> bool:
    return (a.get("sources"), a.get("extension")) == (b.get("sources"), b.get("extension"))


def _source_root() -> str:
    return str(Path(cowstore.__file__).resolve().parent.parent)


def cowstore_env(engine: str | None) -> dict[str, str]:
    """Environment for a cowstore subprocess: this checkout's package, and the engine asked for."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_source_root(), env.get("PYTHONPATH")) if p)
    env.pop("COWSTORE_PURE_PYTHON", None)
    env.pop("COWSTORE_REQUIRE_EXTENSION", None)
    if engine == "python":
        env["COWSTORE_PURE_PYTHON"] = "1"
    elif engine == "cython":
        env["COWSTORE_REQUIRE_EXTENSION"] = "1"
    return env


def cowstore_command() -> list[str]:
    """The `cowstore` command through this interpreter (with `cowstore_env`, this checkout's)."""
    return [sys.executable, "-c", "import sys; from cowstore.cli import main; sys.exit(main())"]


def cowstore_serve_command(store: Path, sock: Path, exports: Sequence[str]) -> list[str]:
    """`cowstore --store STORE serve --socket SOCK --export KEY…`, through this interpreter."""
    command = [*cowstore_command(), "--store", str(store), "serve", "--socket", str(sock)]
    for key in exports:
        command += ["--export", key]
    return command


def qemu_nbd_command(
    image: Path, sock: Path, *, readonly: bool, fmt: str = "qcow2", shared: int = 16
) -> list[str]:
    """qemu-nbd on a unix socket, persistent (-t), page cache on, up to `shared` connections."""
    command = ["qemu-nbd", "-t", "-k", str(sock), "-f", fmt, "-e", str(shared), "--cache=writeback"]
    if readonly:
        command.append("-r")
    return [*command, str(image)]


def nbdkit_command(image: Path, sock: Path, *, readonly: bool) -> list[str]:
    """nbdkit's file plugin on a unix socket, in the foreground."""
    command = ["nbdkit", "-f", "-U", str(sock)]
    if readonly:
        command.append("-r")
    return [*command, "file", str(image)]


def nbd_uri(sock: Path, export: str = "") -> str:
    return f"nbd+unix:///{export}?socket={sock}"


@dataclass
class Server:
    """A running NBD server: what `serving` yields."""

    name: str
    uri: str
    process: subprocess.Popen
    log: Path


def _accepting(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(sock))
        except OSError:
            return False
    return True


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def serving(
    name: str, command: Sequence[str], sock: Path, *, export: str = "", env: dict[str, str] | None = None
) -> Iterator[Server]:
    """Start `command`, wait until `sock` accepts connections, yield; stop it (TERM, then KILL) after."""
    sock = Path(sock)
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    log = sock.with_suffix(".log")
    with open(log, "wb") as out:
        process = subprocess.Popen(list(command), stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (sock.exists() and _accepting(sock)):
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not listen on {sock} within {START_TIMEOUT} s")
            time.sleep(0.01)
        yield Server(name, nbd_uri(sock, export), process, log)
    finally:
        _stop(process)
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()


@dataclass(frozen=True)
class FioJob:
    """One fio job shape: `rw` (randread, randwrite, read, …), block size, queue depth, jobs (connections)."""

    name: str
    rw: str
    bs: str
    iodepth: int
    numjobs: int = 1

    @property
    def writes(self) -> bool:
        return "write" in self.rw or self.rw in ("rw", "randrw", "trim", "randtrim")


def standard_jobs(numjobs: int = 4) -> list[FioJob]:
    """randread 4k qd16, randwrite 4k qd16, read 1M qd4; then each again with `numjobs` connections."""
    base = [
        FioJob("randread-4k-qd16", "randread", "4k", 16),
        FioJob("randwrite-4k-qd16", "randwrite", "4k", 16),
        FioJob("read-1m-qd4", "read", "1m", 4),
    ]
    return base + [FioJob(f"{j.name}-x{numjobs}", j.rw, j.bs, j.iodepth, numjobs) for j in base]


@dataclass
class FioResult:
    """What one fio run measured, summed over its jobs: IOPS, bytes/s, latencies in microseconds."""

    iops: float
    bw_bytes: float
    lat_mean_us: float
    lat_p99_us: float
    runtime_ms: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def parse_fio(text: str) -> FioResult:
    """The figures of fio's JSON output (group reporting: one job entry); tolerates text before the JSON."""
    start = text.find("{")
    if start < 0:
        raise ValueError(f"no JSON in fio output: {text[:500]!r}")
    doc = json.loads(text[start:])
    iops = bw = runtime = 0.0
    lat_sum = lat_n = 0.0
    p99 = 0.0
    for job in doc["jobs"]:
        if job.get("error"):
            raise RuntimeError(f"fio job {job.get('jobname')} failed with error {job['error']}")
        for direction in ("read", "write"):
            d = job.get(direction) or {}
            if not d.get("total_ios"):
                continue
            iops += d["iops"]
            bw += d["bw_bytes"]
            runtime = max(runtime, float(d["runtime"]))
            lat = d.get("lat_ns") or {}
            lat_sum += lat.get("mean", 0.0) * d["total_ios"]
            lat_n += d["total_ios"]
            pct = (d.get("clat_ns") or {}).get("percentile") or {}
            p99 = max(p99, float(pct.get("99.000000", 0.0)))
    if not lat_n:
        raise RuntimeError("fio completed no I/O")
    return FioResult(iops, bw, lat_sum / lat_n / 1000, p99 / 1000, runtime)


def _seconds(value: float) -> str:
    return f"{max(1, round(value * 1000))}ms"


def run_fio(
    target: str | Path,
    job: FioJob,
    *,
    runtime: float,
    ramp: float,
    workdir: Path,
    size: int | None = None,
    direct: bool = True,
) -> FioResult:
    """One bounded fio run of `job` against `target`: an NBD URI (`--ioengine=nbd`), or a file
    (`--ioengine=psync`, O_DIRECT unless not `direct`). Its JSON output is kept beside `workdir`."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / f"fio-{job.name}-{time.monotonic_ns()}.json"
    command = [
        "fio",
        f"--name={job.name}",
        f"--rw={job.rw}",
        f"--bs={job.bs}",
        f"--iodepth={job.iodepth}",
        f"--numjobs={job.numjobs}",
        "--group_reporting",
        "--time_based",
        f"--runtime={_seconds(runtime)}",
        "--output-format=json",
        f"--output={out}",
        "--randrepeat=0",
    ]
    if isinstance(target, Path):
        command += ["--ioengine=psync", f"--filename={target}", f"--direct={int(direct)}"]
    else:
        command += ["--ioengine=nbd", f"--uri={target}"]
    if ramp > 0:
        command.append(f"--ramp_time={_seconds(ramp)}")
    if size is not None:
        command.append(f"--size={size}")
    run(command, timeout=runtime + ramp + 120, cwd=workdir)
    try:
        return parse_fio(out.read_text())
    finally:
        out.unlink(missing_ok=True)


_BENCH_RE = re.compile(r"Run completed in ([0-9.]+) seconds")


def qemu_img_bench(
    image: Path, *, count: int, size: int, step: int | None = None, depth: int = 1, fmt: str = "qcow2"
) -> float:
    """Seconds `qemu-img bench` takes for `count` reads of `size` bytes, `depth` in flight, page cache on."""
    command = [
        "qemu-img",
        "bench",
        "-f",
        fmt,
        "-t",
        "writeback",
        "-c",
        str(count),
        "-d",
        str(depth),
        "-s",
        str(size),
    ]
    if step is not None:
        command += ["-S", str(step)]
    out = run([*command, str(image)])
    m = _BENCH_RE.search(out)
    if not m:
        raise RuntimeError(f"unexpected qemu-img bench output: {out!r}")
    seconds = float(m.group(1))
    return seconds if seconds > 0 else math.nan
