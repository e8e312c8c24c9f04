/* Python twin: nnpatch/delivery/manifest.py
 *
 * The release manifest's rules (spec/MANIFEST.md, "The manifest"), message for message where the
 * Python reader has one. Where MANIFEST.md says more than manifest.py checks today (version names,
 * base_url's trailing '/': issue 28 item 10, the SPEC_AHEAD cases of tests/test_manifest_vectors.py),
 * this reader gives the spec's answer. */
#include "manifest.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NP_MAX_NAME_LEN 94
#define NP_MAX_PATCH_NAME 200

nnp_status np_load_object(nnp_ctx *ctx, const uint8_t *raw, size_t len, size_t limit, const char *what,
                          const char *source, npj_doc **out)
{
    char err[256];
    *out = NULL;
    if (len > limit)
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: %s of %zu bytes exceeds the %zu limit", source, what, len,
                       limit);
    /* Python's load_object has the same limits: a manifest lists a few bases, and 524,288 values keep
     * its parse within SECURITY.md's memory bound */
    const npj_limits lim = {NP_MAX_DOCUMENT_DEPTH, NP_MAX_DOCUMENT_VALUES, NPJ_MAX_STRING};
    if (npj_parse(raw, len, &lim, out, err, sizeof err) != 0)
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: invalid %s JSON: %s", source, what, err);
    if (npj_root(*out)->kind != NPJ_OBJECT) {
        npj_free(*out);
        *out = NULL;
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: invalid %s: not a JSON object", source, what);
    }
    return NNP_OK;
}

/* ---- times --------------------------------------------------------------------------------- */

static long long days_from_civil(long long y, unsigned m, unsigned d)
{
    y -= m <= 2;
    long long era = (y >= 0 ? y : y - 399) / 400;
    unsigned yoe = (unsigned)(y - era * 400);
    unsigned doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    unsigned doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + (long long)doe - 719468;
}

static void civil_from_days(long long z, long long *y, unsigned *m, unsigned *d)
{
    z += 719468;
    long long era = (z >= 0 ? z : z - 146096) / 146097;
    unsigned doe = (unsigned)(z - era * 146097);
    unsigned yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    unsigned doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    unsigned mp = (5 * doy + 2) / 153;
    *d = doy - (153 * mp + 2) / 5 + 1;
    *m = mp < 10 ? mp + 3 : mp - 9;
    *y = (long long)yoe + era * 400 + (*m <= 2);
}

void np_format_time(long long t, char out[21])
{
    long long days = t >= 0 ? t / 86400 : -((-t + 86399) / 86400);
    long long rem = t - days * 86400, y;
    unsigned m, d;
    civil_from_days(days, &y, &m, &d);
    unsigned yy = (unsigned)(y < 0 ? 0 : y % 10000), r = (unsigned)rem;
    char text[64];
    snprintf(text, sizeof text, "%04u-%02u-%02uT%02u:%02u:%02uZ", yy, m, d, r / 3600, r / 60 % 60, r % 60);
    memcpy(out, text, 20);
    out[20] = 0;
}

static int digits(const char *s, int n, unsigned *v)
{
    *v = 0;
    for (int i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        *v = *v * 10 + (unsigned)(s[i] - '0');
    }
    return 0;
}

int np_parse_time(const char *s, size_t len, long long *t)
{
    unsigned y, mo, d, h, mi, se;
    if (len != 20 || s[4] != '-' || s[7] != '-' || s[10] != 'T' || s[13] != ':' || s[16] != ':' || s[19] != 'Z')
        return -1;
    if (digits(s, 4, &y) || digits(s + 5, 2, &mo) || digits(s + 8, 2, &d) || digits(s + 11, 2, &h) ||
        digits(s + 14, 2, &mi) || digits(s + 17, 2, &se))
        return -1;
    /* manifest.py's test: the time spelled back is the same text (2025-02-30 does not round-trip);
     * years below 1000 do not either there (strftime's %Y does not pad them) */
    if (y < 1000 || mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 || mi > 59 || se > 59)
        return -1;
    long long v = days_from_civil(y, mo, d) * 86400 + h * 3600LL + mi * 60LL + se;
    char back[21];
    np_format_time(v, back);
    if (memcmp(back, s, 20) != 0)
        return -1;
    *t = v;
    return 0;
}

/* ---- names and URLs ------------------------------------------------------------------------- */

static int alnum(char c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); }

