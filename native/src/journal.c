/*
 * The undo journal's format (spec/JOURNAL.md): the writer and the reader with Trust checks 1
 * and 2. Python twin: nnpatch/applier/journal.py; byte for byte the journal it writes, and a
 * journal of either implementation is read by the other. Recovery is recover.c.
 */
#include "journal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blake3.h"
#include "json.h"
#include "jsonw.h"

static const uint8_t MAGIC[8] = {0x89, 'N', 'N', 'J', '\r', '\n', 0x1a, '\n'};
#define MAX_INT ((uint64_t)INT64_MAX)
#define WBUF (1u << 20)

/* ---- names ----------------------------------------------------------------------------- */

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

static void header_text(npw_buf *b, const np_jmeta *m, const np_jentry *e, size_t n)
{
    npw_str(b, "{\"base\":{\"blake3\":");
    npw_hex32(b, m->base_blake3);
    npw_str(b, ",\"model_blake3\":");
    npw_hex32(b, m->base_model);
    npw_str(b, "},\"created_by\":\"nnpatch\",\"entries\":[");
    for (size_t i = 0; i < n; i++) {
        if (i)
            npw_put(b, ",", 1);
        npw_str(b, "{\"base_blake3\":");
        npw_hex32(b, e[i].base_blake3);
        npw_str(b, ",\"count\":");
        npw_u64(b, e[i].count);
        npw_str(b, ",\"data_at\":");
        npw_u64(b, e[i].data_at);
        npw_str(b, ",\"index_at\":");
        npw_u64(b, e[i].index_at);
        npw_str(b, ",\"name\":");
        npw_string(b, e[i].name, e[i].name_len);
        npw_str(b, ",\"nbytes\":");
        npw_u64(b, e[i].nbytes);
        npw_str(b, ",\"offset\":");
        npw_u64(b, e[i].offset);
        npw_str(b, ",\"target_blake3\":");
        npw_hex32(b, e[i].target_blake3);
        npw_str(b, ",\"unit\":");
        npw_u64(b, e[i].unit);
        npw_str(b, "}");
    }
    if (m->extents) { /* 1.1: an extents model, named by its table and skeleton */
        static const char hx[] = "0123456789abcdef";
        npw_str(b, "],\"model\":{\"extents\":\"");
        for (size_t i = 0; i < m->extents_len; i++) {
            char two[2] = {hx[m->extents[i] >> 4], hx[m->extents[i] & 15]};
            npw_put(b, two, 2);
        }
        npw_str(b, "\",\"size\":");
        npw_u64(b, m->model_size);
        npw_str(b, ",\"skeleton_blake3\":");
        npw_hex32(b, m->skeleton_blake3);
    } else {
        npw_str(b, "],\"model\":{\"header_blake3\":");
        npw_hex32(b, m->header_blake3);
        npw_str(b, ",\"header_len\":");
        npw_u64(b, m->header_len);
        npw_str(b, ",\"size\":");
        npw_u64(b, m->model_size);
    }
    npw_str(b, "},\"patch\":");
    npw_hex32(b, m->patch);
    npw_str(b, ",\"target\":{\"blake3\":");
    npw_hex32(b, m->target_blake3);
    npw_str(b, ",\"model_blake3\":");
    npw_hex32(b, m->target_model);
    npw_str(b, "}}");
    size_t pad = (size_t)(np_align64(NP_JOURNAL_PREAMBLE + (uint64_t)b->len) - NP_JOURNAL_PREAMBLE - b->len);
    while (pad--)
        npw_put(b, " ", 1);
}

