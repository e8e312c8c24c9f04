/*
 * zstd frames and section readers (spec/FORMAT.md section 7.3): one frame exactly filling a
 * section, its content size the section's size, read back in bounded memory. Python twin:
 * nnpatch/codecs.py.
 */
#ifndef NNP_ZSTDFRAME_H
#define NNP_ZSTDFRAME_H

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

/* The same for a 'zstd-base' section (1.5, skeldelta.c): the frame decoded with prefix (the base's
 * skeleton, prefix_len > 0) as its raw-content dictionary; the frame must name no dictionary ID. */
nnp_status np_section_decode_prefixed(nnp_ctx *ctx, const np_patch *p, const np_section *s, const char *where,
                                      const uint8_t *prefix, size_t prefix_len, uint8_t **out);
/* A 'zstd-base' section's frame rules only (--check without its base: the dictionary is not at hand). */
nnp_status np_section_check_frame(nnp_ctx *ctx, const np_patch *p, const np_section *s, const char *where);

/* Decode a section through (validation, nnp_check): every byte decoded, nothing kept. */
nnp_status np_section_drain(nnp_ctx *ctx, const np_patch *p, const np_section *s, const char *where);

#endif
