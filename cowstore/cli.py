"""The `cowstore` command: a store's snapshots, images and NBD exports from the shell.

Every command opens the store, does one thing and closes it, so the store's lock is held
only while a command runs. A daemon (`serve`, `mount`) holds it for as long as it serves;
meanwhile the other commands run in the daemon, against its open store (`control`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import stat
import sys
import traceback
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO, TypeVar

from . import borrow, control, daemon, layout, rawimage, units
from .check import CheckReport, Problem, slot_runs
from .errors import Corruption, Error, FailedPrecondition, Locked, NotFound
from .store import Store
from .types import Info, Kind
from .units import format_size

PROG = "cowstore"
STORE_ENV = "COWSTORE_STORE"


Handler = TypeVar("Handler", bound=Callable[[argparse.Namespace], int])


class UsageError(Exception):
    """A value on the command line that argparse accepted but the command cannot use."""


def parse_size(text: str) -> int:
    """`units.parse_size`, with a malformed size as a `UsageError` (a one-line error, exit 1)."""
    try:
        return units.parse_size(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def default_store_path() -> Path:
    """$COWSTORE_STORE, else $XDG_DATA_HOME/cowstore, else ~/.local/share/cowstore."""
    env = os.environ.get(STORE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "share"
    return base / "cowstore"


def _store_path(args: argparse.Namespace) -> Path:
    if args.store == "":
        raise UsageError("--store is empty: give the store's directory")
    return Path(args.store).expanduser() if args.store else default_store_path()


@contextlib.contextmanager
def _open_store(args: argparse.Namespace, *, readonly: bool = False, verify: bool = False) -> Iterator[Store]:
    """The store, opened for this command, or the daemon's when the daemon runs the command."""
    held: daemon.Shared | None = getattr(args, "held", None)
    if held is not None:
        with held.borrow(readonly=readonly or args.read_only, verify=verify) as store:
            yield store
        return
    path = _store_path(args)
    if not layout.is_store(path) and not (path.is_dir() and any(path.iterdir())):
        raise UsageError(f"no store at {path}: create one with `{PROG} init` (or pass --store)")
    readonly = readonly or args.read_only
    with layout.open(path, readonly=readonly, wait=args.wait, verify_reads=verify) as store:
        yield store


WAIT = 10.0
"""Seconds a command waits for another process to let go of the store, by default."""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"invalid --wait {text!r}: give a number of seconds")
    return value


def _parse_labels(pairs: Sequence[str] | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"invalid label {pair!r}: use KEY=VALUE")
        labels[key] = value
    return labels


# -- output ------------------------------------------------------------------


def _emit_json(value: Any, out: TextIO | None = None) -> None:
    out = out or sys.stdout
    json.dump(value, out, indent=2)
    out.write("\n")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _iso(when: datetime | None) -> str | None:
    return when.isoformat() if when is not None else None


def _short_time(when: datetime | None) -> str:
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") if when is not None else "-"


def _info_json(info: Info) -> dict[str, Any]:
    return {
        "name": info.name,
        "kind": info.kind.value,
        "parent": info.parent,
        "labels": dict(info.labels),
        "created": _iso(info.created),
        "updated": _iso(info.updated),
        "size": info.size,
    }


