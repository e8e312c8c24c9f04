/*
 * The patch container (spec/FORMAT.md sections 4, 6 and 12): preamble, trailer hash and
 * signature, then the header (header.c), then every section's placement, alignment and zero
 * padding. Python twin: nnpatch/patchfile/reader.py (Patch, parse_patch, _check_layout).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blake3.h"
#include "patch.h"
#include "sign.h"

static const uint8_t MAGIC[8] = {0x89, 'N', 'N', 'P', '\r', '\n', 0x1a, '\n'};

/* ---- container ---------------------------------------------------------------------- */

static nnp_status check_zero(nnp_ctx *ctx, const np_patch *p, uint64_t begin, uint64_t end)
{
    for (uint64_t i = begin; i < end; i++)
        if (p->map[i])
            return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: byte %llu: padding bytes %llu..%llu are not zero", p->name,
                           (unsigned long long)begin, (unsigned long long)begin, (unsigned long long)end);
    return NNP_OK;
}

/* Where the next section (or the trailer) starts after `cursor` (FORMAT.md section 6). */
static uint64_t place(const np_patch *p, uint64_t cursor)
{
    return p->packed ? cursor : np_align64(cursor);
}

static nnp_status check_one(nnp_ctx *ctx, const np_patch *p, const np_section *s, uint64_t *cursor)
{
    if (!s->present)
        return NNP_OK;
    uint64_t a = place(p, *cursor);
    if (s->offset != a)
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT,
                       "%s: section at offset %llu is out of place (expected %llu): sections must follow the header "
                       "in order, each %s",
                       p->name, (unsigned long long)s->offset, (unsigned long long)a,
                       p->packed ? "right after the one before (packed-sections)" : "at the next 64-byte boundary");
    if (s->offset + s->length > p->end - NP_TRAILER)
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: section at offset %llu runs past the end of the data", p->name,
                       (unsigned long long)s->offset);
    if (np_sec_zstd(s)) {
        if (s->length == 0)
            return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: section at offset %llu: empty zstd section", p->name,
                           (unsigned long long)s->offset);
        if (s->size > NP_ZSTD_EXPANSION * s->length + (1u << 17))
            return np_fail(ctx, NNP_KIND_PATCH_FORMAT,
                           "%s: section at offset %llu: size %llu is more than zstd can expand %llu bytes to", p->name,
                           (unsigned long long)s->offset, (unsigned long long)s->size, (unsigned long long)s->length);
    } else if (s->length != s->size) {
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT,
                       "%s: section at offset %llu: stored raw, so length %llu must equal size %llu", p->name,
                       (unsigned long long)s->offset, (unsigned long long)s->length, (unsigned long long)s->size);
    }
    nnp_status st = check_zero(ctx, p, *cursor, s->offset);
    if (st)
        return st;
    *cursor = s->offset + s->length;
    return NNP_OK;
}

static nnp_status check_placement(nnp_ctx *ctx, np_patch *p)
{
    uint64_t cursor = NP_PREAMBLE + p->header_len;
    nnp_status st;
    if ((st = check_one(ctx, p, &p->base.extents, &cursor)) || (st = check_one(ctx, p, &p->base.layout, &cursor)) ||
        (st = check_one(ctx, p, &p->target.extents, &cursor)) || (st = check_one(ctx, p, &p->target.layout, &cursor)) ||
        (st = check_one(ctx, p, &p->target.skeleton, &cursor)))
        return st;
    for (size_t i = 0; i < p->target.nfiles; i++)
        if ((st = check_one(ctx, p, &p->target.files[i].layout, &cursor)) ||
            (st = check_one(ctx, p, &p->target.files[i].content, &cursor)))
            return st;
    for (size_t i = 0; i < p->nops; i++)
        if ((st = check_one(ctx, p, &p->ops[i].index, &cursor)) || (st = check_one(ctx, p, &p->ops[i].scales, &cursor)) ||
            (st = check_one(ctx, p, &p->ops[i].values, &cursor)) ||
            (st = check_one(ctx, p, &p->ops[i].base_values, &cursor)))
            return st;
    uint64_t end = place(p, cursor);
    if (end != p->end - NP_TRAILER)
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: file is %llu bytes, its sections end at %llu (+32 trailer)%s",
                       p->name, (unsigned long long)p->end, (unsigned long long)end,
                       p->end - NP_TRAILER > end ? ": trailing bytes" : ": truncated");
    return check_zero(ctx, p, cursor, end);
}

