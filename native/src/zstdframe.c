/* zstd frames and section readers (spec/FORMAT.md section 7.3). Python twin: nnpatch/codecs.py
 * (zstd_frame_length, _check_zstd, decoded_chunks). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "zstdframe.h"

/* ---- zstd framing --------------------------------------------------------------------- */

int np_zstd_frame_length(const uint8_t *buf, size_t len, uint64_t *out, const char **why, char *whybuf,
                         size_t whylen)
{
    static const uint8_t ZM[4] = {0x28, 0xb5, 0x2f, 0xfd};
    if (len < 4 || memcmp(buf, ZM, 4)) {
        *why = "zstd section does not start with a zstd frame";
        return -1;
    }
    if (len < 5) {
        snprintf(whybuf, whylen, "invalid zstd frame header: Src size is incorrect");
        *why = whybuf;
        return -1;
    }
    /* RFC 8878 3.1.1.1: magic, descriptor, [window descriptor], [dictionary id], [content size] */
    static const unsigned did[4] = {0, 1, 2, 4}, fcs[4] = {0, 2, 4, 8};
    unsigned fhd = buf[4], single = (fhd >> 5) & 1;
    size_t hs = 5 + !single + did[fhd & 3] + (fhd >> 6 == 0 ? single : fcs[fhd >> 6]);
    uint64_t pos = hs;
    uint8_t descriptor = buf[4];
    for (;;) {
        if (pos + 3 > len) {
            *why = "zstd frame truncated";
            return -1;
        }
        uint32_t b = (uint32_t)buf[pos] | (uint32_t)buf[pos + 1] << 8 | (uint32_t)buf[pos + 2] << 16;
        uint32_t last = b & 1, btype = (b >> 1) & 3, bsize = b >> 3;
        if (btype == 3) {
            *why = "zstd frame uses a reserved block type";
            return -1;
        }
        pos += 3 + (btype == 1 ? 1 : bsize);
        if (last)
            break;
    }
    if (descriptor & 0x04)
        pos += 4;
    if (pos > len) {
        *why = "zstd frame truncated";
        return -1;
    }
    *out = pos;
    return 0;
}

/* ---- section reader -------------------------------------------------------------------- */

#define SRFAIL(...) np_fail(ctx, NNP_KIND_PATCH_FORMAT, __VA_ARGS__)

/* prefixed: the caller gives a zstd-base section its base skeleton (np_section_decode_prefixed). */
static nnp_status open_reader(nnp_ctx *ctx, np_secreader *r, const np_patch *p, const np_section *s, const char *where,
                              int prefixed)
{
    memset(r, 0, sizeof *r);
    r->src = np_sec_ptr(p, s);
    r->srclen = s->length;
    r->size = s->size;
    r->zstd = np_sec_zstd(s);
    r->pname = p->name;
    snprintf(r->where, sizeof r->where, "%s", where);
    if (!r->zstd) {
        if (s->length != s->size)
            return SRFAIL("%s: %s: section is %llu bytes, expected %llu", p->name, where, (unsigned long long)s->length,
                          (unsigned long long)s->size);
        return NNP_OK;
    }
    uint64_t flen;
    const char *why;
    char wb[160];
    if (np_zstd_frame_length(r->src, (size_t)r->srclen, &flen, &why, wb, sizeof wb))
        return SRFAIL("%s: %s: %s", p->name, where, why);
    if (flen != r->srclen)
        return SRFAIL("%s: %s: %llu bytes after the zstd frame", p->name, where, (unsigned long long)(r->srclen - flen));
    unsigned long long cs = ZSTD_getFrameContentSize(r->src, (size_t)r->srclen);
    if (cs == ZSTD_CONTENTSIZE_ERROR)
        return SRFAIL("%s: %s: invalid zstd frame header", p->name, where);
    if (cs == ZSTD_CONTENTSIZE_UNKNOWN)
        return SRFAIL("%s: %s: zstd frame declares -1 bytes, section size is %llu", p->name, where,
                      (unsigned long long)s->size);
    if (cs != s->size)
        return SRFAIL("%s: %s: zstd frame declares %llu bytes, section size is %llu", p->name, where, cs,
                      (unsigned long long)s->size);
    if (np_sec_zstd_base(s) && !prefixed) /* never decoded without its dictionary: wrong bytes, or none */
        return SRFAIL("%s: %s: a 'zstd-base' section decodes against the base's skeleton only", p->name, where);
    if (np_sec_zstd_base(s) && (r->src[4] & 3)) /* a raw-content prefix has no ID; none other is defined */
        return SRFAIL("%s: %s: a 'zstd-base' frame must not name a dictionary ID", p->name, where);
    r->ds = ZSTD_createDStream();
    if (!r->ds)
        return np_fail(ctx, NNP_KIND_IO, "%s: %s: out of memory for a zstd decoder", p->name, where);
    ZSTD_initDStream(r->ds);
    r->in.src = r->src;
    r->in.size = (size_t)r->srclen;
    r->in.pos = 0;
    return NNP_OK;
}

nnp_status np_secreader_open(nnp_ctx *ctx, np_secreader *r, const np_patch *p, const np_section *s,
                             const char *where)
{
    return open_reader(ctx, r, p, s, where, 0);
}

