# One error convention: a core function that can fail returns -1 (or NULL) and fills an
# `Err`; the binding, once the lock is released, raises `error(...)`, the one table from
# error kinds to exceptions. `a` and `b` carry numbers the message names, as listed.

cdef enum:
    E_OK = 0
    E_KEY           # a: index in args of the id that names no map
    E_RANGE         # the range (offset, length) is outside the map
    E_CHUNK_RANGE   # the chunk range (offset = first chunk, length = count) is outside the map
    E_NOSPACE       # a: slots in the pool
    E_NOSPACE_WRITE  # a: new chunks a write needs, b: chunks the pool can still give
    E_CORRUPT       # a: data-file offset of the short read
    E_CHECKSUM      # a: chunk, b: slot
    E_OS            # errnum
    E_FULL          # errnum: the file system holding the data file is full (ENOSPC, EDQUOT)
    E_NOMEM
    E_CLOSED
    E_REENTERED     # this thread holds the lock while it runs Python code
    E_LOADING       # a change of slot refcounts before finish_load
    E_LOADED        # load_page / load_map after the engine started
    E_FINISHED      # finish_load again, or after the engine started
    E_REFS          # a page refcount would overflow uint32
    E_CHILDREN      # a: child maps of the map that would change
    E_CHILDREN_DROP  # a: child maps of the map to drop
    E_EXISTS        # the new map's id is taken
    E_MAP_TWICE     # load_map of an id loaded already
    E_PAGE_TWICE    # load_page of an id loaded already
    E_NO_PAGE       # a: the missing page id (uint64)
    E_SLOT_BEYOND   # a: page id, b: slot (args[0]: the pool size)
    E_BAD_PARENT    # a: map id, b: the parent id it names
    E_POOL_LIMIT    # args[0]: the pool size, over max_slots
    E_POOL_INVALID  # args[0]: the pool size, negative
    E_BAD_SLOT      # a: index in args of the slot that is not a freed slot of the pool
    E_SHRINK        # a: the chunk count a map cannot shrink to (it holds chunks past it)


cdef Err NO_ERROR     # zeros: E_OK


cdef object error(State *st, Err *err, tuple args, object offset=None, object length=None, object volume=None):
    """The exception for `err`. `args` are the call's arguments the messages name (ids first);
    `offset` and `length` the range asked; `volume`, a snapshot key, words errors for a Volume."""
    cdef int kind = err.kind
    cdef object exc
    if kind == E_KEY:
        if volume is not None:
            return NotFound(f"snapshot {volume!r} was committed or removed")
        return KeyError(args[err.a] if 0 <= err.a < len(args) else None)
    if kind == E_RANGE:
        return ValueError(f"range {offset}+{length} is outside the map")
    if kind == E_CHUNK_RANGE:
        return ValueError(f"range {offset * st.cs}+{length * st.cs} is outside the map")
    if kind == E_NOSPACE:
        return NoSpace(f"the pool is full: {err.a} chunks of {st.cs} bytes in use")
    if kind == E_NOSPACE_WRITE:
        return NoSpace(f"the pool is full: the write needs {err.a} new chunks of {st.cs} bytes and {err.b} are left")
    if kind == E_CORRUPT or kind == E_CHECKSUM:
        if kind == E_CORRUPT:
            exc = Corruption(f"short read at data offset {err.a}: the data file is truncated")
        else:
            exc = Corruption(f"chunk {err.a} (slot {err.b}) of map {args[0] if args else '?'} fails its checksum")
        if volume is not None:
            return Corruption(f"snapshot {volume!r}, read of {length} bytes at offset {offset}: {exc}")
        return exc
    if kind == E_OS:
        return OSError(err.errnum, _strerror(err.errnum))
    if kind == E_FULL:
        return NoSpace(f"the file system holding the data file is full: {_strerror(err.errnum)}")
    if kind == E_NOMEM:
        return MemoryError()
    if kind == E_CLOSED:
        return Closed("the store is closed")
    if kind == E_REENTERED:
        return RuntimeError("the engine was re-entered while it holds its lock")
    if kind == E_LOADING:
        return ValueError("maps were loaded: finish_load must come first")
    if kind == E_LOADED:
        return ValueError("loading is only valid before finish_load and before any write")
    if kind == E_FINISHED:
        return ValueError("finish_load is only valid once, before any write")
    if kind == E_REFS:
        return ValueError("a page is shared by too many maps")
    if kind == E_CHILDREN:
        return ValueError(f"map {args[0] if args else '?'} has {err.a} child maps: it cannot change or go")
    if kind == E_CHILDREN_DROP:
        return ValueError(f"map {args[0]} has {err.a} child maps: drop them first")
    if kind == E_EXISTS:
        return ValueError(f"map {args[0]} exists")
    if kind == E_MAP_TWICE:
        return ValueError(f"map {args[0]} is loaded twice")
    if kind == E_PAGE_TWICE:
        return ValueError(f"page id {args[0]} is invalid or repeated")
    if kind == E_NO_PAGE:
        return ValueError(f"map {args[0]} names page {<uint64_t>err.a}, which does not exist")
    if kind == E_SLOT_BEYOND:
        return ValueError(f"page {err.a} names slot {err.b}, beyond the pool of {args[0]}")
    if kind == E_BAD_PARENT:
        return ValueError(f"map {err.a} names parent {err.b}: missing, larger or a loop")
    if kind == E_POOL_LIMIT:
        return ValueError(f"pool of {args[0]} slots exceeds the limit")
    if kind == E_POOL_INVALID:
        return ValueError(f"pool of {args[0]} slots is invalid")
    if kind == E_BAD_SLOT:
        return ValueError(f"slot {args[err.a]} is not a freed slot of the pool")
    if kind == E_SHRINK:
        return ValueError(f"map {args[0]} holds chunks past {err.a}: it cannot shrink")
    return SystemError(f"cowstore.engines._cengine: unexpected error {kind}")
