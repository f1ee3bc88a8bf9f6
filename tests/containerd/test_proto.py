"""Our `.proto` files against containerd's (Debian's golang-github-containerd-containerd-dev):
both compiled by protoc, upstream without its gogoproto options, and compared as
descriptors: packages, services, methods and streaming, messages, fields (names, numbers,
types, labels), enums. Also: the committed generated code matches the `.proto`."""

from __future__ import annotations

import ast
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
API = ROOT / "cowstore" / "containerd" / "api"
UPSTREAM = Path("/usr/share/gocode/src/github.com/containerd/containerd/api")
FILES = {"snapshots": "services/snapshots/v1/snapshots.proto", "mount": "types/mount.proto"}

protoc = pytest.importorskip("grpc_tools.protoc")
descriptor_pb2 = pytest.importorskip("google.protobuf.descriptor_pb2")


def _compile(include: Path, files: list[str], out: Path) -> Any:
    """A FileDescriptorSet of `files` (paths under `include`), with what they import."""
    well_known = Path(protoc.__file__).parent / "_proto"
    argv = ["protoc", f"-I{include}", f"-I{well_known}", f"--descriptor_set_out={out}", "--include_imports"]
    assert protoc.main([*argv, *files]) == 0, f"protoc failed on {files}"
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _without_gogoproto(text: str) -> str:
    """An upstream `.proto` without gogoproto: its import, its options, its field options."""
    text = re.sub(r'import weak "gogoproto/gogo.proto";', "", text)
    text = re.sub(r"option \(gogoproto\.[^;]*;", "", text)
    return re.sub(r"\s*\[\(gogoproto\.[^\]]*\]", "", text)


def _shape(fds: Any) -> dict[str, Any]:
    """What the wire and the generated stubs depend on, by package; file names left out."""
    shape: dict[str, Any] = {}
    for f in fds.file:
        if f.package.startswith("google.protobuf"):
            continue
        services = {
            s.name: {
                m.name: (m.input_type, m.output_type, m.client_streaming, m.server_streaming)
                for m in s.method
            }
            for s in f.service
        }

        def message(m: Any) -> Any:
            fields = {x.name: (x.number, x.type, x.label, x.type_name, x.json_name) for x in m.field}
            nested = {n.name: message(n) for n in m.nested_type}
            return fields, nested, m.options.map_entry

        shape[f.package] = {
            "syntax": f.syntax,
            "services": services,
            "messages": {m.name: message(m) for m in f.message_type},
            "enums": {e.name: {v.name: v.number for v in e.value} for e in f.enum_type},
        }
    return shape


def test_our_proto_matches_upstream(tmp_path: Path) -> None:
    if not UPSTREAM.is_dir():
        if os.environ.get("CI"):
            pytest.fail("CI needs golang-github-containerd-containerd-dev (.ci/install-tools installs it)")
        pytest.skip("containerd's .proto files are not installed")
    upstream = tmp_path / "upstream"
    for rel in FILES.values():
        target = upstream / "github.com/containerd/containerd/api" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_without_gogoproto((UPSTREAM / rel).read_text()))
    theirs = _compile(
        upstream, [f"github.com/containerd/containerd/api/{FILES['snapshots']}"], tmp_path / "a"
    )
    ours = _compile(ROOT, ["cowstore/containerd/api/snapshots.proto"], tmp_path / "b")
    assert _shape(ours) == _shape(theirs)
    shape = _shape(ours)
    assert set(shape) == {"containerd.services.snapshots.v1", "containerd.types"}
    methods = shape["containerd.services.snapshots.v1"]["services"]["Snapshots"]
    assert (
        len(methods) == 10 and methods["List"][3] and not any(m[3] for k, m in methods.items() if k != "List")
    )


def test_generated_code_is_current(tmp_path: Path) -> None:
    """The committed `*_pb2*.py` are what `make proto` makes from the `.proto` files now."""
    shutil.copytree(API, tmp_path / "cowstore/containerd/api")
    for name in ("mount", "snapshots"):
        for generated in API.glob(f"{name}_pb2*"):
            (tmp_path / "cowstore/containerd/api" / generated.name).unlink()
    well_known = Path(protoc.__file__).parent / "_proto"
    protos = ["cowstore/containerd/api/mount.proto", "cowstore/containerd/api/snapshots.proto"]
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert (
            protoc.main(["protoc", "-I.", f"-I{well_known}", "--python_out=.", "--pyi_out=.", *protos]) == 0
        )
        assert protoc.main(["protoc", "-I.", f"-I{well_known}", "--grpc_python_out=.", protos[1]]) == 0
    finally:
        os.chdir(cwd)

    def serialized(path: Path) -> bytes:
        """The descriptor bytes a `_pb2.py` embeds: the same whatever protoc version made it."""
        match = re.search(rb"AddSerializedFile\((b'.*?')\)", path.read_bytes(), re.S)
        assert match, path
        return bytes(ast.literal_eval(match.group(1).decode("ascii")))

    for name in ("mount", "snapshots"):
        assert serialized(API / f"{name}_pb2.py") == serialized(
            tmp_path / f"cowstore/containerd/api/{name}_pb2.py"
        ), f"{name}.proto changed: run make proto"
