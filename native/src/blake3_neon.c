/*
 * BLAKE3 SIMD kernel for aarch64: NEON (Advanced SIMD, always present there), 4 lanes; see
 * blake3_impl.h. Little-endian only (blake3_impl.h defines NP_B3_NEON for that alone).
 * Python twin: nnpatch/hashing.py (through the blake3 package's own kernels).
 */
#include "blake3_impl.h"

#ifdef NP_B3_NEON

#include <arm_neon.h>

static inline uint32x4_t load_u32x4(const uint8_t *p)
{
    return vreinterpretq_u32_u8(vld1q_u8(p));
}

static inline void store_u32x4(uint8_t *p, uint32x4_t x)
{
    vst1q_u8(p, vreinterpretq_u8_u32(x));
}

/* r[i] word j becomes r[j] word i (4x4). */
static inline void transpose4(uint32x4_t *r0, uint32x4_t *r1, uint32x4_t *r2, uint32x4_t *r3)
{
    uint32x4x2_t a = vtrnq_u32(*r0, *r1); /* a0 = r0[0] r1[0] r0[2] r1[2]; a1 = r0[1] r1[1] r0[3] r1[3] */
    uint32x4x2_t b = vtrnq_u32(*r2, *r3);
    *r0 = vcombine_u32(vget_low_u32(a.val[0]), vget_low_u32(b.val[0]));
    *r1 = vcombine_u32(vget_low_u32(a.val[1]), vget_low_u32(b.val[1]));
    *r2 = vcombine_u32(vget_high_u32(a.val[0]), vget_high_u32(b.val[0]));
    *r3 = vcombine_u32(vget_high_u32(a.val[1]), vget_high_u32(b.val[1]));
}

void np_b3_hash4_neon(const uint8_t *in, size_t stride, size_t blocks, const uint32_t key[8], uint64_t counter,
                      int increment, uint8_t flags, uint8_t flags_start, uint8_t flags_end, uint8_t *out)
{
#define VADD(a, b) vaddq_u32(a, b)
#define VXOR(a, b) veorq_u32(a, b)
#define VROT16(x) vreinterpretq_u32_u16(vrev32q_u16(vreinterpretq_u16_u32(x)))
#define VROT12(x) vsriq_n_u32(vshlq_n_u32(x, 20), x, 12)
#define VROT8(x) vsriq_n_u32(vshlq_n_u32(x, 24), x, 8)
#define VROT7(x) vsriq_n_u32(vshlq_n_u32(x, 25), x, 7)
    uint32_t lo[4], hi[4];
    for (unsigned i = 0; i < 4; i++) {
        uint64_t c = counter + (increment ? i : 0);
        lo[i] = (uint32_t)c;
        hi[i] = (uint32_t)(c >> 32);
    }
    const uint32x4_t clo = vld1q_u32(lo), chi = vld1q_u32(hi);
    uint32x4_t h[8];
    for (int i = 0; i < 8; i++)
        h[i] = vdupq_n_u32(key[i]);
    const uint8_t *p0 = in, *p1 = in + stride, *p2 = in + 2 * stride, *p3 = in + 3 * stride;
    for (size_t b = 0; b < blocks; b++) {
        size_t off = b * NP_BLAKE3_BLOCK_LEN;
        uint32x4_t m[16];
        for (int q = 0; q < 4; q++) {
            m[4 * q + 0] = load_u32x4(p0 + off + 16 * q);
            m[4 * q + 1] = load_u32x4(p1 + off + 16 * q);
            m[4 * q + 2] = load_u32x4(p2 + off + 16 * q);
            m[4 * q + 3] = load_u32x4(p3 + off + 16 * q);
            transpose4(&m[4 * q + 0], &m[4 * q + 1], &m[4 * q + 2], &m[4 * q + 3]);
        }
        unsigned f = flags;
        if (b == 0)
            f |= flags_start;
        if (b + 1 == blocks)
            f |= flags_end;
        uint32x4_t v0 = h[0], v1 = h[1], v2 = h[2], v3 = h[3], v4 = h[4], v5 = h[5], v6 = h[6], v7 = h[7];
        uint32x4_t v8 = vdupq_n_u32(NP_B3_IV0), v9 = vdupq_n_u32(NP_B3_IV1);
        uint32x4_t v10 = vdupq_n_u32(NP_B3_IV2), v11 = vdupq_n_u32(NP_B3_IV3);
        uint32x4_t v12 = clo, v13 = chi, v14 = vdupq_n_u32(NP_BLAKE3_BLOCK_LEN), v15 = vdupq_n_u32(f);
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
    transpose4(&h[0], &h[1], &h[2], &h[3]);
    transpose4(&h[4], &h[5], &h[6], &h[7]);
    for (int i = 0; i < 4; i++) {
        store_u32x4(out + 32 * i, h[i]);
        store_u32x4(out + 32 * i + 16, h[4 + i]);
    }
#undef VADD
#undef VXOR
#undef VROT16
#undef VROT12
#undef VROT8
#undef VROT7
}

#else
typedef int np_b3_neon_unused; /* ISO C wants a declaration in every translation unit */
#endif