nnp_status np_secreader_read(nnp_ctx *ctx, np_secreader *r, uint8_t *buf, size_t n)
{
    if (n > r->size - r->produced)
        return SRFAIL("%s: %s: zstd data ends early", r->pname, r->where);
    if (!r->zstd) {
        memcpy(buf, r->src + r->produced, n);
        r->produced += n;
        return NNP_OK;
    }
    ZSTD_outBuffer out = {buf, n, 0};
    while (out.pos < n) {
        size_t before_in = r->in.pos, before_out = out.pos;
        size_t ret = ZSTD_decompressStream(r->ds, &out, &r->in);
        if (ZSTD_isError(ret))
            return SRFAIL("%s: %s: corrupt zstd data: %s", r->pname, r->where, ZSTD_getErrorName(ret));
        r->frame_done = ret == 0;
        if (out.pos < n && r->frame_done)
            return SRFAIL("%s: %s: zstd data ends early", r->pname, r->where);
        if (out.pos < n && r->in.pos == before_in && out.pos == before_out)
            return SRFAIL("%s: %s: zstd data ends early", r->pname, r->where);
        if (ret == 0 && out.pos < n && r->in.pos >= r->in.size)
            return SRFAIL("%s: %s: zstd data ends early", r->pname, r->where);
    }
    r->produced += n;
    return NNP_OK;
}

const uint8_t *np_secreader_view(np_secreader *r, size_t n)
{
    const uint8_t *p = r->src + r->produced;
    r->produced += n;
    return p;
}

nnp_status np_secreader_finish(nnp_ctx *ctx, np_secreader *r)
{
    if (!r->zstd || (r->frame_done && r->in.pos == r->in.size))
        return NNP_OK;
    uint8_t b[1];
    ZSTD_outBuffer out = {b, 1, 0};
    for (;;) {
        size_t before = r->in.pos;
        size_t ret = ZSTD_decompressStream(r->ds, &out, &r->in);
        if (ZSTD_isError(ret))
            return SRFAIL("%s: %s: corrupt zstd data: %s", r->pname, r->where, ZSTD_getErrorName(ret));
        if (out.pos)
            return SRFAIL("%s: %s: zstd data longer than expected", r->pname, r->where);
        if (ret == 0)
            return r->in.pos == r->in.size ? NNP_OK
                                            : SRFAIL("%s: %s: zstd data longer than expected", r->pname, r->where);
        if (r->in.pos == before)
            return SRFAIL("%s: %s: corrupt zstd data: frame incomplete", r->pname, r->where);
    }
}

void np_secreader_close(np_secreader *r)
{
    if (r->ds)
        ZSTD_freeDStream(r->ds);
    r->ds = NULL;
}

static nnp_status decode_all(nnp_ctx *ctx, const np_patch *p, const np_section *s, const char *where,
                             const uint8_t *prefix, size_t prefix_len, uint8_t **out)
{
    *out = NULL;
    np_secreader r;
    nnp_status st = open_reader(ctx, &r, p, s, where, prefix != NULL);
    if (!st && prefix) { /* the base's skeleton as a raw-content prefix: Python's DICT_TYPE_RAWCONTENT */
        size_t e = ZSTD_DCtx_refPrefix(r.ds, prefix, prefix_len);
        if (ZSTD_isError(e))
            st = SRFAIL("%s: %s: cannot use the base's skeleton: %s", p->name, where, ZSTD_getErrorName(e));
    }
    if (st) {
        np_secreader_close(&r);
        return st;
    }
    if (s->size > ((uint64_t)1 << 40)) {
        np_secreader_close(&r);
        return SRFAIL("%s: %s: %llu bytes is too large", p->name, where, (unsigned long long)s->size);
    }
    uint8_t *buf = malloc(s->size ? (size_t)s->size : 1);
    if (!buf) {
        np_secreader_close(&r);
        return np_fail(ctx, NNP_KIND_IO, "%s: %s: out of memory for %llu bytes", p->name, where,
                       (unsigned long long)s->size);
    }
    st = np_secreader_read(ctx, &r, buf, (size_t)s->size);
    if (!st)
        st = np_secreader_finish(ctx, &r);
    np_secreader_close(&r);
    if (st) {
        free(buf);
        return st;
    }
    *out = buf;
    return NNP_OK;
}

nnp_status np_section_decode_all(nnp_ctx *ctx, const np_patch *p, const np_section *s, const char *where,
                                 uint8_t **out)
{
    return decode_all(ctx, p, s, where, NULL, 0, out);
}

nnp_status np_section_decode_prefixed(nnp_ctx *ctx, const np_patch *p, const np_section *s, const char *where,
                                      const uint8_t *prefix, size_t prefix_len, uint8_t **out)
{
    return decode_all(ctx, p, s, where, prefix, prefix_len, out);
}

nnp_status np_section_check_frame(nnp_ctx *ctx, const np_patch *p, const np_section *s, const char *where)
{
    np_secreader r;
    nnp_status st = open_reader(ctx, &r, p, s, where, 1);
    np_secreader_close(&r);
    return st;
}

nnp_status np_section_drain(nnp_ctx *ctx, const np_patch *p, const np_section *s, const char *where)
{
    np_secreader r;
    nnp_status st = np_secreader_open(ctx, &r, p, s, where);
    if (!st && r.zstd) {
        uint8_t *buf = malloc(1 << 20);
        if (!buf)
            st = np_fail(ctx, NNP_KIND_IO, "out of memory");
        uint64_t left = s->size;
        while (!st && left) {
            size_t k = left > (1u << 20) ? (1u << 20) : (size_t)left;
            st = np_secreader_read(ctx, &r, buf, k);
            left -= k;
            if (!st)
                st = np_check_cancel(ctx);
        }
        if (!st)
            st = np_secreader_finish(ctx, &r);
        free(buf);
    }
    np_secreader_close(&r);
    return st;
}

