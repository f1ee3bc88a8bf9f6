/* CRC-32 (zlib's), slice-by-8 where the host is little-endian: the chunk sums. */
#ifndef COWSTORE_CS_CRC32_H
#define COWSTORE_CS_CRC32_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

static uint32_t cs_crc_table[8][256];

/* Fills the tables; call once, before any cs_crc32. */
static void cs_crc32_init(void) {
    uint32_t i, c;
    int k;
    for (i = 0; i < 256; i++) {
        c = i;
        for (k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        cs_crc_table[0][i] = c;
    }
    for (i = 0; i < 256; i++) {
        c = cs_crc_table[0][i];
        for (k = 1; k < 8; k++) {
            c = cs_crc_table[0][c & 0xff] ^ (c >> 8);
            cs_crc_table[k][i] = c;
        }
    }
}

static uint32_t cs_crc32(const unsigned char *p, size_t n) {
    uint32_t crc = 0xFFFFFFFFu;
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint32_t one, two;
    while (n && ((uintptr_t)p & 7)) { crc = cs_crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8); n--; }
    while (n >= 8) {
        memcpy(&one, p, 4);
        memcpy(&two, p + 4, 4);
        one ^= crc;
        crc = cs_crc_table[7][one & 0xff] ^ cs_crc_table[6][(one >> 8) & 0xff]
            ^ cs_crc_table[5][(one >> 16) & 0xff] ^ cs_crc_table[4][one >> 24]
            ^ cs_crc_table[3][two & 0xff] ^ cs_crc_table[2][(two >> 8) & 0xff]
            ^ cs_crc_table[1][(two >> 16) & 0xff] ^ cs_crc_table[0][two >> 24];
        p += 8;
        n -= 8;
    }
#endif
    while (n--) crc = cs_crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc ^ 0xFFFFFFFFu;
}

#endif
