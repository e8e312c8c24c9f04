/*
 * A patch read from a stream (nnpatch-apply BASE - -o OUT): spooled to an unlinked temporary
 * file beside the output and checked as it arrives (magic, header, trailer hash), then opened
 * as a file. Python twin: nnpatch/patchfile/stream.py. It answers "is this stream a whole,
 * intact patch?".
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "blake3.h"
#include "fileio.h"
#include "stream.h"

#define HELD (NP_TRAILER + NP_SIGBLOCK)

static nnp_status write_all(nnp_ctx *ctx, int fd, const uint8_t *b, size_t n, const char *what)
{
    int err = np_write_all(fd, b, n);
    return err ? np_fail_errno(ctx, err, what, "cannot spool the patch") : NNP_OK;
}

/* What a stream's reader keeps while it arrives: the first NP_PREAMBLE bytes, the last HELD (the
 * trailer and signature block, not hashed), a hasher of everything before them. */
typedef struct sstate {
    const char *name;
    int fd;
    uint8_t tail[2 * HELD + 8], pre[NP_PREAMBLE];
    size_t tail_len, pre_len;
    uint64_t total;
    int header_checked;
    np_blake3 h;
} sstate;

static const uint8_t MAGIC[8] = {0x89, 'N', 'N', 'P', '\r', '\n', 0x1a, '\n'};

static nnp_status bad_magic(nnp_ctx *ctx, const sstate *s)
{
    if (memcmp(s->pre, MAGIC, s->pre_len < 8 ? s->pre_len : 8))
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: byte 0: not an nnpatch file (bad magic)", s->name);
    return NNP_OK;
}

/* The magic as soon as its bytes are in; the header as soon as it is whole (read back from the
 * spool and parsed: a wrong stream fails before the rest arrives). */
static nnp_status check_head(nnp_ctx *ctx, sstate *s)
{
    nnp_status st;
    if ((st = bad_magic(ctx, s)) || s->pre_len < NP_PREAMBLE)
        return st;
    uint64_t hl = np_le64(s->pre + 16);
    if (hl > NP_MAX_HEADER)
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: byte 16: header length %llu exceeds the %llu limit", s->name,
                       (unsigned long long)hl, (unsigned long long)NP_MAX_HEADER);
    if (s->total < NP_PREAMBLE + hl)
        return NNP_OK;
    uint8_t *hb = malloc(hl ? (size_t)hl : 1);
    if (!hb)
        return np_fail(ctx, NNP_KIND_IO, "out of memory");
    ssize_t g = pread(s->fd, hb, (size_t)hl, NP_PREAMBLE);
    np_patch tmp;
    memset(&tmp, 0, sizeof tmp);
    tmp.fd = -1;
    tmp.name = strdup(s->name);
    if (g != (ssize_t)hl)
        st = np_fail(ctx, NNP_KIND_IO, "%s: cannot read back the spooled header", s->name);
    else if (tmp.name)
        st = np_parse_header(ctx, hb, (size_t)hl, np_le32(s->pre + 12), &tmp);
    free(hb);
    np_patch_close(&tmp);
    if (!st)
        s->header_checked = 1;
    return st;
}

/* k more bytes: spooled, kept (preamble), hashed but for the last HELD. */
static nnp_status take(nnp_ctx *ctx, sstate *s, const uint8_t *buf, size_t k)
{
    nnp_status st;
    if ((st = write_all(ctx, s->fd, buf, k, s->name)))
        return st;
    s->total += k;
    if (s->pre_len < NP_PREAMBLE) {
        size_t c = NP_PREAMBLE - s->pre_len < k ? NP_PREAMBLE - s->pre_len : k;
        memcpy(s->pre + s->pre_len, buf, c);
        s->pre_len += c;
    }
    if (!s->header_checked && (st = check_head(ctx, s)))
        return st;
    if (k >= HELD) {
        np_blake3_update(&s->h, s->tail, s->tail_len);
        np_blake3_update(&s->h, buf, k - HELD);
        memcpy(s->tail, buf + k - HELD, HELD);
        s->tail_len = HELD;
    } else {
        memcpy(s->tail + s->tail_len, buf, k);
        s->tail_len += k;
        if (s->tail_len > HELD) {
            size_t extra = s->tail_len - HELD;
            np_blake3_update(&s->h, s->tail, extra);
            memmove(s->tail, s->tail + extra, HELD);
            s->tail_len = HELD;
        }
    }
    np_progress_total(ctx, k); /* the total grows while the stream arrives */
    return np_progress(ctx, k);
}

/* The end of the stream: long enough, and its trailer hash the digest of what came before. */
static nnp_status check_end(nnp_ctx *ctx, sstate *s)
{
    int signed_ = s->pre_len == NP_PREAMBLE && (np_le32(s->pre + 12) & NP_FLAG_SIGNED);
    size_t end = NP_TRAILER + (signed_ ? NP_SIGBLOCK : 0);
    nnp_status st;
    if (s->total < NP_PREAMBLE + end) {
        if (s->pre_len && !s->header_checked && (st = bad_magic(ctx, s)))
            return st;
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: stream cut off after %llu bytes", s->name,
                       (unsigned long long)s->total);
    }
    np_blake3_update(&s->h, s->tail, s->tail_len - end);
    uint8_t d[32];
    np_blake3_final(&s->h, d);
    if (memcmp(d, s->tail + s->tail_len - end, 32))
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT,
                       "%s: stream cut off or corrupt after %llu bytes: trailer hash mismatch", s->name,
                       (unsigned long long)s->total);
    return NNP_OK;
}

/* Spool one stream beside out_path, checking it as it arrives; opens it as *p. */
nnp_status np_spool(nnp_ctx *ctx, const nnp_source *src, const char *out_path, np_patch *p)
{
    sstate s;
    memset(&s, 0, sizeof s);
    s.name = src->name && strcmp(src->name, "-") ? src->name : "<stdin>";
    np_tmp t;
    nnp_status st = np_tmp_create(ctx, out_path, ".nnpatch-stdin.tmp", &t);
    if (st)
        return st;
    unlink(t.path); /* nothing is left on disk, whatever happens */
    s.fd = t.fd;
    t.fd = -1;
    np_tmp_abort(&t);
    s.header_checked = ctx->have_key; /* with a key nothing is parsed before the signature */
    np_blake3_init(&s.h);
    uint8_t *buf = malloc(1 << 20);
    if (!buf) {
        close(s.fd);
        return np_fail(ctx, NNP_KIND_IO, "out of memory");
    }
    for (;;) {
        if ((st = np_check_cancel(ctx)))
            goto fail;
        long long r = src->read(src->user, buf, 1 << 20);
        if (r < 0) {
            if (!(st = np_check_cancel(ctx)))
                st = np_fail(ctx, NNP_KIND_IO, "%s: cannot read", s.name);
            goto fail;
        }
        if (r == 0)
            break;
        if (r > (1 << 20)) {
            st = np_fail(ctx, NNP_KIND_IO, "%s: the read callback returned more than asked", s.name);
            goto fail;
        }
        if ((st = take(ctx, &s, buf, (size_t)r)))
            goto fail;
    }
    if ((st = check_end(ctx, &s)))
        goto fail;
    free(buf);
    return np_patch_open_fd(ctx, s.fd, s.name, 1, p);
fail:
    free(buf);
    close(s.fd);
    return st;
}
