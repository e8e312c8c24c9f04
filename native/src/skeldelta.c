/*
 * An extents target's skeleton carried as a 'zstd-base' delta (format 1.5, spec/FORMAT.md 5.8).
 * Python twin: nnpatch/applier/skeleton.py (the chain walk) and nnpatch/skeldelta.py (the frame).
 *
 * A device model's skeleton (GGUF metadata, a TFLite flatbuffer with its scales and names) changes
 * little between versions, but whole it costs 1-5 KB of every patch. 'zstd-base' is one zstd frame
 * made with the base's skeleton as a raw-content prefix. The first link's base skeleton is the base
 * file's bytes outside base.extents, which extents.c reads once the file's digest is proven; a
 * later link's is the skeleton of the link before, whose target table must be this link's base one.
 */
#include <stdlib.h>
#include <string.h>

#include "extents.h"
#include "skeldelta.h"
#include "zstdframe.h"

#define PF(...) np_fail(ctx, NNP_KIND_PATCH_FORMAT, __VA_ARGS__)

nnp_status np_skel_check_codec(nnp_ctx *ctx, const np_patch *p)
{
    if (p->base.format != NP_FMT_EXTENTS || p->target.format != NP_FMT_EXTENTS)
        return PF("%s: header: target.skeleton.codec: 'zstd-base' needs an extents base and target", p->name);
    return NNP_OK;
}

int np_skel_needs_base(const np_patch *ps, size_t n)
{
    for (size_t k = n; k-- > 0;) {
        if (ps[k].target.format != NP_FMT_EXTENTS || !np_sec_zstd_base(&ps[k].target.skeleton))
            return 0;
        if (k == 0)
            return 1;
    }
    return 0;
}

/* Link k's base table is link k-1's target table, byte for byte (so link k-1's skeleton is its base's). */
static nnp_status same_table(nnp_ctx *ctx, const np_patch *before, const np_patch *p)
{
    uint8_t *a = NULL, *b = NULL;
    nnp_status st = NNP_OK;
    int same = before->target.format == NP_FMT_EXTENTS && p->base.format == NP_FMT_EXTENTS;
    if (same && !(st = np_section_decode_all(ctx, before, &before->target.extents, "target.extents", &a)) &&
        !(st = np_section_decode_all(ctx, p, &p->base.extents, "base.extents", &b)))
        same = before->target.extents.size == p->base.extents.size &&
               !memcmp(a, b, (size_t)p->base.extents.size);
    free(a);
    free(b);
    if (!st && !same)
        st = np_fail(ctx, NNP_KIND_BASE_MISMATCH,
                     "%s: its skeleton is a delta against a base the link before it does not make (base.extents "
                     "differs from that link's target.extents)", p->name);
    return st;
}

nnp_status np_skel_target(nnp_ctx *ctx, const np_patch *ps, size_t n, const uint8_t *base_skel, uint64_t base_len,
                          uint8_t **out)
{
    const np_patch *p = &ps[n - 1];
    *out = NULL;
    if (!np_sec_zstd_base(&p->target.skeleton))
        return np_section_decode_all(ctx, p, &p->target.skeleton, "target.skeleton", out);
    uint8_t *before = NULL;
    const uint8_t *dict = base_skel;
    uint64_t dict_len = base_len;
    nnp_status st = NNP_OK;
    if (n > 1) { /* the link before's skeleton, itself whole or a delta */
        if (!(st = same_table(ctx, &ps[n - 2], p)) && !(st = np_skel_target(ctx, ps, n - 1, base_skel, base_len,
                                                                             &before))) {
            dict = before;
            dict_len = ps[n - 2].target.skeleton.size;
        }
    }
    if (!st && (!dict || !dict_len))
        st = PF("%s: target.skeleton: a 'zstd-base' skeleton needs a base with a non-empty skeleton", p->name);
    if (!st)
        st = np_section_decode_prefixed(ctx, p, &p->target.skeleton, "target.skeleton", dict, (size_t)dict_len, out);
    free(before);
    return st;
}
