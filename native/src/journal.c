/*
 * The undo journal (spec/JOURNAL.md): writer, reader with the Trust checks, recovery.
 * Byte for byte the journal nnpatch/applier/journal.py writes; a journal of either
 * implementation is recovered by the other.
 */
#include "journal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blake3.h"
#include "json.h"
#include "safetensors.h"

static const uint8_t MAGIC[8] = {0x89, 'N', 'N', 'J', '\r', '\n', 0x1a, '\n'};
#define MAX_INT ((uint64_t)INT64_MAX)
#define WBUF (1u << 20)

/* ---- small helpers ------------------------------------------------------------------ */

char *np_journal_path(const char *model, const char *suffix)
{
    size_t a = strlen(model), b = strlen(suffix);
    char *p = malloc(a + b + 1);
    if (!p)
        return NULL;
    memcpy(p, model, a);
    memcpy(p + a, suffix, b + 1);
    return p;
}

int np_fsync_dir_of(const char *path)
{
    char *copy = strdup(path);
    if (!copy)
        return 0;
    char *slash = strrchr(copy, '/');
    const char *dir = ".";
    if (slash == copy)
        dir = "/";
    else if (slash) {
        *slash = 0;
        dir = copy;
    }
    int err = 0;
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) { /* some file systems cannot open directories: nothing to sync then */
        if (fsync(fd) != 0)
            err = errno;
        close(fd);
    }
    free(copy);
    /* a file system that cannot sync directories at all: its entries are as durable as it makes them */
    if (err == EINVAL || err == EBADF || err == ENOTSUP || err == EOPNOTSUPP)
        err = 0;
    return err;
}

static int lexists(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0;
}

static nnp_status unlink_or_fail(nnp_ctx *ctx, const char *path)
{
    if (unlink(path) != 0)
        return np_fail_errno(ctx, errno, path, "cannot remove");
    return NNP_OK;
}

static void hex32(const uint8_t d[32], char out[65]) { np_hex(d, 32, out); }

static nnp_status write_all(int fd, const uint8_t *p, size_t n)
{
    while (n) {
        ssize_t k = write(fd, p, n);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return NNP_EIO;
        }
        p += k;
        n -= (size_t)k;
    }
    return NNP_OK;
}

static int pread_all(int fd, uint8_t *p, size_t n, uint64_t off, size_t *got)
{
    size_t done = 0;
    while (done < n) {
        ssize_t k = pread(fd, p + done, n - done, (off_t)(off + done));
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (k == 0)
            break;
        done += (size_t)k;
    }
    *got = done;
    return 0;
}

/* ---- header text (Python: json.dumps(obj, sort_keys=True, separators=(",", ":"))) ------- */

typedef struct sbuf {
    uint8_t *p;
    size_t len, cap;
    int oom;
} sbuf;

static void sb_put(sbuf *b, const void *s, size_t n)
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
static void sb_str(sbuf *b, const char *s) { sb_put(b, s, strlen(s)); }
static void sb_u64(sbuf *b, uint64_t v)
{
    char t[24];
    int n = snprintf(t, sizeof t, "%llu", (unsigned long long)v);
    sb_put(b, t, (size_t)n);
}
static void sb_hex(sbuf *b, const uint8_t d[32])
{
    char h[65];
    hex32(d, h);
    sb_put(b, "\"", 1);
    sb_put(b, h, 64);
    sb_put(b, "\"", 1);
}
static void sb_u16esc(sbuf *b, unsigned v)
{
    char t[8];
    snprintf(t, sizeof t, "\\u%04x", v & 0xffffu);
    sb_put(b, t, 6);
}

/* A JSON string as Python's json.dumps writes it with ensure_ascii=True. */
static void sb_json_string(sbuf *b, const char *s, size_t n)
{
    const uint8_t *p = (const uint8_t *)s;
    sb_put(b, "\"", 1);
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
        case '"': sb_str(b, "\\\""); continue;
        case '\\': sb_str(b, "\\\\"); continue;
        case '\n': sb_str(b, "\\n"); continue;
        case '\r': sb_str(b, "\\r"); continue;
        case '\t': sb_str(b, "\\t"); continue;
        case '\b': sb_str(b, "\\b"); continue;
        case '\f': sb_str(b, "\\f"); continue;
        default: break;
        }
        if (c >= 0x20 && c <= 0x7e) {
            char ch = (char)c;
            sb_put(b, &ch, 1);
        } else if (c < 0x10000) {
            sb_u16esc(b, c);
        } else {
            uint32_t v = c - 0x10000;
            sb_u16esc(b, 0xd800 | (v >> 10));
            sb_u16esc(b, 0xdc00 | (v & 0x3ff));
        }
    }
    sb_put(b, "\"", 1);
}

/* Python's _layout: where each entry's indices and old bytes go for a header of hlen bytes.
 * Returns the end of the entry data, or 0 on overflow. */
static uint64_t layout(np_jentry *e, size_t n, uint64_t hlen)
{
    uint64_t pos = NP_JOURNAL_PREAMBLE + hlen, t;
    for (size_t i = 0; i < n; i++) {
        e[i].index_at = pos;
        if (np_mul(8, e[i].count, &t) || np_add(pos, t, &pos) || pos > ((uint64_t)1 << 62))
            return 0;
        pos = np_align64(pos);
        e[i].data_at = pos;
        if (np_mul(e[i].unit, e[i].count, &t) || np_add(pos, t, &pos) || pos > ((uint64_t)1 << 62))
            return 0;
        pos = np_align64(pos);
    }
    return pos;
}

