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
    while (n) {
        ssize_t w = write(fd, b, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return np_fail_errno(ctx, errno, what, "cannot spool the patch");
        b += w;
        n -= (size_t)w;
    }
    return NNP_OK;
}

/* Spool one stream beside out_path, checking it as it arrives; opens it as *p. */
nnp_status np_spool(nnp_ctx *ctx, const nnp_source *src, const char *out_path, np_patch *p)
{
    const char *name = src->name && strcmp(src->name, "-") ? src->name : "<stdin>";
    np_tmp t;
    nnp_status st = np_tmp_create(ctx, out_path, ".nnpatch-stdin.tmp", &t);
    if (st)
        return st;
    unlink(t.path); /* nothing is left on disk, whatever happens */
    int fd = t.fd;
    t.fd = -1;
    np_tmp_abort(&t);
    uint8_t *buf = malloc(1 << 20);
    uint8_t tail[2 * HELD + 8], pre[NP_PREAMBLE];
    size_t tail_len = 0, pre_len = 0;
    uint64_t total = 0;
    int header_checked = ctx->have_key; /* with a key nothing is parsed before the signature */
    np_blake3 h;
    np_blake3_init(&h);
    if (!buf) {
        close(fd);
        return np_fail(ctx, NNP_KIND_IO, "out of memory");
    }
    for (;;) {
        if ((st = np_check_cancel(ctx)))
            goto fail;
        long long r = src->read(src->user, buf, 1 << 20);
        if (r < 0) {
            if ((st = np_check_cancel(ctx)))
                goto fail;
            st = np_fail(ctx, NNP_KIND_IO, "%s: cannot read", name);
            goto fail;
        }
        if (r == 0)
            break;
        if (r > (1 << 20)) {
            st = np_fail(ctx, NNP_KIND_IO, "%s: the read callback returned more than asked", name);
            goto fail;
        }
        size_t k = (size_t)r;
        if ((st = write_all(ctx, fd, buf, k, name)))
            goto fail;
        total += k;
        if (pre_len < NP_PREAMBLE) {
            size_t c = NP_PREAMBLE - pre_len < k ? NP_PREAMBLE - pre_len : k;
            memcpy(pre + pre_len, buf, c);
            pre_len += c;
        }
        if (!header_checked) {
            static const uint8_t MAGIC[8] = {0x89, 'N', 'N', 'P', '\r', '\n', 0x1a, '\n'};
            if (memcmp(pre, MAGIC, pre_len < 8 ? pre_len : 8)) {
                st = np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: byte 0: not an nnpatch file (bad magic)", name);
                goto fail;
            }
            if (pre_len == NP_PREAMBLE) {
                uint64_t hl = np_le64(pre + 16);
                if (hl > NP_MAX_HEADER) {
                    st = np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: byte 16: header length %llu exceeds the %llu limit",
                                 name, (unsigned long long)hl, (unsigned long long)NP_MAX_HEADER);
                    goto fail;
                }
                if (total >= NP_PREAMBLE + hl) {
                    uint8_t *hb = malloc(hl ? (size_t)hl : 1);
                    if (!hb) {
                        st = np_fail(ctx, NNP_KIND_IO, "out of memory");
                        goto fail;
                    }
                    ssize_t g = pread(fd, hb, (size_t)hl, NP_PREAMBLE);
                    np_patch tmp;
                    memset(&tmp, 0, sizeof tmp);
                    tmp.fd = -1;
                    tmp.name = strdup(name);
                    if (g != (ssize_t)hl)
                        st = np_fail(ctx, NNP_KIND_IO, "%s: cannot read back the spooled header", name);
                    else if (tmp.name)
                        st = np_parse_header(ctx, hb, (size_t)hl, np_le32(pre + 12), &tmp);
                    free(hb);
                    np_patch_close(&tmp);
                    if (st)
                        goto fail;
                    header_checked = 1;
                }
            }
        }
        /* hash all but the last HELD bytes */
        if (k >= HELD) {
            np_blake3_update(&h, tail, tail_len);
            np_blake3_update(&h, buf, k - HELD);
            memcpy(tail, buf + k - HELD, HELD);
            tail_len = HELD;
        } else {
            memcpy(tail + tail_len, buf, k);
            tail_len += k;
            if (tail_len > HELD) {
                size_t extra = tail_len - HELD;
                np_blake3_update(&h, tail, extra);
                memmove(tail, tail + extra, HELD);
                tail_len = HELD;
            }
        }
        np_progress_total(ctx, k); /* the total grows while the stream arrives */
        if ((st = np_progress(ctx, k)))
            goto fail;
    }
    {
        int signed_ = pre_len == NP_PREAMBLE && (np_le32(pre + 12) & NP_FLAG_SIGNED);
        size_t end = NP_TRAILER + (signed_ ? NP_SIGBLOCK : 0);
        if (total < NP_PREAMBLE + end) {
            if (pre_len && !header_checked) {
                static const uint8_t MAGIC[8] = {0x89, 'N', 'N', 'P', '\r', '\n', 0x1a, '\n'};
                if (memcmp(pre, MAGIC, pre_len < 8 ? pre_len : 8)) {
                    st = np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: byte 0: not an nnpatch file (bad magic)", name);
                    goto fail;
                }
            }
            st = np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: stream cut off after %llu bytes", name,
                         (unsigned long long)total);
            goto fail;
        }
        np_blake3_update(&h, tail, tail_len - end);
        uint8_t d[32];
        np_blake3_final(&h, d);
        if (memcmp(d, tail + tail_len - end, 32)) {
            st = np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: stream cut off or corrupt after %llu bytes: trailer hash "
                         "mismatch", name, (unsigned long long)total);
            goto fail;
        }
    }
    free(buf);
    return np_patch_open_fd(ctx, fd, name, 1, p);
fail:
    free(buf);
    close(fd);
    return st;
}