nnp_status np_journal_encode_header(nnp_ctx *ctx, const np_jmeta *meta, np_jentry *entries, size_t n,
                                    uint8_t **out, size_t *out_len)
{
    /* encode_header: the length fixed point, reached from an empty text as Python reaches it */
    *out = NULL;
    *out_len = 0;
    npw_buf text = {0};
    for (int iter = 0; iter < 8; iter++) {
        if (!layout(entries, n, text.len)) {
            free(text.p);
            return np_fail(ctx, NNP_KIND_USAGE, "the update is too large to journal (offsets overflow)");
        }
        npw_buf next = {0};
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
        if (np_write_all(w->fd, w->buf, w->buf_len) != 0)
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
        if (jw_flush(w) != NNP_OK || np_write_all(w->fd, p, len) != 0)
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
    pre[10] = meta->extents ? 1 : 0, pre[11] = 0; /* minor: 1.1 for an extents model (a 1.0 reader refuses it) */
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

void np_journal_close(np_journal *j)
{
    if (j->map)
        munmap((void *)j->map, (size_t)j->size);
    npj_free(j->doc);
    free(j->entries);
    if (j->ext)
        np_ext_table_free(j->ext);
    free(j->ext);
    memset(j, 0, sizeof *j);
}

static uint64_t max_journal_size(uint64_t model_size)
{
    uint64_t t, r;
    if (np_mul(10, model_size, &t) || np_add(t, 4 * NP_JOURNAL_MAX_HEADER, &r))
        return UINT64_MAX;
    return r;
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

nnp_status np_journal_invalid(nnp_ctx *ctx, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    nnp_status s = np_vfail(ctx, NNP_KIND_INVALID_JOURNAL, NNP_EFORMAT, fmt, ap);
    va_end(ap);
    return s;
}

static nnp_status get_int(nnp_ctx *ctx, const npj_value *obj, const char *key, const char *where, uint64_t *out)
{
    const npj_value *v = npj_get(obj, key);
    if (v && v->kind == NPJ_INT && v->u.i.negative && v->u.i.magnitude == 0) { /* -0: Python reads 0 */
        *out = 0;
        return NNP_OK;
    }
    if (!v || npj_as_u64(v, MAX_INT, out) != 0) {
        if (v && v->kind == NPJ_INT && !v->u.i.negative)
            return np_journal_invalid(ctx, "%s: %s must be an integer in 0..2^63-1, not %llu", where, key,
                       (unsigned long long)v->u.i.magnitude);
        return np_journal_invalid(ctx, "%s: %s must be an integer in 0..2^63-1, not %s", where, key, v ? kind_name(v) : "missing");
    }
    return NNP_OK;
}

static nnp_status get_hex(nnp_ctx *ctx, const npj_value *obj, const char *key, const char *where, uint8_t out[32])
{
    const npj_value *v = npj_get(obj, key);
    if (npj_as_digest(v, out) != 0) {
        char q[NP_QUOTE_MAX];
        if (v && v->kind == NPJ_STRING)
            np_quote(q, sizeof q, v->u.str.s, v->u.str.len);
        else
            snprintf(q, sizeof q, "%s", v ? kind_name(v) : "missing");
        return np_journal_invalid(ctx, "%s: %s must be a 64-digit lowercase hex digest, not %s", where, key, q);
    }
    return NNP_OK;
}

/* An object with exactly these keys. */
static nnp_status exact_object(nnp_ctx *ctx, const npj_value *v, const char *const *keys, size_t nkeys,
                               const char *where)
{
    if (!v || v->kind != NPJ_OBJECT)
        return np_journal_invalid(ctx, "%s: must be a JSON object", where);
    char missing[256] = "", extra[NP_QUOTE_MAX] = "";
    for (size_t k = 0; k < nkeys; k++)
        if (!npj_get(v, keys[k])) {
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
        return np_journal_invalid(ctx, "%s: %s%s%s%s%s", where, missing[0] ? "missing " : "", missing,
                   missing[0] && extra[0] ? "; " : "", extra[0] ? "unknown " : "", extra);
    return NNP_OK;
}

static const char *const MODEL_KEYS[] = {"size", "header_len", "header_blake3"};
static const char *const REF_KEYS[] = {"blake3", "model_blake3"};
static const char *const ENTRY_KEYS[] = {"name", "offset", "nbytes", "unit", "count",
                                         "base_blake3", "target_blake3", "index_at", "data_at"};
static const char *const TOP_KEYS[] = {"created_by", "model", "base", "target", "patch", "entries"};

static const char *const EXTENTS_MODEL_KEYS[] = {"size", "extents", "skeleton_blake3"};

static int hexval(uint8_t c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* An extents model's `model` (1.1): its size, skeleton digest and extent table (lowercase hex),
 * the table checked by every rule of FORMAT.md 5.8 and naming a file of that size. */
static nnp_status extents_identity(nnp_ctx *ctx, np_journal *j, const npj_value *model, const char *where)
{
    nnp_status s;
    if ((s = exact_object(ctx, model, EXTENTS_MODEL_KEYS, 3, where)) ||
        (s = get_int(ctx, model, "size", where, &j->model_size)) ||
        (s = get_hex(ctx, model, "skeleton_blake3", where, j->skeleton_blake3)))
        return s;
    const npj_value *v = npj_get(model, "extents");
    int ok = v->kind == NPJ_STRING && v->u.str.len >= 2 && v->u.str.len % 2 == 0;
    for (size_t i = 0; ok && i < v->u.str.len; i++)
        ok = hexval((uint8_t)v->u.str.s[i]) >= 0;
    if (!ok)
        return np_journal_invalid(ctx, "%s: extents must be the extent table as lowercase hex", where);
    j->ext = calloc(1, sizeof *j->ext);
    size_t n = v->u.str.len / 2;
    if (j->ext)
        j->ext->raw = malloc(n);
    if (!j->ext || !j->ext->raw)
        return np_fail(ctx, NNP_KIND_IO, "%s: out of memory", where);
    for (size_t i = 0; i < n; i++)
        j->ext->raw[i] = (uint8_t)(hexval((uint8_t)v->u.str.s[2 * i]) << 4 | hexval((uint8_t)v->u.str.s[2 * i + 1]));
    char w[NP_QUOTE_MAX + 4300];
    snprintf(w, sizeof w, "%.*s: extents", NP_QUOTE_MAX + 4200, where);
    if ((s = np_ext_parse(ctx, j->ext, n, NNP_KIND_INVALID_JOURNAL, w)))
        return s;
    if (j->ext->file_size != j->model_size)
        return np_journal_invalid(ctx, "%s: the extent table describes a %llu-byte file, the model is %llu", where,
                                  (unsigned long long)j->ext->file_size, (unsigned long long)j->model_size);
    return NNP_OK;
}

/* At most one entry per name, found in one pass: a set of the entries seen, keyed by the first 8
 * bytes of each name's BLAKE3 (a planted journal cannot make the names collide), so 255,000 entries
 * cost 255,000 lookups, not 3 x 10^10 comparisons; checked in entry order, as Python's set is. */
typedef struct name_set {
    size_t *slot; /* entry index + 1; 0: empty */
    size_t mask;
} name_set;

static int name_set_init(name_set *t, size_t n)
{
    size_t cap = 16;
    while (cap < 2 * n)
        cap *= 2;
    t->mask = cap - 1;
    t->slot = calloc(cap, sizeof *t->slot);
    return t->slot != NULL;
}

/* 1 when entry i's name is an earlier entry's; else it is added. */
static int name_seen(name_set *t, const np_jentry *e, size_t i)
{
    np_blake3 h;
    uint8_t d[32];
    np_blake3_init(&h);
    np_blake3_update(&h, e[i].name, e[i].name_len);
    np_blake3_final(&h, d);
    size_t at = 0;
    memcpy(&at, d, sizeof at);
    for (at &= t->mask; t->slot[at]; at = (at + 1) & t->mask) {
        const np_jentry *o = &e[t->slot[at] - 1];
        if (o->name_len == e[i].name_len && memcmp(o->name, e[i].name, e[i].name_len) == 0)
            return 1;
    }
    t->slot[at] = i + 1;
    return 0;
}

static nnp_status names_done(name_set *t, nnp_status s)
{
    free(t->slot);
    return s;
}

static nnp_status parse_header(nnp_ctx *ctx, np_journal *j, const uint8_t *text, size_t len)
{
    const char *path = j->path;
    unsigned depth;
    uint64_t values;
    npj_shape(text, len, &depth, &values);
    if (depth > NP_JOURNAL_MAX_DEPTH)
        return np_journal_invalid(ctx, "%s: journal header nests deeper than %d", path, NP_JOURNAL_MAX_DEPTH);
    npj_limits lim = {NP_JOURNAL_MAX_DEPTH, UINT64_MAX, NPJ_MAX_STRING};
    char err[256];
    if (npj_parse(text, len, &lim, &j->doc, err, sizeof err) != 0)
        return np_journal_invalid(ctx, "%s: journal header is not valid JSON: %s", path, err);
    const npj_value *root = npj_root(j->doc);
    if (!root || root->kind != NPJ_OBJECT)
        return np_journal_invalid(ctx, "%s: journal header is not a JSON object", path);
    char missing[128] = "";
    for (size_t k = 0; k < 6; k++)
        if (!npj_get(root, TOP_KEYS[k])) {
            size_t l = strlen(missing);
            snprintf(missing + l, sizeof missing - l, "%s%s", l ? ", " : "", TOP_KEYS[k]);
        }
    if (missing[0])
        return np_journal_invalid(ctx, "%s: journal header lacks %s", path, missing);
    if (npj_get(root, "created_by")->kind != NPJ_STRING)
        return np_journal_invalid(ctx, "%s: created_by must be a string", path);
    char where[NP_QUOTE_MAX + 4200];
    nnp_status s;
    const npj_value *model = npj_get(root, "model");
    snprintf(where, sizeof where, "%s: model", path);
    if (model && model->kind == NPJ_OBJECT && npj_get(model, "extents")) {
        if ((s = extents_identity(ctx, j, model, where)))
            return s;
    } else if ((s = exact_object(ctx, model, MODEL_KEYS, 3, where)) ||
               (s = get_int(ctx, model, "size", where, &j->model_size)) ||
               (s = get_int(ctx, model, "header_len", where, &j->header_len)) ||
               (s = get_hex(ctx, model, "header_blake3", where, j->header_blake3)))
        return s;
    static const char *const sides[] = {"base", "target"};
    for (int k = 0; k < 2; k++) {
        const npj_value *r = npj_get(root, sides[k]);
        snprintf(where, sizeof where, "%s: %s", path, sides[k]);
        if ((s = exact_object(ctx, r, REF_KEYS, 2, where)) || (s = get_hex(ctx, r, "blake3", where, NULL)) ||
            (s = get_hex(ctx, r, "model_blake3", where, NULL)))
            return s;
    }
    if ((s = get_hex(ctx, root, "patch", path, NULL)))
        return s;
    const npj_value *arr = npj_get(root, "entries");
    if (arr->kind != NPJ_ARRAY)
        return np_journal_invalid(ctx, "%s: entries must be a JSON array", path);
    size_t n = arr->u.arr.n;
    uint64_t names = 0;
    j->entries = n ? calloc(n, sizeof *j->entries) : NULL;
    name_set seen = {NULL, 0};
    if ((n && !j->entries) || !name_set_init(&seen, n))
        return np_fail(ctx, NNP_KIND_IO, "%s: out of memory", path);
    for (size_t i = 0; i < n; i++) {
        const npj_value *o = &arr->u.arr.items[i];
        np_jentry *e = &j->entries[i];
        snprintf(where, sizeof where, "%s: entry %zu", path, i);
        if ((s = exact_object(ctx, o, ENTRY_KEYS, 9, where)))
            return names_done(&seen, s);
        const npj_value *name = npj_get(o, "name");
        if (name->kind != NPJ_STRING)
            return names_done(&seen, np_journal_invalid(ctx, "%s: name must be a string", where));
        e->name = name->u.str.s;
        e->name_len = name->u.str.len;
        char q[NP_QUOTE_MAX];
        np_quote(q, sizeof q, e->name, e->name_len);
        snprintf(where, sizeof where, "%s: entry %s", path, q);
        if (name_seen(&seen, j->entries, i))
            return names_done(&seen, np_journal_invalid(ctx, "%s: a second entry for the same tensor", where));
        names += e->name_len; /* JOURNAL.md Trust step 2: 16 MiB of names together, as Python counts them */
        if (names > ((uint64_t)1 << 24))
            return names_done(&seen, np_journal_invalid(ctx, "%s: the entries' names total more than 16777216 bytes of UTF-8",
                                                  where));
        if ((s = get_int(ctx, o, "offset", where, &e->offset)) || (s = get_int(ctx, o, "nbytes", where, &e->nbytes)) ||
            (s = get_int(ctx, o, "unit", where, &e->unit)) || (s = get_int(ctx, o, "count", where, &e->count)) ||
            (s = get_hex(ctx, o, "base_blake3", where, e->base_blake3)) ||
            (s = get_hex(ctx, o, "target_blake3", where, e->target_blake3)) ||
            (s = get_int(ctx, o, "index_at", where, &e->index_at)) ||
            (s = get_int(ctx, o, "data_at", where, &e->data_at)))
            return names_done(&seen, s);
        uint64_t prod;
        if (e->count && (!e->unit || np_mul(e->count, e->unit, &prod) || prod > e->nbytes))
            return names_done(&seen, np_journal_invalid(ctx, "%s: count %llu x unit %llu bytes does not fit in nbytes %llu",
                                                  where, (unsigned long long)e->count, (unsigned long long)e->unit,
                                                  (unsigned long long)e->nbytes));
        j->n = i + 1;
    }
    j->n = n;
    return names_done(&seen, NNP_OK);
}

static nnp_status check_layout(nnp_ctx *ctx, np_journal *j, uint64_t hlen)
{
    uint64_t end = j->size - NP_JOURNAL_TRAILER, pos = NP_JOURNAL_PREAMBLE + hlen, t;
    for (size_t i = 0; i < j->n; i++) {
        np_jentry *e = &j->entries[i];
        char q[NP_QUOTE_MAX];
        np_quote(q, sizeof q, e->name, e->name_len);
        if (e->index_at != pos)
            return np_journal_invalid(ctx, "%s: entry %s: index_at is %llu, its indices are at %llu", j->path, q,
                       (unsigned long long)e->index_at, (unsigned long long)pos);
        if (np_mul(8, e->count, &t) || np_add(pos, t, &pos) || pos > end)
            return np_journal_invalid(ctx, "%s: entry %s runs past the end of the journal", j->path, q);
        pos = np_align64(pos);
        if (e->data_at != pos)
            return np_journal_invalid(ctx, "%s: entry %s: data_at is %llu, its old bytes are at %llu", j->path, q,
                       (unsigned long long)e->data_at, (unsigned long long)pos);
        if (np_mul(e->unit, e->count, &t) || np_add(pos, t, &pos) || pos > end)
            return np_journal_invalid(ctx, "%s: entry %s runs past the end of the journal", j->path, q);
        pos = np_align64(pos);
        if (pos > end)
            return np_journal_invalid(ctx, "%s: entry %s runs past the end of the journal", j->path, q);
    }
    if (pos != end)
        return np_journal_invalid(ctx, "%s: %llu bytes between the last entry and the trailer", j->path,
                   (unsigned long long)(end - pos));
    return NNP_OK;
}

nnp_status np_journal_read(nnp_ctx *ctx, const char *path, uint64_t model_size, np_journal *j, int *torn)
{
    memset(j, 0, sizeof *j);
    j->path = path;
    *torn = 0;
    /* O_NONBLOCK: a FIFO planted under the journal's name must not hang recover; O_NOFOLLOW: a symlink
     * planted there is refused, not followed (JOURNAL.md, Trust step 1; SECURITY.md, files beside the model) */
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0 && errno == ELOOP)
        return np_journal_invalid(ctx, "%s: the journal is a symbolic link; nnpatch neither follows nor reuses it", path);
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
        return np_journal_invalid(ctx, "%s: the journal is not a regular file", path);
    }
    if (st.st_nlink != 1 || st.st_uid != geteuid()) {
        close(fd);
        return np_journal_invalid(ctx, "%s: the journal %s; nnpatch neither follows nor reuses it", path,
                   st.st_nlink != 1 ? "has more than one link (a hard link to another file)"
                                    : "belongs to another user");
    }
    uint64_t size = (uint64_t)st.st_size, max = max_journal_size(model_size);
    if (size > max) {
        close(fd);
        return np_journal_invalid(ctx, "%s: the journal is %llu bytes, more than any journal of a %llu-byte model (%llu)", path,
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
        return np_journal_invalid(ctx, "%s: unknown journal flags %#x", path, flags);
    if (hlen > NP_JOURNAL_MAX_HEADER)
        return np_journal_invalid(ctx, "%s: journal header of %llu bytes exceeds the %llu limit", path, (unsigned long long)hlen,
                   (unsigned long long)NP_JOURNAL_MAX_HEADER);
    if (NP_JOURNAL_PREAMBLE + hlen > size - NP_JOURNAL_TRAILER || (NP_JOURNAL_PREAMBLE + hlen) % 64)
        return np_journal_invalid(ctx, "%s: journal header length %llu does not fit the journal or is not padded to 64", path,
                   (unsigned long long)hlen);
    nnp_status s = parse_header(ctx, j, d + NP_JOURNAL_PREAMBLE, (size_t)hlen);
    if (!s)
        s = check_layout(ctx, j, hlen);
    return s;
}