static void header_text(sbuf *b, const np_jmeta *m, const np_jentry *e, size_t n)
{
    sb_str(b, "{\"base\":{\"blake3\":");
    sb_hex(b, m->base_blake3);
    sb_str(b, ",\"model_blake3\":");
    sb_hex(b, m->base_model);
    sb_str(b, "},\"created_by\":\"nnpatch\",\"entries\":[");
    for (size_t i = 0; i < n; i++) {
        if (i)
            sb_put(b, ",", 1);
        sb_str(b, "{\"base_blake3\":");
        sb_hex(b, e[i].base_blake3);
        sb_str(b, ",\"count\":");
        sb_u64(b, e[i].count);
        sb_str(b, ",\"data_at\":");
        sb_u64(b, e[i].data_at);
        sb_str(b, ",\"index_at\":");
        sb_u64(b, e[i].index_at);
        sb_str(b, ",\"name\":");
        sb_json_string(b, e[i].name, e[i].name_len);
        sb_str(b, ",\"nbytes\":");
        sb_u64(b, e[i].nbytes);
        sb_str(b, ",\"offset\":");
        sb_u64(b, e[i].offset);
        sb_str(b, ",\"target_blake3\":");
        sb_hex(b, e[i].target_blake3);
        sb_str(b, ",\"unit\":");
        sb_u64(b, e[i].unit);
        sb_str(b, "}");
    }
    sb_str(b, "],\"model\":{\"header_blake3\":");
    sb_hex(b, m->header_blake3);
    sb_str(b, ",\"header_len\":");
    sb_u64(b, m->header_len);
    sb_str(b, ",\"size\":");
    sb_u64(b, m->model_size);
    sb_str(b, "},\"patch\":");
    sb_hex(b, m->patch);
    sb_str(b, ",\"target\":{\"blake3\":");
    sb_hex(b, m->target_blake3);
    sb_str(b, ",\"model_blake3\":");
    sb_hex(b, m->target_model);
    sb_str(b, "}}");
    size_t pad = (size_t)(np_align64(NP_JOURNAL_PREAMBLE + (uint64_t)b->len) - NP_JOURNAL_PREAMBLE - b->len);
    while (pad--)
        sb_put(b, " ", 1);
}

nnp_status np_journal_encode_header(nnp_ctx *ctx, const np_jmeta *meta, np_jentry *entries, size_t n,
                                    uint8_t **out, size_t *out_len)
{
    /* encode_header: the length fixed point, reached from an empty text as Python reaches it */
    *out = NULL;
    *out_len = 0;
    sbuf text = {0};
    for (int iter = 0; iter < 8; iter++) {
        if (!layout(entries, n, text.len)) {
            free(text.p);
            return np_fail(ctx, NNP_KIND_USAGE, "the update is too large to journal (offsets overflow)");
        }
        sbuf next = {0};
        header_text(&next, meta, entries, n);
        if (next.oom) {
            free(text.p);
            free(next.p);
            return np_fail(ctx, NNP_KIND_IO, "out of memory building the journal header");
        }
        if (next.len == text.len && iter > 0) {
            free(text.p);
            *out = next.p;
            *out_len = next.len;
            return NNP_OK;
        }
        free(text.p);
        text = next;
    }
    free(text.p);
    return np_fail(ctx, NNP_KIND_USAGE, "the journal header's length does not settle");
}

/* ---- writer --------------------------------------------------------------------------- */

static nnp_status jw_flush(np_jwriter *w)
{
    if (w->buf_len) {
        if (write_all(w->fd, w->buf, w->buf_len) != NNP_OK)
            return NNP_EIO;
        w->buf_len = 0;
    }
    return NNP_OK;
}

static nnp_status jw_raw(nnp_ctx *ctx, np_jwriter *w, const void *data, size_t len)
{
    const uint8_t *p = data;
    np_blake3_update((np_blake3 *)w->hash, p, len);
    w->pos += len;
    if (len >= WBUF) {
        if (jw_flush(w) != NNP_OK || write_all(w->fd, p, len) != NNP_OK)
            return np_fail_errno(ctx, errno, w->tmp, "cannot write the journal");
        return NNP_OK;
    }
    if (w->buf_len + len > WBUF && jw_flush(w) != NNP_OK)
        return np_fail_errno(ctx, errno, w->tmp, "cannot write the journal");
    memcpy(w->buf + w->buf_len, p, len);
    w->buf_len += len;
    return NNP_OK;
}

nnp_status np_jw_write(nnp_ctx *ctx, np_jwriter *w, const void *data, size_t len)
{
    return jw_raw(ctx, w, data, len);
}

nnp_status np_jw_end_part(nnp_ctx *ctx, np_jwriter *w)
{
    static const uint8_t zeros[64];
    size_t pad = (size_t)(np_align64(w->pos) - w->pos);
    return pad ? jw_raw(ctx, w, zeros, pad) : NNP_OK;
}

void np_jw_abort(np_jwriter *w)
{
    if (w->fd >= 0) {
        close(w->fd);
        w->fd = -1;
    }
    if (w->tmp)
        (void)unlink(w->tmp);
    free(w->path);
    free(w->tmp);
    free(w->hash);
    free(w->buf);
    w->path = w->tmp = NULL;
    w->hash = NULL;
    w->buf = NULL;
}

