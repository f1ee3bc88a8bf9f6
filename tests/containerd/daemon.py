"""A private containerd for tests and benchmarks: its own root, state, sockets and temp dir.

`Containerd(workdir, proxy_plugins={"cowstore": SOCK})` writes a version 2 config.toml
(the CRI plugin disabled, every path under `workdir`, each proxy plugin a snapshotter on its
socket), starts `containerd --config` and waits until `ctr version` answers. The built-in
`overlayfs` and `native` snapshotters stay available beside the proxy ones, so one daemon
serves every contender of a benchmark. `ctr(*args)` runs ctr against it in one namespace.

`stop()` (and leaving the `with` block) removes what ran (tasks, containers, images) while the
daemon is up, stops the daemon by its pid (SIGTERM, then SIGKILL), then makes sure nothing of
it is left on the machine: shims started for its socket, mounts and loop devices under
`workdir`, the cgroups of its namespace. What had to be forced is kept in
`leftovers` so a test can fail on it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

TOOLS = ("containerd", "ctr", "runc", "containerd-shim-runc-v2")
BUILTIN_SNAPSHOTTERS = ("overlayfs", "native")
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
CTR_TIMEOUT = 600.0
CGROUP_ROOT = Path("/sys/fs/cgroup")
SHIM_RUN_DIR = Path("/run/containerd")
"""The shims' socket directory (`s/`): fixed in containerd 1.6; removed again if we made it."""


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def config_toml(workdir: Path, proxy_plugins: Mapping[str, str | os.PathLike[str]] | None = None) -> str:
    """containerd's config: every path under `workdir`; `proxy_plugins` maps a snapshotter name to
    its plugin's socket."""
    lines = [
        "version = 2",
        f'root = "{workdir / "root"}"',
        f'state = "{workdir / "state"}"',
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]',
        "",
        "[grpc]",
        f'  address = "{workdir / "containerd.sock"}"',
        "[ttrpc]",
        f'  address = "{workdir / "containerd.sock.ttrpc"}"',
        "[debug]",
        '  level = "info"',
        "[metrics]",
        '  address = ""',
        '[plugins."io.containerd.internal.v1.opt"]',
        f'  path = "{workdir / "opt"}"',
    ]
    for name, sock in (proxy_plugins or {}).items():
        lines += [f"[proxy_plugins.{name}]", '  type = "snapshot"', f'  address = "{sock}"']
    return "\n".join(lines) + "\n"


CAPTURE_DIR = "/run/ctr-capture"
"""Where a container started by `run_container(capture=True)` writes its standard output."""


