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
np_b3_kernel np_b3_hash8_avx512; /* 8 lanes, AVX-512F + VL on 256-bit vectors */
np_b3_kernel np_b3_hash16_avx512; /* 16 lanes, AVX-512F */
int np_b3_have_sse41(void);
int np_b3_have_avx2(void);
int np_b3_have_avx512(void);
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

/* Four G functions side by side, step by step (the order the vector code is emitted in). */
#define NP_B3V_G4(a0, b0, c0, d0, a1, b1, c1, d1, a2, b2, c2, d2, a3, b3, c3, d3, x0, y0, x1, y1, x2, y2, x3, y3) \
    do {                                                                                                    \
        a0 = VADD(VADD(a0, x0), b0);                                                                        \
        a1 = VADD(VADD(a1, x1), b1);                                                                        \
        a2 = VADD(VADD(a2, x2), b2);                                                                        \
        a3 = VADD(VADD(a3, x3), b3);                                                                        \
        d0 = VROT16(VXOR(d0, a0));                                                                          \
        d1 = VROT16(VXOR(d1, a1));                                                                          \
        d2 = VROT16(VXOR(d2, a2));                                                                          \
        d3 = VROT16(VXOR(d3, a3));                                                                          \
        c0 = VADD(c0, d0);                                                                                  \
        c1 = VADD(c1, d1);                                                                                  \
        c2 = VADD(c2, d2);                                                                                  \
        c3 = VADD(c3, d3);                                                                                  \
        b0 = VROT12(VXOR(b0, c0));                                                                          \
        b1 = VROT12(VXOR(b1, c1));                                                                          \
        b2 = VROT12(VXOR(b2, c2));                                                                          \
        b3 = VROT12(VXOR(b3, c3));                                                                          \
        a0 = VADD(VADD(a0, y0), b0);                                                                        \
        a1 = VADD(VADD(a1, y1), b1);                                                                        \
        a2 = VADD(VADD(a2, y2), b2);                                                                        \
        a3 = VADD(VADD(a3, y3), b3);                                                                        \
        d0 = VROT8(VXOR(d0, a0));                                                                           \
        d1 = VROT8(VXOR(d1, a1));                                                                           \
        d2 = VROT8(VXOR(d2, a2));                                                                           \
        d3 = VROT8(VXOR(d3, a3));                                                                           \
        c0 = VADD(c0, d0);                                                                                  \
        c1 = VADD(c1, d1);                                                                                  \
        c2 = VADD(c2, d2);                                                                                  \
        c3 = VADD(c3, d3);                                                                                  \
        b0 = VROT7(VXOR(b0, c0));                                                                           \
        b1 = VROT7(VXOR(b1, c1));                                                                           \
        b2 = VROT7(VXOR(b2, c2));                                                                           \
        b3 = VROT7(VXOR(b3, c3));                                                                           \
    } while (0)

#ifndef NP_B3V_PHASED_G /* one G after another: GCC allocates registers better for it */
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
#else
#define NP_B3V_ROUND(s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15)        \
    do {                                                                                        \
        NP_B3V_G4(v0, v4, v8, v12, v1, v5, v9, v13, v2, v6, v10, v14, v3, v7, v11, v15,          \
                  m[s0], m[s1], m[s2], m[s3], m[s4], m[s5], m[s6], m[s7]);                      \
        NP_B3V_G4(v0, v5, v10, v15, v1, v6, v11, v12, v2, v7, v8, v13, v3, v4, v9, v14,          \
                  m[s8], m[s9], m[s10], m[s11], m[s12], m[s13], m[s14], m[s15]);                \
    } while (0)
#endif

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
