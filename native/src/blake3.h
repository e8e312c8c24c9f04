/* BLAKE3 (default mode, 32-byte output), portable C99: https://github.com/BLAKE3-team/BLAKE3-specs */
#ifndef NNP_BLAKE3_H
#define NNP_BLAKE3_H

#include <stddef.h>
#include <stdint.h>

#define NP_BLAKE3_OUT_LEN 32
#define NP_BLAKE3_BLOCK_LEN 64
#define NP_BLAKE3_CHUNK_LEN 1024
#define NP_BLAKE3_MAX_DEPTH 54

typedef struct np_blake3_chunk {
    uint32_t cv[8];
    uint64_t chunk_counter;
    uint8_t buf[NP_BLAKE3_BLOCK_LEN];
    uint8_t buf_len;
    uint8_t blocks_compressed;
    uint8_t flags;
} np_blake3_chunk;

typedef struct np_blake3 {
    uint32_t key[8];
    np_blake3_chunk chunk;
    uint8_t cv_stack_len;
    uint8_t cv_stack[(NP_BLAKE3_MAX_DEPTH + 1) * NP_BLAKE3_OUT_LEN];
} np_blake3;

void np_blake3_init(np_blake3 *h);
void np_blake3_update(np_blake3 *h, const void *data, size_t len);
/* Does not modify h: more input may follow, and finalizing again gives the longer input's hash. */
void np_blake3_final(const np_blake3 *h, uint8_t out[NP_BLAKE3_OUT_LEN]);
/* One-shot convenience (named np_blake3_hash: C forbids a function named like the typedef np_blake3). */
void np_blake3_hash(const void *data, size_t len, uint8_t out[NP_BLAKE3_OUT_LEN]);
void np_hex(const uint8_t *bytes, size_t n, char *out /* 2n + 1 */);

#endif
