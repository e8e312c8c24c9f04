/* Index formats: u32, u64, delta-varint and bitmap positions, validated as they stream
 * (spec/FORMAT.md section 7.4). Python twin: nnpatch/codecs.py (decode_indices, _varint_decode),
 * called the way nnpatch/applier/decode.py's decode_index calls it. */
#include <stdio.h>
#include <string.h>

#include "index.h"

/* ---- indices ----------------------------------------------------------------------------- */

#define IXFAIL(...) np_fail(ctx, NNP_KIND_PATCH_FORMAT, __VA_ARGS__)

nnp_status np_idx_open(nnp_ctx *ctx, np_idx *it, const np_patch *p, const np_op *op, uint64_t bound)
{
    memset(it, 0, sizeof *it);
    char q[NP_QUOTE_MAX];
    np_quote(q, sizeof q, op->name, op->name_len);
    snprintf(it->where, sizeof it->where, "%s.index", q);
    it->fmt = op->index.st[0];
    it->count = op->count;
    it->bound = bound;
    const np_section *s = &op->index;
    nnp_status st = np_secreader_open(ctx, &it->r, p, s, it->where);
    if (st)
        return st;
    uint64_t need;
    switch (it->fmt) {
    case NP_S_U32:
    case NP_S_U64: {
        unsigned w = it->fmt == NP_S_U32 ? 4 : 8;
        if (np_mul(op->count, w, &need) || need != s->size)
            return IXFAIL("%s: %s: %llu index bytes, %llu %s indices need %llu", p->name, it->where,
                          (unsigned long long)s->size, (unsigned long long)op->count, w == 4 ? "u32" : "u64",
                          (unsigned long long)(op->count * w));
        break;
    }
    case NP_S_BITMAP:
        need = bound / 8 + (bound % 8 != 0);
        if (need != s->size)
            return IXFAIL("%s: %s: bitmap is %llu bytes, %llu positions need %llu", p->name, it->where,
                          (unsigned long long)s->size, (unsigned long long)bound, (unsigned long long)need);
        break;
    case NP_S_VARINT:
        break;
    default:
        return np_fail(ctx, NNP_KIND_UNSUPPORTED_VERSION, "%s: %s: unknown index encoding", p->name, it->where);
    }
    return NNP_OK;
}

static nnp_status idx_byte(nnp_ctx *ctx, np_idx *it, uint8_t *b, int *eof)
{
    if (it->bpos == it->blen) {
        uint64_t left = it->r.size - it->r.produced;
        if (!left) {
            *eof = 1;
            return NNP_OK;
        }
        size_t k = left > sizeof it->buf ? sizeof it->buf : (size_t)left;
        nnp_status st = np_secreader_read(ctx, &it->r, it->buf, k);
        if (st)
            return st;
        it->blen = k;
        it->bpos = 0;
    }
    *eof = 0;
    *b = it->buf[it->bpos++];
    it->consumed++;
    return NNP_OK;
}

