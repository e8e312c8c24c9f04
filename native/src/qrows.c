/*
 * Quantized rows (the qrows op of format 1.3, spec/FORMAT.md sections 5.5 and 7.5). Python twin:
 * nnpatch/quantdelta.py, called as nnpatch/applier/decode.py (_run_qrows, check_qrows) calls it.
 *
 * Each element of a changed row: new = old when its code is 0 or old is NaN/infinite; otherwise
 *     t = RN32(scale * code); y = RN32(binary32(old) + t); new = RN_dtype(y)
 * in binary32, round to nearest even, no fused multiply-add (the build has -ffp-contract=off,
 * and the product and the sum are separate statements), no flush to zero. The conversions
 * F16/BF16 <-> binary32 are integer code, the same on every CPU; only the one multiply and
 * the one add are float instructions, which IEEE 754 defines to the bit. Since the scale is
 * finite and old is finite when they run, y is never NaN, so no NaN propagation rule (which
 * differs between x86 and ARM) decides a bit.
 *
 * Memory: the index, the scales and the codes are read as streams side by side, a piece of
 * at most QPIECE code bytes at a time (rows wider than that are done in pieces too).
 */
#include <float.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "decode.h"

#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD != 0
#error "qrows needs binary32 arithmetic rounded at each step (FLT_EVAL_METHOD 0; on 32-bit x86: -msse2 -mfpmath=sse)"
#endif

#define QPIECE ((size_t)64 << 10) /* code bytes decoded at a time */
#define QSCALES 4096               /* bytes of scales buffered at a time (a multiple of 4) */

/* ---- the arithmetic ------------------------------------------------------------------ */

static inline float f32_of(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t bits_of(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* The binary32 bits of a finite F16 value (exact, subnormals included). */
static inline uint32_t f32_bits_of_f16(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e)
        return sign | (e + 112) << 23 | m << 13;
    if (!m)
        return sign;
    e = 113; /* m * 2^-24 = (m / 2^10) * 2^-14: shift the leading one up to bit 10 */
    while (!(m & 0x400u)) {
        m <<= 1;
        e--;
    }
    return sign | e << 23 | (m & 0x3ffu) << 13;
}

/* binary32 bits (never a NaN) rounded to nearest, ties to even, into F16: subnormal results,
 * and |y| >= 65520 gives an infinity of its sign. */
static inline uint16_t f16_of_f32_bits(uint32_t u)
{
    uint16_t sign = (uint16_t)(u >> 16 & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a >= 0x477ff000u) /* 65520 and above (infinity too) */
        return sign | 0x7c00u;
    if (a >= 0x38800000u) { /* 2^-14 and above: a normal F16; a carry out of the mantissa moves the exponent */
        uint32_t r = a - 0x38000000u; /* rebias 127 -> 15 */
        return sign | (uint16_t)((r + 0xfffu + ((r >> 13) & 1u)) >> 13);
    }
    if (a <= 0x33000000u) /* |y| <= 2^-25: zero (2^-25 itself is a tie, to the even 0) */
        return sign;
    /* a subnormal F16 q * 2^-24: q = RNE(mant * 2^(e - 126)), the shift in [14, 24] */
    unsigned shift = 126u - (a >> 23);
    uint32_t mant = (a & 0x7fffffu) | 0x800000u;
    uint32_t q = mant >> shift, rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    q += rem > half || (rem == half && (q & 1u));
    return sign | (uint16_t)q; /* q = 0x400 is the smallest normal, as it should be */
}

/* binary32 bits (never a NaN) rounded to nearest, ties to even, into BF16 (FORMAT.md 7.5). */
static inline uint16_t bf16_of_f32_bits(uint32_t u) { return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16); }

