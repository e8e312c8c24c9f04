/* JSON writer (jsonw.c): a growing byte buffer and the pieces of a json.dumps text with
 * ensure_ascii=True. Python twin: nnpatch/applier/journal.py (encode_header). */
#ifndef NNP_JSONW_H
#define NNP_JSONW_H

#include <stddef.h>
#include <stdint.h>

/* A growing buffer; oom is set (and later writes ignored) once memory runs out. Zero-initialize;
 * the caller frees p. */
typedef struct npw_buf {
    uint8_t *p;
    size_t len, cap;
    int oom;
} npw_buf;

void npw_put(npw_buf *b, const void *s, size_t n);
void npw_str(npw_buf *b, const char *s);
void npw_u64(npw_buf *b, uint64_t v);
/* A 32-byte digest as a quoted string of 64 lowercase hex digits. */
void npw_hex32(npw_buf *b, const uint8_t d[32]);
/* A JSON string as Python's json.dumps writes it with ensure_ascii=True. */
void npw_string(npw_buf *b, const char *s, size_t n);

#endif
