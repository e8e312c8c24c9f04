/*
 * Codecs (spec/FORMAT.md section 7): zstd frames, section readers, index formats
 * and the value stages (xor/add/zadd deltas, esort, byte planes), undone chunk by
 * chunk in bounded memory, as nnpatch/codecs.py and nnpatch/applier/decode.py do.
 */
#ifndef NNP_CODEC_H
#define NNP_CODEC_H

#include <stddef.h>
#include <stdint.h>
#include <zstd.h>

#include "patch.h"

/* Length of the single zstd frame at buf (walked block by block, as codecs.zstd_frame_length).
 * 0 and *out, or -1 with *why set to a static reason. */
int np_zstd_frame_length(const uint8_t *buf, size_t len, uint64_t *out, const char **why, char *whybuf,
                         size_t whylen);

/* Sequential reader of a section's decoded bytes (zstd undone where the codec ends in zstd). */
typedef struct np_secreader {
    const uint8_t *src;
    uint64_t srclen, size, produced;
    int zstd;
    int frame_done;
    ZSTD_DStream *ds;
    ZSTD_inBuffer in;
    char where[256];
    const char *pname;
} np_secreader;

/* Checks the frame (one frame exactly filling the section, content size == size). */
nnp_status np_secreader_open(nnp_ctx *ctx, np_secreader *r, const np_patch *p, const np_section *s,
                             const char *where);
/* Exactly n bytes into buf ("zstd data ends early" otherwise). */
nnp_status np_secreader_read(nnp_ctx *ctx, np_secreader *r, uint8_t *buf, size_t n);
/* Zero-copy view of the next n bytes of a raw (non-zstd) section. */
const uint8_t *np_secreader_view(np_secreader *r, size_t n);
/* At the end: no more data ("zstd data longer than expected"). */
nnp_status np_secreader_finish(nnp_ctx *ctx, np_secreader *r);
void np_secreader_close(np_secreader *r);

/* Decode a whole small section into a new malloc'd buffer (layouts, headers). */
nnp_status np_section_decode_all(nnp_ctx *ctx, const np_patch *p, const np_section *s, const char *where,
                                 uint8_t **out);

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

/* Decode a section through (validation, nnp_check): every byte decoded, nothing kept. */
nnp_status np_section_drain(nnp_ctx *ctx, const np_patch *p, const np_section *s, const char *where);

#endif