def _labels_text(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _show_info(args: argparse.Namespace, info: Info) -> None:
    if args.json:
        _emit_json(_info_json(info))
        return
    print(f"name:     {info.name}")
    print(f"kind:     {info.kind.value}")
    print(f"parent:   {info.parent or '-'}")
    print(f"size:     {format_size(info.size)} ({info.size} bytes)")
    print(f"created:  {_short_time(info.created)}")
    print(f"updated:  {_short_time(info.updated)}")
    print("labels:" + ("" if info.labels else "   -"))
    for k, v in sorted(info.labels.items()):
        print(f"  {k}={v}")


class _Progress:
    """A progress bar on stderr when it is a terminal (tqdm if installed); silent otherwise."""

    def __init__(self, total: int, label: str) -> None:
        self._total = max(total, 1)
        self._label = label
        self._done = 0
        self._shown = -1
        self._bar: Any = None
        self._enabled = sys.stderr.isatty()
        if self._enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self._bar = tqdm(
                total=total,
                desc=label,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=sys.stderr,
                leave=False,
            )

    def __call__(self, n: int) -> None:
        borrow.checkpoint()
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            return
        self._done += n
        percent = self._done * 100 // self._total
        if percent != self._shown:
            self._shown = percent
            sys.stderr.write(f"\r{self._label}: {percent}%")
            sys.stderr.flush()

    def close(self) -> None:
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.close()
        elif self._shown >= 0:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


@contextlib.contextmanager
def _progress(total: int, label: str) -> Iterator[_Progress]:
    bar = _Progress(total, label)
    try:
        yield bar
    finally:
        bar.close()


# -- commands: each one's arguments registered with its handler --------------


AddArguments = Callable[[Any], object]
"""Adds arguments to a parser (or a group of one)."""


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: its name and help, what it adds to its parser, and the handler (an exit
    status). `through_daemon`: whether a daemon holding the store runs it; `paths`: its
    arguments that name files, relative to the working directory."""

    name: str
    help: str
    arguments: tuple[AddArguments, ...]
    run: Callable[[argparse.Namespace], int]
    through_daemon: bool = True
    paths: tuple[str, ...] = ()


COMMANDS: list[Command] = []
"""Every subcommand, in the order `--help` lists them."""


def command(
    name: str, help: str, *arguments: AddArguments, through_daemon: bool = True, paths: tuple[str, ...] = ()
) -> Callable[[Handler], Handler]:
    """Register the decorated handler as the subcommand `name`, with its `arguments`."""

    def register(run: Handler) -> Handler:
        COMMANDS.append(Command(name, help, arguments, run, through_daemon, paths))
        return run

    return register


def arg(*flags: str, **options: Any) -> AddArguments:
    """One `add_argument` call, made when the parser is built."""
    return lambda parser: parser.add_argument(*flags, **options)


def one_of(*arguments: AddArguments) -> AddArguments:
    """Arguments of which at most one may be given (a mutually exclusive group)."""

    def add(parser: argparse.ArgumentParser) -> None:
        group = parser.add_mutually_exclusive_group()
        for add_argument in arguments:
            add_argument(group)

    return add


LABELS = arg("--label", action="append", metavar="KEY=VALUE", help="set a label (repeatable)")


def _size(text: str | None) -> int | None:
    return parse_size(text) if text is not None else None


def _change_then_show(args: argparse.Namespace, key: str, change: Callable[[Store], object]) -> int:
    """Make one change in the store, then print snapshot `key` with --json (nothing otherwise)."""
    with _open_store(args) as store:
        change(store)
        info = store.stat(key)
    if args.json:
        _emit_json(_info_json(info))
    return 0


@command(
    "init",
    "create the store (or check an existing one's settings)",
    arg("--chunk-size", metavar="SIZE", help="a power of two from 4K to 1M (default 64K)"),
    arg("--default-size", metavar="SIZE", help="size of a snapshot without parent (default 10G)"),
    arg("--max-bytes", metavar="SIZE", help="limit the chunk pool; 0 lifts the limit (kept in the store)"),
    through_daemon=False,
)
def _cmd_init(args: argparse.Namespace) -> int:
    path = _store_path(args)
    chunk_size = _size(args.chunk_size)
    default_size = _size(args.default_size)
    max_bytes = _size(args.max_bytes)
    if not layout.is_store(path):
        path.parent.mkdir(parents=True, exist_ok=True)
    with layout.open(
        path,
        create=True,
        chunk_size=chunk_size,
        default_size=default_size,
        max_bytes=max_bytes,
        wait=args.wait,
    ) as store:
        figures = {
            "path": str(path.absolute()),
            "created": store.created,
            "chunk_size": store.chunk_size,
            "default_size": store.default_size,
            "max_bytes": store.max_bytes,
        }
    if args.json:
        _emit_json(figures)
    else:
        what = "created store" if store.created else "store exists"
        limit = f"pool limit {format_size(store.max_bytes)}" if store.max_bytes else "no pool limit"
        print(
            f"{what} at {figures['path']} (chunk size {format_size(store.chunk_size)}, "
            f"default size {format_size(store.default_size)}, {limit})"
        )
    return 0


@command(
    "ls",
    "list snapshots",
    arg(
        "filters",
        nargs="*",
        metavar="FILTER",
        help='containerd filter, e.g. kind==committed or labels."a/b"==c (several: any matches)',
    ),
)
def _cmd_ls(args: argparse.Namespace) -> int:
    with _open_store(args) as store:
        infos = list(store.walk(*args.filters))
    if args.json:
        _emit_json([_info_json(i) for i in infos])
    else:
        rows = [
            [
                i.name,
                i.kind.value,
                i.parent or "-",
                format_size(i.size),
                _short_time(i.created),
                _labels_text(i.labels),
            ]
            for i in infos
        ]
        _table(["NAME", "KIND", "PARENT", "SIZE", "CREATED", "LABELS"], rows)
    return 0


@command("stat", "show one snapshot", arg("key"))
def _cmd_stat(args: argparse.Namespace) -> int:
    with _open_store(args) as store:
        info = store.stat(args.key)
    _show_info(args, info)
    return 0


@command(
    "prepare",
    "create an active (read-write) snapshot",
    arg("key"),
    arg("parent", nargs="?", help="a committed snapshot to start from"),
    arg("--size", metavar="SIZE", help="size of a snapshot without parent (default: the store's)"),
    LABELS,
)
def _cmd_prepare(args: argparse.Namespace) -> int:
    labels = _parse_labels(args.label)
    size = _size(args.size)
    return _change_then_show(
        args, args.key, lambda store: store.prepare(args.key, args.parent, size=size, labels=labels).close()
    )


@command(
    "view",
    "create a read-only view",
    arg("key"),
    arg("parent", nargs="?", help="the committed snapshot to view"),
    LABELS,
)
def _cmd_view(args: argparse.Namespace) -> int:
    labels = _parse_labels(args.label)
    return _change_then_show(
        args, args.key, lambda store: store.view(args.key, args.parent, labels=labels).close()
    )


@command("commit", "commit an active snapshot under a new name", arg("name"), arg("key"), LABELS)
def _cmd_commit(args: argparse.Namespace) -> int:
    labels = _parse_labels(args.label)
    return _change_then_show(args, args.name, lambda store: store.commit(args.name, args.key, labels=labels))


@command(
    "resize",
    "grow an active snapshot (volumes already open keep their old size)",
    arg("key"),
    arg("size", metavar="SIZE", help="the new size, at least the current one (20G, 1048576)"),
)
def _cmd_resize(args: argparse.Namespace) -> int:
    size = parse_size(args.size)
    return _change_then_show(args, args.key, lambda store: store.resize(args.key, size))


@command("rm", "remove snapshots (children before their parents)", arg("keys", nargs="+", metavar="KEY"))
def _cmd_rm(args: argparse.Namespace) -> int:
    """Removes every key given, saying for each whether it went; children named too go
    first, so `rm base child` works."""
    outcome: dict[str, Error | None] = {}
    with _open_store(args) as store:
        pending = list(dict.fromkeys(args.keys))
        while pending:
            blocked: list[str] = []
            for key in pending:
                try:
                    store.remove(key)
                    outcome[key] = None
                except FailedPrecondition as exc:
                    blocked.append(key)
                    outcome[key] = exc
                except Error as exc:
                    outcome[key] = exc
            if len(blocked) == len(pending):
                break
            pending = blocked
    if args.json:
        _emit_json(
            [
                {
                    "key": key,
                    "removed": failure is None,
                    **({"error": _error_json(failure)} if failure else {}),
                }
                for key, failure in outcome.items()
            ]
        )
    else:
        for key, failure in outcome.items():
            if failure is None:
                print(f"removed {key}")
            else:
                _error(failure, args)
    return 1 if any(outcome.values()) else 0


@command(
    "label",
    "set (k=v) or delete (k=) labels; with none, show them",
    arg("key"),
    arg("labels", nargs="*", metavar="KEY=VALUE"),
)
def _cmd_label(args: argparse.Namespace) -> int:
    changes = _parse_labels(args.labels)
    with _open_store(args) as store:
        info = store.stat(args.key)
        if changes:
            info = store.update(dataclasses.replace(info, labels=changes), *(f"labels.{k}" for k in changes))
    if args.json:
        _emit_json(_info_json(info))
    else:
        for k, v in sorted(info.labels.items()):
            print(f"{k}={v}")
    return 0


@command("usage", "space a snapshot holds that its parent does not", arg("key"))
def _cmd_usage(args: argparse.Namespace) -> int:
    with _open_store(args) as store:
        usage = store.usage(args.key)
    if args.json:
        _emit_json({"size": usage.size, "chunks": usage.chunks})
    else:
        print(f"size:    {format_size(usage.size)} ({usage.size} bytes)")
        print(f"chunks:  {usage.chunks}")
    return 0


@command("df", "pool figures: chunk size, snapshots, data file size")
def _cmd_df(args: argparse.Namespace) -> int:
    path = _store_path(args)
    with _open_store(args) as store:
        infos = list(store.walk())
        stats = store.stats()
        apparent = os.stat(path / layout.DATA_FILE).st_size
    figures: dict[str, Any] = {
        "path": str(path.absolute()),
        "chunk_size": stats.chunk_size,
        "default_size": store.default_size,
        "max_bytes": stats.max_bytes,
        "snapshots": stats.snapshots,
        "kinds": {k.value: sum(1 for i in infos if i.kind is k) for k in Kind},
        "slots": stats.slots,
        "used": stats.used,
        "free": stats.free,
        "pending": stats.pending,
        "used_bytes": stats.used * stats.chunk_size,
        "logical_bytes": stats.logical_bytes,
        "sharing_ratio": stats.sharing_ratio,
        "disk_bytes": stats.disk_bytes,
        "apparent_bytes": apparent,
    }
    if args.json:
        _emit_json(figures)
        return 0
    kinds = ", ".join(f"{n} {k}" for k, n in figures["kinds"].items() if n)
    limit = format_size(stats.max_bytes) if stats.max_bytes is not None else "none"
    print(f"store:          {figures['path']}")
    print(f"chunk size:     {format_size(stats.chunk_size)}")
    print(f"default size:   {format_size(store.default_size)}")
    print(f"pool limit:     {limit}")
    print(f"snapshots:      {stats.snapshots}" + (f" ({kinds})" if kinds else ""))
    print(
        f"chunks:         {stats.used} used, {stats.free} free, {stats.pending} pending, {stats.slots} slots"
    )
    print(f"used:           {format_size(figures['used_bytes'])}")
    print(f"logical:        {format_size(stats.logical_bytes)} (sharing ratio {stats.sharing_ratio:.2f})")
    print(f"data file:      {format_size(stats.disk_bytes)} on disk, {format_size(apparent)} apparent")
    return 0


@command("compact", "give free space back to the disk: trim the pool's free tail, punch free chunks")
def _cmd_compact(args: argparse.Namespace) -> int:
    with _open_store(args) as store:
        freed = store.compact()
        disk = store.stats().disk_bytes
    if args.json:
        _emit_json({"freed_bytes": freed, "disk_bytes": disk})
    else:
        print(f"freed:          {format_size(freed)} ({freed} bytes)")
        print(f"data file:      {format_size(disk)} on disk")
    return 0


@command("tree", "the snapshot tree with kind, size and exclusive usage")
def _cmd_tree(args: argparse.Namespace) -> int:
    """Parents before children. Chains are as deep as 1024 layers, so nothing here recurses
    or indents by depth: --json is a flat list (each node names its parent and children),
    and an only child prints under its parent marked "↳" instead of one level further in."""
    with _open_store(args) as store:
        infos = list(store.walk())
        usage = {i.name: store.usage(i.name) for i in infos}
    children: dict[str | None, list[Info]] = {}
    for info in infos:
        children.setdefault(info.parent, []).append(info)
    stack: list[tuple[Info, str, str]] = [(i, "", "") for i in reversed(children.get(None, []))]
    order: list[tuple[Info, str]] = []
    while stack:
        info, lead, rest = stack.pop()
        order.append((info, lead))
        kids = children.get(info.name, [])
        if len(kids) == 1:
            stack.append((kids[0], rest + "↳ ", rest))
            continue
        for n, kid in reversed(list(enumerate(kids))):
            last = n == len(kids) - 1
            stack.append((kid, rest + ("└── " if last else "├── "), rest + ("    " if last else "│   ")))
    if args.json:
        _emit_json(
            [
                {
                    "name": i.name,
                    "kind": i.kind.value,
                    "parent": i.parent,
                    "size": i.size,
                    "usage": {"size": usage[i.name].size, "chunks": usage[i.name].chunks},
                    "children": [k.name for k in children.get(i.name, [])],
                }
                for i, _ in order
            ]
        )
        return 0
    for info, lead in order:
        print(
            f"{lead}{info.name}  ({info.kind.value}, {format_size(info.size)}, "
            f"exclusive {format_size(usage[info.name].size)})"
        )
    return 0


@command("map", "a snapshot's extents, like qemu-img map", arg("key"))
def _cmd_map(args: argparse.Namespace) -> int:
    with _open_store(args) as store:
        chain = [args.key]
        while (parent := store.stat(chain[-1]).parent) is not None:
            chain.append(parent)
        size = store.stat(args.key).size
        found = list(rawimage.extents(lambda o, n: store.map(args.key, o, n), size, store.chunk_size))
    entries = [
        {
            "start": e.offset,
            "length": e.length,
            "depth": e.depth - 1 if e.depth else len(chain) - 1,
            "present": e.depth > 0,
            "zero": e.zero,
            "data": e.allocated,
        }
        for e in found
    ]
    if args.json:
        _emit_json(entries)
        return 0
    rows = []
    for e in found:
        state = "data" if e.allocated else "zero" if e.depth else "unallocated"
        rows.append([str(e.offset), str(e.length), state, chain[e.depth - 1] if e.depth else "-"])
    _table(["START", "LENGTH", "STATE", "LAYER"], rows)
    return 0


@command(
    "diff",
    "byte ranges whose chunks differ between two snapshots",
    arg("a", metavar="A"),
    arg("b", metavar="B"),
)
def _cmd_diff(args: argparse.Namespace) -> int:
    with _open_store(args) as store:
        end = max(store.stat(args.a).size, store.stat(args.b).size)
        ranges = [(o, min(n, end - o)) for o, n in store.diff(args.a, args.b)]
    total = sum(n for _, n in ranges)
    if args.json:
        _emit_json({"ranges": [{"offset": o, "length": n} for o, n in ranges], "total": total})
        return 0
    if not ranges:
        print("no differences")
        return 0
    _table(["OFFSET", "LENGTH"], [[str(o), str(n)] for o, n in ranges])
    print(f"total: {format_size(total)} ({total} bytes) in {len(ranges)} range{'s' * (len(ranges) != 1)}")
    return 0


def _transfer_json(t: rawimage.Transfer) -> dict[str, int]:
    return dataclasses.asdict(t)


@command(
    "import",
    "read a raw image into a new active snapshot (all or nothing)",
    arg("file", metavar="FILE"),
    arg("key", metavar="KEY"),
    arg("--parent", help="build on this committed snapshot: only differing chunks take space"),
    arg("--commit", metavar="NAME", help="commit the snapshot as NAME once imported"),
    LABELS,
    paths=("file",),
)
def _cmd_import(args: argparse.Namespace) -> int:
    labels = _parse_labels(args.label)
    with _open_store(args) as store:
        with _progress(rawimage.image_size(args.file), f"import {args.key}") as bar:
            result = rawimage.import_image(
                store,
                args.file,
                args.key,
                parent=args.parent,
                labels=labels,
                commit=args.commit,
                progress=bar,
            )
        name = args.commit or args.key
        usage = store.usage(name)
    if args.json:
        usage_json = {"size": usage.size, "chunks": usage.chunks}
        _emit_json({"name": name, **_transfer_json(result), "usage": usage_json})
    else:
        print(
            f"imported {args.file} as {name}: {format_size(result.size)}, "
            f"{format_size(result.written)} written, {format_size(result.zeroed)} zeroed, "
            f"{format_size(result.skipped)} skipped"
        )
    return 0


@command(
    "export",
    "write a snapshot to a sparse raw image (- for standard output)",
    arg("key", metavar="KEY"),
    arg("file", metavar="FILE"),
    arg("--force", action="store_true", help="replace FILE if it exists"),
    arg("--verify", action="store_true", help="check the sum of every committed chunk read"),
    paths=("file",),
)
def _cmd_export(args: argparse.Namespace) -> int:
    with (
        _open_store(args, verify=args.verify) as store,
        rawimage.snapshot_volume(store, args.key) as vol,
        _progress(vol.size, f"export {args.key}") as bar,
    ):
        result = rawimage.export_volume(vol, args.file, store.chunk_size, replace=args.force, progress=bar)
    # With FILE "-", standard output carries the image: the report goes to standard error.
    out = sys.stderr if args.file == "-" else sys.stdout
    if args.json:
        _emit_json({"name": args.key, **_transfer_json(result)}, out)
    else:
        print(
            f"exported {args.key} to {args.file}: {format_size(result.size)}, "
            f"{format_size(result.written)} written, {format_size(result.skipped)} left sparse",
            file=out,
        )
    return 0


CHECK_CLEAN, CHECK_CORRUPT, CHECK_LEAKS = 0, 2, 3


def check_status(report: CheckReport) -> int:
    """qemu-img check's exit code: 0 clean, 2 corrupted, 3 only leaks (1, check failed, is an error)."""
    if not report.ok:
        return CHECK_CORRUPT
    return CHECK_LEAKS if report.leaks else CHECK_CLEAN


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _slot_ranges(slots: Sequence[int]) -> str:
    """Ascending slots as "3-7, 9, 12-20"."""
    return ", ".join(f"{a}-{a + n - 1}" if n > 1 else f"{a}" for a, n in slot_runs(slots))


@command(
    "check",
    "check the store (exit 0 clean, 2 corrupted, 3 leaks only); a damaged store is checked read-only",
    arg("--data", action="store_true", help="also read every chunk in use"),
    arg(
        "--repair", action="store_true", help="give free space back, drop leaks (corruption is only reported)"
    ),
)
def _cmd_check(args: argparse.Namespace) -> int:
    """Checks, and with --repair gives space back; corruption is reported, never "repaired".
    A store whose maps are too damaged to open is opened read-only, to report all it can."""
    try:
        with _open_store(args) as store:
            found = store.check(data=args.data)
            report = store.repair() if args.repair and found.ok else found
    except Corruption as exc:
        with _open_store(args, readonly=True) as store:
            found = report = store.check(data=args.data)
        if report.ok:
            report.problems.append(Problem(_one_line(exc), "store"))
    given_back = len(found.reclaimable_slots) - len(report.reclaimable_slots)
    fixed = found.leaks - report.leaks
    status = check_status(report)
    if args.json:
        _emit_json(
            {
                "corruptions": len(report.problems),
                "leaks": report.leaks,
                "leaks-fixed": fixed,
                "problems": [{"what": p.what, "where": p.where} for p in report.problems],
                "leaked-pages": report.leaked_pages,
                "reclaimable-slots": report.reclaimable_slots,
                "reclaimed-slots": given_back,
                "snapshots": report.snapshots,
                "pages": report.pages,
                "slots": report.slots,
                "referenced-slots": report.referenced_slots,
                "chunks-read": report.chunks_read,
            }
        )
        return status
    for p in report.problems:
        print(f"ERROR {p.where}: {p.what}")
    if report.leaked_pages:
        print(f"Leaked map pages: {_slot_ranges(report.leaked_pages)}")
    if fixed or given_back:
        print(
            f"Repaired: {_plural(fixed, 'leak')} dropped, {_plural(given_back, 'free chunk')} given back "
            f"({format_size(given_back * store.chunk_size)})"
        )
    if report.reclaimable_slots:
        n = len(report.reclaimable_slots)
        print(
            f"{_plural(n, 'free chunk')} ({format_size(n * store.chunk_size)}) still "
            f"{'hold' if n != 1 else 'holds'} space in the data file, slots "
            f"{_slot_ranges(report.reclaimable_slots)}: --repair gives it back"
        )
    if report.problems:
        print(f"{_plural(len(report.problems), 'problem')} found on the store.")
        if args.repair:
            print("Corruption cannot be repaired safely; nothing was changed.")
    if report.leaks:
        print(f"{_plural(report.leaks, 'leak')} found on the store (space that --repair frees).")
    if status == CHECK_CLEAN:
        print("No errors were found on the store.")
    print(
        f"{report.snapshots} snapshots, {report.pages} map pages, {report.referenced_slots}/{report.slots} "
        f"chunks in use" + (f", {report.chunks_read} chunks read" if args.data else "")
    )
    return status


_LISTEN_RE = re.compile(r"\[(?P<v6>[^\]]+)\]:(?P<port6>\d+)|(?P<host>[^:\[\]]*):(?P<port>\d+)")


def parse_listen(text: str) -> tuple[str, int]:
    """(host, port) from "HOST:PORT", "[IPv6]:PORT" or ":PORT" (loopback)."""
    m = _LISTEN_RE.fullmatch(text)
    if not m:
        raise UsageError(f"invalid --listen {text!r}: use HOST:PORT, [IPV6]:PORT or :PORT")
    host = m.group("v6") or m.group("host") or "127.0.0.1"
    port = int(m.group("port6") or m.group("port"))
    if not 0 <= port <= 65535:
        raise UsageError(f"invalid --listen {text!r}: port {port} is out of range")
    return host, port


@command(
    "serve",
    "hold the store and serve it until SIGTERM or SIGINT: NBD (the default), files (--mount), "
    "containerd's snapshots API (--containerd)",
    one_of(
        arg("--listen", metavar="HOST:PORT", help="NBD on TCP (default 127.0.0.1:10809)"),
        arg("--socket", metavar="PATH", help="NBD on a Unix socket instead of TCP"),
    ),
    arg("--mount", metavar="DIR", help="every snapshot as a file in DIR (FUSE); NBD only with a flag for it"),
    arg(
        "--containerd",
        metavar="PATH",
        help="containerd's snapshots gRPC API on the Unix socket PATH (a proxy snapshotter); "
        "mounts the files too, in --mount DIR or else STORE/files",
    ),
    arg("--export", action="append", metavar="KEY", help="export only these over NBD (repeatable)"),
    arg("--allow-remote", action="store_true", help="allow NBD on a non-loopback address"),
    arg("--verify", action="store_true", help="check the sum of every committed chunk read"),
    through_daemon=False,
)
def _cmd_serve(args: argparse.Namespace) -> int:
    """The daemon: checks every option before the store opens, names what it serves and
    where; meanwhile other commands on the store go through it."""
    serve_nbd = (
        args.listen is not None or args.socket is not None or (args.mount is None and not args.containerd)
    )
    front_ends: list[daemon.FrontEnd] = []
    if args.containerd is not None and args.mount is None:
        files = _store_path(args).absolute() / "files"
        with contextlib.suppress(FileExistsError, FileNotFoundError):
            files.mkdir(mode=0o700)
        args.mount = str(files)
    if args.containerd is not None:
        from .containerd import clear_stale

        clear_stale(args.mount)  # before _fuse clears a dead mount there: see clear_stale
    if args.mount is not None:
        front_ends.append(_fuse(args, Path(args.mount), threads=4))
    if args.containerd is not None:
        front_ends.append(_containerd(args, Path(args.containerd), Path(args.mount)))
    if not serve_nbd:
        for flag, given in (("--export", args.export), ("--allow-remote", args.allow_remote)):
            if given:
                raise UsageError(f"{flag} is for NBD: add --listen or --socket to serve NBD too")
        with _open_store(args, verify=args.verify) as store:
            _hold(args, store, front_ends)
        return 0
    host, port = parse_listen(args.listen) if args.listen else ("127.0.0.1", 10809)
    try:
        from . import nbd
    except ImportError as exc:
        raise UsageError(f"the NBD server is not available: {exc}") from exc
    if args.socket is not None:
        _check_socket_path(Path(args.socket), "--socket")
    elif not args.allow_remote and not nbd.is_loopback(host):
        raise UsageError(
            f"--listen {args.listen}: {host} is not a loopback address, and NBD has no "
            "authentication: pass --allow-remote to serve beyond this machine"
        )
    with _open_store(args, verify=args.verify) as store:
        for key in args.export or ():
            try:
                kind = store.stat(key).kind
            except NotFound:
                raise UsageError(f"--export {key}: no snapshot has that key") from None
            if kind is Kind.COMMITTED:
                raise UsageError(f"--export {key}: it is committed; export a view of it (cowstore view)")

        def ready(server: Any) -> None:
            for key in server.export_names():
                readonly = store.readonly or store.stat(key).kind is Kind.VIEW
                uri = _nbd_uri(server.address, key)
                if args.json:
                    print(json.dumps({"export": key, "readonly": readonly, "uri": uri}), flush=True)
                else:
                    print(
                        f"exporting {key} ({'read-only' if readonly else 'read-write'}) at {uri}", flush=True
                    )
            if not args.export and not args.json:
                print(f"serving every active snapshot and view at {_nbd_uri(server.address, '')}", flush=True)

        nbd_server = daemon.Nbd(
            ready=ready,
            exports=args.export or None,
            host=host,
            port=port,
            socket_path=args.socket,
            allow_remote=args.allow_remote,
        )
        _hold(args, store, [nbd_server, *front_ends])
    return 0


@command(
    "mount",
    "serve every snapshot as a file in MOUNTPOINT (FUSE) until unmounted, SIGTERM or SIGINT",
    arg("mountpoint", metavar="MOUNTPOINT"),
    arg("--threads", type=int, default=4, help="requests served at once (default 4)"),
    through_daemon=False,
)
def _cmd_mount(args: argparse.Namespace) -> int:
    """The daemon with files only (`serve --mount` without NBD); in the foreground, as
    nbdfuse and qemu-storage-daemon run."""
    if not 1 <= args.threads <= 64:
        raise UsageError(f"--threads {args.threads}: give 1 to 64")
    front_end = _fuse(args, Path(args.mountpoint), threads=args.threads)
    with _open_store(args) as store:
        _hold(args, store, [front_end])
    return 0


def _fuse(args: argparse.Namespace, mountpoint: Path, *, threads: int) -> daemon.Fuse:
    """The FUSE front end, which says what it mounted once the files are there. A dead mount
    left on `mountpoint` by a killed daemon is cleared first."""
    from .fuse import file_name, kernel

    kernel.clear_stale(str(mountpoint))
    if not mountpoint.is_dir():
        raise UsageError(f"mount point {mountpoint} is not a directory")

    def ready(m: Any) -> None:
        # From the store, not the mount: the daemon never waits on its own FUSE files (a
        # SIGKILL then could not end it; see cowstore/containerd/loop.py).
        names = sorted(file_name(info.name) for info in m.store.walk())
        if args.json:
            print(json.dumps({"mountpoint": m.mountpoint, "files": names}), flush=True)
        else:
            print(f"mounted {len(names)} snapshots at {m.mountpoint}", flush=True)

    return daemon.Fuse(str(mountpoint), threads=threads, ready=ready)


def _hold(args: argparse.Namespace, store: Store, front_ends: Sequence[daemon.FrontEnd]) -> None:
    """Serve through `front_ends` and run the other commands' requests until told to stop."""
    path = _store_path(args).absolute()
    shared = daemon.Shared(store, path)
    daemon.run(store, path, front_ends, lambda request: _serve_request(shared, request))


def _check_socket_path(path: Path, flag: str) -> None:
    if not path.parent.is_dir():
        raise UsageError(f"{flag} {path}: the directory {path.parent} does not exist")
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise UsageError(
            f"{flag} {path}: something that is not a socket is there; remove it or pick another path"
        )


def _containerd(args: argparse.Namespace, path: Path, files: Path) -> daemon.FrontEnd:
    """containerd's snapshots API on `path`, for the files the FUSE front end mounts on
    `files` (it starts first)."""
    _check_socket_path(path, "--containerd")
    try:
        from .containerd import Containerd, service  # noqa: F401 (service: grpcio and protobuf are there)
    except ImportError as exc:  # pragma: no cover - grpcio or protobuf missing
        raise UsageError(
            f"--containerd needs grpcio and protobuf: pip install cowstore[containerd] ({exc})"
        ) from exc

    def ready(socket_path: str) -> None:
        if args.json:
            print(json.dumps({"containerd": socket_path, "files": str(files)}), flush=True)
        else:
            print(f"serving containerd's snapshots API at {socket_path}", flush=True)

    return Containerd(str(path), str(files), ready=ready)


def _nbd_uri(address: tuple[str, int] | str, key: str) -> str:
    """The NBD URI of export `key` (qemu, nbdinfo and nbdcopy take these)."""
    name = urllib.parse.quote(key, safe="")
    if isinstance(address, str):
        return f"nbd+unix:///{name}?socket={address}"
    host, port = address
    return f"nbd://{f'[{host}]' if ':' in host else host}:{port}/{name}"


# -- the parser --------------------------------------------------------------


_DESCRIPTION = """\
Manage a cowstore store: copy-on-write snapshots of block devices (containerd's active,
committed and view kinds), raw image import and export, and NBD exports.

The store is --store PATH, else $COWSTORE_STORE, else $XDG_DATA_HOME/cowstore (when
XDG_DATA_HOME is set to an absolute path), else ~/.local/share/cowstore.
Sizes take binary suffixes: 4096, 64K, 64KiB, 10G, 1.5GiB, 2T.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; --json and --debug work before or after the subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show a traceback on errors"
    )

    parser = argparse.ArgumentParser(
        prog=PROG, description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--store",
        metavar="PATH",
        help=f"the store directory (default: ${STORE_ENV}, else $XDG_DATA_HOME/cowstore, "
        "else ~/.local/share/cowstore)",
    )
    parser.add_argument(
        "--wait",
        metavar="SECONDS",
        type=_seconds,
        default=WAIT,
        help=f"how long to wait for another process to let go of the store (default {WAIT:g})",
    )
    parser.add_argument(
        "--read-only",
        action="store_true",
        help="open the store without changing it, a damaged one too: what is intact reads as usual",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output on every report")
    parser.add_argument("--debug", action="store_true", help="show a traceback on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for c in COMMANDS:
        p = sub.add_parser(c.name, parents=[common], help=c.help, description=c.help)
        p.set_defaults(func=c.run)
        for add_arguments in c.arguments:
            add_arguments(p)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and not isinstance(exc, Error) and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}" if exc.filename is not None else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _error_json(exc: BaseException) -> dict[str, str]:
    return {"kind": type(exc).__name__, "message": _one_line(exc)}


def _error(exc: BaseException, args: argparse.Namespace) -> None:
    """One line on standard error; with --json, a JSON object."""
    if args.json:
        print(json.dumps({"error": _error_json(exc)}), file=sys.stderr)
    else:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)


LOG_ENV = "COWSTORE_LOG"
"""Logging to standard error: `LEVEL`, or `LOGGER=LEVEL` pairs separated by commas
(`cowstore.containerd.service.timing=DEBUG` logs every containerd RPC's duration)."""


def _configure_logging(spec: str) -> None:
    """Set up logging as $COWSTORE_LOG asks (unset: Python's default, warnings and worse)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, level = item.rpartition("=")
        try:
            logging.getLogger(name or None).setLevel(level.upper())
        except ValueError:
            print(f"{PROG}: ${LOG_ENV}: unknown level {level!r} (ignored)", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]); returns the exit status."""
    if os.environ.get(LOG_ENV):
        _configure_logging(os.environ[LOG_ENV])
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    # SIGTERM unwinds like Ctrl-C, so what a command leaves half done is undone first.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _outcome(args, lambda: _here_or_in_daemon(args, argv))
    finally:
        signal.signal(signal.SIGTERM, previous)


def _outcome(args: argparse.Namespace, run: Callable[[], int]) -> int:
    """`run`'s exit status, with errors, Ctrl-C and SIGTERM reported on standard error."""
    try:
        return run()
    except SystemExit as exc:
        print(f"{PROG}: terminated", file=sys.stderr)
        return exc.code if isinstance(exc.code, int) else 1
    except (Error, UsageError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):
            with contextlib.suppress(OSError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
            return 1
        if args.debug:
            traceback.print_exc()
        if isinstance(exc, Corruption) and not args.read_only:
            exc = Corruption(f"{exc} (--read-only opens what is intact; check reports every problem)")
        _error(exc, args)
        return 1
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


def _command(name: str) -> Command:
    return next(c for c in COMMANDS if c.name == name)


def _here_or_in_daemon(args: argparse.Namespace, argv: list[str]) -> int:
    status = _through_daemon(args, argv)
    return args.func(args) if status is None else status


# -- commands run by the daemon that holds the store -----------------------------


def _through_daemon(args: argparse.Namespace, argv: list[str]) -> int | None:
    """Run the command line in the daemon holding the store, if one does (its exit status;
    None: run it here). The daemon writes to our standard output and error itself. A
    command that cannot run in it fails at once: a daemon does not let go of its store."""
    path = _store_path(args).absolute()
    if not control.socket_path(path).exists():
        return None
    if not _command(args.command).through_daemon:
        pid = control.daemon_pid(path)
        if pid is not None:
            raise Locked(
                f"store {path} is in use: process {pid} serves it (a cowstore daemon), "
                f"and {args.command} cannot run through it"
            )
        return None
    request = {
        "argv": argv,
        "store": str(path),
        "cwd": _cwd(),
        "umask": _umask(),
        "stdout": _stream_json(sys.stdout),
        "stderr": _stream_json(sys.stderr),
    }
    with contextlib.ExitStack() as opened:
        cwd = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        opened.callback(os.close, cwd)
        return control.call(path, request, [sys.stdout.fileno(), sys.stderr.fileno(), cwd])


def _cwd() -> str:
    try:
        return os.getcwd()
    except FileNotFoundError:
        return "/"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _stream_json(stream: TextIO) -> dict[str, Any]:
    return {
        "encoding": getattr(stream, "encoding", None) or "utf-8",
        "errors": getattr(stream, "errors", None) or "strict",
        "line_buffering": bool(getattr(stream, "line_buffering", False)),
    }


def _client_stream(fd: int, spec: object) -> borrow.Stream:
    if not isinstance(spec, dict):
        return borrow.Stream(fd)
    return borrow.Stream(
        fd, str(spec.get("encoding")), str(spec.get("errors")), bool(spec.get("line_buffering"))
    )


def _serve_request(shared: daemon.Shared, request: control.Request) -> int:
    """Run a client's command line as `main` would in the client, against the daemon's store,
    writing to the client's streams from its working directory."""
    message, fds = request.message, request.fds
    argv, store, cwd = message.get("argv"), message.get("store"), message.get("cwd")
    if (
        len(fds) != 3
        or not isinstance(argv, list)
        or not all(isinstance(a, str) for a in argv)
        or not isinstance(store, str)
        or not isinstance(cwd, str)
    ):
        raise control.ProtocolError(f"a request without argv, store, cwd and 3 descriptors: {message}")
    umask = message.get("umask")
    with borrow.client(
        _client_stream(fds[0], message.get("stdout")),
        _client_stream(fds[1], message.get("stderr")),
        cwd=fds[2],
        umask=umask if isinstance(umask, int) else None,
        interrupted=lambda: request.signal,
    ) as own_directory:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:
            return exc.code if isinstance(exc.code, int) else 1
        spec = _command(args.command)
        args.store = store
        args.held = shared
        if not own_directory:
            for name in spec.paths:
                value = getattr(args, name)
                if value != "-":
                    setattr(args, name, os.path.join(cwd, value))

        def run() -> int:
            if not spec.through_daemon or not os.path.samefile(store, shared.path):
                raise UsageError(f"this daemon does not run {args.command} on {store}")
            return args.func(args)

        try:
            return _outcome(args, run)
        except Exception:
            traceback.print_exc()
            return 1


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