static void apply_f32(uint8_t *restrict d, size_t n, float s, const int8_t *restrict c)
{
    for (size_t j = 0; j < n; j++) {
        uint32_t u = np_le32(d + 4 * j);
        if (!c[j] || (u & 0x7f800000u) == 0x7f800000u)
            continue;
        float t = s * (float)c[j]; /* RN32(s * c): rounded here, not fused with the add */
        float y = f32_of(u) + t;   /* RN32(x + t) */
        np_put_le32(d + 4 * j, bits_of(y));
    }
}

static void apply_bf16(uint8_t *restrict d, size_t n, float s, const int8_t *restrict c)
{
    for (size_t j = 0; j < n; j++) {
        uint16_t h = np_le16(d + 2 * j);
        if (!c[j] || (h & 0x7f80u) == 0x7f80u)
            continue;
        float t = s * (float)c[j];
        float y = f32_of((uint32_t)h << 16) + t;
        uint16_t r = bf16_of_f32_bits(bits_of(y));
        d[2 * j] = (uint8_t)r;
        d[2 * j + 1] = (uint8_t)(r >> 8);
    }
}

static void apply_f16(uint8_t *restrict d, size_t n, float s, const int8_t *restrict c)
{
    for (size_t j = 0; j < n; j++) {
        uint16_t h = np_le16(d + 2 * j);
        if (!c[j] || (h & 0x7c00u) == 0x7c00u)
            continue;
        float t = s * (float)c[j];
        float y = f32_of(f32_bits_of_f16(h)) + t;
        uint16_t r = f16_of_f32_bits(bits_of(y));
        d[2 * j] = (uint8_t)r;
        d[2 * j + 1] = (uint8_t)(r >> 8);
    }
}

void np_qrows_apply_words(int dtype, uint8_t *words, size_t n, float scale, const int8_t *codes)
{
    if (dtype == NP_DT_F32)
        apply_f32(words, n, scale, codes);
    else if (dtype == NP_DT_BF16)
        apply_bf16(words, n, scale, codes);
    else
        apply_f16(words, n, scale, codes);
}

/* The floating-point environment the arithmetic needs: round to nearest even, subnormal results
 * kept (no FTZ) and subnormal operands read as they are (no DAZ). An application may have changed
 * it (fesetround, a fast-math library setting MXCSR or FPCR); then refuse rather than write a
 * model the target digest would refuse anyway. */
static int fp_env_ok(void)
{
    volatile float one = 1.0f, e = 0x1.8p-24f, mn = 0x1p-126f, half = 0.5f, tiny = 0x1p-149f, zero = 0.0f;
    float up = one + e, down = -one - e, sub = mn * half, kept = tiny + zero;
    return bits_of(up) == 0x3f800001u && bits_of(down) == 0xbf800001u && bits_of(sub) == 0x00400000u &&
           bits_of(kept) == 0x00000001u;
}

/* ---- the sections ------------------------------------------------------------------------ */

/* A section read as a stream, in pieces: views of a raw section, or decoded into buf. */
typedef struct qsrc {
    np_secreader r;
    int open;
    uint8_t *buf;
    size_t cap, pos, len;
    uint64_t left; /* decoded bytes not yet taken into buf (zstd) or viewed (raw) */
} qsrc;

static nnp_status qs_open(nnp_ctx *ctx, qsrc *q, const np_patch *p, const np_section *s, const char *where,
                          uint8_t *buf, size_t cap)
{
    memset(q, 0, sizeof *q);
    q->open = 1;
    q->buf = buf;
    q->cap = cap;
    q->left = s->size;
    return np_secreader_open(ctx, &q->r, p, s, where);
}

/* Up to want (>= 1) contiguous bytes; at least one, or the section has ended early. */
static nnp_status qs_get(nnp_ctx *ctx, qsrc *q, size_t want, const uint8_t **out, size_t *got)
{
    if (!q->r.zstd) {
        size_t k = want < q->left ? want : (size_t)q->left;
        *out = np_secreader_view(&q->r, k);
        q->left -= k;
        *got = k;
    } else {
        if (q->pos == q->len && q->left) {
            size_t k = q->left < q->cap ? (size_t)q->left : q->cap;
            nnp_status st = np_secreader_read(ctx, &q->r, q->buf, k);
            if (st)
                return st;
            q->pos = 0;
            q->len = k;
            q->left -= k;
        }
        size_t k = want < q->len - q->pos ? want : q->len - q->pos;
        *out = q->buf + q->pos;
        q->pos += k;
        *got = k;
    }
    if (!*got) /* cannot happen: the header's sizes were checked against count and the row */
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: %s: data ends early", q->r.pname, q->r.where);
    return NNP_OK;
}

