/* Value stages: xor/add/zadd deltas, esort, byte planes, undone chunk by chunk onto the tensor
 * (spec/FORMAT.md sections 7.1 and 7.2). Python twin: nnpatch/applier/decode.py (run_step) with the
 * word loops of nnpatch/kernel.py (combine, scatter_*, unsort). */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "decode.h"

#define CHUNK_ELEMENTS ((uint64_t)1 << 20)

/* ---- value stages ---------------------------------------------------------------------------- */

int np_mode_of(const np_section *s)
{
    switch (np_sec_delta(s)) {
    case NP_S_XOR: return NP_M_XOR;
    case NP_S_ADD: return NP_M_ADD;
    case NP_S_ZADD: return NP_M_ZADD;
    }
    return NP_M_REPLACE;
}

static inline uint64_t ldw(const uint8_t *p, unsigned w)
{
    switch (w) {
    case 1: return p[0];
    case 2: return np_le16(p);
    case 4: return np_le32(p);
    default: return np_le64(p);
    }
}
static inline void stw(uint8_t *p, unsigned w, uint64_t v)
{
    for (unsigned k = 0; k < w; k++)
        p[k] = (uint8_t)(v >> (8 * k));
}
static inline uint64_t ldplanar(const uint8_t *v, size_t n, size_t j, unsigned w)
{
    uint64_t x = 0;
    for (unsigned k = 0; k < w; k++)
        x |= (uint64_t)v[(size_t)k * n + j] << (8 * k);
    return x;
}
static inline uint64_t combine(uint64_t d, uint64_t v, int mode, unsigned w)
{
    uint64_t mask = w == 8 ? ~(uint64_t)0 : (((uint64_t)1 << (8 * w)) - 1);
    switch (mode) {
    case NP_M_XOR: return d ^ v;
    case NP_M_ADD: return (d + v) & mask;
    case NP_M_ZADD: return (d + ((v >> 1) ^ (0 - (v & 1)))) & mask;
    default: return v;
    }
}

/* Fast loops for the common layouts: plain (not planar, no esort) combine of k words. */
#define DEF_PLAIN(W, T, LD)                                                                         \
    static void plain##W(uint8_t *restrict d, const uint8_t *restrict v, size_t k, int mode)       \
    {                                                                                               \
        T a, b;                                                                                     \
        switch (mode) {                                                                             \
        case NP_M_REPLACE: memcpy(d, v, k * W); break;                                              \
        case NP_M_XOR: for (size_t i = 0; i < k * W; i++) d[i] ^= v[i]; break;                      \
        case NP_M_ADD:                                                                              \
            for (size_t i = 0; i < k; i++) {                                                        \
                memcpy(&a, d + i * W, W); memcpy(&b, v + i * W, W);                                 \
                a = (T)(a + b); memcpy(d + i * W, &a, W);                                           \
            }                                                                                       \
            break;                                                                                  \
        case NP_M_ZADD:                                                                             \
            for (size_t i = 0; i < k; i++) {                                                        \
                memcpy(&a, d + i * W, W); memcpy(&b, v + i * W, W);                                 \
                a = (T)(a + (T)((T)(b >> 1) ^ (T)(0u - (T)(b & 1u)))); memcpy(d + i * W, &a, W);    \
            }                                                                                       \
            break;                                                                                  \
        }                                                                                           \
    }
DEF_PLAIN(1, uint8_t, 0)
DEF_PLAIN(2, uint16_t, 0)
DEF_PLAIN(4, uint32_t, 0)
DEF_PLAIN(8, uint64_t, 0)

#if defined(__BYTE_ORDER__) && defined(__ORDER_BIG_ENDIAN__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define NP_BIG_ENDIAN 1
#endif

static void plain_combine(uint8_t *d, const uint8_t *v, size_t k, int mode, unsigned w)
{
#ifdef NP_BIG_ENDIAN
    for (size_t i = 0; i < k; i++)
        stw(d + i * w, w, combine(ldw(d + i * w, w), ldw(v + i * w, w), mode, w));
#else
    switch (w) {
    case 1: plain1(d, v, k, mode); break;
    case 2: plain2(d, v, k, mode); break;
    case 4: plain4(d, v, k, mode); break;
    default: plain8(d, v, k, mode); break;
    }
#endif
}

/* Planar, no esort: words j0..j0+k of a chunk of n words. */
static void planar_combine(uint8_t *d, const uint8_t *v, size_t n, size_t j0, size_t k, int mode, unsigned w)
{
    if (mode == NP_M_REPLACE || mode == NP_M_XOR) { /* byte-wise */
        for (unsigned b = 0; b < w; b++) {
            const uint8_t *src = v + (size_t)b * n + j0;
            uint8_t *dst = d + b;
            if (mode == NP_M_REPLACE)
                for (size_t i = 0; i < k; i++)
                    dst[i * w] = src[i];
            else
                for (size_t i = 0; i < k; i++)
                    dst[i * w] ^= src[i];
        }
        return;
    }
    for (size_t i = 0; i < k; i++)
        stw(d + i * w, w, combine(ldw(d + i * w, w), ldplanar(v, n, j0 + i, w), mode, w));
}

