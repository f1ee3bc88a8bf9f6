"""An NBD server for a cowstore Store: every active and view snapshot is an export.

Clients (qemu-img, qemu-io, qemu's block layer, nbdcopy, nbdinfo, fio, the kernel's nbd
driver) speak the fixed newstyle protocol of NetworkBlockDevice/nbd doc/proto.md with
structured replies and the `base:allocation` and `qemu:allocation-depth` metadata
contexts. Export names are snapshot keys; views are exported read-only.

The server is split by protocol phase, as nbdkit's is: `server` (listening, exports,
threads), `handshake` (option negotiation, giving a `Session`), `transmission` (the
request loop) and `proto` (wire constants and layouts).
"""

from __future__ import annotations

from .handshake import MAX_OPTION
from .proto import MAX_PAYLOAD
from .server import Server, is_loopback, serve

__all__ = ["MAX_OPTION", "MAX_PAYLOAD", "Server", "is_loopback", "serve"]
