/*
 * Extents models (format 1.4, spec/FORMAT.md section 5.8): extents.c. Python twin:
 * nnpatch/weights/extents.py and nnpatch/applier/targets.py (_build_extents).
 */
#ifndef NNP_EXTENTS_H
#define NNP_EXTENTS_H

#include <stddef.h>

#include "internal.h"
#include "patch.h"
#include "safetensors.h"

/* Apply the open patches ps[0..n) (taken over: closed, also on failure) to the extents base at
 * base_path, writing the target file at out_path: one patch, extents base and target. */
nnp_status np_extents_apply(nnp_ctx *ctx, const char *base_path, np_patch *ps, size_t n, const char *out_path);

/* What apply checks of an extents patch before it reads the base (--check): the tables (spec 5.8)
 * and the target's against its layout, output and skeleton sizes. */
nnp_status np_extents_check(nnp_ctx *ctx, const np_patch *p);

/* The base's tensors (an extents base of base_size bytes) as an np_st: each at its extent, with
 * the dtype and shape the patch gives it; owns its names and shapes. */
nnp_status np_extents_base_st(nnp_ctx *ctx, const np_patch *p, uint64_t base_size, const char *base_path,
                              np_st *out);

/* --check --base: a 'zstd-base' skeleton (1.5) decoded against the base file mapped at map (proven
 * by its digest first, as apply does); NNP_OK for any other patch. */
nnp_status np_extents_check_skeleton(nnp_ctx *ctx, const np_patch *p, const uint8_t *map, uint64_t size,
                                     const char *base_path);

/* Whether any of the patches has an extents base or target (that apply routes to np_extents_apply). */
static inline int np_extents_any(const np_patch *ps, size_t n)
{
    for (size_t k = 0; k < n; k++)
        if (ps[k].base.format == NP_FMT_EXTENTS || ps[k].target.format == NP_FMT_EXTENTS)
            return 1;
    return 0;
}

#endif