typedef struct vctx {
    nnp_ctx *ctx;
    const np_step_job *job;
    unsigned w;
    int mode, planar, esort;
    unsigned shift, mask;
    size_t *start; /* esort counting array (mask + 1) */
    uint8_t *dst;
    uint64_t unit_bytes;
} vctx;

static inline unsigned key_of(const uint8_t *old, unsigned w, unsigned shift, unsigned mask)
{
    unsigned top = w > 1 ? ((unsigned)old[w - 1] << 8 | old[w - 2]) : old[0];
    return (top >> shift) & mask;
}

/* The destination words of units u0..u0+nu: a callback per contiguous run. */
typedef struct unit_src {
    int kind; /* 0: contiguous from dst + pos; 1: indexed (rows/elements) */
    uint64_t pos;
    np_idx *it;
} unit_src;

/* Apply one chunk: n words of values at vals (plain or planar), to units of the chunk. */
static nnp_status apply_chunk(vctx *c, const uint8_t *vals, size_t nunits, uint64_t *idxbuf, np_idx *pre,
                              np_idx *it, uint64_t whole_pos)
{
    const unsigned w = c->w;
    const size_t uw = (size_t)(c->unit_bytes / w); /* words per unit */
    const size_t n = nunits * uw;
    nnp_status st;
    (void)idxbuf;
    if (c->esort) {
        /* histogram of the old words' keys, in position order */
        memset(c->start, 0, ((size_t)c->mask + 1) * sizeof *c->start);
        for (size_t u = 0; u < nunits; u++) {
            uint8_t *d;
            if (pre) {
                uint64_t pos;
                if ((st = np_idx_next(c->ctx, pre, &pos)))
                    return st;
                d = c->dst + pos * c->unit_bytes;
            } else {
                d = c->dst + whole_pos + u * c->unit_bytes;
            }
            for (size_t i = 0; i < uw; i++)
                c->start[key_of(d + i * w, w, c->shift, c->mask)]++;
        }
        size_t sum = 0;
        for (size_t k = 0; k <= c->mask; k++) {
            size_t x = c->start[k];
            c->start[k] = sum;
            sum += x;
        }
    }
    size_t j = 0; /* position in the chunk */
    for (size_t u = 0; u < nunits; u++) {
        uint8_t *d;
        if (it) {
            uint64_t pos;
            if ((st = np_idx_next(c->ctx, it, &pos)))
                return st;
            d = c->dst + pos * c->unit_bytes;
        } else {
            d = c->dst + whole_pos + u * c->unit_bytes;
        }
        if (!c->esort) {
            if (c->planar)
                planar_combine(d, vals, n, j, uw, c->mode, w);
            else
                plain_combine(d, vals + j * w, uw, c->mode, w);
        } else {
            for (size_t i = 0; i < uw; i++) {
                uint8_t *x = d + i * w;
                size_t src = c->start[key_of(x, w, c->shift, c->mask)]++;
                if (src >= n) /* cannot happen: the same keys were counted above */
                    return np_fail(c->ctx, NNP_KIND_PATCH_FORMAT, "esort: inconsistent keys");
                uint64_t v = c->planar ? ldplanar(vals, n, src, w) : ldw(vals + src * w, w);
                stw(x, w, combine(ldw(x, w), v, c->mode, w));
            }
        }
        j += uw;
    }
    return NNP_OK;
}

/* A wide chunk's buffer (rows of more than 2^20 elements, F64): an unlinked file in dir, mapped,
 * so it lives in the page cache rather than anonymous memory; NULL when that cannot be had. */
static uint8_t *map_scratch(const char *dir, size_t n)
{
    char path[4096];
    uint8_t *buf = NULL;
    snprintf(path, sizeof path, "%s/.nnpatch-scratch.XXXXXX", dir);
    int fd = mkstemp(path);
    if (fd < 0)
        return NULL;
    unlink(path);
    if (ftruncate(fd, (off_t)n) == 0) {
        void *mm = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (mm != MAP_FAILED)
            buf = mm;
    }
    close(fd);
    return buf;
}

/* What a step's section holds: units of unit_bytes each (rows, elements, or every element of the
 * tensor), and the bound of its index positions (0 when it has no index). */
static void step_units(const np_step_job *job, int indexed, unsigned w, uint64_t *units, uint64_t *unit_bytes,
                       uint64_t *bound)
{
    *bound = 0;
    *unit_bytes = w;
    *units = indexed ? job->op->count : job->numel;
    if (indexed && job->op->kind == NP_OP_ROWS) {
        *bound = job->shape[0];
        *unit_bytes = *bound ? job->nbytes / *bound : 0;
    } else if (indexed) {
        *bound = job->numel;
    }
}

