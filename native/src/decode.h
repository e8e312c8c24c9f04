/*
 * Value stages (spec/FORMAT.md sections 7.1, 7.2 and 7.5): xor/add/zadd deltas, esort, byte
 * planes and quantized rows, undone chunk by chunk in bounded memory onto a tensor's bytes.
 * Python twin: nnpatch/applier/decode.py.
 */
#ifndef NNP_DECODE_H
#define NNP_DECODE_H

#include "index.h"

/* Modes of combining a values word with the current word. */
enum { NP_M_REPLACE = 0, NP_M_XOR, NP_M_ADD, NP_M_ZADD };
int np_mode_of(const np_section *s); /* from its delta stage */

/* One step: section s of op (values or base_values) applied onto dst, the bytes of the tensor
 * described by (dtype, rank, shape, nbytes) that holds the current bytes (anything when mode is
 * REPLACE over a whole). For rows and elements the index is validated first. */
typedef struct np_step_job {
    const np_patch *patch;
    const np_op *op;
    const np_section *s;
    int mode;
    int dtype;
    unsigned rank;
    const uint64_t *shape;
    uint64_t numel, nbytes;
    const char *scratch_dir; /* where a chunk buffer above NP_SCRATCH_MIN goes (an unlinked file, mapped:
                                page cache, not anonymous memory); NULL: the heap */
} np_step_job;
#define NP_SCRATCH_MIN ((uint64_t)4 << 20)
nnp_status np_run_step(nnp_ctx *ctx, const np_step_job *job, uint8_t *dst);

/* qrows (format 1.3, FORMAT.md 7.5; qrows.c). np_run_step runs a qrows op's values through
 * np_run_qrows: index validated, every scale finite, then the changed rows rebuilt in place from
 * their old words, a piece at a time. */
nnp_status np_run_qrows(nnp_ctx *ctx, const np_step_job *job, uint8_t *dst);
/* What nnp_check checks of a qrows op without a base: finite scales, zero padding nibbles. */
nnp_status np_qrows_check(nnp_ctx *ctx, const np_patch *p, const np_op *op);
/* The arithmetic on n words of dtype (F32, BF16 or F16, little-endian) with one scale and n codes. */
void np_qrows_apply_words(int dtype, uint8_t *words, size_t n, float scale, const int8_t *codes);

#endif
