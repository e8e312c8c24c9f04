/*
 * The patch header, JSON to structs (spec/FORMAT.md section 5): the header unpacked (zstd, flag
 * bit 0), parsed as strict JSON and checked key by key, ops, sections, codecs and targets, into
 * an np_patch whose strings live in an arena. Python twin: nnpatch/patchfile/header.py (the
 * structures) with the header half of nnpatch/patchfile/reader.py (_Reader, _header_from_json,
 * unpack_header).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"
#include "patch.h"
#include "skeldelta.h"
#include "zstdframe.h"

/* ---- header parsing ---------------------------------------------------------------- */

typedef struct rd {
    nnp_ctx *ctx;
    np_patch *p;
    uint64_t names; /* bytes of op names and file paths so far (count_name) */
} rd;

#define PF(...) np_fail(r->ctx, NNP_KIND_PATCH_FORMAT, __VA_ARGS__)
#define UV(...) np_fail(r->ctx, NNP_KIND_UNSUPPORTED_VERSION, __VA_ARGS__)

static nnp_status fail_field(rd *r, const char *where, const char *msg)
{
    return PF("%s: header: %s: %s", r->p->name, where, msg);
}

/* spec/FORMAT.md section 12: op names and the paths of files and outputs total at most NP_MAX_NAMES bytes,
 * counted in reader.py's order (a reader keeps them all: bounded, so is what keeping them costs) */
static nnp_status count_name(rd *r, size_t n, const char *where, const char *suffix)
{
    char w[640];
    snprintf(w, sizeof w, "%s%s", where, suffix);
    r->names += n;
    return r->names > NP_MAX_NAMES
               ? fail_field(r, w, "the header's names and paths total more than 16777216 bytes of UTF-8")
               : NNP_OK;
}

static nnp_status missing(rd *r, const char *where, const char *key)
{
    return PF("%s: header: %s: missing required key '%s'", r->p->name, where, key);
}

/* ", found V" with V as Python's repr would show it (reader._Reader.int), for the values whose repr
 * is plain to reproduce; "" for the others (floats, integers beyond 64 bits, lists, objects). */
static const char *found_text(const npj_value *v, char *buf, size_t n)
{
    char q[NP_QUOTE_MAX];
    switch (v->kind) {
    case NPJ_NULL: snprintf(buf, n, ", found None"); break;
    case NPJ_FALSE: snprintf(buf, n, ", found False"); break;
    case NPJ_TRUE: snprintf(buf, n, ", found True"); break;
    case NPJ_INT:
        snprintf(buf, n, ", found %s%llu", v->u.i.negative ? "-" : "", (unsigned long long)v->u.i.magnitude);
        break;
    case NPJ_STRING: snprintf(buf, n, ", found %s", np_quote(q, sizeof q, v->u.str.s, v->u.str.len)); break;
    default: buf[0] = 0;
    }
    return buf;
}

static nnp_status get_obj(rd *r, const npj_value *parent, const char *key, const char *where, int optional,
                          const npj_value **out)
{
    const npj_value *v = npj_get(parent, key);
    *out = NULL;
    if (!v)
        return optional ? NNP_OK : missing(r, where, key);
    if (v->kind != NPJ_OBJECT) {
        char w[512];
        snprintf(w, sizeof w, "%s.%s", where, key);
        return fail_field(r, w, "must be an object");
    }
    *out = v;
    return NNP_OK;
}

static nnp_status get_int(rd *r, const npj_value *parent, const char *key, const char *where, int optional,
                          int *present, uint64_t *out)
{
    const npj_value *v = npj_get(parent, key);
    if (present)
        *present = v != NULL;
    if (!v)
        return optional ? NNP_OK : missing(r, where, key);
    if (npj_as_u64(v, (uint64_t)INT64_MAX, out) != 0) {
        char w[512], found[NP_QUOTE_MAX + 16];
        snprintf(w, sizeof w, "%s.%s", where, key);
        return PF("%s: header: %s: must be an integer in [0, 2^63)%s", r->p->name, w, found_text(v, found, sizeof found));
    }
    return NNP_OK;
}

static nnp_status get_str(rd *r, const npj_value *parent, const char *key, const char *where, int optional,
                          const npj_value **out)
{
    const npj_value *v = npj_get(parent, key);
    *out = NULL;
    if (!v)
        return optional ? NNP_OK : missing(r, where, key);
    if (v->kind != NPJ_STRING) {
        char w[512];
        snprintf(w, sizeof w, "%s.%s", where, key);
        return PF("%s: header: %s: must be a string, found %s", r->p->name, w, npj_type_name(v));
    }
    *out = v;
    return NNP_OK;
}

static nnp_status get_digest(rd *r, const npj_value *parent, const char *key, const char *where, uint8_t out[32])
{
    const npj_value *v;
    nnp_status st = get_str(r, parent, key, where, 0, &v);
    if (st)
        return st;
    int ok = npj_as_digest(v, out) == 0;
    if (!ok) {
        char w[512];
        snprintf(w, sizeof w, "%s.%s", where, key);
        return fail_field(r, w, "must be 64 lowercase hex digits");
    }
    return NNP_OK;
}

static int stage_code(const char *s, size_t n)
{
    static const char *names[] = {NULL, "xor", "add", "zadd", "esort", "planes", "zstd",
                                  "u32", "u64", "delta-varint", "bitmap", "zstd-base"};
    for (int i = 1; i <= NP_S_ZSTD_BASE; i++)
        if (strlen(names[i]) == n && memcmp(names[i], s, n) == 0)
            return i;
    return NP_S_UNKNOWN;
}