nnp_status np_idx_next(nnp_ctx *ctx, np_idx *it, uint64_t *pos)
{
    nnp_status st;
    uint64_t v = 0;
    int eof = 0;
    uint8_t b;
    const char *pn = it->r.pname;
    if (it->emitted >= it->count)
        return IXFAIL("%s: %s: more than %llu indices", pn, it->where, (unsigned long long)it->count);
    switch (it->fmt) {
    case NP_S_U32:
    case NP_S_U64: {
        unsigned w = it->fmt == NP_S_U32 ? 4 : 8;
        for (unsigned i = 0; i < w; i++) {
            if ((st = idx_byte(ctx, it, &b, &eof)))
                return st;
            if (eof)
                return IXFAIL("%s: %s: index data ends early", pn, it->where);
            v |= (uint64_t)b << (8 * i);
        }
        break;
    }
    case NP_S_VARINT: {
        uint64_t g = 0;
        unsigned n = 0;
        for (;;) {
            if ((st = idx_byte(ctx, it, &b, &eof)))
                return st;
            if (eof)
                return IXFAIL("%s: %s: varint stream holds fewer than %llu values", pn, it->where,
                              (unsigned long long)it->count);
            if (n == 9 && b > 1)
                return IXFAIL("%s: %s: varint exceeds 64 bits", pn, it->where);
            g |= (uint64_t)(b & 0x7f) << (7 * n);
            n++;
            if (!(b & 0x80))
                break;
            if (n == 10)
                return IXFAIL("%s: %s: varint exceeds 64 bits", pn, it->where);
        }
        if (it->emitted == 0)
            v = g;
        else if (np_add(it->prev, 1, &v) || np_add(v, g, &v))
            return IXFAIL("%s: %s: index out of range (bound %llu)", pn, it->where, (unsigned long long)it->bound);
        if (v >= it->bound)
            return IXFAIL("%s: %s: index out of range (bound %llu)", pn, it->where, (unsigned long long)it->bound);
        break;
    }
    case NP_S_BITMAP:
        for (;;) {
            if (!it->have_cur || it->bit == 8) {
                /* skip zero bytes quickly */
                for (;;) {
                    if ((st = idx_byte(ctx, it, &b, &eof)))
                        return st;
                    if (eof)
                        return IXFAIL("%s: %s: bitmap holds %llu indices, expected %llu", pn, it->where,
                                      (unsigned long long)it->emitted, (unsigned long long)it->count);
                    it->bytepos = it->consumed - 1;
                    if (b)
                        break;
                }
                it->cur = b;
                it->bit = 0;
                it->have_cur = 1;
            }
            while (it->bit < 8 && !(it->cur >> it->bit & 1))
                it->bit++;
            if (it->bit < 8) {
                v = it->bytepos * 8 + it->bit;
                it->bit++;
                break;
            }
        }
        if (v >= it->bound)
            return IXFAIL("%s: %s: bitmap has bits set past position %llu", pn, it->where,
                          (unsigned long long)it->bound);
        break;
    }
    if (v >= it->bound || (it->emitted && v <= it->prev))
        return IXFAIL("%s: %s: indices must be strictly increasing and below %llu", pn, it->where,
                      (unsigned long long)it->bound);
    it->prev = v;
    it->emitted++;
    *pos = v;
    return NNP_OK;
}

nnp_status np_idx_finish(nnp_ctx *ctx, np_idx *it)
{
    nnp_status st;
    uint8_t b;
    int eof = 0;
    const char *pn = it->r.pname;
    if (it->fmt == NP_S_BITMAP) {
        /* no more bits: the rest of the current byte and every later byte are zero */
        if (it->have_cur && it->bit < 8 && (it->cur >> it->bit))
            return IXFAIL("%s: %s: bitmap holds more than %llu indices", pn, it->where, (unsigned long long)it->count);
        for (;;) {
            if ((st = idx_byte(ctx, it, &b, &eof)))
                return st;
            if (eof)
                break;
            if (b) {
                uint64_t p = (it->consumed - 1) * 8;
                if (p >= it->bound || (p + 8 > it->bound && (b >> (it->bound - p))))
                    return IXFAIL("%s: %s: bitmap has bits set past position %llu", pn, it->where,
                                  (unsigned long long)it->bound);
                return IXFAIL("%s: %s: bitmap holds more than %llu indices", pn, it->where,
                              (unsigned long long)it->count);
            }
        }
    } else {
        if ((st = idx_byte(ctx, it, &b, &eof)))
            return st;
        if (!eof)
            return IXFAIL("%s: %s: varint stream holds more than %llu values", pn, it->where,
                          (unsigned long long)it->count);
    }
    return np_secreader_finish(ctx, &it->r);
}

void np_idx_close(np_idx *it) { np_secreader_close(&it->r); }

nnp_status np_idx_validate(nnp_ctx *ctx, const np_patch *p, const np_op *op, uint64_t bound, np_index_fn fn,
                           void *user)
{
    np_idx it;
    nnp_status st = np_idx_open(ctx, &it, p, op, bound);
    uint64_t piece[1024];
    size_t n = 0;
    for (uint64_t i = 0; !st && i < op->count; i++) {
        st = np_idx_next(ctx, &it, &piece[n++]);
        if (!st && n == 1024) {
            if (fn)
                st = fn(user, piece, n);
            n = 0;
            if (!st && (i & 0xffff) == 0)
                st = np_check_cancel(ctx);
        }
    }
    if (!st)
        st = np_idx_finish(ctx, &it);
    if (!st && n && fn)
        st = fn(user, piece, n);
    np_idx_close(&it);
    return st;
}

