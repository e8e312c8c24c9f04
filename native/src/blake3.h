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
    uint8_t impl; /* NP_BLAKE3_IMPL_*: the compression kernels this hasher uses, chosen at init */
} np_blake3;

/* Implementations (all give the same digests): np_blake3_init picks the fastest this CPU runs. */
enum {
    NP_BLAKE3_IMPL_AUTO = 0,
    NP_BLAKE3_IMPL_SCALAR = 1, /* portable C */
    NP_BLAKE3_IMPL_SSE41 = 2,  /* x86-64, 4 chunks at a time */
    NP_BLAKE3_IMPL_AVX2 = 3,   /* x86-64, 8 chunks at a time (SSE4.1 for a 4-chunk rest) */
    NP_BLAKE3_IMPL_NEON = 4,   /* aarch64, 4 chunks at a time */
    NP_BLAKE3_IMPL_AVX512 = 5, /* x86-64 AVX-512F+VL, 16 chunks at a time (then 8, 4) */
};

void np_blake3_init(np_blake3 *h);
/* np_blake3_init with a given implementation (tests, benchmarks): 0, or -1 when this build or CPU
 * lacks it (h is then initialized with the automatic choice). */
int np_blake3_init_impl(np_blake3 *h, int impl);
/* The fastest implementation available here (never NP_BLAKE3_IMPL_AUTO). */
int np_blake3_impl_best(void);
/* Whether impl runs here; its name ("scalar", "sse41", "avx2", "neon", "avx512"), or NULL for no such impl. */
int np_blake3_impl_available(int impl);
const char *np_blake3_impl_name(int impl);
void np_blake3_update(np_blake3 *h, const void *data, size_t len);
/* Does not modify h: more input may follow, and finalizing again gives the longer input's hash. */
void np_blake3_final(const np_blake3 *h, uint8_t out[NP_BLAKE3_OUT_LEN]);
/* One-shot convenience (named np_blake3_hash: C forbids a function named like the typedef np_blake3). */
void np_blake3_hash(const void *data, size_t len, uint8_t out[NP_BLAKE3_OUT_LEN]);
/*
 * A tensor's digest again after a few of its bytes changed (hashpool.c): the chaining values of its
 * whole aligned subtrees of NP_BLAKE3_SUB_LEN bytes (64 chunks: 32 bytes kept per 64 KiB), and
 * inside the subtrees marked dirty those of their NP_BLAKE3_FINE_LEN-byte subtrees (4 chunks).
 * dirty[b], for each of the np_blake3_subtrees(len) subtrees: bit j set when bytes of fine
 * subtree j of subtree b may differ. Both functions give exactly np_blake3_hash(data, len).
 *   np_blake3_hash_keep: hashes all of data; writes sub_cv (32 bytes per subtree) and, for each
 *     subtree with dirty[b] != 0 in order of b, its 16 fine chaining values to fine_cv (512 bytes each).
 *   np_blake3_hash_reuse: with what hash_keep wrote for the old bytes and the same dirty marks,
 *     the digest of the new bytes, reading only the dirty fine subtrees and the bytes after the
 *     last whole subtree. Exact when every byte that differs lies in a dirty fine subtree.
 * impl: NP_BLAKE3_IMPL_* (AUTO: the best here).
 */
#define NP_BLAKE3_SUB_LEN (64 * 1024)
#define NP_BLAKE3_FINE_LEN (4 * 1024)
/* Whole subtrees whose chaining values the two functions keep: len / SUB_LEN, or 0 when len <= SUB_LEN
 * (a subtree that is the whole input is the root). */
size_t np_blake3_subtrees(size_t len);
void np_blake3_hash_keep(int impl, const void *data, size_t len, const uint16_t *dirty, uint8_t *sub_cv,
                         uint8_t *fine_cv, uint8_t out[NP_BLAKE3_OUT_LEN]);
void np_blake3_hash_reuse(int impl, const void *data, size_t len, const uint16_t *dirty, const uint8_t *sub_cv,
                          const uint8_t *fine_cv, uint8_t out[NP_BLAKE3_OUT_LEN]);
/* The chaining values of whole subtrees first .. first+n-1 of an input (NP_BLAKE3_SUB_LEN bytes each;
 * data: where subtree `first` starts), 32 bytes each to sub_cv: what np_blake3_hash_keep writes for
 * them, so that one input can be hashed in pieces on several threads and its digest taken by
 * np_blake3_hash_reuse with no dirty marks (hashpool.c np_hash_file). */
void np_blake3_subtree_cvs(int impl, const void *data, size_t first, size_t n, uint8_t *sub_cv);
void np_hex(const uint8_t *bytes, size_t n, char *out /* 2n + 1 */);

#endif