/* A section; *codec gets the JSON codec list (for messages of the codec checks). */
static nnp_status get_section(rd *r, const npj_value *parent, const char *key, const char *where, int optional,
                              np_section *out, const npj_value **codec)
{
    const npj_value *o;
    memset(out, 0, sizeof *out);
    nnp_status st = get_obj(r, parent, key, where, optional, &o);
    if (st || !o)
        return st;
    char w[512];
    snprintf(w, sizeof w, "%s.%s", where, key);
    const npj_value *c = npj_get(o, "codec");
    int ok = c && c->kind == NPJ_ARRAY && c->u.arr.n <= 8;
    for (size_t i = 0; ok && i < c->u.arr.n; i++)
        if (c->u.arr.items[i].kind != NPJ_STRING)
            ok = 0;
    if (!ok)
        return fail_field(r, w, "codec must be a list of at most 8 stage names");
    if ((st = get_int(r, o, "offset", w, 0, NULL, &out->offset)) || (st = get_int(r, o, "length", w, 0, NULL, &out->length)) ||
        (st = get_int(r, o, "size", w, 0, NULL, &out->size)))
        return st;
    out->nst = (uint8_t)c->u.arr.n;
    for (size_t i = 0; i < c->u.arr.n; i++)
        out->st[i] = (uint8_t)stage_code(c->u.arr.items[i].u.str.s, c->u.arr.items[i].u.str.len);
    out->present = 1;
    *codec = c;
    return NNP_OK;
}

static int is_delta(int s) { return s == NP_S_XOR || s == NP_S_ADD || s == NP_S_ZADD; }

static void codec_text(const npj_value *codec, char *buf, size_t n)
{
    size_t o = 0;
    o += (size_t)snprintf(buf + o, n - o, "[");
    for (size_t i = 0; i < codec->u.arr.n && o < n; i++) {
        char q[64];
        np_quote(q, sizeof q, codec->u.arr.items[i].u.str.s, codec->u.arr.items[i].u.str.len);
        o += (size_t)snprintf(buf + o, n - o, "%s%s", i ? ", " : "", q);
    }
    if (o < n)
        snprintf(buf + o, n - o, "]");
}

/* codecs.check_value_codec, wrapped "header: ". dtype < 0: none. */
static nnp_status check_value_codec(rd *r, const np_section *s, const npj_value *codec, int relative_allowed,
                                    const char *where, int dtype)
{
    static const int rank[] = {0, 0, 0, 0, 1, 2, 3};
    for (unsigned i = 0; i < s->nst; i++)
        if (s->st[i] == NP_S_UNKNOWN || s->st[i] > NP_S_ZSTD) {
            char q[128];
            np_quote(q, sizeof q, codec->u.arr.items[i].u.str.s, codec->u.arr.items[i].u.str.len);
            return UV("%s: header: %s: unknown encoding %s", r->p->name, where, q);
        }
    for (unsigned i = 1; i < s->nst; i++)
        if (rank[s->st[i]] <= rank[s->st[i - 1]]) {
            char t[256];
            codec_text(codec, t, sizeof t);
            return PF("%s: header: %s: codec stages %s out of order or repeated", r->p->name, where, t);
        }
    if (!relative_allowed && s->nst && is_delta(s->st[0])) {
        char q[64];
        np_quote(q, sizeof q, codec->u.arr.items[0].u.str.s, codec->u.arr.items[0].u.str.len);
        return PF("%s: header: %s: delta stage %s needs an old tensor of the same dtype and shape", r->p->name,
                  where, q);
    }
    if (np_sec_has(s, NP_S_ESORT)) {
        if (!np_sec_delta(s))
            return PF("%s: header: %s: stage 'esort' needs a delta stage before it", r->p->name, where);
        if (dtype < 0 || np_dtypes[dtype].esort_shift < 0)
            return PF("%s: header: %s: stage 'esort' needs a floating-point dtype, not %s", r->p->name, where,
                      dtype < 0 ? "None" : np_dtypes[dtype].name);
    }
    return NNP_OK;
}

static nnp_status check_index_codec(rd *r, const np_section *s, const npj_value *codec, const char *where)
{
    if (s->nst == 0)
        return PF("%s: header: %s: index codec must be a non-empty list of stage names", r->p->name, where);
    for (unsigned i = 0; i < s->nst; i++) {
        int ok = i == 0 ? (s->st[0] >= NP_S_U32 && s->st[0] <= NP_S_BITMAP) : s->st[i] == NP_S_ZSTD;
        if (!ok) {
            char q[128];
            np_quote(q, sizeof q, codec->u.arr.items[i].u.str.s, codec->u.arr.items[i].u.str.len);
            return UV("%s: header: %s: unknown index encoding %s", r->p->name, where, q);
        }
    }
    if (s->nst > 2)
        return PF("%s: header: %s: codec stage 'zstd' repeated", r->p->name, where);
    return NNP_OK;
}

static int delta_or_planes(const np_section *s)
{
    for (unsigned i = 0; i < s->nst; i++)
        if (is_delta(s->st[i]) || s->st[i] == NP_S_PLANES)
            return 1;
    return 0;
}

