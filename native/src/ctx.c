/* The context: messages, error kinds, settings, progress and cancellation; the version and the
 * names the public API parses. No Python twin: Python raises exceptions (nnpatch/errors.py) where
 * the C API keeps the last failure in a context. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

const np_dtype np_dtypes[NP_NDTYPES] = {
    /* name, size, write_rank, esort shift, esort mask */
    {"BOOL", 1, 0, -1, 0},      {"U8", 1, 1, -1, 0},        {"I8", 1, 2, -1, 0},
    {"F8_E4M3", 1, 4, 3, 0x0F}, {"F8_E5M2", 1, 3, 2, 0x1F}, {"F8_E8M0", 1, 5, -1, 0},
    {"I16", 2, 6, -1, 0},       {"U16", 2, 7, -1, 0},       {"F16", 2, 8, 10, 0x1F},
    {"BF16", 2, 9, 7, 0xFF},    {"I32", 4, 10, -1, 0},      {"U32", 4, 11, -1, 0},
    {"F32", 4, 12, 7, 0xFF},    {"I64", 8, 15, -1, 0},      {"U64", 8, 16, -1, 0},
    {"F64", 8, 14, 4, 0x7FF},   {"C64", 8, 13, -1, 0},
};

int np_dtype_find(const char *s, size_t len)
{
    for (int i = 0; i < NP_NDTYPES; i++)
        if (strlen(np_dtypes[i].name) == len && memcmp(np_dtypes[i].name, s, len) == 0)
            return i;
    return -1;
}

nnp_ctx *nnp_ctx_new(void)
{
    nnp_ctx *ctx = calloc(1, sizeof *ctx);
    if (ctx)
        ctx->verify = NNP_VERIFY_DEFAULT;
    return ctx;
}

void nnp_ctx_free(nnp_ctx *ctx)
{
    if (ctx) {
        memset(ctx->key, 0, sizeof ctx->key);
        free(ctx);
    }
}

const char *nnp_message(const nnp_ctx *ctx) { return ctx ? ctx->msg : "no context"; }
nnp_error_kind nnp_error(const nnp_ctx *ctx) { return ctx ? ctx->kind : NNP_KIND_USAGE; }

const char *nnp_error_name(nnp_error_kind kind)
{
    switch (kind) {
    case NNP_KIND_NONE: return "";
    case NNP_KIND_PATCH_FORMAT: return "PatchFormatError";
    case NNP_KIND_UNSUPPORTED_VERSION: return "UnsupportedVersionError";
    case NNP_KIND_WEIGHTS: return "WeightsError";
    case NNP_KIND_INVALID_JOURNAL: return "InvalidJournal";
    case NNP_KIND_BASE_MISMATCH: return "BaseMismatchError";
    case NNP_KIND_INTEGRITY: return "IntegrityError";
    case NNP_KIND_IO: return "NnpatchIOError";
    case NNP_KIND_USAGE: return "UsageError";
    case NNP_KIND_CANCELLED: return "Interrupted";
    case NNP_KIND_NO_UPDATE_PATH: return "NoUpdatePathError";
    }
    return "NnpatchError";
}

nnp_status nnp_set_verify(nnp_ctx *ctx, nnp_verify mode)
{
    if (!ctx)
        return NNP_EUSAGE;
    np_clear(ctx);
    if (mode != NNP_VERIFY_DEFAULT && mode != NNP_VERIFY_FULL && mode != NNP_VERIFY_TOUCHED)
        return np_fail(ctx, NNP_KIND_USAGE, "--verify must be one of default, full, touched, got %d", (int)mode);
    ctx->verify = mode;
    return NNP_OK;
}

void nnp_set_progress(nnp_ctx *ctx, nnp_progress_fn fn, void *user)
{
    if (!ctx)
        return;
    ctx->progress = fn;
    ctx->progress_user = user;
}

void nnp_cancel(nnp_ctx *ctx)
{
    if (ctx)
        np_set_cancelled(ctx);
}

