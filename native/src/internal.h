/*
 * libnnpatch internals shared by every module: the context, error helpers,
 * the dtype table, overflow-checked arithmetic and small byte helpers.
 * Nothing here is public API.
 */
#ifndef NNP_INTERNAL_H
#define NNP_INTERNAL_H

#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "../include/nnpatch.h"

#if defined(__GNUC__) || defined(__clang__)
#define NP_PRINTF(a, b) __attribute__((format(printf, a, b)))
#define NP_UNUSED __attribute__((unused))
#else
#define NP_PRINTF(a, b)
#define NP_UNUSED
#endif

#define NP_MSG_MAX 1024

struct nnp_ctx {
    char msg[NP_MSG_MAX];
    nnp_error_kind kind;
    nnp_verify verify;
    int have_key;
    uint8_t key[32];
    nnp_progress_fn progress;
    void *progress_user;
    uint64_t progress_done, progress_total;
    volatile sig_atomic_t cancelled; /* set by nnp_cancel (any thread, signal handler): np_cancelled() */
};

/* The cancel flag is written by another thread or a signal handler and read by the workers:
 * relaxed atomics where the compiler has them (lock-free on an int, so async-signal-safe),
 * the volatile sig_atomic_t that C99 guarantees for signal handlers elsewhere. */
#if defined(__GNUC__) || defined(__clang__)
#define np_cancelled(ctx) __atomic_load_n(&(ctx)->cancelled, __ATOMIC_RELAXED)
#define np_set_cancelled(ctx) __atomic_store_n(&(ctx)->cancelled, 1, __ATOMIC_RELAXED)
#else
#define np_cancelled(ctx) ((ctx)->cancelled)
#define np_set_cancelled(ctx) ((void)((ctx)->cancelled = 1))
#endif

/* ---- errors -------------------------------------------------------------------- */

/* The status (exit code) a kind maps to: PATCH_FORMAT/UNSUPPORTED/WEIGHTS -> 3,
 * BASE_MISMATCH/INTEGRITY -> 4, IO -> 5, USAGE -> 2, CANCELLED -> 130,
 * INVALID_JOURNAL -> 3 (use np_fail_as for the 4 of JOURNAL.md where needed). */
nnp_status np_status_of(nnp_error_kind kind);
/* Each stream of nnp_apply_streams: its size field this library's nnp_source, a read function
 * (USAGE failure otherwise). */
nnp_status np_check_sources(nnp_ctx *ctx, const nnp_source *patches, size_t n);

/* Record a one-line message (printf format; newlines and control characters are
 * replaced) and the kind; returns np_status_of(kind). */
nnp_status np_fail(nnp_ctx *ctx, nnp_error_kind kind, const char *fmt, ...) NP_PRINTF(3, 4);
/* The same with an explicit status (e.g. InvalidJournal with 4). */
nnp_status np_fail_as(nnp_ctx *ctx, nnp_error_kind kind, nnp_status status, const char *fmt, ...) NP_PRINTF(4, 5);
nnp_status np_vfail(nnp_ctx *ctx, nnp_error_kind kind, nnp_status status, const char *fmt, va_list ap);
/* An OS error: "<path>: <what>: <strerror(errnum)>", kind IO (5). */
nnp_status np_fail_errno(nnp_ctx *ctx, int errnum, const char *path, const char *what);
/* Prefix the current message with "<prefix>: " (keeps kind). */
void np_prefix(nnp_ctx *ctx, const char *prefix);
/* Clear the message and kind (start of every public call). */
void np_clear(nnp_ctx *ctx);

/* NNP_ECANCELLED (and the message) when nnp_cancel was called, else NNP_OK. */
nnp_status np_check_cancel(nnp_ctx *ctx);
/* Report progress (adds `done` bytes); calls the callback; cancels when it returns non-zero.
 * Returns NNP_ECANCELLED when cancelled. */
nnp_status np_progress(nnp_ctx *ctx, uint64_t done);
void np_progress_total(nnp_ctx *ctx, uint64_t add);

/* Quote untrusted text for a message, Python-repr-like: 'abc', non-printable bytes and
 * quotes escaped (\xNN), cut to about `cap` bytes with "..." when longer. Writes a
 * NUL-terminated string of at most outlen bytes. Returns out. */
char *np_quote(char *out, size_t outlen, const char *s, size_t len);
#define NP_QUOTE_MAX 200 /* a buffer of this size holds any quoted name (it is cut) */

/* ---- dtypes -------------------------------------------------------------------- */

typedef struct np_dtype {
    const char *name;
    uint8_t size;       /* item size in bytes */
    uint8_t write_rank; /* safetensors writer order (dtypes.WRITE_RANK) */
    int8_t esort_shift; /* -1: not a float dtype esort accepts */
    uint16_t esort_mask;
} np_dtype;

#define NP_NDTYPES 17
/* Indices in np_dtypes of the dtypes a qrows op changes (ctx.c keeps the table in this order). */
enum { NP_DT_F16 = 8, NP_DT_BF16 = 9, NP_DT_F32 = 12 };
extern const np_dtype np_dtypes[NP_NDTYPES];
/* Index in np_dtypes of the dtype named s[0..len), or -1. */
int np_dtype_find(const char *s, size_t len);

/* ---- arithmetic ---------------------------------------------------------------- */

/* Each returns 0 and sets *out, or -1 on overflow (of uint64_t). */
static inline int np_add(uint64_t a, uint64_t b, uint64_t *out)
{
    if (a > UINT64_MAX - b)
        return -1;
    *out = a + b;
    return 0;
}
static inline int np_mul(uint64_t a, uint64_t b, uint64_t *out)
{
    if (a != 0 && b > UINT64_MAX / a)
        return -1;
    *out = a * b;
    return 0;
}
static inline uint64_t np_align64(uint64_t n) { return (n + 63) & ~(uint64_t)63; } /* caller: n < 2^63 */

static inline uint64_t np_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}
static inline uint32_t np_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static inline uint16_t np_le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static inline void np_put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}
static inline void np_put_le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

/* Byte-wise comparison of two names (the canonical order: UTF-8 bytes, shorter prefix first). */
static inline int np_name_cmp(const char *a, size_t alen, const char *b, size_t blen)
{
    size_t n = alen < blen ? alen : blen;
    int c = n ? memcmp(a, b, n) : 0;
    if (c)
        return c;
    return alen < blen ? -1 : alen > blen;
}

/* Stable sort of an index array v[0..n) by cmp(cx, a, b) (merge sort; no globals). */
void np_sort_indices(size_t *v, size_t n, int (*cmp)(const void *cx, size_t a, size_t b), const void *cx);

/* Constant-time comparison of n bytes (0 when equal). */
int np_ct_diff(const uint8_t *a, const uint8_t *b, size_t n);

#define NP_MAX_RANK 64
#define NP_LIMIT_62 ((uint64_t)1 << 62)

#endif