static nnp_status get_tensor(rd *r, const npj_value *parent, const char *key, const char *where, np_tref *out)
{
    const npj_value *o, *dt;
    nnp_status st = get_obj(r, parent, key, where, 0, &o);
    if (st)
        return st;
    char w[512];
    snprintf(w, sizeof w, "%s.%s", where, key);
    if ((st = get_str(r, o, "dtype", w, 0, &dt)))
        return st;
    int d = np_dtype_find(dt->u.str.s, dt->u.str.len);
    if (d < 0) {
        char q[128];
        np_quote(q, sizeof q, dt->u.str.s, dt->u.str.len);
        return UV("%s: header: %s.dtype: unknown dtype %s", r->p->name, w, q);
    }
    const npj_value *sh = npj_get(o, "shape");
    int ok = sh && sh->kind == NPJ_ARRAY && sh->u.arr.n <= NP_MAX_RANK;
    for (size_t i = 0; ok && i < sh->u.arr.n; i++) {
        const npj_value *v = &sh->u.arr.items[i];
        if (v->kind != NPJ_INT || v->u.i.negative || v->u.i.magnitude >= NP_LIMIT_62)
            ok = 0;
    }
    if (!ok) {
        char w2[600];
        snprintf(w2, sizeof w2, "%s.shape", w);
        return fail_field(r, w2, "must be a list of at most 64 non-negative integers");
    }
    uint64_t *shape = np_arena_alloc(&r->p->arena, (sh->u.arr.n ? sh->u.arr.n : 1) * sizeof(uint64_t));
    if (!shape)
        return PF("%s: out of memory parsing the header", r->p->name);
    uint64_t numel = 1, nbytes = 0;
    int zero = 0, over = 0;
    for (size_t i = 0; i < sh->u.arr.n; i++) {
        shape[i] = sh->u.arr.items[i].u.i.magnitude;
        if (!shape[i])
            zero = 1;
        else if (!over && np_mul(numel, shape[i], &numel))
            over = 1;
    }
    if (zero)
        numel = 0;
    else if (over || np_mul(numel, np_dtypes[d].size, &nbytes) || nbytes >= NP_LIMIT_62) {
        char w2[600];
        snprintf(w2, sizeof w2, "%s.shape", w);
        return fail_field(r, w2, "tensor too large");
    }
    out->present = 1;
    out->dtype = d;
    out->rank = (unsigned)sh->u.arr.n;
    out->shape = shape;
    out->numel = numel;
    out->nbytes = nbytes;
    return get_digest(r, o, "blake3", w, out->blake3);
}

/* reader.check_relative_path: NULL when fine. */
static const char *check_relative_path(const char *s, size_t n)
{
    if (n == 0 || n > NP_MAX_PATH)
        return "must be 1 to 4096 bytes of UTF-8";
    if (memchr(s, '\\', n) || memchr(s, 0, n) || s[0] == '/')
        return "must be a relative path with '/' separators, without NUL or backslash";
    size_t a = 0, parts = 0, longest = 0;
    for (size_t i = 0; i <= n; i++)
        if (i == n || s[i] == '/') {
            size_t l = i - a;
            if (l == 0 || (l == 1 && s[a] == '.') || (l == 2 && s[a] == '.' && s[a + 1] == '.'))
                return "must not have an empty, '.' or '..' component";
            parts++;
            longest = l > longest ? l : longest;
            a = i + 1;
        }
    /* spec 5.6 (issue 28): checked in this order by reader.check_relative_path too */
    if (parts > 65)
        return "must not lie more than 64 directories deep";
    if (longest > 255)
        return "must not have a component longer than 255 bytes";
    a = 0;
    for (size_t i = 0; i <= n; i++)
        if (i == n || s[i] == '/') {
            size_t l = i - a;
            /* casefold of ".git": ASCII letters only can fold to g, i, t here (plus the Kelvin-free set) */
            if (l == 4 && s[a] == '.' && (s[a + 1] | 32) == 'g' && (s[a + 2] | 32) == 'i' && (s[a + 3] | 32) == 't')
                return "must not name or lie inside '.git'";
            a = i + 1;
        }
    return NULL;
}

static char *arena_str(np_arena_blk **a, const char *s, size_t n)
{
    char *d = np_arena_alloc(a, n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = 0;
    }
    return d;
}

