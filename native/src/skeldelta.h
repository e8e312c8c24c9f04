/*
 * An extents target's skeleton carried as a 'zstd-base' delta (format 1.5, spec/FORMAT.md 5.8):
 * skeldelta.c. Python twin: nnpatch/applier/skeleton.py and nnpatch/skeldelta.py.
 */
#ifndef NNP_SKELDELTA_H
#define NNP_SKELDELTA_H

#include <stddef.h>
#include <stdint.h>

#include "internal.h"
#include "patch.h"

/* The header rule of a 'zstd-base' target.skeleton: an extents base and target. */
nnp_status np_skel_check_codec(nnp_ctx *ctx, const np_patch *p);

/* Whether the skeleton of the chain ps[0..n)'s target is decoded against the first base's
 * skeleton (the last link's skeleton, and each link's before it back to the first, is a delta). */
int np_skel_needs_base(const np_patch *ps, size_t n);

/* The skeleton of ps[n-1]'s target (a new malloc'd buffer of target.skeleton.size bytes): whole,
 * or decoded against the skeleton of the link before (base_skel: the first base's, already
 * proven by the caller; NULL when np_skel_needs_base is 0). */
nnp_status np_skel_target(nnp_ctx *ctx, const np_patch *ps, size_t n, const uint8_t *base_skel, uint64_t base_len,
                          uint8_t **out);

#endif