const char *nnp_version(void) { return NNP_VERSION_STRING; }
unsigned nnp_version_number(void) { return NNP_VERSION_NUMBER; }

nnp_status nnp_verify_from_name(const char *name, nnp_verify *mode)
{
    static const struct { const char *name; nnp_verify mode; } names[] = {
        {"default", NNP_VERIFY_DEFAULT}, {"full", NNP_VERIFY_FULL}, {"touched", NNP_VERIFY_TOUCHED}};
    for (size_t i = 0; name && i < sizeof names / sizeof names[0]; i++)
        if (!strcmp(name, names[i].name)) {
            if (mode)
                *mode = names[i].mode;
            return NNP_OK;
        }
    return NNP_EUSAGE;
}

nnp_status np_check_sources(nnp_ctx *ctx, const nnp_source *patches, size_t n)
{
    for (size_t k = 0; k < n; k++) {
        /* one layout so far; a later library copies an older, shorter one (nnpatch.h, "Stability") */
        if (patches[k].size != sizeof(nnp_source))
            return np_fail(ctx, NNP_KIND_USAGE,
                           "stream %zu: nnp_source.size is %zu, not %zu (initialize it with NNP_SOURCE_INIT)", k + 1,
                           patches[k].size, sizeof(nnp_source));
        if (!patches[k].read)
            return np_fail(ctx, NNP_KIND_USAGE, "stream %zu has no read function", k + 1);
    }
    return NNP_OK;
}

nnp_status np_status_of(nnp_error_kind kind)
{
    switch (kind) {
    case NNP_KIND_NONE: return NNP_OK;
    case NNP_KIND_PATCH_FORMAT:
    case NNP_KIND_UNSUPPORTED_VERSION:
    case NNP_KIND_WEIGHTS:
    case NNP_KIND_INVALID_JOURNAL: return NNP_EFORMAT;
    case NNP_KIND_BASE_MISMATCH:
    case NNP_KIND_INTEGRITY: return NNP_EINTEGRITY;
    case NNP_KIND_IO: return NNP_EIO;
    case NNP_KIND_USAGE: return NNP_EUSAGE;
    case NNP_KIND_CANCELLED: return NNP_ECANCELLED;
    case NNP_KIND_NO_UPDATE_PATH: return NNP_ENOPATH;
    }
    return NNP_EFORMAT;
}

void np_clear(nnp_ctx *ctx)
{
    ctx->msg[0] = 0;
    ctx->kind = NNP_KIND_NONE;
    ctx->progress_done = ctx->progress_total = 0;
}

/* One line: control characters (newlines included) become '?'. */
static void one_line(char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            *s = '?';
}

nnp_status np_vfail(nnp_ctx *ctx, nnp_error_kind kind, nnp_status status, const char *fmt, va_list ap)
{
    vsnprintf(ctx->msg, sizeof ctx->msg, fmt, ap);
    one_line(ctx->msg);
    ctx->kind = kind;
    return status;
}

nnp_status np_fail(nnp_ctx *ctx, nnp_error_kind kind, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    nnp_status st = np_vfail(ctx, kind, np_status_of(kind), fmt, ap);
    va_end(ap);
    return st;
}

nnp_status np_fail_as(nnp_ctx *ctx, nnp_error_kind kind, nnp_status status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    nnp_status st = np_vfail(ctx, kind, status, fmt, ap);
    va_end(ap);
    return st;
}

nnp_status np_fail_errno(nnp_ctx *ctx, int errnum, const char *path, const char *what)
{
    if (errnum == ENOSPC)
        return np_fail(ctx, NNP_KIND_IO, "%s: %s: no space left on device", path, what);
    return np_fail(ctx, NNP_KIND_IO, "%s: %s: %s", path, what, strerror(errnum));
}

void np_prefix(nnp_ctx *ctx, const char *prefix)
{
    char tmp[2 * NP_MSG_MAX];
    snprintf(tmp, sizeof tmp, "%s: %s", prefix, ctx->msg);
    one_line(tmp);
    memcpy(ctx->msg, tmp, NP_MSG_MAX - 1);
    ctx->msg[NP_MSG_MAX - 1] = 0;
}