static nnp_status target_files(rd *r, const npj_value *o, const char *key, np_model *m)
{
    const npj_value *items = npj_get(o, "files");
    char w[512];
    snprintf(w, sizeof w, "%s.files", key);
    if (!items || items->kind != NPJ_ARRAY || items->u.arr.n < 1 || items->u.arr.n > NP_MAX_FILES)
        return fail_field(r, w, "must be a list of 1 to 65536 files");
    m->files = np_arena_alloc(&r->p->arena, items->u.arr.n * sizeof *m->files);
    if (!m->files)
        return PF("%s: out of memory", r->p->name);
    m->nfiles = 0;
    const char *prev = NULL;
    size_t prev_len = 0;
    nnp_status st;
    char q[NP_QUOTE_MAX];
    for (size_t i = 0; i < items->u.arr.n; i++) {
        const npj_value *fj = &items->u.arr.items[i];
        char where[512], w2[600];
        snprintf(where, sizeof where, "%s.files[%zu]", key, i);
        if (fj->kind != NPJ_OBJECT)
            return fail_field(r, where, "must be an object");
        const npj_value *pv, *kv;
        if ((st = get_str(r, fj, "path", where, 0, &pv)))
            return st;
        const char *why = check_relative_path(pv->u.str.s, pv->u.str.len);
        np_quote(q, sizeof q, pv->u.str.s, pv->u.str.len);
        snprintf(w2, sizeof w2, "%s.path", where);
        if (why)
            return PF("%s: header: %s: %s %s", r->p->name, w2, q, why);
        if (prev && np_name_cmp(pv->u.str.s, pv->u.str.len, prev, prev_len) <= 0)
            return PF("%s: header: %s: %s: files must be sorted by path, without duplicates", r->p->name, w2, q);
        if (prev && pv->u.str.len > prev_len && memcmp(pv->u.str.s, prev, prev_len) == 0 &&
            pv->u.str.s[prev_len] == '/')
            return PF("%s: header: %s: %s lies inside a file", r->p->name, w2, q);
        if ((st = count_name(r, pv->u.str.len, w2, "")))
            return st;
        prev = pv->u.str.s;
        prev_len = pv->u.str.len;
        if ((st = get_str(r, fj, "kind", where, 0, &kv)))
            return st;
        np_tfile *f = &m->files[i];
        memset(f, 0, sizeof *f);
        const char *ks = kv->u.str.s;
        size_t kl = kv->u.str.len;
        if (kl == 11 && !memcmp(ks, "safetensors", 11))
            f->kind = NP_FILE_SAFETENSORS;
        else if (kl == 4 && !memcmp(ks, "blob", 4))
            f->kind = NP_FILE_BLOB;
        else if (kl == 4 && !memcmp(ks, "copy", 4))
            f->kind = NP_FILE_COPY;
        else {
            np_quote(q, sizeof q, ks, kl);
            return UV("%s: header: %s.kind: unknown file kind %s", r->p->name, where, q);
        }
        if ((st = get_int(r, fj, "size", where, 0, NULL, &f->size)) || (st = get_digest(r, fj, "blake3", where, f->blake3)))
            return st;
        static const char *fields[] = {"layout", "content", "from"};
        for (int k = 0; k < 3; k++)
            if (k != f->kind - 1 && npj_get(fj, fields[k]))
                return PF("%s: header: %s: a '%.*s' file has no '%s'", r->p->name, where, (int)kl, ks, fields[k]);
        const npj_value *codec = NULL;
        if (f->kind == NP_FILE_SAFETENSORS) {
            if ((st = get_section(r, fj, "layout", where, 0, &f->layout, &codec)))
                return st;
        } else if (f->kind == NP_FILE_BLOB) {
            if ((st = get_section(r, fj, "content", where, 0, &f->content, &codec)))
                return st;
            if (f->content.size != f->size) {
                snprintf(w2, sizeof w2, "%s.content", where);
                return PF("%s: header: %s: size %llu is not the file's size %llu", r->p->name, w2,
                          (unsigned long long)f->content.size, (unsigned long long)f->size);
            }
        } else {
            const npj_value *fr;
            if ((st = get_str(r, fj, "from", where, 0, &fr)))
                return st;
            why = check_relative_path(fr->u.str.s, fr->u.str.len);
            if (why) {
                np_quote(q, sizeof q, fr->u.str.s, fr->u.str.len);
                return PF("%s: header: %s.from: %s %s", r->p->name, where, q, why);
            }
            if ((st = count_name(r, fr->u.str.len, where, ".from")))
                return st;
            f->from = arena_str(&r->p->arena, fr->u.str.s, fr->u.str.len);
            f->from_len = fr->u.str.len;
        }
        np_section *s = f->kind == NP_FILE_SAFETENSORS ? &f->layout : f->kind == NP_FILE_BLOB ? &f->content : NULL;
        if (s) {
            const char *nm = f->kind == NP_FILE_SAFETENSORS ? "layout" : "content";
            snprintf(w2, sizeof w2, "%s.%s", where, nm);
            if ((st = check_value_codec(r, s, codec, 0, w2, -1)))
                return st;
            if (delta_or_planes(s)) {
                char w3[700];
                snprintf(w3, sizeof w3, "%s.codec", w2);
                return PF("%s: header: %s: %s is stored raw or as zstd only", r->p->name, w3, nm);
            }
        }
        f->path = arena_str(&r->p->arena, pv->u.str.s, pv->u.str.len);
        f->path_len = pv->u.str.len;
        if (!f->path)
            return PF("%s: out of memory", r->p->name);
        m->nfiles++;
    }
    uint64_t total = 0;
    for (size_t i = 0; i < m->nfiles; i++)
        if (np_add(total, m->files[i].size, &total))
            total = UINT64_MAX;
    if (total != m->size) {
        snprintf(w, sizeof w, "%s.size", key);
        return PF("%s: header: %s: %llu is not the sum of its files' sizes (%llu)", r->p->name, w,
                  (unsigned long long)m->size, (unsigned long long)total);
    }
    return NNP_OK;
}

