# The on-disk format's values as the compiled code uses them: cowstore/engines/format.py
# describes the format, this enum is the one place the C code spells it, and
# `_format_constants()` hands the values to the test that compares the two.

cdef enum:
    FMT_SUB_BLOCKS = 32             # format.SUB_BLOCKS: sub-blocks of a chunk, bits of a partial bitmap
    FMT_PARTIAL = 0x80000000u       # format.PARTIAL: the entry flag of a partial chunk
    FMT_SLOT_MASK = 0x7FFFFFFFu     # format.MAX_SLOT: takes the slot out of an entry
    FMT_FULL_BITS = 0xFFFFFFFFu     # format.FULL_BITS: the bitmap of a chunk with every sub-block
    FMT_ENTRY_BYTES = 4             # a stored entry, and a stored sum: little-endian uint32
    FMT_PAGE_ID_BYTES = 8           # an item of a stored directory: a little-endian uint64 page id


def _format_constants():
    """The format values compiled into this module, by the names `format.py` gives them."""
    return {
        "PARTIAL": <uint32_t>FMT_PARTIAL,
        "MAX_SLOT": <uint32_t>FMT_SLOT_MASK,
        "SUB_BLOCKS": <int>FMT_SUB_BLOCKS,
        "FULL_BITS": <uint32_t>FMT_FULL_BITS,
        "page_size(1)": 2 * <int>FMT_ENTRY_BYTES,
        "directory item": <int>FMT_PAGE_ID_BYTES,
    }


cdef inline uint32_t chunk_crc(const unsigned char *data, uint64_t n) noexcept nogil:
    """format.chunk_sum: CRC-32, with 0 (meaning "none yet") kept as 1."""
    cdef uint32_t c = cs_crc32(data, n)
    return c if c else 1