nnp_status np_check_cancel(nnp_ctx *ctx)
{
    if (np_cancelled(ctx))
        return np_fail(ctx, NNP_KIND_CANCELLED, "interrupted");
    return NNP_OK;
}

nnp_status np_progress(nnp_ctx *ctx, uint64_t done)
{
    ctx->progress_done += done;
    if (ctx->progress_done > ctx->progress_total)
        ctx->progress_total = ctx->progress_done;
    if (ctx->progress && ctx->progress(ctx->progress_user, ctx->progress_done, ctx->progress_total))
        np_set_cancelled(ctx);
    return np_check_cancel(ctx);
}

void np_progress_total(nnp_ctx *ctx, uint64_t add)
{
    if (np_add(ctx->progress_total, add, &ctx->progress_total))
        ctx->progress_total = UINT64_MAX;
}

char *np_quote(char *out, size_t outlen, const char *s, size_t len)
{
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;
    if (outlen < 8) {
        if (outlen)
            out[0] = 0;
        return out;
    }
    out[o++] = '\'';
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (o + 8 >= outlen) {
            out[o++] = '.';
            out[o++] = '.';
            out[o++] = '.';
            break;
        }
        if (c >= 0x80) { /* a valid UTF-8 sequence is kept, any other byte escaped */
            size_t k = c >= 0xf0 && c <= 0xf4 ? 4 : c >= 0xe0 ? 3 : c >= 0xc2 && c < 0xe0 ? 2 : 0;
            int ok = k && i + k <= len && c < 0xf5;
            for (size_t x = 1; ok && x < k; x++)
                ok = ((unsigned char)s[i + x] & 0xc0) == 0x80;
            if (ok && k == 3 && ((c == 0xe0 && (unsigned char)s[i + 1] < 0xa0) || (c == 0xed && (unsigned char)s[i + 1] >= 0xa0)))
                ok = 0;
            if (ok && k == 4 && ((c == 0xf0 && (unsigned char)s[i + 1] < 0x90) || (c == 0xf4 && (unsigned char)s[i + 1] >= 0x90)))
                ok = 0;
            if (ok && c == 0xc2 && ((unsigned char)s[i + 1] <= 0xa0 || (unsigned char)s[i + 1] == 0xad)) {
                /* U+0080..U+00A0 (the C1 controls: U+009B is a terminal's CSI) and U+00AD: escaped as
                 * Python's repr escapes them, never written raw to a terminal */
                unsigned char cp = (unsigned char)s[i + 1];
                out[o++] = '\\';
                out[o++] = 'x';
                out[o++] = hex[cp >> 4];
                out[o++] = hex[cp & 15];
                i += 1;
                continue;
            }
            if (ok) {
                if (o + k + 8 >= outlen) {
                    out[o++] = '.';
                    out[o++] = '.';
                    out[o++] = '.';
                    break;
                }
                memcpy(out + o, s + i, k);
                o += k;
                i += k - 1;
                continue;
            }
        }
        if (c == '\n' || c == '\r' || c == '\t' || c == '\'' || c == '\\') {
            out[o++] = '\\';
            out[o++] = c == '\n' ? 'n' : c == '\r' ? 'r' : c == '\t' ? 't' : (char)c;
        } else if (c < 0x20 || c >= 0x7f) {
            out[o++] = '\\';
            out[o++] = 'x';
            out[o++] = hex[c >> 4];
            out[o++] = hex[c & 15];
        } else {
            out[o++] = (char)c;
        }
    }
    out[o++] = '\'';
    out[o] = 0;
    return out;
}

int np_ct_diff(const uint8_t *a, const uint8_t *b, size_t n)
{
    uint8_t d = 0;
    for (size_t i = 0; i < n; i++)
        d |= a[i] ^ b[i];
    return d != 0;
}