static nnp_status onnx_outputs(rd *r, const npj_value *o, const char *key, np_model *m)
{
    const npj_value *items = npj_get(o, "outputs");
    char w[512];
    snprintf(w, sizeof w, "%s.outputs", key);
    if (!items || items->kind != NPJ_ARRAY || items->u.arr.n < 1 || items->u.arr.n > NP_MAX_FILES)
        return fail_field(r, w, "must be a list of 1 to 65536 files");
    nnp_status st;
    char q[NP_QUOTE_MAX];
    for (size_t i = 0; i < items->u.arr.n; i++) {
        const npj_value *fj = &items->u.arr.items[i], *pv;
        char where[512];
        snprintf(where, sizeof where, "%s.outputs[%zu]", key, i);
        if (fj->kind != NPJ_OBJECT)
            return fail_field(r, where, "must be an object");
        if ((st = get_str(r, fj, "path", where, 0, &pv)))
            return st;
        const char *why = check_relative_path(pv->u.str.s, pv->u.str.len);
        if (!why && i == 0 && memchr(pv->u.str.s, '/', pv->u.str.len))
            why = "must be a file name, without '/'";
        if (why) {
            np_quote(q, sizeof q, pv->u.str.s, pv->u.str.len);
            return PF("%s: header: %s.path: %s %s", r->p->name, where, q, why);
        }
        for (size_t j = 0; j < i; j++) {
            const npj_value *pj = npj_get(&items->u.arr.items[j], "path");
            if (pj->u.str.len == pv->u.str.len && !memcmp(pj->u.str.s, pv->u.str.s, pv->u.str.len)) {
                np_quote(q, sizeof q, pv->u.str.s, pv->u.str.len);
                return PF("%s: header: %s.path: %s is listed twice", r->p->name, where, q);
            }
        }
        if ((st = count_name(r, pv->u.str.len, where, ".path")))
            return st;
        uint64_t size;
        uint8_t dg[32];
        if ((st = get_int(r, fj, "size", where, 0, NULL, &size)) || (st = get_digest(r, fj, "blake3", where, dg)))
            return st;
    }
    m->noutputs = items->u.arr.n;
    return NNP_OK;
}

static nnp_status model_ref(rd *r, const npj_value *root, const char *key, np_model *m)
{
    const npj_value *o, *fv;
    nnp_status st;
    int target = key[0] == 't';
    memset(m, 0, sizeof *m);
    if ((st = get_obj(r, root, key, "header", 0, &o)) || (st = get_str(r, o, "format", key, 0, &fv)))
        return st;
    const char *f = fv->u.str.s;
    size_t fl = fv->u.str.len;
    if (fl == 11 && !memcmp(f, "safetensors", 11))
        m->format = NP_FMT_SAFETENSORS;
    else if (fl == 15 && !memcmp(f, "safetensors-dir", 15))
        m->format = NP_FMT_DIR;
    else if (fl == 7 && !memcmp(f, "pytorch", 7))
        m->format = NP_FMT_PYTORCH;
    else if (fl == 4 && !memcmp(f, "onnx", 4))
        m->format = NP_FMT_ONNX;
    else if (fl == 7 && !memcmp(f, "extents", 7))
        m->format = NP_FMT_EXTENTS;
    else {
        char q[128];
        np_quote(q, sizeof q, f, fl);
        return UV("%s: header: %s.format: unknown model format %s", r->p->name, key, q);
    }
    int directory = target && m->format == NP_FMT_DIR;
    const npj_value *codec = NULL;
    if ((st = get_int(r, o, "size", key, 0, NULL, &m->size)) || (st = get_digest(r, o, "blake3", key, m->blake3)) ||
        (st = get_digest(r, o, "model_blake3", key, m->model_blake3)) ||
        (st = get_int(r, o, "tensors", key, 0, NULL, &m->tensors)) ||
        (st = get_section(r, o, "layout", key, !target || directory, &m->layout, &codec)))
        return st;
    if (directory) {
        if (m->layout.present) {
            char w[64];
            snprintf(w, sizeof w, "%s.layout", key);
            return fail_field(r, w, "a directory target describes its files under 'files', not 'layout'");
        }
        if ((st = target_files(r, o, key, m)))
            return st;
    } else if (npj_get(o, "files")) {
        char w[64];
        snprintf(w, sizeof w, "%s.files", key);
        return fail_field(r, w, "only a directory target ('safetensors-dir') lists files");
    }
    int ext = m->format == NP_FMT_EXTENTS; /* 1.4, spec 5.8: its table; a target's skeleton and one output */
    if (target && (m->format == NP_FMT_ONNX || ext)) {
        if ((st = get_section(r, o, "skeleton", key, 0, &m->skeleton, &codec)) || (st = onnx_outputs(r, o, key, m)))
            return st;
        const npj_value *out0 = &npj_get(o, "outputs")->u.arr.items[0];
        if (ext && m->noutputs != 1)
            return fail_field(r, "target.outputs", "an extents target writes exactly one file");
        if (ext && ((st = get_int(r, out0, "size", "target.outputs[0]", 0, NULL, &m->output_size)) ||
                    (st = get_digest(r, out0, "blake3", "target.outputs[0]", m->output_blake3))))
            return st;
    } else if (npj_get(o, "skeleton") || npj_get(o, "outputs")) {
        return fail_field(r, key, "only an ONNX or extents target has 'skeleton' and 'outputs'");
    }
    if (ext ? (st = get_section(r, o, "extents", key, 0, &m->extents, &codec)) != NNP_OK : !!npj_get(o, "extents"))
        return st ? st : fail_field(r, target ? "target.extents" : "base.extents", "is for extents models only");
    return NNP_OK;
}

static nnp_status layout_codec(rd *r, const npj_value *root, const char *role, const char *name,
                               const np_section *s)
{
    if (!s->present)
        return NNP_OK;
    if (np_sec_zstd_base(s) && !strcmp(name, "skeleton")) /* 1.5: a skeleton delta, its rules in skeldelta.c */
        return np_skel_check_codec(r->ctx, r->p);
    /* find the codec JSON again for messages */
    const npj_value *m = npj_get(root, role), *sec = m ? npj_get(m, name) : NULL, *codec = sec ? npj_get(sec, "codec") : NULL;
    char w[128];
    snprintf(w, sizeof w, "%s.%s", role, name);
    nnp_status st = check_value_codec(r, s, codec, 0, w, -1);
    if (st)
        return st;
    if (delta_or_planes(s))
        return PF("%s: header: %s.codec: %s is stored raw or as zstd only", r->p->name, w, name);
    return NNP_OK;
}

