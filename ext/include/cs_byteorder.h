/* Copies of n uint32 (or uint64) values between host order and little-endian bytes: the
   stored pages and directories are little-endian (cowstore/engines/format.py). */
#ifndef COWSTORE_CS_BYTEORDER_H
#define COWSTORE_CS_BYTEORDER_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static void cs_le32_copy(void *dst, const void *src, size_t n) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    size_t i; uint32_t v;
    for (i = 0; i < n; i++) {
        memcpy(&v, (const char *)src + 4 * i, 4); v = __builtin_bswap32(v);
        memcpy((char *)dst + 4 * i, &v, 4);
    }
#else
    memcpy(dst, src, 4 * n);
#endif
}

static void cs_le64_copy(void *dst, const void *src, size_t n) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    size_t i; uint64_t v;
    for (i = 0; i < n; i++) {
        memcpy(&v, (const char *)src + 8 * i, 8); v = __builtin_bswap64(v);
        memcpy((char *)dst + 8 * i, &v, 8);
    }
#else
    memcpy(dst, src, 8 * n);
#endif
}

#endif
