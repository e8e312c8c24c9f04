/*
 * Index formats (spec/FORMAT.md section 7.4), streamed and validated: positions strictly
 * increasing and below a bound, exactly count of them. Python twin: nnpatch/codecs.py
 * (decode_indices).
 */
#ifndef NNP_INDEX_H
#define NNP_INDEX_H

#include "zstdframe.h"

/* Index iterator: positions strictly increasing and < bound, exactly count of them. */
typedef struct np_idx {
    np_secreader r;
    int fmt;
    uint64_t count, bound, emitted, prev;
    uint8_t buf[4096];
    size_t blen, bpos;
    uint64_t consumed; /* decoded bytes consumed */
    /* bitmap state */
    uint64_t bytepos;
    unsigned bit;
    uint8_t cur;
    int have_cur;
    char where[256];
} np_idx;

nnp_status np_idx_open(nnp_ctx *ctx, np_idx *it, const np_patch *p, const np_op *op, uint64_t bound);
/* The next position. */
nnp_status np_idx_next(nnp_ctx *ctx, np_idx *it, uint64_t *pos);
/* After count positions: nothing left. */
nnp_status np_idx_finish(nnp_ctx *ctx, np_idx *it);
void np_idx_close(np_idx *it);
/* Whole index decoded and validated, each piece of positions handed to fn (may be NULL). */
typedef nnp_status (*np_index_fn)(void *user, const uint64_t *idx, size_t n);
nnp_status np_idx_validate(nnp_ctx *ctx, const np_patch *p, const np_op *op, uint64_t bound, np_index_fn fn,
                           void *user);


#endif