int np_plain_name(const char *s, size_t len, size_t max)
{
    if (len == 0 || len > max || !alnum(s[0]))
        return 0;
    for (size_t i = 1; i < len; i++)
        if (!alnum(s[i]) && s[i] != '.' && s[i] != '_' && s[i] != '-')
            return 0;
    return 1;
}

/* Bytes of the whitespace character (Python's str.isspace, as re's \s) at s, or 0. */
static size_t space_at(const unsigned char *s, size_t left)
{
    if (s[0] == ' ' || (s[0] >= 0x09 && s[0] <= 0x0d) || (s[0] >= 0x1c && s[0] <= 0x1f))
        return 1;
    if (left >= 2 && s[0] == 0xc2 && (s[1] == 0x85 || s[1] == 0xa0))
        return 2;
    if (left >= 3) {
        unsigned c = (unsigned)s[0] << 16 | (unsigned)s[1] << 8 | s[2];
        if (c == 0xe19a80 || (c >= 0xe28080 && c <= 0xe2808a) || c == 0xe280a8 || c == 0xe280a9 ||
            c == 0xe280af || c == 0xe2819f || c == 0xe38080)
            return 3;
    }
    return 0;
}

int np_is_url(const char *s) { return !strncmp(s, "http://", 7) || !strncmp(s, "https://", 8); }

int np_http_url(const char *s, size_t len)
{
    size_t i = !strncmp(s, "http://", 7) ? 7 : !strncmp(s, "https://", 8) ? 8 : 0;
    if (!i || memchr(s, 0, len))
        return 0;
    size_t host = i;
    for (; i < len && s[i] != '/'; i++)
        if (s[i] == '?' || s[i] == '#' || space_at((const unsigned char *)s + i, len - i))
            return 0;
    if (i == host)
        return 0;
    for (; i < len; i++)
        if (s[i] == '?' || s[i] == '#' || space_at((const unsigned char *)s + i, len - i))
            return 0;
    return 1;
}

/* ---- the manifest ------------------------------------------------------------------------- */

typedef struct mp {
    nnp_ctx *ctx;
    const char *source;
} mp;