nnp_status np_jw_open(nnp_ctx *ctx, np_jwriter *w, const char *jpath, const np_jmeta *meta, np_jentry *entries,
                      size_t n)
{
    memset(w, 0, sizeof *w);
    w->fd = -1;
    uint8_t *header;
    size_t hlen;
    nnp_status s = np_journal_encode_header(ctx, meta, entries, n, &header, &hlen);
    if (s)
        return s;
    if (hlen > NP_JOURNAL_MAX_HEADER) {
        free(header);
        return np_fail(ctx, NNP_KIND_USAGE,
                       "%s: the update touches too many tensors to journal (%zu-byte journal header, limit %llu); "
                       "write the result with -o instead of --in-place",
                       jpath, hlen, (unsigned long long)NP_JOURNAL_MAX_HEADER);
    }
    w->path = strdup(jpath);
    w->tmp = np_journal_path(jpath, ".tmp");
    w->hash = malloc(sizeof(np_blake3));
    w->buf = malloc(WBUF);
    if (!w->path || !w->tmp || !w->hash || !w->buf) {
        free(header);
        free(w->tmp);
        w->tmp = NULL;
        np_jw_abort(w);
        return np_fail(ctx, NNP_KIND_IO, "%s: out of memory", jpath);
    }
    np_blake3_init((np_blake3 *)w->hash);
    /* recovery removed any .tmp journal under the lock: one there now was planted (a hard link to
     * another file would be truncated), so it is refused rather than reused */
    w->fd = open(w->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0666);
    if (w->fd < 0) {
        int e = errno;
        free(header);
        char *tmp = w->tmp;
        w->tmp = NULL; /* not ours to remove */
        s = np_fail_errno(ctx, e, tmp, "cannot write the journal");
        free(tmp);
        np_jw_abort(w);
        return s;
    }
    uint8_t pre[NP_JOURNAL_PREAMBLE];
    memcpy(pre, MAGIC, 8);
    pre[8] = 1, pre[9] = 0;   /* major */
    pre[10] = 0, pre[11] = 0; /* minor */
    np_put_le32(pre + 12, 0);
    np_put_le64(pre + 16, hlen);
    s = jw_raw(ctx, w, pre, sizeof pre);
    if (!s)
        s = jw_raw(ctx, w, header, hlen);
    free(header);
    if (s)
        np_jw_abort(w);
    return s;
}

nnp_status np_jw_commit(nnp_ctx *ctx, np_jwriter *w)
{
    uint8_t trailer[32];
    np_blake3_final((np_blake3 *)w->hash, trailer);
    nnp_status s = jw_raw(ctx, w, trailer, 32);
    if (!s && jw_flush(w) != NNP_OK)
        s = np_fail_errno(ctx, errno, w->path, "cannot write the journal");
    if (!s && fsync(w->fd) != 0)
        s = np_fail_errno(ctx, errno, w->path, "cannot write the journal");
    if (!s) {
        int rc = close(w->fd);
        w->fd = -1;
        if (rc != 0)
            s = np_fail_errno(ctx, errno, w->path, "cannot write the journal");
    }
    if (!s && rename(w->tmp, w->path) != 0)
        s = np_fail_errno(ctx, errno, w->path, "cannot write the journal");
    if (s) {
        np_jw_abort(w);
        return s;
    }
    /* the commit point of the journal: the model is written only once its entry is durable; if it
     * cannot be made so, it is as if never committed (the model is untouched) */
    int err = np_fsync_dir_of(w->path);
    if (err) {
        (void)unlink(w->path);
        s = np_fail(ctx, NNP_KIND_IO, "%s: cannot make the journal durable (fsync of its folder: %s); the model "
                    "was not written", w->path, strerror(err));
        free(w->tmp);
        w->tmp = NULL; /* renamed: no .tmp left to remove */
        np_jw_abort(w);
        return s;
    }
    free(w->tmp);
    w->tmp = NULL; /* committed: nothing to remove */
    np_jw_abort(w);
    return NNP_OK;
}

/* ---- reader (Trust, steps 1 and 2) ------------------------------------------------------ */

typedef struct journal {
    const char *path;
    const uint8_t *map;
    uint64_t size;
    npj_doc *doc;
    np_jentry *entries;
    size_t n;
    uint64_t model_size, header_len;
    uint8_t header_blake3[32];
} journal;

static void journal_close(journal *j)
{
    if (j->map)
        munmap((void *)j->map, (size_t)j->size);
    npj_free(j->doc);
    free(j->entries);
    memset(j, 0, sizeof *j);
}

static uint64_t max_journal_size(uint64_t model_size)
{
    uint64_t t, r;
    if (np_mul(10, model_size, &t) || np_add(t, 4 * NP_JOURNAL_MAX_HEADER, &r))
        return UINT64_MAX;
    return r;
}

/* Exact key lookup (keys may hold NUL: compare lengths too). */
static const npj_value *get(const npj_value *obj, const char *key)
{
    if (!obj || obj->kind != NPJ_OBJECT)
        return NULL;
    size_t kl = strlen(key);
    for (size_t i = 0; i < obj->u.obj.n; i++) {
        const npj_member *m = &obj->u.obj.members[i];
        if (m->key_len == kl && memcmp(m->key, key, kl) == 0)
            return &m->value;
    }
    return NULL;
}

static const char *kind_name(const npj_value *v)
{
    switch (v->kind) {
    case NPJ_NULL: return "None";
    case NPJ_FALSE: return "False";
    case NPJ_TRUE: return "True";
    case NPJ_INT: return "a negative integer";
    case NPJ_BIGINT: return "an integer out of range";
    case NPJ_FLOAT: return "a float";
    case NPJ_STRING: return "a string";
    case NPJ_ARRAY: return "a list";
    default: return "an object";
    }
}

