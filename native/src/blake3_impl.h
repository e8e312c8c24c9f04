/*
 * BLAKE3 internals shared by blake3.c and the SIMD kernels (blake3_x86.c, blake3_neon.c).
 *
 * A SIMD kernel hashes N inputs at once, one input per vector lane (N = 4 for SSE4.1 and
 * NEON, 8 for AVX2): the state word v[i] of all N compressions sits in one vector, and the
 * message words are transposed so that vector m[w] holds word w of every lane's block.
 * Input lane i starts at in + i * stride and is `blocks` whole 64-byte blocks long: a chunk
 * (stride 1024, 16 blocks, counter + i) or a parent node (stride 64, 1 block, counter 0).
 * Block b is compressed with flags | (b == 0 ? flags_start : 0) | (b == blocks - 1 ?
 * flags_end : 0); lane i's 32-byte chaining value goes to out + 32 * i.
 */
#ifndef NNP_BLAKE3_IMPL_H
#define NNP_BLAKE3_IMPL_H

#include <stddef.h>
#include <stdint.h>

#include "blake3.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define NP_B3_X86 1
#endif
#if defined(__aarch64__) && defined(__ARM_NEON) && defined(__BYTE_ORDER__) && \
    __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define NP_B3_NEON 1
#endif

enum {
    NP_B3_CHUNK_START = 1u << 0,
    NP_B3_CHUNK_END = 1u << 1,
    NP_B3_PARENT = 1u << 2,
    NP_B3_ROOT = 1u << 3,
};

#define NP_B3_IV0 0x6A09E667u
#define NP_B3_IV1 0xBB67AE85u
#define NP_B3_IV2 0x3C6EF372u
#define NP_B3_IV3 0xA54FF53Au

typedef void np_b3_kernel(const uint8_t *in, size_t stride, size_t blocks, const uint32_t key[8],
                          uint64_t counter, int increment, uint8_t flags, uint8_t flags_start,
                          uint8_t flags_end, uint8_t *out);

#ifdef NP_B3_X86
np_b3_kernel np_b3_hash4_sse41; /* 4 lanes */
np_b3_kernel np_b3_hash8_avx2;  /* 8 lanes */
int np_b3_have_sse41(void);
int np_b3_have_avx2(void);
#endif
#ifdef NP_B3_NEON
np_b3_kernel np_b3_hash4_neon; /* 4 lanes */
#endif

/*
 * The round function on vectors. A file defining a kernel provides VADD, VXOR, VROT16,
 * VROT12, VROT8, VROT7 for its vector type, and has v0..v15 and m[16] in scope.
 */
#define NP_B3V_G(a, b, c, d, x, y)    \
    do {                              \
        a = VADD(VADD(a, b), x);      \
        d = VROT16(VXOR(d, a));       \
        c = VADD(c, d);               \
        b = VROT12(VXOR(b, c));       \
        a = VADD(VADD(a, b), y);      \
        d = VROT8(VXOR(d, a));        \
        c = VADD(c, d);               \
        b = VROT7(VXOR(b, c));        \
    } while (0)

#define NP_B3V_ROUND(s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15) \
    do {                                                                                \
        NP_B3V_G(v0, v4, v8, v12, m[s0], m[s1]);                                        \
        NP_B3V_G(v1, v5, v9, v13, m[s2], m[s3]);                                        \
        NP_B3V_G(v2, v6, v10, v14, m[s4], m[s5]);                                       \
        NP_B3V_G(v3, v7, v11, v15, m[s6], m[s7]);                                       \
        NP_B3V_G(v0, v5, v10, v15, m[s8], m[s9]);                                       \
        NP_B3V_G(v1, v6, v11, v12, m[s10], m[s11]);                                     \
        NP_B3V_G(v2, v7, v8, v13, m[s12], m[s13]);                                      \
        NP_B3V_G(v3, v4, v9, v14, m[s14], m[s15]);                                      \
    } while (0)

/* The seven rounds; row r is the message permutation (2,6,3,10,7,0,4,13,1,11,12,5,9,14,15,8)
 * applied r times. */
#define NP_B3V_ROUNDS()                                                    \
    do {                                                                   \
        NP_B3V_ROUND(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); \
        NP_B3V_ROUND(2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8); \
        NP_B3V_ROUND(3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1); \
        NP_B3V_ROUND(10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6); \
        NP_B3V_ROUND(12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4); \
        NP_B3V_ROUND(9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7); \
        NP_B3V_ROUND(11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13); \
    } while (0)

#endif
