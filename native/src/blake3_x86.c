/*
 * BLAKE3 SIMD kernels for x86-64: SSE4.1 (4 lanes), AVX2 and AVX-512VL (8 lanes), AVX-512F (16
 * lanes); see blake3_impl.h. Python twin: nnpatch/hashing.py (through the blake3 package's own
 * kernels).
 * Each kernel carries its own target attribute, so this file builds with the project's plain
 * flags; blake3.c calls one only after np_b3_have_sse41()/np_b3_have_avx2() said yes.
 */
#include "blake3_impl.h"

#ifdef NP_B3_X86

#include <immintrin.h>

int np_b3_have_sse41(void)
{
    return __builtin_cpu_supports("sse4.1") ? 1 : 0;
}

int np_b3_have_avx512(void)
{
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") ? 1 : 0;
}

int np_b3_have_avx2(void)
{
    /* libgcc's and compiler-rt's "avx2" include the OS check (XGETBV) for the YMM state */
    return __builtin_cpu_supports("avx2") ? 1 : 0;
}

/* Lane i's counter: counter + i when increment, else counter. */
static void lane_counters(uint64_t counter, int increment, unsigned lanes, uint32_t lo[8], uint32_t hi[8])
{
    for (unsigned i = 0; i < lanes; i++) {
        uint64_t c = counter + (increment ? i : 0);
        lo[i] = (uint32_t)c;
        hi[i] = (uint32_t)(c >> 32);
    }
}

static uint8_t block_flags(size_t b, size_t blocks, uint8_t flags, uint8_t flags_start, uint8_t flags_end)
{
    unsigned f = flags;
    if (b == 0)
        f |= flags_start;
    if (b + 1 == blocks)
        f |= flags_end;
    return (uint8_t)f;
}

/* --- SSE4.1, 4 lanes ---------------------------------------------------------------------------- */

#define SSE_TARGET __attribute__((target("sse4.1")))

/* r[i] (4 words of row i) becomes column i: r[i] word j = old r[j] word i. */
#define SSE_TRANSPOSE4(r0, r1, r2, r3)                 \
    do {                                               \
        __m128i t0_ = _mm_unpacklo_epi32(r0, r1);      \
        __m128i t1_ = _mm_unpackhi_epi32(r0, r1);      \
        __m128i t2_ = _mm_unpacklo_epi32(r2, r3);      \
        __m128i t3_ = _mm_unpackhi_epi32(r2, r3);      \
        r0 = _mm_unpacklo_epi64(t0_, t2_);             \
        r1 = _mm_unpackhi_epi64(t0_, t2_);             \
        r2 = _mm_unpacklo_epi64(t1_, t3_);             \
        r3 = _mm_unpackhi_epi64(t1_, t3_);             \
    } while (0)