static nnp_status bad(nnp_ctx *ctx, const char *fmt, ...) NP_PRINTF(2, 3);
static nnp_status bad(nnp_ctx *ctx, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    nnp_status s = np_vfail(ctx, NNP_KIND_INVALID_JOURNAL, NNP_EFORMAT, fmt, ap);
    va_end(ap);
    return s;
}

static nnp_status get_int(nnp_ctx *ctx, const npj_value *obj, const char *key, const char *where, uint64_t *out)
{
    const npj_value *v = get(obj, key);
    if (v && v->kind == NPJ_INT && v->u.i.negative && v->u.i.magnitude == 0) { /* -0: Python reads 0 */
        *out = 0;
        return NNP_OK;
    }
    if (!v || npj_as_u64(v, MAX_INT, out) != 0) {
        if (v && v->kind == NPJ_INT && !v->u.i.negative)
            return bad(ctx, "%s: %s must be an integer in 0..2^63-1, not %llu", where, key,
                       (unsigned long long)v->u.i.magnitude);
        return bad(ctx, "%s: %s must be an integer in 0..2^63-1, not %s", where, key, v ? kind_name(v) : "missing");
    }
    return NNP_OK;
}

static int is_hex64(const char *s, size_t n)
{
    if (n != 64)
        return 0;
    for (size_t i = 0; i < 64; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    return 1;
}

static int unhex(char c) { return c <= '9' ? c - '0' : c - 'a' + 10; }

static nnp_status get_hex(nnp_ctx *ctx, const npj_value *obj, const char *key, const char *where, uint8_t out[32])
{
    const npj_value *v = get(obj, key);
    const char *s;
    size_t n;
    if (!v || npj_as_string(v, &s, &n) != 0 || !is_hex64(s, n)) {
        char q[NP_QUOTE_MAX];
        if (v && v->kind == NPJ_STRING)
            np_quote(q, sizeof q, v->u.str.s, v->u.str.len);
        else
            snprintf(q, sizeof q, "%s", v ? kind_name(v) : "missing");
        return bad(ctx, "%s: %s must be a 64-digit lowercase hex digest, not %s", where, key, q);
    }
    if (out)
        for (int i = 0; i < 32; i++)
            out[i] = (uint8_t)(unhex(s[2 * i]) << 4 | unhex(s[2 * i + 1]));
    return NNP_OK;
}

/* An object with exactly these keys. */
static nnp_status exact_object(nnp_ctx *ctx, const npj_value *v, const char *const *keys, size_t nkeys,
                               const char *where)
{
    if (!v || v->kind != NPJ_OBJECT)
        return bad(ctx, "%s: must be a JSON object", where);
    char missing[256] = "", extra[NP_QUOTE_MAX] = "";
    for (size_t k = 0; k < nkeys; k++)
        if (!get(v, keys[k])) {
            size_t l = strlen(missing);
            snprintf(missing + l, sizeof missing - l, "%s%s", l ? ", " : "", keys[k]);
        }
    for (size_t i = 0; i < v->u.obj.n && !extra[0]; i++) {
        const npj_member *m = &v->u.obj.members[i];
        int known = 0;
        for (size_t k = 0; k < nkeys; k++)
            if (m->key_len == strlen(keys[k]) && memcmp(m->key, keys[k], m->key_len) == 0)
                known = 1;
        if (!known)
            np_quote(extra, sizeof extra, m->key, m->key_len);
    }
    if (missing[0] || extra[0])
        return bad(ctx, "%s: %s%s%s%s%s", where, missing[0] ? "missing " : "", missing,
                   missing[0] && extra[0] ? "; " : "", extra[0] ? "unknown " : "", extra);
    return NNP_OK;
}

static const char *const MODEL_KEYS[] = {"size", "header_len", "header_blake3"};
static const char *const REF_KEYS[] = {"blake3", "model_blake3"};
static const char *const ENTRY_KEYS[] = {"name", "offset", "nbytes", "unit", "count",
                                         "base_blake3", "target_blake3", "index_at", "data_at"};
static const char *const TOP_KEYS[] = {"created_by", "model", "base", "target", "patch", "entries"};

static nnp_status parse_header(nnp_ctx *ctx, journal *j, const uint8_t *text, size_t len)
{
    const char *path = j->path;
    unsigned depth;
    uint64_t values;
    npj_shape(text, len, &depth, &values);
    if (depth > NP_JOURNAL_MAX_DEPTH)
        return bad(ctx, "%s: journal header nests deeper than %d", path, NP_JOURNAL_MAX_DEPTH);
    npj_limits lim = {NP_JOURNAL_MAX_DEPTH, UINT64_MAX};
    char err[256];
    if (npj_parse(text, len, &lim, &j->doc, err, sizeof err) != 0)
        return bad(ctx, "%s: journal header is not valid JSON: %s", path, err);
    const npj_value *root = npj_root(j->doc);
    if (!root || root->kind != NPJ_OBJECT)
        return bad(ctx, "%s: journal header is not a JSON object", path);
    char missing[128] = "";
    for (size_t k = 0; k < 6; k++)
        if (!get(root, TOP_KEYS[k])) {
            size_t l = strlen(missing);
            snprintf(missing + l, sizeof missing - l, "%s%s", l ? ", " : "", TOP_KEYS[k]);
        }
    if (missing[0])
        return bad(ctx, "%s: journal header lacks %s", path, missing);
    if (get(root, "created_by")->kind != NPJ_STRING)
        return bad(ctx, "%s: created_by must be a string", path);
    char where[NP_QUOTE_MAX + 4200];
    nnp_status s;
    const npj_value *model = get(root, "model");
    snprintf(where, sizeof where, "%s: model", path);
    if ((s = exact_object(ctx, model, MODEL_KEYS, 3, where)) || (s = get_int(ctx, model, "size", where, &j->model_size)) ||
        (s = get_int(ctx, model, "header_len", where, &j->header_len)) ||
        (s = get_hex(ctx, model, "header_blake3", where, j->header_blake3)))
        return s;
    static const char *const sides[] = {"base", "target"};
    for (int k = 0; k < 2; k++) {
        const npj_value *r = get(root, sides[k]);
        snprintf(where, sizeof where, "%s: %s", path, sides[k]);
        if ((s = exact_object(ctx, r, REF_KEYS, 2, where)) || (s = get_hex(ctx, r, "blake3", where, NULL)) ||
            (s = get_hex(ctx, r, "model_blake3", where, NULL)))
            return s;
    }
    if ((s = get_hex(ctx, root, "patch", path, NULL)))
        return s;
    const npj_value *arr = get(root, "entries");
    if (arr->kind != NPJ_ARRAY)
        return bad(ctx, "%s: entries must be a JSON array", path);
    size_t n = arr->u.arr.n;
    j->entries = n ? calloc(n, sizeof *j->entries) : NULL;
    if (n && !j->entries)
        return np_fail(ctx, NNP_KIND_IO, "%s: out of memory", path);
    for (size_t i = 0; i < n; i++) {
        const npj_value *o = &arr->u.arr.items[i];
        np_jentry *e = &j->entries[i];
        snprintf(where, sizeof where, "%s: entry %zu", path, i);
        if ((s = exact_object(ctx, o, ENTRY_KEYS, 9, where)))
            return s;
        const npj_value *name = get(o, "name");
        if (name->kind != NPJ_STRING)
            return bad(ctx, "%s: name must be a string", where);
        e->name = name->u.str.s;
        e->name_len = name->u.str.len;
        char q[NP_QUOTE_MAX];
        np_quote(q, sizeof q, e->name, e->name_len);
        snprintf(where, sizeof where, "%s: entry %s", path, q);
        for (size_t k = 0; k < i; k++) /* at most one entry per name */
            if (j->entries[k].name_len == e->name_len && memcmp(j->entries[k].name, e->name, e->name_len) == 0)
                return bad(ctx, "%s: a second entry for the same tensor", where);
        if ((s = get_int(ctx, o, "offset", where, &e->offset)) || (s = get_int(ctx, o, "nbytes", where, &e->nbytes)) ||
            (s = get_int(ctx, o, "unit", where, &e->unit)) || (s = get_int(ctx, o, "count", where, &e->count)) ||
            (s = get_hex(ctx, o, "base_blake3", where, e->base_blake3)) ||
            (s = get_hex(ctx, o, "target_blake3", where, e->target_blake3)) ||
            (s = get_int(ctx, o, "index_at", where, &e->index_at)) ||
            (s = get_int(ctx, o, "data_at", where, &e->data_at)))
            return s;
        uint64_t prod;
        if (e->count && (!e->unit || np_mul(e->count, e->unit, &prod) || prod > e->nbytes))
            return bad(ctx, "%s: count %llu x unit %llu bytes does not fit in nbytes %llu", where,
                       (unsigned long long)e->count, (unsigned long long)e->unit, (unsigned long long)e->nbytes);
        j->n = i + 1;
    }
    j->n = n;
    return NNP_OK;
}

static nnp_status check_layout(nnp_ctx *ctx, journal *j, uint64_t hlen)
{
    uint64_t end = j->size - NP_JOURNAL_TRAILER, pos = NP_JOURNAL_PREAMBLE + hlen, t;
    for (size_t i = 0; i < j->n; i++) {
        np_jentry *e = &j->entries[i];
        char q[NP_QUOTE_MAX];
        np_quote(q, sizeof q, e->name, e->name_len);
        if (e->index_at != pos)
            return bad(ctx, "%s: entry %s: index_at is %llu, its indices are at %llu", j->path, q,
                       (unsigned long long)e->index_at, (unsigned long long)pos);
        if (np_mul(8, e->count, &t) || np_add(pos, t, &pos) || pos > end)
            return bad(ctx, "%s: entry %s runs past the end of the journal", j->path, q);
        pos = np_align64(pos);
        if (e->data_at != pos)
            return bad(ctx, "%s: entry %s: data_at is %llu, its old bytes are at %llu", j->path, q,
                       (unsigned long long)e->data_at, (unsigned long long)pos);
        if (np_mul(e->unit, e->count, &t) || np_add(pos, t, &pos) || pos > end)
            return bad(ctx, "%s: entry %s runs past the end of the journal", j->path, q);
        pos = np_align64(pos);
        if (pos > end)
            return bad(ctx, "%s: entry %s runs past the end of the journal", j->path, q);
    }
    if (pos != end)
        return bad(ctx, "%s: %llu bytes between the last entry and the trailer", j->path,
                   (unsigned long long)(end - pos));
    return NNP_OK;
}

/* Trust steps 1 and 2. *torn = 1 (status OK, message in ctx) for a torn journal. */
static nnp_status read_journal(nnp_ctx *ctx, const char *path, uint64_t model_size, journal *j, int *torn)
{
    memset(j, 0, sizeof *j);
    j->path = path;
    *torn = 0;
    /* O_NONBLOCK: a FIFO planted under the journal's name must not hang recover; O_NOFOLLOW: a symlink
     * planted there is refused, not followed (JOURNAL.md, Trust step 1; SECURITY.md, files beside the model) */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0 && errno == ELOOP)
        return bad(ctx, "%s: the journal is a symbolic link; nnpatch neither follows nor reuses it", path);
    if (fd < 0)
        return np_fail_errno(ctx, errno, path, "cannot read the journal");
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return np_fail_errno(ctx, e, path, "cannot read the journal");
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return bad(ctx, "%s: the journal is not a regular file", path);
    }
    if (st.st_nlink != 1 || st.st_uid != geteuid()) {
        close(fd);
        return bad(ctx, "%s: the journal %s; nnpatch neither follows nor reuses it", path,
                   st.st_nlink != 1 ? "has more than one link (a hard link to another file)"
                                    : "belongs to another user");
    }
    uint64_t size = (uint64_t)st.st_size, max = max_journal_size(model_size);
    if (size > max) {
        close(fd);
        return bad(ctx, "%s: the journal is %llu bytes, more than any journal of a %llu-byte model (%llu)", path,
                   (unsigned long long)size, (unsigned long long)model_size, (unsigned long long)max);
    }
    if (size > SIZE_MAX) {
        close(fd);
        return np_fail(ctx, NNP_KIND_IO, "%s: cannot read the journal: too large for this machine", path);
    }
    if (size) {
        void *m = mmap(NULL, (size_t)size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (m == MAP_FAILED) {
            int e = errno;
            close(fd);
            return np_fail_errno(ctx, e, path, "cannot read the journal");
        }
        j->map = m;
    }
    close(fd);
    j->size = size;
    const uint8_t *d = j->map;
    if (size < NP_JOURNAL_PREAMBLE + NP_JOURNAL_TRAILER) {
        *torn = 1;
        np_fail(ctx, NNP_KIND_INVALID_JOURNAL, "%s: journal is torn (%llu bytes)", path, (unsigned long long)size);
        return NNP_OK;
    }
    if (memcmp(d, MAGIC, 8) != 0) {
        *torn = 1;
        np_fail(ctx, NNP_KIND_INVALID_JOURNAL, "%s: not an nnpatch journal (bad magic)", path);
        return NNP_OK;
    }
    unsigned major = np_le16(d + 8);
    if (major != 1)
        return np_fail(ctx, NNP_KIND_INTEGRITY,
                       "%s: journal version %u is not supported by this nnpatch; the journal is kept and the model "
                       "was not written",
                       path, major);
    uint8_t h[32];
    np_blake3_hash(d, (size_t)(size - NP_JOURNAL_TRAILER), h);
    if (memcmp(h, d + size - NP_JOURNAL_TRAILER, 32) != 0) {
        *torn = 1;
        np_fail(ctx, NNP_KIND_INVALID_JOURNAL, "%s: journal is torn or damaged (trailer hash mismatch)", path);
        return NNP_OK;
    }
    /* committed and whole from here on: whatever is wrong now was written so, and is refused, not discarded */
    uint32_t flags = np_le32(d + 12);
    uint64_t hlen = np_le64(d + 16);
    if (flags)
        return bad(ctx, "%s: unknown journal flags %#x", path, flags);
    if (hlen > NP_JOURNAL_MAX_HEADER)
        return bad(ctx, "%s: journal header of %llu bytes exceeds the %llu limit", path, (unsigned long long)hlen,
                   (unsigned long long)NP_JOURNAL_MAX_HEADER);
    if (NP_JOURNAL_PREAMBLE + hlen > size - NP_JOURNAL_TRAILER || (NP_JOURNAL_PREAMBLE + hlen) % 64)
        return bad(ctx, "%s: journal header length %llu does not fit the journal or is not padded to 64", path,
                   (unsigned long long)hlen);
    nnp_status s = parse_header(ctx, j, d + NP_JOURNAL_PREAMBLE, (size_t)hlen);
    if (!s)
        s = check_layout(ctx, j, hlen);
    return s;
}

