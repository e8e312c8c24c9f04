/* JSON writer: the bytes Python's json.dumps(obj, sort_keys=True, separators=(",", ":")) writes
 * (ensure_ascii), for the journal header. Python twin: nnpatch/applier/journal.py (encode_header);
 * the reader side is json.c (nnpatch/_json.py). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blake3.h"
#include "jsonw.h"

void npw_put(npw_buf *b, const void *s, size_t n)
{
    if (b->oom)
        return;
    if (n > SIZE_MAX - b->len) {
        b->oom = 1;
        return;
    }
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n) {
            if (cap > SIZE_MAX / 2) {
                b->oom = 1;
                return;
            }
            cap *= 2;
        }
        uint8_t *q = realloc(b->p, cap);
        if (!q) {
            b->oom = 1;
            return;
        }
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
}
void npw_str(npw_buf *b, const char *s) { npw_put(b, s, strlen(s)); }
void npw_u64(npw_buf *b, uint64_t v)
{
    char t[24];
    int n = snprintf(t, sizeof t, "%llu", (unsigned long long)v);
    npw_put(b, t, (size_t)n);
}
void npw_hex32(npw_buf *b, const uint8_t d[32])
{
    char h[65];
    np_hex(d, 32, h);
    npw_put(b, "\"", 1);
    npw_put(b, h, 64);
    npw_put(b, "\"", 1);
}
static void u16esc(npw_buf *b, unsigned v)
{
    char t[8];
    snprintf(t, sizeof t, "\\u%04x", v & 0xffffu);
    npw_put(b, t, 6);
}

/* A JSON string as Python's json.dumps writes it with ensure_ascii=True. */
void npw_string(npw_buf *b, const char *s, size_t n)
{
    const uint8_t *p = (const uint8_t *)s;
    npw_put(b, "\"", 1);
    size_t i = 0;
    while (i < n) {
        uint32_t c = p[i];
        size_t len = 1;
        if (c >= 0x80) { /* decode UTF-8 (the names come from a strictly parsed header: valid) */
            if ((c & 0xe0) == 0xc0 && i + 1 < n) {
                c = (c & 0x1f) << 6 | (p[i + 1] & 0x3f);
                len = 2;
            } else if ((c & 0xf0) == 0xe0 && i + 2 < n) {
                c = (c & 0x0f) << 12 | (uint32_t)(p[i + 1] & 0x3f) << 6 | (p[i + 2] & 0x3f);
                len = 3;
            } else if ((c & 0xf8) == 0xf0 && i + 3 < n) {
                c = (c & 0x07) << 18 | (uint32_t)(p[i + 1] & 0x3f) << 12 | (uint32_t)(p[i + 2] & 0x3f) << 6 |
                    (p[i + 3] & 0x3f);
                len = 4;
            } else {
                c = 0xfffd;
            }
        }
        i += len;
        switch (c) {
        case '"': npw_str(b, "\\\""); continue;
        case '\\': npw_str(b, "\\\\"); continue;
        case '\n': npw_str(b, "\\n"); continue;
        case '\r': npw_str(b, "\\r"); continue;
        case '\t': npw_str(b, "\\t"); continue;
        case '\b': npw_str(b, "\\b"); continue;
        case '\f': npw_str(b, "\\f"); continue;
        default: break;
        }
        if (c >= 0x20 && c <= 0x7e) {
            char ch = (char)c;
            npw_put(b, &ch, 1);
        } else if (c < 0x10000) {
            u16esc(b, c);
        } else {
            uint32_t v = c - 0x10000;
            u16esc(b, 0xd800 | (v >> 10));
            u16esc(b, 0xdc00 | (v & 0x3ff));
        }
    }
    npw_put(b, "\"", 1);
}