static void qs_close(qsrc *q)
{
    if (q->open)
        np_secreader_close(&q->r);
    q->open = 0;
}

static void where_of(const np_op *op, const char *section, char *out, size_t n)
{
    char q[NP_QUOTE_MAX];
    np_quote(q, sizeof q, op->name, op->name_len);
    snprintf(out, n, "%s.%s", q, section);
}

/* quantdelta.decode_scales: every scale finite (decoded whole first, as the Python applier does,
 * so that a bad scale is refused before any row changes). */
static nnp_status check_scales(nnp_ctx *ctx, const np_patch *p, const np_op *op)
{
    char where[300];
    uint8_t buf[QSCALES];
    qsrc q;
    where_of(op, "scales", where, sizeof where);
    nnp_status st = qs_open(ctx, &q, p, &op->scales, where, buf, sizeof buf);
    uint64_t i = 0;
    while (!st && (q.left || q.pos < q.len)) {
        const uint8_t *b;
        size_t got;
        if ((st = qs_get(ctx, &q, QSCALES, &b, &got)))
            break;
        for (size_t k = 0; k + 4 <= got; k += 4, i++) {
            uint32_t u = np_le32(b + k);
            if ((u & 0x7f800000u) == 0x7f800000u) {
                st = np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: %s: scale %llu is not finite (%s)", p->name, where,
                             (unsigned long long)i, u & 0x7fffffu ? "nan" : u >> 31 ? "-inf" : "inf");
                break;
            }
        }
    }
    if (!st)
        st = np_secreader_finish(ctx, &q.r);
    qs_close(&q);
    return st;
}

/* One pass over the codes: padding nibbles checked (quantdelta.unpack_codes); with dst, each
 * changed row of the tensor at dst rebuilt from its old words, its scale and its codes. */