/* ---- recovery (Trust steps 3 to 5, then the writes) ------------------------------------ */

/* The model's real safetensors header (8 + the u64 at offset 0 bytes), or fewer bytes when the
 * file cannot hold one (which then matches no journal). Python: inplace._model_header. */
static nnp_status model_header(nnp_ctx *ctx, const char *model, int fd, uint64_t size, uint8_t **out, size_t *len)
{
    uint8_t first[8];
    size_t got;
    *out = NULL;
    *len = 0;
    if (pread_all(fd, first, 8, 0, &got) != 0)
        return np_fail_errno(ctx, errno, model, "cannot read");
    uint64_t n = got == 8 ? np_le64(first) : 0;
    uint64_t cap = size >= 8 ? size - 8 : 0;
    if (cap > NP_ST_MAX_HEADER)
        cap = NP_ST_MAX_HEADER;
    size_t total = got;
    if (got == 8 && n <= cap)
        total = (size_t)(8 + n);
    uint8_t *buf = malloc(total ? total : 1);
    if (!buf)
        return np_fail(ctx, NNP_KIND_IO, "%s: out of memory reading its header", model);
    memcpy(buf, first, got);
    if (total > 8) {
        size_t more;
        if (pread_all(fd, buf + 8, total - 8, 8, &more) != 0) {
            int e = errno;
            free(buf);
            return np_fail_errno(ctx, e, model, "cannot read");
        }
        total = 8 + more;
    }
    *out = buf;
    *len = total;
    return NNP_OK;
}