static nnp_status parse_container(nnp_ctx *ctx, np_patch *p, int trailer_checked)
{
    const uint8_t *b = p->map;
    uint64_t size = p->file_size;
    if (size < NP_PREAMBLE) {
        size_t n = size < 8 ? (size_t)size : 8;
        if (n && memcmp(b, MAGIC, n))
            return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: byte 0: not an nnpatch file (bad magic)", p->name);
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: truncated: %llu bytes, the preamble alone is %d", p->name,
                       (unsigned long long)size, NP_PREAMBLE);
    }
    if (memcmp(b, MAGIC, 8)) {
        char q[64];
        np_quote(q, sizeof q, (const char *)b, 8);
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: byte 0: not an nnpatch file (bad magic b%s, expected b'\\x89NNP\\r\\n\\x1a\\n')",
                       p->name, q);
    }
    p->major = np_le16(b + 8);
    p->minor = np_le16(b + 10);
    p->flags = np_le32(b + 12);
    p->header_len = np_le64(b + 16);
    if (p->major != NNP_FORMAT_MAJOR)
        return np_fail(ctx, NNP_KIND_UNSUPPORTED_VERSION,
                       "%s: byte 8: unsupported format version %u.%u (this nnpatch reads %d.x)", p->name, p->major,
                       p->minor, NNP_FORMAT_MAJOR);
    if (p->flags & NP_RESERVED_FLAGS)
        return np_fail(ctx, NNP_KIND_UNSUPPORTED_VERSION, "%s: byte 12: reserved flag bits set (0x%04x)", p->name,
                       (unsigned)(p->flags & NP_RESERVED_FLAGS));
    uint64_t sig = p->flags & NP_FLAG_SIGNED ? NP_SIGBLOCK : 0;
    if (size < NP_PREAMBLE + NP_TRAILER + sig)
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: truncated: %llu bytes, no room for the trailer", p->name,
                       (unsigned long long)size);
    p->end = size - sig;
    memcpy(p->trailer, b + p->end - NP_TRAILER, 32);
    if (!trailer_checked) {
        uint8_t h[32];
        np_blake3_hash(b, (size_t)(p->end - NP_TRAILER), h);
        if (memcmp(h, p->trailer, 32))
            return np_fail(ctx, NNP_KIND_PATCH_FORMAT,
                           "%s: byte %llu: trailer hash mismatch: the file is corrupt or truncated", p->name,
                           (unsigned long long)(p->end - NP_TRAILER));
    }
    nnp_status st;
    if (ctx->have_key && (st = np_sign_check(ctx, p->name, p->trailer, sig ? b + p->end : NULL)))
        return st;
    if (p->header_len > NP_MAX_HEADER)
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: byte 16: header length %llu exceeds the %llu limit", p->name,
                       (unsigned long long)p->header_len, (unsigned long long)NP_MAX_HEADER);
    if (NP_PREAMBLE + p->header_len > p->end - NP_TRAILER)
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT,
                       "%s: byte 16: truncated: header length %llu runs past the end of the file", p->name,
                       (unsigned long long)p->header_len);
    if ((NP_PREAMBLE + p->header_len) % 64)
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: byte 16: header length %llu does not end on a 64-byte boundary",
                       p->name, (unsigned long long)p->header_len);
    if ((st = np_parse_header(ctx, b + NP_PREAMBLE, (size_t)p->header_len, p->flags, p)))
        return st;
    return check_placement(ctx, p);
}

void np_patch_close(np_patch *p)
{
    if (!p)
        return;
    if (p->map && p->file_size)
        munmap((void *)p->map, (size_t)p->file_size);
    if (p->fd >= 0)
        close(p->fd);
    np_arena_free(&p->arena);
    free(p->name);
    memset(p, 0, sizeof *p);
    p->fd = -1;
}

nnp_status np_patch_open_fd(nnp_ctx *ctx, int fd, const char *name, int trailer_checked, np_patch *p)
{
    memset(p, 0, sizeof *p);
    p->fd = fd;
    p->name = strdup(name);
    if (!p->name) {
        np_patch_close(p);
        return np_fail(ctx, NNP_KIND_IO, "out of memory");
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        nnp_status st = np_fail_errno(ctx, errno, name, "cannot stat");
        np_patch_close(p);
        return st;
    }
    if (!S_ISREG(sb.st_mode)) {
        np_patch_close(p);
        return np_fail(ctx, NNP_KIND_IO, "%s: cannot open: not a regular file", name);
    }
    p->file_size = (uint64_t)sb.st_size;
    if (p->file_size > (uint64_t)SIZE_MAX / 2) {
        np_patch_close(p);
        return np_fail(ctx, NNP_KIND_IO, "%s: too large for this platform's address space", name);
    }
    if (p->file_size) {
        void *m = mmap(NULL, (size_t)p->file_size, PROT_READ, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED) {
            nnp_status st = np_fail_errno(ctx, errno, name, "cannot map");
            np_patch_close(p);
            return st;
        }
        p->map = m;
    }
    nnp_status st = parse_container(ctx, p, trailer_checked);
    if (st)
        np_patch_close(p);
    return st;
}

nnp_status np_patch_open(nnp_ctx *ctx, const char *path, const char *name, np_patch *out)
{
    memset(out, 0, sizeof *out);
    out->fd = -1;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return np_fail_errno(ctx, errno, path, "cannot open");
    return np_patch_open_fd(ctx, fd, name ? name : path, 0, out);
}
