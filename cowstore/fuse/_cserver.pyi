"""Types of `cowstore.fuse._cserver`, the FUSE server of the Cython engine (libfuse 3)."""

from typing_extensions import disjoint_base

from cowstore.fuse.namespace import Namespace

ENTRY_TIMEOUT: float
ATTR_TIMEOUT: float
TUNING: dict[str, int]

@disjoint_base
class Server:
    """Serves one FUSE connection (a /dev/fuse descriptor) for a namespace, with libfuse."""

    @property
    def namespace(self) -> Namespace: ...
    def __init__(self, namespace: Namespace, fd: int, *, threads: int, max_write: int) -> None: ...
    def run(self) -> None: ...