/* An op's count against its tensor (1 to the positions there are, at most half the elements of an
 * 'elements' op) and its values and scales sections against the bytes the op writes. */
static nnp_status check_op_sizes(rd *r, const np_op *op, const char *w)
{
    int k = op->kind;
    const np_tref *t = &op->target;
    uint64_t bound = 0, expected = 0;
    int has_bound = 0;
    if (k == NP_OP_ROWS) {
        bound = t->shape[0];
        uint64_t row_bytes = bound ? t->nbytes / bound : 0;
        has_bound = 1;
        if (np_mul(op->count, row_bytes, &expected))
            expected = UINT64_MAX; /* cannot equal a size < 2^63 */
    } else if (k == NP_OP_QROWS) {
        bound = t->shape[0];
        uint64_t row_elements = bound ? t->numel / bound : 0;
        has_bound = 1;
        if (np_mul(op->count, np_qrows_row_bytes(row_elements, op->bits), &expected))
            expected = UINT64_MAX;
    } else if (k == NP_OP_ELEMENTS) {
        bound = t->numel;
        has_bound = 1;
        if (np_mul(op->count, np_dtypes[t->dtype].size, &expected))
            expected = UINT64_MAX;
    } else if (t->present) {
        expected = t->nbytes;
    }
    if (has_bound && op->count > bound)
        return PF("%s: header: %s: count %llu exceeds the %llu positions of the tensor", r->p->name, w,
                  (unsigned long long)op->count, (unsigned long long)bound);
    if (k == NP_OP_ELEMENTS && op->count > bound / 2)
        return PF("%s: header: %s: count %llu is more than half the tensor's %llu elements (use a 'whole' op)",
                  r->p->name, w, (unsigned long long)op->count, (unsigned long long)bound);
    if (has_bound && op->count == 0)
        return PF("%s: header: %s: count must be at least 1 (an unchanged tensor has no op)", r->p->name, w);
    if (op->values.present && op->values.size != expected)
        return PF("%s: header: %s.values: size %llu does not match the %llu bytes the op writes", r->p->name, w,
                  (unsigned long long)op->values.size, (unsigned long long)expected);
    if (op->scales.present && op->scales.size != 4 && op->scales.size != 4 * op->count) /* count <= bound < 2^62 */
        return PF("%s: header: %s.scales: size %llu is neither 4 (one scale) nor %llu (one per row)", r->p->name, w,
                  (unsigned long long)op->scales.size, (unsigned long long)(4 * op->count));
    return NNP_OK;
}