nnp_status np_run_step(nnp_ctx *ctx, const np_step_job *job, uint8_t *dst)
{
    const np_op *op = job->op;
    const np_section *s = job->s;
    const np_patch *p = job->patch;
    if (op->kind == NP_OP_QROWS && s == &op->values) /* its own arithmetic on the old rows (qrows.c) */
        return np_run_qrows(ctx, job, dst);
    vctx c;
    memset(&c, 0, sizeof c);
    c.ctx = ctx;
    c.job = job;
    c.w = np_dtypes[job->dtype].size;
    c.mode = job->mode;
    c.planar = np_sec_has(s, NP_S_PLANES) && c.w > 1;
    c.esort = np_sec_has(s, NP_S_ESORT);
    c.dst = dst;
    char q[NP_QUOTE_MAX], where[300];
    np_quote(q, sizeof q, op->name, op->name_len);
    snprintf(where, sizeof where, "%s.%s", q, s == &op->base_values ? "base_values" : "values");
    if (c.esort) {
        if (np_dtypes[job->dtype].esort_shift < 0)
            return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: %s: stage 'esort' needs a floating-point dtype", p->name,
                           where);
        c.shift = (unsigned)np_dtypes[job->dtype].esort_shift;
        c.mask = np_dtypes[job->dtype].esort_mask;
    }
    int indexed = s == &op->values && (op->kind == NP_OP_ROWS || op->kind == NP_OP_ELEMENTS);
    uint64_t units, bound;
    step_units(job, indexed, c.w, &units, &c.unit_bytes, &bound);
    uint64_t total;
    if (np_mul(units, c.unit_bytes, &total) || total != s->size)
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: %s: section holds %llu bytes, the op needs %llu units of %llu",
                       p->name, where, (unsigned long long)s->size, (unsigned long long)units,
                       (unsigned long long)c.unit_bytes);
    nnp_status st;
    if (indexed && (st = np_idx_validate(ctx, p, op, bound, NULL, NULL)))
        return st;
    if (units == 0 || c.unit_bytes == 0) {
        np_secreader r;
        st = np_secreader_open(ctx, &r, p, s, where);
        if (!st)
            st = np_secreader_finish(ctx, &r);
        np_secreader_close(&r);
        return st;
    }
    uint64_t unit_elements = c.unit_bytes / c.w;
    uint64_t per = CHUNK_ELEMENTS / (unit_elements ? unit_elements : 1);
    if (!c.planar && !c.esort) /* chunks matter only to planes and esort: decode in small pieces */
        per = ((uint64_t)256 << 10) / c.unit_bytes;
    if (per < 1)
        per = 1;
    np_secreader r;
    np_idx it = {0}, pre = {0};
    int have_it = 0, have_pre = 0;
    uint8_t *buf = NULL;
    size_t scratch = 0;
    if ((st = np_secreader_open(ctx, &r, p, s, where)))
        goto out;
    if (indexed) {
        if ((st = np_idx_open(ctx, &it, p, op, bound)))
            goto out;
        have_it = 1;
        if (c.esort) {
            if ((st = np_idx_open(ctx, &pre, p, op, bound)))
                goto out;
            have_pre = 1;
        }
    }
    if (c.esort) {
        c.start = malloc(((size_t)c.mask + 1) * sizeof *c.start);
        if (!c.start) {
            st = np_fail(ctx, NNP_KIND_IO, "out of memory");
            goto out;
        }
    }
    uint64_t chunk_cap = (per < units ? per : units) * c.unit_bytes;
    if (r.zstd && chunk_cap > NP_SCRATCH_MIN && job->scratch_dir && chunk_cap < SIZE_MAX / 2 &&
        (buf = map_scratch(job->scratch_dir, (size_t)chunk_cap)))
        scratch = (size_t)chunk_cap;
    if (r.zstd && !buf) {
        if (chunk_cap > SIZE_MAX / 2 || !(buf = malloc((size_t)chunk_cap))) {
            st = np_fail(ctx, NNP_KIND_IO, "%s: %s: out of memory for a %llu-byte chunk", p->name, where,
                         (unsigned long long)chunk_cap);
            goto out;
        }
    }
    uint64_t done = 0, whole_pos = 0;
    while (done < units) {
        uint64_t nu = units - done < per ? units - done : per;
        size_t nb = (size_t)(nu * c.unit_bytes);
        const uint8_t *vals;
        if (r.zstd) {
            if ((st = np_secreader_read(ctx, &r, buf, nb)))
                goto out;
            vals = buf;
        } else {
            vals = np_secreader_view(&r, nb);
        }
        if ((st = apply_chunk(&c, vals, (size_t)nu, NULL, have_pre ? &pre : NULL, have_it ? &it : NULL, whole_pos)))
            goto out;
        done += nu;
        whole_pos += nb;
        if ((st = np_check_cancel(ctx)))
            goto out;
    }
    st = np_secreader_finish(ctx, &r);
out:
    if (scratch)
        munmap(buf, scratch);
    else
        free(buf);
    free(c.start);
    np_secreader_close(&r);
    if (have_it)
        np_idx_close(&it);
    if (have_pre)
        np_idx_close(&pre);
    return st;
}