static nnp_status bad(mp *p, const char *fmt, ...) NP_PRINTF(2, 3);
static nnp_status bad(mp *p, const char *fmt, ...)
{
    char text[NP_MSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    return np_fail(p->ctx, NNP_KIND_PATCH_FORMAT, "%s: %s", p->source, text);
}

enum { T_INT, T_STR, T_OBJ, T_LIST };
static const char *const TNAME[] = {"int", "str", "dict", "list"};

/* manifest.py's _req: the member `key` of obj with that type (ints not negative). */
static const npj_value *req(mp *p, const npj_value *obj, const char *key, int type, const char *where,
                            nnp_status *st)
{
    const npj_value *v = npj_get(obj, key);
    int ok = v && ((type == T_INT && v->kind == NPJ_INT) || (type == T_STR && v->kind == NPJ_STRING) ||
                   (type == T_OBJ && v->kind == NPJ_OBJECT) || (type == T_LIST && v->kind == NPJ_ARRAY));
    if (!ok) {
        *st = bad(p, "%s: '%s' missing or not %s", where, key, TNAME[type]);
        return NULL;
    }
    if (type == T_INT && v->u.i.negative) {
        *st = bad(p, "%s: '%s' is negative", where, key);
        return NULL;
    }
    return v;
}

static nnp_status req_u64(mp *p, const npj_value *obj, const char *key, const char *where, uint64_t *out)
{
    nnp_status st = NNP_OK;
    const npj_value *v = req(p, obj, key, T_INT, where, &st);
    if (v)
        *out = v->u.i.magnitude;
    return st;
}

static nnp_status req_hex(mp *p, const npj_value *obj, const char *key, const char *where, uint8_t out[32])
{
    nnp_status st = NNP_OK;
    const npj_value *v = req(p, obj, key, T_STR, where, &st);
    if (!v)
        return st;
    if (npj_as_digest(v, out) != 0)
        return bad(p, "%s: '%s' is not 64 lowercase hex digits", where, key);
    return NNP_OK;
}

/* An optional version name (MANIFEST.md: "Names match ^[A-Za-z0-9][A-Za-z0-9._-]{0,93}$"). */
static nnp_status opt_name(mp *p, const npj_value *obj, const char *where, const char **out)
{
    const npj_value *v = npj_get(obj, "name");
    *out = NULL;
    if (!v)
        return NNP_OK;
    if (v->kind != NPJ_STRING || !np_plain_name(v->u.str.s, v->u.str.len, NP_MAX_NAME_LEN))
        return bad(p, "%s: 'name' is not a version name (^[A-Za-z0-9][A-Za-z0-9._-]{0,93}$)", where);
    *out = v->u.str.s;
    return NNP_OK;
}

static nnp_status check_link(mp *p, const npj_value *obj, const char *where, int inline_hashes, np_mlink *l)
{
    nnp_status st = NNP_OK;
    const npj_value *name = req(p, obj, "patch", T_STR, where, &st);
    if (!name)
        return st;
    if (!np_plain_name(name->u.str.s, name->u.str.len, NP_MAX_PATCH_NAME)) {
        char q[300];
        return bad(p, "%s: patch file name %s is not a plain file name", where,
                   np_quote(q, sizeof q, name->u.str.s, name->u.str.len));
    }
    l->patch = name->u.str.s;
    if ((st = req_u64(p, obj, "patch_size", where, &l->patch_size)) || (st = req_hex(p, obj, "patch_blake3", where,
                                                                                     l->patch_blake3)) ||
        (st = req_hex(p, obj, "patch_trailer_blake3", where, l->trailer_blake3)))
        return st;
    if (inline_hashes && ((st = req_hex(p, obj, "base_blake3", where, l->base_blake3)) ||
                          (st = req_hex(p, obj, "target_blake3", where, l->target_blake3))))
        return st;
    return NNP_OK;
}

static nnp_status parse_base(mp *p, const npj_value *b, size_t i, np_manifest *m, np_mbase *e)
{
    char where[64], w2[96];
    nnp_status st = NNP_OK;
    snprintf(where, sizeof where, "bases[%zu]", i);
    if (b->kind != NPJ_OBJECT)
        return bad(p, "%s: not an object", where);
    if ((st = req_hex(p, b, "base_blake3", where, e->base_blake3)) ||
        (st = req_u64(p, b, "base_size", where, &e->base_size)) || (st = check_link(p, b, where, 0, &e->direct)))
        return st;
    memcpy(e->direct.base_blake3, e->base_blake3, 32);
    memcpy(e->direct.target_blake3, m->target_blake3, 32);
    if (npj_get(b, "chain")) {
        snprintf(w2, sizeof w2, "%s.chain", where);
        const npj_value *c = req(p, b, "chain", T_OBJ, where, &st), *links;
        if (!c || (st = req_u64(p, c, "size", w2, &e->chain_size)) || !(links = req(p, c, "links", T_LIST, w2, &st)))
            return st;
        if (links->u.arr.n == 0)
            return bad(p, "%s: no links", w2);
        for (size_t j = 0; j < links->u.arr.n && j < NP_MAX_CHAIN_LINKS; j++) {
            char w3[128];
            snprintf(w3, sizeof w3, "%s.links[%zu]", w2, j);
            if (links->u.arr.items[j].kind != NPJ_OBJECT)
                return bad(p, "%s: not an object", w3);
            if ((st = check_link(p, &links->u.arr.items[j], w3, 1, &e->links[j])))
                return st;
        }
        if (links->u.arr.n > NP_MAX_CHAIN_LINKS)
            return bad(p, "%s: %zu links, more than the %d an updater follows", w2, links->u.arr.n,
                       NP_MAX_CHAIN_LINKS);
        e->has_chain = 1;
        e->nlinks = links->u.arr.n;
    }
    return opt_name(p, b, where, &e->name);
}

static nnp_status check_full(mp *p, const npj_value *full, np_manifest *m)
{
    nnp_status st = NNP_OK;
    uint64_t size = 0;
    uint8_t d[32];
    const npj_value *url = req(p, full, "url", T_STR, "full", &st);
    if (!url)
        return st;
    if (!np_plain_name(url->u.str.s, url->u.str.len, NP_MAX_PATCH_NAME) && !np_http_url(url->u.str.s, url->u.str.len)) {
        char q[300];
        return bad(p, "full: url %s is neither a plain file name nor an http(s) URL",
                   np_quote(q, sizeof q, url->u.str.s, url->u.str.len));
    }
    if ((st = req_u64(p, full, "size", "full", &size)))
        return st;
    if (size != m->target_size)
        return bad(p, "%s", "full: 'size' is not the target's size");
    const npj_value *b = req(p, full, "blake3", T_STR, "full", &st);
    if (!b)
        return st;
    if (npj_as_digest(b, d) != 0 || memcmp(d, m->target_blake3, 32) != 0)
        return bad(p, "%s", "full: 'blake3' is not the target's BLAKE3");
    m->has_full = 1;
    m->full_url = url->u.str.s;
    return NNP_OK;
}

static int str_is(const npj_value *v, const char *s)
{
    return v && v->kind == NPJ_STRING && v->u.str.len == strlen(s) && !memcmp(v->u.str.s, s, v->u.str.len);
}

static nnp_status parse(mp *p, const npj_value *root, np_manifest *m)
{
    nnp_status st = NNP_OK;
    if (!str_is(npj_get(root, "format"), "nnpatch-release"))
        return bad(p, "%s", "not an nnpatch release manifest (format must be 'nnpatch-release')");
    const npj_value *ver = npj_get(root, "version");
    if (!ver || ver->kind != NPJ_INT || ver->u.i.negative || ver->u.i.magnitude != 1) {
        char q[64] = "None";
        if (ver && ver->kind == NPJ_INT)
            snprintf(q, sizeof q, "%s%llu", ver->u.i.negative ? "-" : "", (unsigned long long)ver->u.i.magnitude);
        else if (ver)
            snprintf(q, sizeof q, "of type %s", npj_type_name(ver));
        return bad(p, "unsupported manifest version %s", q);
    }
    const npj_value *t = req(p, root, "target", T_OBJ, "manifest", &st), *bases;
    uint8_t model_digest[32];
    if (!t || (st = req_hex(p, t, "blake3", "target", m->target_blake3)) ||
        (st = req_hex(p, t, "model_blake3", "target", model_digest)) ||
        (st = req_u64(p, t, "size", "target", &m->target_size)) || (st = opt_name(p, t, "target", &m->target_name)))
        return st;
    if (!(bases = req(p, root, "bases", T_LIST, "manifest", &st)))
        return st;
    if (bases->u.arr.n) {
        m->bases = calloc(bases->u.arr.n, sizeof *m->bases);
        if (!m->bases)
            return np_fail(p->ctx, NNP_KIND_IO, "%s: out of memory", p->source);
    }
    for (size_t i = 0; i < bases->u.arr.n; i++, m->nbases++)
        if ((st = parse_base(p, &bases->u.arr.items[i], i, m, &m->bases[i])))
            return st;
    const npj_value *r = npj_get(root, "release");
    if (r) {
        if (npj_as_u64(r, NP_MAX_RELEASE, &m->release) != 0)
            return bad(p, "manifest: 'release' must be an integer from 0 to %llu", (unsigned long long)NP_MAX_RELEASE);
        m->has_release = 1;
    }
    static const char *const TIMES[] = {"created", "expires"};
    for (int k = 0; k < 2; k++) {
        const npj_value *v = npj_get(root, TIMES[k]);
        long long when;
        if (v && (v->kind != NPJ_STRING || np_parse_time(v->u.str.s, v->u.str.len, &when) != 0))
            return bad(p, "manifest: '%s' is not a UTC time like 2025-01-31T12:00:00Z", TIMES[k]);
        if (v && k == 1)
            m->expires = v->u.str.s;
    }
    const npj_value *u = npj_get(root, "base_url");
    if (u) {
        if (u->kind != NPJ_STRING || !np_http_url(u->u.str.s, u->u.str.len))
            return bad(p, "%s", "manifest: 'base_url' is not an http:// or https:// URL");
        if (u->u.str.s[u->u.str.len - 1] != '/') /* MANIFEST.md: "an http:// or https:// URL ending in /" */
            return bad(p, "%s", "manifest: 'base_url' does not end in '/'");
        m->base_url = u->u.str.s;
    }
    const npj_value *full = npj_get(root, "full");
    if (full) {
        const npj_value *f = req(p, root, "full", T_OBJ, "manifest", &st);
        if (!f || (st = check_full(p, f, m)))
            return st;
    }
    return NNP_OK;
}

nnp_status np_manifest_parse(nnp_ctx *ctx, const uint8_t *raw, size_t len, const char *source, np_manifest *m)
{
    memset(m, 0, sizeof *m);
    nnp_status st = np_load_object(ctx, raw, len, NP_MAX_MANIFEST, "manifest", source, &m->doc);
    if (st)
        return st;
    mp p = {ctx, source};
    st = parse(&p, npj_root(m->doc), m);
    if (st)
        np_manifest_free(m);
    return st;
}

void np_manifest_free(np_manifest *m)
{
    free(m->bases);
    npj_free(m->doc);
    memset(m, 0, sizeof *m);
}