static nnp_status op_from_json(rd *r, const npj_value *oj, const char *where, np_op *op)
{
    const npj_value *kv;
    nnp_status st;
    char q[NP_QUOTE_MAX];
    if ((st = get_str(r, oj, "op", where, 0, &kv)))
        return st;
    static const char *kinds[] = {NULL, "rows", "elements", "whole", "add", "remove", "qrows"};
    op->kind = 0;
    for (int k = 1; k <= NP_OP_QROWS; k++)
        if (strlen(kinds[k]) == kv->u.str.len && !memcmp(kinds[k], kv->u.str.s, kv->u.str.len))
            op->kind = k;
    if (!op->kind) {
        np_quote(q, sizeof q, kv->u.str.s, kv->u.str.len);
        return UV("%s: header: %s.op: unknown operation %s", r->p->name, where, q);
    }
    int k = op->kind;
    int has_base = k != NP_OP_ADD, has_target = k != NP_OP_REMOVE,
        has_index = k == NP_OP_ROWS || k == NP_OP_ELEMENTS || k == NP_OP_QROWS, has_values = k != NP_OP_REMOVE;
    const npj_value *vcodec = NULL, *icodec = NULL, *bcodec = NULL, *scodec = NULL;
    if (has_base && (st = get_tensor(r, oj, "base", where, &op->base)))
        return st;
    if (has_target && (st = get_tensor(r, oj, "target", where, &op->target)))
        return st;
    if (has_index) {
        if ((st = get_int(r, oj, "count", where, 0, NULL, &op->count)) ||
            (st = get_section(r, oj, "index", where, 0, &op->index, &icodec)))
            return st;
    }
    if (has_values && (st = get_section(r, oj, "values", where, 0, &op->values, &vcodec)))
        return st;
    uint64_t bits = 0;
    if (k == NP_OP_QROWS) {
        if ((st = get_int(r, oj, "bits", where, 0, NULL, &bits)) ||
            (st = get_section(r, oj, "scales", where, 0, &op->scales, &scodec)))
            return st;
        op->bits = bits == 8 || bits == 4 ? (unsigned)bits : 0;
    }
    if ((st = get_section(r, oj, "base_values", where, 1, &op->base_values, &bcodec)))
        return st;
    if (k == NP_OP_REMOVE && !op->base_values.present && npj_get(oj, "values"))
        return fail_field(r, where, "op 'remove' stores the old bytes under 'base_values'");
    char w[512];
    snprintf(w, sizeof w, "%s (%s)", where, np_quote(q, sizeof q, op->name, op->name_len));
    const np_tref *b = &op->base, *t = &op->target;
    int same = b->present && t->present && b->dtype == t->dtype && b->rank == t->rank &&
               (b->rank == 0 || !memcmp(b->shape, t->shape, b->rank * sizeof(uint64_t)));
    if ((k == NP_OP_ROWS || k == NP_OP_ELEMENTS || k == NP_OP_QROWS) && !same)
        return PF("%s: header: %s: op '%s' needs the same dtype and shape before and after", r->p->name, w, kinds[k]);
    if ((k == NP_OP_ROWS || k == NP_OP_QROWS) && t->rank == 0)
        return PF("%s: header: %s: op '%s' needs a tensor of rank 1 or more", r->p->name, w, kinds[k]);
    char w2[600];
    if (k == NP_OP_QROWS) {
        /* reader._check_qrows: a dtype the arithmetic of section 7.5 is defined for, 8- or 4-bit codes,
         * scales and codes stored raw or as zstd */
        if (t->dtype != NP_DT_F32 && t->dtype != NP_DT_BF16 && t->dtype != NP_DT_F16)
            return PF("%s: header: %s: op 'qrows' changes F32, BF16, F16 tensors, not %s", r->p->name, w,
                      np_dtypes[t->dtype].name);
        if (!op->bits)
            return PF("%s: header: %s.bits: must be 8 or 4, found %llu", r->p->name, w, (unsigned long long)bits);
        const np_section *qs[2] = {&op->scales, &op->values};
        const npj_value *qc[2] = {scodec, vcodec};
        static const char *qn[2] = {"scales", "values"};
        for (int i = 0; i < 2; i++) {
            snprintf(w2, sizeof w2, "%s.%s", w, qn[i]);
            if ((st = check_value_codec(r, qs[i], qc[i], 0, w2, -1)))
                return st;
            if (delta_or_planes(qs[i]) || np_sec_has(qs[i], NP_S_ESORT))
                return PF("%s: header: %s.codec: a 'qrows' op stores its scales and codes raw or as zstd only",
                          r->p->name, w2);
        }
    }
    if (op->values.present) {
        snprintf(w2, sizeof w2, "%s.values", w);
        if ((st = check_value_codec(r, &op->values, vcodec, same, w2, t->present ? t->dtype : -1)))
            return st;
    }
    if (op->index.present) {
        snprintf(w2, sizeof w2, "%s.index", w);
        if ((st = check_index_codec(r, &op->index, icodec, w2)))
            return st;
    }
    if ((st = check_op_sizes(r, op, w)))
        return st;
    if (op->base_values.present) {
        int needs = k == NP_OP_REMOVE || (k == NP_OP_WHOLE && !np_sec_delta(&op->values));
        snprintf(w2, sizeof w2, "%s.base_values", w);
        if (!needs)
            return PF("%s: header: %s: only 'remove' and 'whole' without a delta stage carry the old bytes",
                      r->p->name, w2);
        if ((st = check_value_codec(r, &op->base_values, bcodec, 0, w2, -1)))
            return st;
        if (op->base_values.size != b->nbytes)
            return PF("%s: header: %s: size %llu does not match the %llu old bytes", r->p->name, w2,
                      (unsigned long long)op->base_values.size, (unsigned long long)b->nbytes);
    }
    return NNP_OK;
}

static nnp_status header_from_json(rd *r, const npj_value *root)
{
    np_patch *p = r->p;
    nnp_status st;
    const npj_value *feat = npj_get(root, "required_features");
    if (!feat)
        return fail_field(r, "header", "missing required key 'required_features' (a list, empty when none)");
    if ((st = np_patch_features(r->ctx, p, feat)))
        return st;
    const npj_value *cb;
    if ((st = get_str(r, root, "created_by", "header", 1, &cb)))
        return st;
    if ((st = model_ref(r, root, "base", &p->base)) || (st = model_ref(r, root, "target", &p->target)))
        return st;
    if (p->base.layout.present && p->base.format != NP_FMT_SAFETENSORS) {
        const npj_value *fv = npj_get(npj_get(root, "base"), "format");
        char q[128];
        np_quote(q, sizeof q, fv->u.str.s, fv->u.str.len);
        return PF("%s: header: base.layout: only a safetensors base has a layout (this one is %s)", p->name, q);
    }
    if ((st = layout_codec(r, root, "base", "extents", &p->base.extents)) ||
        (st = layout_codec(r, root, "target", "extents", &p->target.extents)) ||
        (st = layout_codec(r, root, "base", "layout", &p->base.layout)) ||
        (st = layout_codec(r, root, "target", "layout", &p->target.layout)) ||
        (st = layout_codec(r, root, "target", "skeleton", &p->target.skeleton)))
        return st;
    const npj_value *ops = npj_get(root, "ops");
    if (!ops || ops->kind != NPJ_ARRAY)
        return fail_field(r, "header", "missing required key 'ops' (a list)");
    if (ops->u.arr.n > NP_MAX_OPS)
        return PF("%s: header: ops: %zu ops, more than the %zu a patch may have", p->name, ops->u.arr.n, NP_MAX_OPS);
    p->ops = ops->u.arr.n ? np_arena_alloc(&p->arena, ops->u.arr.n * sizeof *p->ops) : NULL;
    if (ops->u.arr.n && !p->ops)
        return PF("%s: out of memory for %zu ops", p->name, ops->u.arr.n);
    const char *prev = NULL;
    size_t prev_len = 0;
    for (size_t i = 0; i < ops->u.arr.n; i++) {
        const npj_value *oj = &ops->u.arr.items[i], *nv;
        char where[64], w2[96];
        snprintf(where, sizeof where, "ops[%zu]", i);
        if (oj->kind != NPJ_OBJECT)
            return fail_field(r, where, "must be an object");
        if ((st = get_str(r, oj, "name", where, 0, &nv)))
            return st;
        snprintf(w2, sizeof w2, "%s.name", where);
        if (nv->u.str.len == 0 || nv->u.str.len > NP_MAX_NAME)
            return fail_field(r, w2, "must be 1 to 65536 bytes of UTF-8");
        if (prev && np_name_cmp(nv->u.str.s, nv->u.str.len, prev, prev_len) <= 0) {
            char q[NP_QUOTE_MAX];
            np_quote(q, sizeof q, nv->u.str.s, nv->u.str.len);
            return PF("%s: header: %s: %s: ops must be sorted by name, without duplicates", p->name, w2, q);
        }
        if ((st = count_name(r, nv->u.str.len, w2, "")))
            return st;
        prev = nv->u.str.s;
        prev_len = nv->u.str.len;
        np_op *op = &p->ops[i];
        memset(op, 0, sizeof *op);
        op->name = arena_str(&p->arena, nv->u.str.s, nv->u.str.len);
        op->name_len = nv->u.str.len;
        if (!op->name)
            return PF("%s: out of memory", p->name);
        if ((st = op_from_json(r, oj, where, op)))
            return st;
        p->nops = i + 1;
    }
    return NNP_OK;
}