SSE_TARGET void np_b3_hash4_sse41(const uint8_t *in, size_t stride, size_t blocks, const uint32_t key[8],
                                  uint64_t counter, int increment, uint8_t flags, uint8_t flags_start,
                                  uint8_t flags_end, uint8_t *out)
{
#define VADD(a, b) _mm_add_epi32(a, b)
#define VXOR(a, b) _mm_xor_si128(a, b)
#define VROT16(x) _mm_shuffle_epi8(x, rot16)
#define VROT8(x) _mm_shuffle_epi8(x, rot8)
#define VROT12(x) _mm_or_si128(_mm_srli_epi32(x, 12), _mm_slli_epi32(x, 20))
#define VROT7(x) _mm_or_si128(_mm_srli_epi32(x, 7), _mm_slli_epi32(x, 25))
    const __m128i rot16 = _mm_setr_epi8(2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    const __m128i rot8 = _mm_setr_epi8(1, 2, 3, 0, 5, 6, 7, 4, 9, 10, 11, 8, 13, 14, 15, 12);
    uint32_t lo[8], hi[8];
    lane_counters(counter, increment, 4, lo, hi);
    const __m128i clo = _mm_setr_epi32((int)lo[0], (int)lo[1], (int)lo[2], (int)lo[3]);
    const __m128i chi = _mm_setr_epi32((int)hi[0], (int)hi[1], (int)hi[2], (int)hi[3]);
    __m128i h[8];
    for (int i = 0; i < 8; i++)
        h[i] = _mm_set1_epi32((int)key[i]);
    const uint8_t *p0 = in, *p1 = in + stride, *p2 = in + 2 * stride, *p3 = in + 3 * stride;
    for (size_t b = 0; b < blocks; b++) {
        size_t off = b * NP_BLAKE3_BLOCK_LEN;
        __m128i m[16];
        for (int q = 0; q < 4; q++) {
            m[4 * q + 0] = _mm_loadu_si128((const __m128i *)(const void *)(p0 + off + 16 * q));
            m[4 * q + 1] = _mm_loadu_si128((const __m128i *)(const void *)(p1 + off + 16 * q));
            m[4 * q + 2] = _mm_loadu_si128((const __m128i *)(const void *)(p2 + off + 16 * q));
            m[4 * q + 3] = _mm_loadu_si128((const __m128i *)(const void *)(p3 + off + 16 * q));
            SSE_TRANSPOSE4(m[4 * q + 0], m[4 * q + 1], m[4 * q + 2], m[4 * q + 3]);
        }
        __m128i v0 = h[0], v1 = h[1], v2 = h[2], v3 = h[3], v4 = h[4], v5 = h[5], v6 = h[6], v7 = h[7];
        __m128i v8 = _mm_set1_epi32((int)NP_B3_IV0), v9 = _mm_set1_epi32((int)NP_B3_IV1);
        __m128i v10 = _mm_set1_epi32((int)NP_B3_IV2), v11 = _mm_set1_epi32((int)NP_B3_IV3);
        __m128i v12 = clo, v13 = chi, v14 = _mm_set1_epi32(NP_BLAKE3_BLOCK_LEN);
        __m128i v15 = _mm_set1_epi32(block_flags(b, blocks, flags, flags_start, flags_end));
        NP_B3V_ROUNDS();
        h[0] = VXOR(v0, v8);
        h[1] = VXOR(v1, v9);
        h[2] = VXOR(v2, v10);
        h[3] = VXOR(v3, v11);
        h[4] = VXOR(v4, v12);
        h[5] = VXOR(v5, v13);
        h[6] = VXOR(v6, v14);
        h[7] = VXOR(v7, v15);
    }
    SSE_TRANSPOSE4(h[0], h[1], h[2], h[3]);
    SSE_TRANSPOSE4(h[4], h[5], h[6], h[7]);
    for (int i = 0; i < 4; i++) {
        _mm_storeu_si128((__m128i *)(void *)(out + 32 * i), h[i]);
        _mm_storeu_si128((__m128i *)(void *)(out + 32 * i + 16), h[4 + i]);
    }
#undef VADD
#undef VXOR
#undef VROT16
#undef VROT8
#undef VROT12
#undef VROT7
}

/* --- AVX2, 8 lanes ------------------------------------------------------------------------------- */

#define AVX2_TARGET __attribute__((target("avx2")))

/* An 8x8 transpose of 32-bit words: r[i] word j becomes r[j] word i. */
#define AVX2_TRANSPOSE8(r)                                                      \
    do {                                                                        \
        __m256i t0_ = _mm256_unpacklo_epi32(r[0], r[1]);                        \
        __m256i t1_ = _mm256_unpackhi_epi32(r[0], r[1]);                        \
        __m256i t2_ = _mm256_unpacklo_epi32(r[2], r[3]);                        \
        __m256i t3_ = _mm256_unpackhi_epi32(r[2], r[3]);                        \
        __m256i t4_ = _mm256_unpacklo_epi32(r[4], r[5]);                        \
        __m256i t5_ = _mm256_unpackhi_epi32(r[4], r[5]);                        \
        __m256i t6_ = _mm256_unpacklo_epi32(r[6], r[7]);                        \
        __m256i t7_ = _mm256_unpackhi_epi32(r[6], r[7]);                        \
        /* u0: word 0 of rows 0-3 | word 4 of rows 0-3, and so on */           \
        __m256i u0_ = _mm256_unpacklo_epi64(t0_, t2_);                          \
        __m256i u1_ = _mm256_unpackhi_epi64(t0_, t2_);                          \
        __m256i u2_ = _mm256_unpacklo_epi64(t1_, t3_);                          \
        __m256i u3_ = _mm256_unpackhi_epi64(t1_, t3_);                          \
        __m256i u4_ = _mm256_unpacklo_epi64(t4_, t6_);                          \
        __m256i u5_ = _mm256_unpackhi_epi64(t4_, t6_);                          \
        __m256i u6_ = _mm256_unpacklo_epi64(t5_, t7_);                          \
        __m256i u7_ = _mm256_unpackhi_epi64(t5_, t7_);                          \
        r[0] = _mm256_permute2x128_si256(u0_, u4_, 0x20);                       \
        r[4] = _mm256_permute2x128_si256(u0_, u4_, 0x31);                       \
        r[1] = _mm256_permute2x128_si256(u1_, u5_, 0x20);                       \
        r[5] = _mm256_permute2x128_si256(u1_, u5_, 0x31);                       \
        r[2] = _mm256_permute2x128_si256(u2_, u6_, 0x20);                       \
        r[6] = _mm256_permute2x128_si256(u2_, u6_, 0x31);                       \
        r[3] = _mm256_permute2x128_si256(u3_, u7_, 0x20);                       \
        r[7] = _mm256_permute2x128_si256(u3_, u7_, 0x31);                       \
    } while (0)

/*
 * The 8-lane kernel, defined twice: AVX2 (16 vector registers; 12- and 7-bit rotations are two
 * shifts and an or, 16 and 8 a byte shuffle) and AVX-512VL on 256-bit vectors (32 registers,
 * so the state and message stay in registers, and VPRORD rotates). V8_CONSTANTS and the V*
 * operations are defined before each definition.
 */
#define DEFINE_HASH8(NAME, TARGET)                                                                                    \
    __attribute__((target(TARGET))) void NAME(const uint8_t *in, size_t stride, size_t blocks, const uint32_t key[8], \
                                              uint64_t counter, int increment, uint8_t flags, uint8_t flags_start,    \
                                              uint8_t flags_end, uint8_t *out)                                        \
{                                                                                                                     \
    V8_CONSTANTS                                                                                                      \
    uint32_t lo[8], hi[8];                                                                                            \
    lane_counters(counter, increment, 8, lo, hi);                                                                     \
    const __m256i clo = _mm256_loadu_si256((const __m256i *)(const void *)lo);                                        \
    const __m256i chi = _mm256_loadu_si256((const __m256i *)(const void *)hi);                                        \
    __m256i h[8];                                                                                                     \
    for (int i = 0; i < 8; i++)                                                                                       \
        h[i] = _mm256_set1_epi32((int)key[i]);                                                                        \
    for (size_t b = 0; b < blocks; b++) {                                                                             \
        const uint8_t *p = in + b * NP_BLAKE3_BLOCK_LEN;                                                              \
        __m256i m[16];                                                                                                \
        for (int i = 0; i < 8; i++) {                                                                                 \
            m[i] = _mm256_loadu_si256((const __m256i *)(const void *)(p + i * stride));                               \
            m[8 + i] = _mm256_loadu_si256((const __m256i *)(const void *)(p + i * stride + 32));                      \
        }                                                                                                             \
        AVX2_TRANSPOSE8(m);                                                                                           \
        AVX2_TRANSPOSE8((m + 8));                                                                                     \
        __m256i v0 = h[0], v1 = h[1], v2 = h[2], v3 = h[3], v4 = h[4], v5 = h[5], v6 = h[6], v7 = h[7];               \
        __m256i v8 = _mm256_set1_epi32((int)NP_B3_IV0), v9 = _mm256_set1_epi32((int)NP_B3_IV1);                       \
        __m256i v10 = _mm256_set1_epi32((int)NP_B3_IV2), v11 = _mm256_set1_epi32((int)NP_B3_IV3);                     \
        __m256i v12 = clo, v13 = chi, v14 = _mm256_set1_epi32(NP_BLAKE3_BLOCK_LEN);                                   \
        __m256i v15 = _mm256_set1_epi32(block_flags(b, blocks, flags, flags_start, flags_end));                       \
        NP_B3V_ROUNDS();                                                                                              \
        h[0] = VXOR(v0, v8);                                                                                          \
        h[1] = VXOR(v1, v9);                                                                                          \
        h[2] = VXOR(v2, v10);                                                                                         \
        h[3] = VXOR(v3, v11);                                                                                         \
        h[4] = VXOR(v4, v12);                                                                                         \
        h[5] = VXOR(v5, v13);                                                                                         \
        h[6] = VXOR(v6, v14);                                                                                         \
        h[7] = VXOR(v7, v15);                                                                                         \
    }                                                                                                                 \
    AVX2_TRANSPOSE8(h);                                                                                               \
    for (int i = 0; i < 8; i++)                                                                                       \
        _mm256_storeu_si256((__m256i *)(void *)(out + 32 * i), h[i]);                                                 \
}

#define VADD(a, b) _mm256_add_epi32(a, b)
#define VXOR(a, b) _mm256_xor_si256(a, b)

#define V8_CONSTANTS                                                                                     \
    const __m256i rot16 = _mm256_setr_epi8(2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13, 2, 3, 0, \
                                           1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);                 \
    const __m256i rot8 = _mm256_setr_epi8(1, 2, 3, 0, 5, 6, 7, 4, 9, 10, 11, 8, 13, 14, 15, 12, 1, 2, 3,  \
                                          0, 5, 6, 7, 4, 9, 10, 11, 8, 13, 14, 15, 12);
#define VROT16(x) _mm256_shuffle_epi8(x, rot16)
#define VROT8(x) _mm256_shuffle_epi8(x, rot8)
#define VROT12(x) _mm256_or_si256(_mm256_srli_epi32(x, 12), _mm256_slli_epi32(x, 20))
#define VROT7(x) _mm256_or_si256(_mm256_srli_epi32(x, 7), _mm256_slli_epi32(x, 25))
DEFINE_HASH8(np_b3_hash8_avx2, "avx2")
#undef V8_CONSTANTS
#undef VROT16
#undef VROT8
#undef VROT12
#undef VROT7

#define V8_CONSTANTS
#define VROT16(x) _mm256_ror_epi32(x, 16)
#define VROT8(x) _mm256_ror_epi32(x, 8)
#define VROT12(x) _mm256_ror_epi32(x, 12)
#define VROT7(x) _mm256_ror_epi32(x, 7)
DEFINE_HASH8(np_b3_hash8_avx512, "avx2,avx512f,avx512vl")
#undef V8_CONSTANTS
#undef VROT16
#undef VROT8
#undef VROT12
#undef VROT7
#undef VADD
#undef VXOR


/* --- AVX-512F, 16 lanes ---------------------------------------------------------------------------- */

#define AVX512_TARGET __attribute__((target("avx512f")))

/* A 16x16 transpose of 32-bit words (r[i] word j becomes r[j] word i): 4x4 transposes inside
 * each 128-bit lane (unpack 32, unpack 64), then a 4x4 transpose of the 128-bit lanes. */
AVX512_TARGET static inline void transpose16(__m512i r[16])
{
    __m512i u[16];
    for (int g = 0; g < 4; g++) {
        __m512i t0 = _mm512_unpacklo_epi32(r[4 * g], r[4 * g + 1]);
        __m512i t1 = _mm512_unpackhi_epi32(r[4 * g], r[4 * g + 1]);
        __m512i t2 = _mm512_unpacklo_epi32(r[4 * g + 2], r[4 * g + 3]);
        __m512i t3 = _mm512_unpackhi_epi32(r[4 * g + 2], r[4 * g + 3]);
        /* u[4g + k], 128-bit lane L: word 4L + k of rows 4g..4g+3 */
        u[4 * g + 0] = _mm512_unpacklo_epi64(t0, t2);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t0, t2);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t1, t3);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t1, t3);
    }
    for (int k = 0; k < 4; k++) {
        __m512i a = u[k], b = u[4 + k], c = u[8 + k], d = u[12 + k];
        __m512i t0 = _mm512_shuffle_i32x4(a, b, 0x44); /* a.L0 a.L1 b.L0 b.L1 */
        __m512i t1 = _mm512_shuffle_i32x4(a, b, 0xEE); /* a.L2 a.L3 b.L2 b.L3 */
        __m512i t2 = _mm512_shuffle_i32x4(c, d, 0x44);
        __m512i t3 = _mm512_shuffle_i32x4(c, d, 0xEE);
        r[k] = _mm512_shuffle_i32x4(t0, t2, 0x88);      /* a.L0 b.L0 c.L0 d.L0: word k */
        r[4 + k] = _mm512_shuffle_i32x4(t0, t2, 0xDD);  /* word 4 + k */
        r[8 + k] = _mm512_shuffle_i32x4(t1, t3, 0x88);  /* word 8 + k */
        r[12 + k] = _mm512_shuffle_i32x4(t1, t3, 0xDD); /* word 12 + k */
    }
}

