"""A store written before the layout moved opens after it, with both engines, byte for byte.

`fixtures/store-e631190/` was made by cowstore at commit e631190 (see
`fixtures/make_store_e631190.py`): committed layers, a partial chunk left unsealed in an
active layer, a zeroed chunk, a view and labels. The bytes each snapshot must read are
written out here again, independently of the code under test."""

from __future__ import annotations

import shutil
from pathlib import Path

import cowstore

FIXTURE = Path(__file__).parent / "fixtures" / "store-e631190"
C = 4096


def expected() -> dict[str, bytes]:
    base = bytearray(64 * C)
    base[C : 4 * C] = bytes(range(256)) * 48
    mid = bytearray(base)
    mid[C + 700 : C + 707] = b"partial"
    mid[10 * C : 11 * C] = b"B" * C
    top = bytearray(mid)
    top[2 * C + 5 : 2 * C + 9] = b"top!"
    top[3 * C : 4 * C] = bytes(C)
    return {
        "sha256:base": bytes(base),
        "sha256:mid": bytes(mid),
        "ctr/top": bytes(top),
        "view/mid": bytes(mid),
    }


def test_a_store_written_before_the_move_opens_with_its_snapshots_and_bytes(engine, tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "s")
    with cowstore.open(tmp_path / "s", engine=engine) as s:
        infos = {i.name: i for i in s.walk()}
        assert {k: (i.kind.value, i.parent) for k, i in infos.items()} == {
            "sha256:base": ("committed", None),
            "sha256:mid": ("committed", "sha256:base"),
            "ctr/top": ("active", "sha256:mid"),
            "view/mid": ("view", "sha256:mid"),
        }
        assert infos["sha256:base"].labels == {"layer": "base"}
        assert infos["ctr/top"].labels == {"app": "web"}
        for key, data in expected().items():
            assert s.reader(key).pread(64 * C, 0) == data, key
        assert s.check(data=True).ok
        s.mounts("ctr/top").pwrite(b"after", 0)
    with cowstore.open(tmp_path / "s", engine=engine) as s:
        assert s.reader("ctr/top").pread(5, 0) == b"after"
        assert s.check(data=True).ok