static nnp_status unpack_header(nnp_ctx *ctx, np_patch *p, const uint8_t *raw, size_t len, uint8_t **out,
                                size_t *outlen)
{
    uint64_t flen;
    const char *why;
    char whybuf[160];
    if (np_zstd_frame_length(raw, len, &flen, &why, whybuf, sizeof whybuf))
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: byte %d: compressed header: %s", p->name, NP_PREAMBLE, why);
    unsigned long long size = ZSTD_getFrameContentSize(raw, (size_t)flen);
    if (size == ZSTD_CONTENTSIZE_UNKNOWN || size == ZSTD_CONTENTSIZE_ERROR || size > NP_MAX_HEADER)
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: byte %d: compressed header declares %lld bytes (limit %llu)",
                       p->name, NP_PREAMBLE, size > NP_MAX_HEADER && size < ZSTD_CONTENTSIZE_ERROR ? (long long)size : -1LL,
                       (unsigned long long)NP_MAX_HEADER);
    if (size > 64 * flen + 65536)
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT,
                       "%s: byte %d: compressed header declares %llu bytes from a %llu-byte frame (at most 64x + 65536)",
                       p->name, NP_PREAMBLE, size, (unsigned long long)flen);
    for (size_t i = (size_t)flen; i < len; i++)
        if (raw[i])
            return np_fail(ctx, NNP_KIND_PATCH_FORMAT,
                           "%s: byte %llu: compressed header: padding after the zstd frame is not zero", p->name,
                           (unsigned long long)(NP_PREAMBLE + flen));
    uint8_t *buf = malloc(size ? (size_t)size : 1);
    if (!buf)
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: out of memory for a %llu-byte header", p->name, size);
    size_t got = ZSTD_decompress(buf, (size_t)size, raw, (size_t)flen);
    if (ZSTD_isError(got) || got != size) {
        free(buf);
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: byte %d: compressed header: corrupt zstd data: %s", p->name,
                       NP_PREAMBLE, ZSTD_isError(got) ? ZSTD_getErrorName(got) : "wrong size");
    }
    *out = buf;
    *outlen = (size_t)size;
    return NNP_OK;
}

nnp_status np_parse_header(nnp_ctx *ctx, const uint8_t *raw, size_t len, uint32_t flags, np_patch *p)
{
    uint8_t *unpacked = NULL;
    nnp_status st;
    if (flags & NP_FLAG_HEADER_ZSTD) {
        if ((st = unpack_header(ctx, p, raw, len, &unpacked, &len)))
            return st;
        raw = unpacked;
    }
    npj_doc *doc = NULL;
    rd r = {ctx, p, 0};
    if (len == 0 || raw[0] != '{') {
        /* a JSON object must start the header (UTF-8 is checked by the parser below first) */
        st = np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: byte %d: header is not a JSON object", p->name, NP_PREAMBLE);
        goto out;
    }
    unsigned depth;
    uint64_t values;
    npj_shape(raw, len, &depth, &values);
    if (depth > NP_MAX_JSON_DEPTH) {
        st = np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: byte %d: header JSON nests deeper than %d", p->name, NP_PREAMBLE,
                     NP_MAX_JSON_DEPTH);
        goto out;
    }
    if (values > NP_MAX_JSON_VALUES) {
        st = np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: byte %d: header JSON holds more than %llu values", p->name,
                     NP_PREAMBLE, (unsigned long long)NP_MAX_JSON_VALUES);
        goto out;
    }
    npj_limits lim = {NP_MAX_JSON_DEPTH, NP_MAX_JSON_VALUES, NPJ_MAX_STRING};
    char err[256];
    if (npj_parse(raw, len, &lim, &doc, err, sizeof err) != 0) {
        st = np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: byte %d: header is not valid JSON: %s", p->name, NP_PREAMBLE, err);
        goto out;
    }
    if (npj_root(doc)->kind != NPJ_OBJECT) {
        st = np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: byte %d: header is not a JSON object", p->name, NP_PREAMBLE);
        goto out;
    }
    st = header_from_json(&r, npj_root(doc));
out:
    npj_free(doc);
    free(unpacked);
    return st;
}