AVX512_TARGET void np_b3_hash16_avx512(const uint8_t *in, size_t stride, size_t blocks, const uint32_t key[8],
                                       uint64_t counter, int increment, uint8_t flags, uint8_t flags_start,
                                       uint8_t flags_end, uint8_t *out)
{
#define VADD(a, b) _mm512_add_epi32(a, b)
#define VXOR(a, b) _mm512_xor_si512(a, b)
#define VROT16(x) _mm512_ror_epi32(x, 16)
#define VROT12(x) _mm512_ror_epi32(x, 12)
#define VROT8(x) _mm512_ror_epi32(x, 8)
#define VROT7(x) _mm512_ror_epi32(x, 7)
    uint32_t lo[16], hi[16];
    for (unsigned i = 0; i < 16; i++) {
        uint64_t c = counter + (increment ? i : 0);
        lo[i] = (uint32_t)c;
        hi[i] = (uint32_t)(c >> 32);
    }
    const __m512i clo = _mm512_loadu_si512((const void *)lo), chi = _mm512_loadu_si512((const void *)hi);
    __m512i h[8];
    for (int i = 0; i < 8; i++)
        h[i] = _mm512_set1_epi32((int)key[i]);
    for (size_t b = 0; b < blocks; b++) {
        const uint8_t *p = in + b * NP_BLAKE3_BLOCK_LEN;
        __m512i m[16];
        for (int i = 0; i < 16; i++)
            m[i] = _mm512_loadu_si512((const void *)(p + i * stride));
        transpose16(m);
        __m512i v0 = h[0], v1 = h[1], v2 = h[2], v3 = h[3], v4 = h[4], v5 = h[5], v6 = h[6], v7 = h[7];
        __m512i v8 = _mm512_set1_epi32((int)NP_B3_IV0), v9 = _mm512_set1_epi32((int)NP_B3_IV1);
        __m512i v10 = _mm512_set1_epi32((int)NP_B3_IV2), v11 = _mm512_set1_epi32((int)NP_B3_IV3);
        __m512i v12 = clo, v13 = chi, v14 = _mm512_set1_epi32(NP_BLAKE3_BLOCK_LEN);
        __m512i v15 = _mm512_set1_epi32(block_flags(b, blocks, flags, flags_start, flags_end));
        NP_B3V_ROUNDS();
        h[0] = VXOR(v0, v8);
        h[1] = VXOR(v1, v9);
        h[2] = VXOR(v2, v10);
        h[3] = VXOR(v3, v11);
        h[4] = VXOR(v4, v12);
        h[5] = VXOR(v5, v13);
        h[6] = VXOR(v6, v14);
        h[7] = VXOR(v7, v15);
    }
    /* lane i's chaining value: word w is lane i of h[w] */
    uint32_t words[8][16];
    for (int w = 0; w < 8; w++)
        _mm512_storeu_si512((void *)words[w], h[w]);
    for (int i = 0; i < 16; i++)
        for (int w = 0; w < 8; w++) {
            uint32_t x = words[w][i];
            uint8_t *o = out + 32 * i + 4 * w;
            o[0] = (uint8_t)x;
            o[1] = (uint8_t)(x >> 8);
            o[2] = (uint8_t)(x >> 16);
            o[3] = (uint8_t)(x >> 24);
        }
#undef VADD
#undef VXOR
#undef VROT16
#undef VROT8
#undef VROT12
#undef VROT7
}

#else
typedef int np_b3_x86_unused; /* ISO C wants a declaration in every translation unit */
#endif