/* The BLAKE3 of the entry's tensor as the rollback would leave it, computed without writing. */
static void rolled_back_digest(const uint8_t *model, const journal *j, const np_jentry *e, uint8_t out[32])
{
    np_blake3 h;
    np_blake3_init(&h);
    const uint8_t *src = model ? model + e->offset : NULL;
    const uint8_t *idx = j->map + e->index_at, *old = j->map + e->data_at;
    uint64_t cur = 0, nunits = e->unit ? e->nbytes / e->unit : 0;
    for (uint64_t k = 0; k < e->count; k++) {
        uint64_t i = np_le64(idx + 8 * k);
        if (i > cur)
            np_blake3_update(&h, src + cur * e->unit, (size_t)((i - cur) * e->unit));
        np_blake3_update(&h, old + k * e->unit, (size_t)e->unit);
        cur = i + 1;
    }
    if (e->nbytes && nunits > cur)
        np_blake3_update(&h, src + cur * e->unit, (size_t)(e->nbytes - cur * e->unit));
    np_blake3_final(&h, out);
}

static nnp_status check_model(nnp_ctx *ctx, const char *model, const char *jpath, journal *j, int fd, uint64_t size)
{
    uint8_t *head;
    size_t hl;
    nnp_status s = model_header(ctx, model, fd, size, &head, &hl);
    if (s)
        return s;
    uint8_t hd[32];
    np_blake3_hash(head, hl, hd);
    if (j->model_size != size || j->header_len != hl || np_ct_diff(hd, j->header_blake3, 32)) {
        free(head);
        return np_fail(ctx, NNP_KIND_INTEGRITY,
                       "%s: the undo journal %s belongs to another file (it names a file of %llu bytes with a "
                       "%llu-byte safetensors header; this one is %llu bytes with a %zu-byte header, or its header "
                       "differs); not touching either",
                       model, jpath, (unsigned long long)j->model_size, (unsigned long long)j->header_len,
                       (unsigned long long)size, hl);
    }
    np_st st;
    s = np_st_parse(ctx, head, hl, size, model, NNP_KIND_WEIGHTS, &st);
    free(head);
    if (s) {
        char why[NP_MSG_MAX];
        snprintf(why, sizeof why, "%s", nnp_message(ctx));
        np_st_free(&st);
        return bad(ctx, "%s: the model it names is not a valid safetensors file (%s)", jpath, why);
    }
    for (size_t i = 0; i < j->n && !s; i++) {
        const np_jentry *e = &j->entries[i];
        char q[NP_QUOTE_MAX];
        np_quote(q, sizeof q, e->name, e->name_len);
        const np_tensor *t = np_st_find(&st, e->name, e->name_len);
        if (!t) {
            s = bad(ctx, "%s: entry %s: the model has no such tensor", jpath, q);
            break;
        }
        if (e->offset != t->begin || e->nbytes != t->nbytes) {
            s = bad(ctx, "%s: entry %s: bytes %llu..%llu are not the tensor's %llu..%llu", jpath, q,
                    (unsigned long long)e->offset, (unsigned long long)(e->offset + e->nbytes),
                    (unsigned long long)t->begin, (unsigned long long)t->end);
            break;
        }
        /* a row (op rows), an element (op elements) or the whole tensor: what inplace.c writes */
        uint64_t item = np_dtypes[t->dtype].size;
        uint64_t row = (t->rank && t->shape[0]) ? t->nbytes / t->shape[0] : UINT64_MAX;
        int ok = e->unit == t->nbytes || e->unit == item || e->unit == row;
        if (!ok || (e->unit && t->nbytes % e->unit)) {
            s = bad(ctx, "%s: entry %s: unit %llu is not a row, an element or the whole of the tensor", jpath, q,
                    (unsigned long long)e->unit);
            break;
        }
        if (e->count) {
            uint64_t bound = t->nbytes / e->unit, prev = 0;
            const uint8_t *idx = j->map + e->index_at;
            for (uint64_t k = 0; k < e->count; k++) {
                uint64_t v = np_le64(idx + 8 * k);
                if (k && v <= prev) {
                    s = bad(ctx, "%s: entry %s: unit indices are not strictly increasing", jpath, q);
                    break;
                }
                if (v >= bound) {
                    s = bad(ctx, "%s: entry %s: a unit index is >= %llu, the tensor's number of units", jpath, q,
                            (unsigned long long)bound);
                    break;
                }
                prev = v;
            }
        }
    }
    np_st_free(&st);
    return s;
}