class Containerd:
    """One private containerd, started by `start()` (or `with`), stopped by its pid."""

    def __init__(
        self,
        workdir: Path,
        proxy_plugins: Mapping[str, str | os.PathLike[str]] | None = None,
        namespace: str | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.proxy_plugins = dict(proxy_plugins or {})
        self.namespace = namespace or f"cowstore-test-{os.getpid()}"
        self.address = self.workdir / "containerd.sock"
        self.root = self.workdir / "root"
        self.config = self.workdir / "config.toml"
        self.log = self.workdir / "containerd.log"
        self.tmp = self.workdir / "tmp"
        self.process: subprocess.Popen[bytes] | None = None
        self.leftovers: list[str] = []
        self.run_dir_existed = SHIM_RUN_DIR.exists()

    def snapshotter_root(self, name: str) -> Path:
        """Where a built-in snapshotter keeps its data (a proxy's lives with its plugin)."""
        return self.root / f"io.containerd.snapshotter.v1.{name}"

    @property
    def env(self) -> dict[str, str]:
        """containerd and ctr mount layers in temp dirs: keep them under `workdir`."""
        return {**os.environ, "TMPDIR": str(self.tmp)}

    def start(self) -> Containerd:
        if len(str(self.address)) > 100:
            raise ValueError(f"{self.address}: too long for a unix socket")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)
        self.config.write_text(config_toml(self.workdir, self.proxy_plugins))
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                ["containerd", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"containerd exited with {self.process.returncode}:\n{self.log_tail()}")
            if self.address.exists() and not self.ctr("version", check=False, timeout=10).returncode:
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"containerd did not answer within {START_TIMEOUT} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def ctr(
        self, *args: str, check: bool = True, timeout: float = CTR_TIMEOUT
    ) -> subprocess.CompletedProcess[str]:
        """`ctr --address A --namespace N ARGS`; a failure shows ctr's output and the daemon's log."""
        argv = ["ctr", "--address", str(self.address), "--namespace", self.namespace, *args]
        proc = subprocess.run(argv, capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and proc.returncode:
            raise AssertionError(
                f"{' '.join(args)} failed with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}\n"
                f"-- containerd log --\n{self.log_tail(2000)}"
            )
        return proc

    def snapshots(self, snapshotter: str) -> list[str]:
        """Keys and names of `snapshotter`'s snapshots in this namespace."""
        out = self.ctr("snapshots", "--snapshotter", snapshotter, "ls").stdout.splitlines()
        return [line.split()[0] for line in out[1:] if line.strip()]

    @property
    def run_options(self) -> list[str]:
        """`ctr run` options that keep runc's state and ctr's FIFOs under `workdir`, not /run/containerd."""
        return ["--runc-root", str(self.workdir / "runc"), "--fifo-dir", str(self.workdir / "fifo")]

    def run_container(
        self,
        image: str,
        name: str,
        *command: str,
        snapshotter: str,
        rm: bool = True,
        capture: bool = True,
        timeout: float = CTR_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """`ctr run [--rm] --snapshotter S IMAGE NAME COMMAND…` (no terminal).

        With `capture`, the command's standard output is written to a file on a bind mount and
        returned as the result's stdout: ctr's own copy through FIFOs sometimes loses the output
        of a short-lived container (containerd#770), which a busy machine makes likely. The
        command runs under the image's /bin/sh then."""
        args = ["run", *(["--rm"] if rm else []), "--snapshotter", snapshotter, *self.run_options]
        if not capture:
            return self.ctr(*args, image, name, *command, timeout=timeout)
        out = self.workdir / "out" / name
        out.mkdir(parents=True, exist_ok=True)
        (out / "stdout").unlink(missing_ok=True)
        args += ["--mount", f"type=bind,src={out},dst={CAPTURE_DIR},options=rbind:rw"]
        wrapped = ["/bin/sh", "-c", f'exec "$@" >{CAPTURE_DIR}/stdout', "sh", *command]
        proc = self.ctr(*args, image, name, *wrapped, timeout=timeout)
        proc.stdout = (out / "stdout").read_text()
        return proc

    def start_detached(self, image: str, name: str, *command: str, snapshotter: str) -> None:
        """`ctr run -d`: the container's task keeps running; `exec` into it, `remove` it after."""
        self.ctr(
            "run", "-d", "--null-io", "--snapshotter", snapshotter, *self.run_options, image, name, *command
        )

    def exec(self, name: str, exec_id: str, *command: str) -> subprocess.CompletedProcess[str]:
        fifo = ["--fifo-dir", str(self.workdir / "fifo")]
        return self.ctr("tasks", "exec", *fifo, "--exec-id", exec_id, name, *command)

    def remove(self, *names: str) -> None:
        """Kill the containers' tasks (if any) and remove the containers with their snapshots."""
        for name in names:
            self.ctr("tasks", "rm", "--force", name, check=False)
        self.ctr("containers", "rm", *names)

    def collect(self) -> None:
        """Run containerd's GC now and wait for it: removals only mark snapshots gone, and the
        snapshotter deletes their data in a later collection (a lease removed with --sync runs one)."""
        self.ctr("leases", "create", "--id", "collect")
        self.ctr("leases", "rm", "--sync", "collect")

    def gc(self) -> None:
        """Remove every image and prune content; containerd's GC then removes unreferenced snapshots.

        `images rm --sync` waits for the collection it triggers; a last content prune collects again.
        """
        images = self.ctr("images", "ls", "-q").stdout.split()
        if images:
            self.ctr("images", "rm", "--sync", *images)
        self.ctr("content", "prune", "references")

    def clear(self) -> None:
        """Kill and delete every task, container and image of the namespace (daemon still up)."""
        tasks = [line.split()[0] for line in self.ctr("tasks", "ls").stdout.splitlines()[1:] if line.strip()]
        for task in tasks:
            self.ctr("tasks", "kill", "--signal", "SIGKILL", task, check=False)
        for task in tasks:
            for _ in range(100):
                if not self.ctr("tasks", "rm", "--force", task, check=False).returncode:
                    break
                time.sleep(0.1)
        containers = self.ctr("containers", "ls", "-q").stdout.split()
        if containers:
            self.ctr("containers", "rm", *containers, check=False)
        self.gc()

    def stop(self) -> list[str]:
        """Clear, stop the daemon by pid, then force away anything left; returns what had to be forced."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(Exception):
                self.clear()
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.leftovers.append(f"containerd {process.pid} ignored SIGTERM")
                process.kill()
                process.wait()
        self.leftovers += cleanup(self.workdir, self.address, self.namespace)
        if not self.run_dir_existed:
            for path in (SHIM_RUN_DIR / "s", SHIM_RUN_DIR / "fifo", SHIM_RUN_DIR / "runc", SHIM_RUN_DIR):
                with contextlib.suppress(OSError):
                    path.rmdir()
        return self.leftovers

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def shims(address: Path) -> list[int]:
    """Pids of the shims started for the containerd on `address` (their command line names it)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"containerd-shim" in argv[0] and str(address).encode() in argv:
            pids.append(int(proc.name))
    return pids


def mounts_under(prefix: Path) -> list[str]:
    """Mount points under `prefix`, deepest first."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            target = line.split()[4].encode().decode("unicode_escape")
            if target == str(prefix) or target.startswith(f"{prefix}/"):
                found.append(target)
    return sorted(found, key=lambda t: -t.count("/"))


def loops_under(prefix: Path) -> list[str]:
    """Loop devices whose backing file is under `prefix`."""
    found = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        with contextlib.suppress(OSError):
            if backing.read_text().strip().startswith(f"{prefix}/"):
                found.append(f"/dev/{backing.parent.parent.name}")
    return found


def cleanup(workdir: Path, address: Path, namespace: str) -> list[str]:
    """Remove what a stopped containerd may have left; returns a line per thing it had to remove."""
    forced = []
    for pid in shims(address):
        forced.append(f"shim {pid}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for target in mounts_under(workdir):
        forced.append(f"mount {target}")
        subprocess.run(["umount", target], capture_output=True, timeout=60)
    for target in mounts_under(workdir):
        subprocess.run(["umount", "--lazy", target], capture_output=True, timeout=60)
    for dev in loops_under(workdir):
        forced.append(f"loop {dev}")
        subprocess.run(["losetup", "--detach", dev], capture_output=True, timeout=60)
    for cgroup in namespace_cgroups(namespace):
        for child in sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
            forced.append(f"cgroup {child}")
            with contextlib.suppress(OSError):
                child.rmdir()
        with contextlib.suppress(OSError):
            cgroup.rmdir()
    return forced


def namespace_cgroups(namespace: str) -> list[Path]:
    """The cgroups runc made for `namespace`'s containers: one directory in the unified
    hierarchy (cgroup v2), or one per controller hierarchy (v1, `/sys/fs/cgroup/memory/NS`)."""
    hierarchies = [CGROUP_ROOT]
    with contextlib.suppress(OSError):
        hierarchies += [p for p in CGROUP_ROOT.iterdir() if p.is_dir() and not p.is_symlink()]
    return [h / namespace for h in hierarchies if (h / namespace).is_dir()]


@contextlib.contextmanager
def mounted(mounts: list[dict], target: Path) -> Iterator[Path]:
    """Mount what a snapshotter returned (`ctr snapshots view --mounts` JSON: Type, Source,
    Options) on `target`; mount(8) attaches a loop device for the `loop` option, as containerd does."""
    target.mkdir(parents=True, exist_ok=True)
    done = []
    try:
        for raw in mounts:
            m = {k.lower(): v for k, v in raw.items()}
            argv = ["mount", "-t", m["type"], m["source"], str(target)]
            if m.get("options"):
                argv[1:1] = ["-o", ",".join(m["options"])]
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            if proc.returncode:
                raise AssertionError(f"{argv} failed ({proc.returncode}): {proc.stderr.strip()}")
            done.append(target)
        yield target
    finally:
        for t in reversed(done):
            subprocess.run(["umount", str(t)], check=True, capture_output=True, timeout=60)