static nnp_status codes_pass(nnp_ctx *ctx, const np_patch *p, const np_op *op, uint64_t n, uint8_t *dst, int dtype,
                             uint64_t unit_bytes)
{
    const unsigned bits = op->bits, w = np_dtypes[dtype].size;
    const uint64_t rcb = np_qrows_row_bytes(n, bits);
    const int single = op->scales.size == 4;
    char vwhere[300], swhere[300];
    where_of(op, "values", vwhere, sizeof vwhere);
    where_of(op, "scales", swhere, sizeof swhere);
    qsrc codes, scales;
    np_idx it;
    int have_it = 0;
    memset(&scales, 0, sizeof scales);
    uint8_t *cbuf = malloc(QPIECE), *sbuf = malloc(QSCALES);
    int8_t *cv = malloc(2 * QPIECE);
    nnp_status st = NNP_OK;
    if (!cbuf || !sbuf || !cv) {
        free(cbuf);
        free(sbuf);
        free(cv);
        return np_fail(ctx, NNP_KIND_IO, "%s: %s: out of memory", p->name, vwhere);
    }
    if ((st = qs_open(ctx, &codes, p, &op->values, vwhere, cbuf, QPIECE)))
        goto out;
    if (dst) {
        have_it = 1; /* closed also when the open fails */
        if ((st = np_idx_open(ctx, &it, p, op, op->target.shape[0])))
            goto out;
        if ((st = qs_open(ctx, &scales, p, &op->scales, swhere, sbuf, QSCALES)))
            goto out;
    }
    float s = 0.0f;
    for (uint64_t r = 0; r < op->count; r++) {
        uint8_t *row = NULL;
        if (dst) {
            uint64_t pos;
            if ((st = np_idx_next(ctx, &it, &pos)))
                goto out;
            row = dst + pos * unit_bytes;
            if (r == 0 || !single) {
                const uint8_t *b;
                size_t got;
                if ((st = qs_get(ctx, &scales, 4, &b, &got)))
                    goto out;
                s = f32_of(np_le32(b));
            }
        }
        for (uint64_t b0 = 0; b0 < rcb;) {
            const uint8_t *b;
            size_t got, ne;
            if ((st = qs_get(ctx, &codes, rcb - b0 < QPIECE ? (size_t)(rcb - b0) : QPIECE, &b, &got)))
                goto out;
            uint64_t j0 = bits == 8 ? b0 : 2 * b0;
            if (bits == 8) {
                ne = got;
                if (dst)
                    memcpy(cv, b, got); /* two's complement bytes */
            } else {
                int pad = b0 + got == rcb && (n & 1);
                if (pad && b[got - 1] >> 4) {
                    st = np_fail(ctx, NNP_KIND_PATCH_FORMAT,
                                 "%s: %s: the padding nibble after a row's last 4-bit code is not zero", p->name,
                                 vwhere);
                    goto out;
                }
                ne = 2 * got - (size_t)pad;
                if (dst)
                    for (size_t k = 0; k < ne; k++) {
                        unsigned nib = (b[k >> 1] >> (4 * (k & 1))) & 0xfu;
                        cv[k] = (int8_t)((int)(nib ^ 8u) - 8);
                    }
            }
            if (dst)
                np_qrows_apply_words(dtype, row + j0 * w, ne, s, cv);
            b0 += got;
            if ((got >= 4096 || (r & 0x3ff) == 0x3ff) && (st = np_check_cancel(ctx))) /* a wide piece, or 1024 rows */
                goto out;
        }
    }
    if (have_it && (st = np_idx_finish(ctx, &it)))
        goto out;
    if (dst && (st = np_secreader_finish(ctx, &scales.r)))
        goto out;
    st = np_secreader_finish(ctx, &codes.r);
out:
    qs_close(&codes);
    qs_close(&scales);
    if (have_it)
        np_idx_close(&it);
    free(cbuf);
    free(sbuf);
    free(cv);
    return st;
}

nnp_status np_qrows_check(nnp_ctx *ctx, const np_patch *p, const np_op *op)
{
    nnp_status st = check_scales(ctx, p, op);
    if (st)
        return st;
    uint64_t rows = op->target.shape[0], n = rows ? op->target.numel / rows : 0;
    if (!n || op->bits == 8) /* 8-bit codes: every byte is a valid code (np_section_drain reads them) */
        return NNP_OK;
    return codes_pass(ctx, p, op, n, NULL, op->target.dtype, 0);
}

nnp_status np_run_qrows(nnp_ctx *ctx, const np_step_job *job, uint8_t *dst)
{
    const np_op *op = job->op;
    const np_patch *p = job->patch;
    if (job->dtype != NP_DT_F32 && job->dtype != NP_DT_BF16 && job->dtype != NP_DT_F16) /* checked with the header */
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: op 'qrows' on a %s tensor", p->name,
                       np_dtypes[job->dtype].name);
    if (!fp_env_ok())
        return np_fail(ctx, NNP_KIND_IO,
                       "the floating-point environment is not IEEE 754 round-to-nearest-even without flush-to-zero: "
                       "op 'qrows' cannot be applied exactly here");
    uint64_t rows = job->shape[0], n = rows ? job->numel / rows : 0;
    nnp_status st = np_idx_validate(ctx, p, op, rows, NULL, NULL);
    if (!st)
        st = check_scales(ctx, p, op);
    if (st || !n) /* rows without elements: nothing to change (nor to read) */
        return st;
    return codes_pass(ctx, p, op, n, dst, job->dtype, job->nbytes / rows);
}