nnp_status np_recover_locked(nnp_ctx *ctx, const char *model, int fd, int *recovered)
{
    if (recovered)
        *recovered = 0;
    char *jpath = np_journal_path(model, NP_JOURNAL_SUFFIX);
    char *tpath = np_journal_path(model, NP_JOURNAL_TMP_SUFFIX);
    nnp_status s = NNP_OK;
    journal j;
    memset(&j, 0, sizeof j);
    uint8_t *m = NULL;
    uint64_t msize = 0;
    if (!jpath || !tpath) {
        s = np_fail(ctx, NNP_KIND_IO, "%s: out of memory", model);
        goto out;
    }
    if (lexists(tpath)) { /* never committed: the model was not written */
        if ((s = unlink_or_fail(ctx, tpath)))
            goto out;
        (void)np_fsync_dir_of(model); /* best effort: not a commit point later writes rely on */
    }
    if (!lexists(jpath))
        goto out;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        s = np_fail_errno(ctx, errno, model, "cannot stat");
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        s = np_fail(ctx, NNP_KIND_USAGE, "%s: not a file, so the undo journal %s cannot be its; not touching either",
                    model, jpath);
        goto out;
    }
    msize = (uint64_t)st.st_size;
    int torn;
    if ((s = read_journal(ctx, jpath, msize, &j, &torn)))
        goto out;
    if (torn) {
        /* A journal reaches its final name only complete and fsynced, and the model is written only after
         * that: a torn one means the storage lost it, and the model was never written through it. */
        np_clear(ctx);
        if ((s = unlink_or_fail(ctx, jpath)))
            goto out;
        (void)np_fsync_dir_of(model); /* best effort: not a commit point later writes rely on */
        goto out;
    }
    if ((s = check_model(ctx, model, jpath, &j, fd, msize)))
        goto out;
    if (j.n && msize) {
        if (msize > SIZE_MAX) {
            s = np_fail(ctx, NNP_KIND_IO, "%s: too large to map", model);
            goto out;
        }
        void *p = mmap(NULL, (size_t)msize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) {
            s = np_fail_errno(ctx, errno, model, "cannot map for writing");
            goto out;
        }
        m = p;
    }
    for (size_t i = 0; i < j.n; i++) { /* Trust step 5: the result, before any write */
        const np_jentry *e = &j.entries[i];
        uint8_t d[32];
        rolled_back_digest(m, &j, e, d);
        if (np_ct_diff(d, e->base_blake3, 32)) {
            char q[NP_QUOTE_MAX], a[65], b[65];
            np_quote(q, sizeof q, e->name, e->name_len);
            hex32(d, a);
            hex32(e->base_blake3, b);
            s = np_fail(ctx, NNP_KIND_INTEGRITY,
                        "%s: the undo journal %s does not roll tensor %s back to its base (it would be BLAKE3 %s, the "
                        "journal expects %s): the model changed since, or the journal is not its; the journal is "
                        "kept and the model was not written",
                        model, jpath, q, a, b);
            goto out;
        }
    }
    for (size_t i = 0; i < j.n; i++) { /* the writes */
        const np_jentry *e = &j.entries[i];
        const uint8_t *idx = j.map + e->index_at, *old = j.map + e->data_at;
        for (uint64_t k = 0; k < e->count; k++)
            memcpy(m + e->offset + np_le64(idx + 8 * k) * e->unit, old + k * e->unit, (size_t)e->unit);
    }
    if (m && msync(m, (size_t)msize, MS_SYNC) != 0) {
        s = np_fail_errno(ctx, errno, model, "cannot write back the journal's bytes");
        goto out;
    }
    if (fsync(fd) != 0) {
        s = np_fail_errno(ctx, errno, model, "cannot write back the journal's bytes");
        goto out;
    }
    for (size_t i = 0; i < j.n; i++) { /* catches storage that did not keep what was written */
        const np_jentry *e = &j.entries[i];
        uint8_t d[32];
        np_blake3_hash(m ? m + e->offset : (const uint8_t *)"", (size_t)e->nbytes, d);
        if (np_ct_diff(d, e->base_blake3, 32)) {
            char q[NP_QUOTE_MAX], a[65], b[65];
            np_quote(q, sizeof q, e->name, e->name_len);
            hex32(d, a);
            hex32(e->base_blake3, b);
            s = np_fail(ctx, NNP_KIND_INTEGRITY,
                        "%s: rollback left tensor %s different from the base (BLAKE3 %s, expected %s); the journal "
                        "%s is kept",
                        model, q, a, b, jpath);
            goto out;
        }
    }
    if ((s = unlink_or_fail(ctx, jpath)))
        goto out;
    (void)np_fsync_dir_of(model); /* best effort: not a commit point later writes rely on */
    if (recovered)
        *recovered = 1;
out:
    if (m)
        munmap(m, (size_t)msize);
    journal_close(&j);
    free(jpath);
    free(tpath);
    return s;
}

nnp_status np_lock_model(nnp_ctx *ctx, const char *model, int *fdp)
{
    *fdp = -1;
    struct stat st;
    int isdir = stat(model, &st) == 0 && S_ISDIR(st.st_mode);
    /* a model directory is locked through its directory's descriptor */
    int fd = open(model, (isdir ? O_RDONLY : O_RDWR) | O_CLOEXEC);
    if (fd < 0)
        return np_fail_errno(ctx, errno, model, "cannot open for writing");
    while (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        int e = errno;
        if (e == EINTR)
            continue;
        close(fd);
        if (e == EWOULDBLOCK)
            return np_fail(ctx, NNP_KIND_IO,
                           "%s: locked: another nnpatch is updating this model; try again when it has finished", model);
        return np_fail_errno(ctx, e, model, "cannot lock");
    }
    struct stat a, b;
    if (fstat(fd, &a) != 0 || stat(model, &b) != 0 || a.st_ino != b.st_ino || a.st_dev != b.st_dev) {
        close(fd);
        return np_fail(ctx, NNP_KIND_IO, "%s: replaced while waiting for the lock; try again", model);
    }
    *fdp = fd;
    return NNP_OK;
}

nnp_status np_journal_refuse_unfinished(nnp_ctx *ctx, const char *model)
{
    char *jpath = np_journal_path(model, NP_JOURNAL_SUFFIX);
    if (!jpath)
        return np_fail(ctx, NNP_KIND_IO, "%s: out of memory", model);
    struct stat st;
    nnp_status s = NNP_OK;
    if (stat(jpath, &st) == 0)
        s = np_fail(ctx, NNP_KIND_INTEGRITY,
                    "%s: an in-place update of this model was interrupted (undo journal %s); run `nnpatch recover %s` "
                    "first",
                    model, jpath, model);
    free(jpath);
    return s;
}
