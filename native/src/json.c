/*
 * Strict JSON (see json.h). Python twin: nnpatch/_json.py. The text is read in four linear passes,
 * none recursive (the first two are jsonscan.c's):
 *   1. UTF-8: the whole text, as Python's strict decoder checks it;
 *   2. shape: depth and value count outside strings (npj_shape), checked against the limits;
 *   3. validate: the full grammar, counting each container's children and the bytes the
 *      parsed values will need (no string over the limit), allocating nothing but those counts;
 *   4. build: the same walk again, writing values into one exactly-sized arena, and refusing
 *      duplicate keys as each object closes (sorted, so a huge object costs n log n).
 * Verdicts match nnpatch/_json.py loads_strict with the patch reader's limits, NaN/Infinity
 * refused (FORMAT.md), and integers of more than 4300 digits refused as CPython's int()
 * refuses them (sys.int_info.default_max_str_digits), so both readers accept the same texts.
 */
#include "json.h"

#include <errno.h>
#include <stddef.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* CPython's default limit on the digits of an int parsed from text: json.loads refuses more. */
#define NPJ_MAX_INT_DIGITS 4300

struct npj_doc {
    npj_value root;
    unsigned char *mem;
};

/* Every node array starts at a multiple of this, so arrays of values and of members can share the arena. */
typedef struct npj_node_align {
    char c;
    union {
        npj_value v;
        npj_member m;
    } u;
} npj_node_align;
#define NODE_ALIGN (offsetof(npj_node_align, u))

static size_t round_node(size_t n)
{
    return (n + NODE_ALIGN - 1) / NODE_ALIGN * NODE_ALIGN;
}

static void fail(char *err, size_t errlen, const char *fmt, ...)
{
    if (err == NULL || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* --- passes 3 and 4: the parser ---------------------------------------------------------------- */

typedef struct frame {
    npj_value *v;     /* build: the container */
    size_t container; /* its index in opening order */
    size_t n;         /* children so far */
    int is_object;
} frame;

typedef struct parser {
    const uint8_t *t;
    size_t len, pos;
    int build;
    char *err;
    size_t errlen;
    frame *stack;
    size_t stack_cap, sp;
    size_t *counts; /* children of each container, in opening order */
    size_t ncounts, next_container;
    /* validate: sizes needed; build: the arena */
    size_t node_bytes, string_bytes, max_float_len;
    unsigned char *nodes, *strings;
    size_t nodes_used, strings_used;
    uint64_t max_string; /* decoded bytes of one string (npj_limits.max_string) */
    char *scratch; /* build: room for one float's digits */
    size_t *sort_a, *sort_b; /* build: duplicate-key check */
    size_t sort_cap;
} parser;

static int perr(parser *p, const char *fmt, ...)
{
    if (p->err != NULL && p->errlen > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(p->err, p->errlen, fmt, ap);
        va_end(ap);
    }
    return -1;
}

static void skip_ws(parser *p)
{
    while (p->pos < p->len) {
        uint8_t c = p->t[p->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
            break;
        p->pos++;
    }
}

static int hexval(uint8_t c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static int read_u4(parser *p, size_t at, unsigned *out)
{
    if (p->len - at < 4)
        return -1;
    unsigned v = 0;
    for (int k = 0; k < 4; k++) {
        int h = hexval(p->t[at + (size_t)k]);
        if (h < 0)
            return -1;
        v = v << 4 | (unsigned)h;
    }
    *out = v;
    return 0;
}

static size_t put_utf8(unsigned char *o, unsigned cp)
{
    if (cp < 0x80) {
        o[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (unsigned char)(0xC0 | cp >> 6);
        o[1] = (unsigned char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (unsigned char)(0xE0 | cp >> 12);
        o[1] = (unsigned char)(0x80 | (cp >> 6 & 0x3F));
        o[2] = (unsigned char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (unsigned char)(0xF0 | cp >> 18);
    o[1] = (unsigned char)(0x80 | (cp >> 12 & 0x3F));
    o[2] = (unsigned char)(0x80 | (cp >> 6 & 0x3F));
    o[3] = (unsigned char)(0x80 | (cp & 0x3F));
    return 4;
}

/* A string at p->pos (which holds '"'). Validate: adds its size to string_bytes. Build: writes
 * it into the arena and sets *s, *n. The text is valid UTF-8 already. */
static int parse_string(parser *p, const char **s, size_t *n)
{
    size_t start = p->pos;
    unsigned char *out = NULL;
    size_t w = 0;
    if (p->build) {
        out = p->strings + p->strings_used;
    }
    p->pos++;
    for (;;) {
        /* a run of plain bytes */
        size_t run = p->pos;
        while (run < p->len) {
            uint8_t c = p->t[run];
            if (c == '"' || c == '\\' || c < 0x20)
                break;
            run++;
        }
        if (out != NULL) {
            if (p->strings_used + w + (run - p->pos) + 1 > p->string_bytes)
                return perr(p, "internal: string arena exhausted");
            memcpy(out + w, p->t + p->pos, run - p->pos);
        }
        w += run - p->pos;
        p->pos = run;
        if (w > p->max_string)
            return perr(p, "a string longer than %llu bytes at byte %zu", (unsigned long long)p->max_string, start);
        if (p->pos >= p->len)
            return perr(p, "unterminated string starting at byte %zu", start);
        uint8_t c = p->t[p->pos];
        if (c == '"') {
            p->pos++;
            break;
        }
        if (c < 0x20)
            return perr(p, "control character 0x%02x in a string at byte %zu", c, p->pos);
        /* an escape */
        if (p->pos + 1 >= p->len)
            return perr(p, "unterminated string starting at byte %zu", start);
        uint8_t e = p->t[p->pos + 1];
        unsigned char tmp[4];
        size_t k = 1;
        switch (e) {
        case '"': tmp[0] = '"'; break;
        case '\\': tmp[0] = '\\'; break;
        case '/': tmp[0] = '/'; break;
        case 'b': tmp[0] = '\b'; break;
        case 'f': tmp[0] = '\f'; break;
        case 'n': tmp[0] = '\n'; break;
        case 'r': tmp[0] = '\r'; break;
        case 't': tmp[0] = '\t'; break;
        case 'u': {
            unsigned cp;
            if (read_u4(p, p->pos + 2, &cp) != 0)
                return perr(p, "invalid \\uXXXX escape at byte %zu", p->pos);
            size_t esc = 6;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                unsigned lo;
                if (p->len - p->pos >= 12 && p->t[p->pos + 6] == '\\' && p->t[p->pos + 7] == 'u' &&
                    read_u4(p, p->pos + 8, &lo) == 0 && lo >= 0xDC00 && lo <= 0xDFFF) {
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    esc = 12;
                } else
                    return perr(p, "a string holds a lone surrogate (\\u%04X escape at byte %zu)", cp, p->pos);
            } else if (cp >= 0xDC00 && cp <= 0xDFFF)
                return perr(p, "a string holds a lone surrogate (\\u%04X escape at byte %zu)", cp, p->pos);
            k = put_utf8(tmp, cp);
            p->pos += esc - 2;
            break;
        }
        default:
            return perr(p, "invalid escape at byte %zu", p->pos);
        }
        p->pos += 2;
        if (out != NULL) {
            if (p->strings_used + w + k + 1 > p->string_bytes)
                return perr(p, "internal: string arena exhausted");
            memcpy(out + w, tmp, k);
        }
        w += k; /* checked against max_string at the top of the loop, which every escape goes back to */
    }
    if (out != NULL) {
        out[w] = '\0';
        p->strings_used += w + 1;
        *s = (const char *)out;
        *n = w;
    } else {
        if (w + 1 > SIZE_MAX - p->string_bytes)
            return perr(p, "text too large");
        p->string_bytes += w + 1;
    }
    return 0;
}

/* A float from the digits of its literal, converted with strtod on a text holding no decimal
 * point (so the locale cannot change it): mantissa digits, 'e', the adjusted exponent. */
static double to_double(parser *p, size_t start, size_t int_end, size_t frac_start, size_t frac_end,
                        size_t exp_start, size_t end, int negative)
{
    char *b = p->scratch;
    size_t w = 0;
    for (size_t i = start; i < int_end; i++)
        b[w++] = (char)p->t[i];
    for (size_t i = frac_start; i < frac_end; i++)
        b[w++] = (char)p->t[i];
    size_t lead = 0;
    while (lead < w && b[lead] == '0')
        lead++;
    if (lead == w)
        return negative ? -0.0 : 0.0;
    /* exponent: saturate far beyond any double's range */
    const int64_t cap = (int64_t)1 << 52;
    int64_t e = 0;
    int eneg = 0;
    size_t i = exp_start;
    if (i < end && (p->t[i] == '+' || p->t[i] == '-'))
        eneg = p->t[i++] == '-';
    for (; i < end; i++) {
        if (e < cap)
            e = e * 10 + (p->t[i] - '0');
    }
    if (eneg)
        e = -e;
    size_t frac_digits = frac_end - frac_start;
    e -= (int64_t)(frac_digits < (size_t)cap ? frac_digits : (size_t)cap);
    int m = snprintf(b + w, 32, "e%lld", (long long)e);
    if (m < 0)
        return 0.0;
    int saved = errno;
    double d = strtod(b + lead, NULL);
    errno = saved;
    return negative ? -d : d;
}

static int parse_number(parser *p, npj_value *v)
{
    size_t start = p->pos;
    int negative = 0;
    if (p->t[p->pos] == '-') {
        negative = 1;
        p->pos++;
    }
    size_t int_start = p->pos;
    if (p->pos >= p->len || p->t[p->pos] < '0' || p->t[p->pos] > '9')
        return perr(p, "invalid number at byte %zu", start);
    if (p->t[p->pos] == '0')
        p->pos++;
    else
        while (p->pos < p->len && p->t[p->pos] >= '0' && p->t[p->pos] <= '9')
            p->pos++;
    size_t int_end = p->pos, frac_start = p->pos, frac_end = p->pos;
    int is_float = 0;
    if (p->pos < p->len && p->t[p->pos] == '.') {
        p->pos++;
        frac_start = p->pos;
        while (p->pos < p->len && p->t[p->pos] >= '0' && p->t[p->pos] <= '9')
            p->pos++;
        frac_end = p->pos;
        if (frac_end == frac_start)
            return perr(p, "invalid number at byte %zu", start);
        is_float = 1;
    }
    size_t exp_start = p->pos; /* an empty exponent when there is none */
    if (p->pos < p->len && (p->t[p->pos] == 'e' || p->t[p->pos] == 'E')) {
        p->pos++;
        exp_start = p->pos;
        if (p->pos < p->len && (p->t[p->pos] == '+' || p->t[p->pos] == '-'))
            p->pos++;
        size_t d = p->pos;
        while (p->pos < p->len && p->t[p->pos] >= '0' && p->t[p->pos] <= '9')
            p->pos++;
        if (p->pos == d)
            return perr(p, "invalid number at byte %zu", start);
        is_float = 1;
    }
    if (is_float) {
        size_t need = (p->pos - start) + 32;
        if (!p->build) {
            if (need > p->max_float_len)
                p->max_float_len = need;
            return 0;
        }
        v->kind = NPJ_FLOAT;
        v->u.f = to_double(p, int_start, int_end, frac_start, frac_end, exp_start, p->pos, negative);
        return 0;
    }
    if (int_end - int_start > NPJ_MAX_INT_DIGITS)
        return perr(p, "integer of more than %d digits at byte %zu", NPJ_MAX_INT_DIGITS, start);
    if (!p->build)
        return 0;
    uint64_t m = 0;
    int big = 0;
    for (size_t i = int_start; i < int_end; i++) {
        unsigned d = (unsigned)(p->t[i] - '0');
        if (m > (UINT64_MAX - d) / 10) {
            big = 1;
            break;
        }
        m = m * 10 + d;
    }
    if (negative && m > ((uint64_t)1 << 63))
        big = 1;
    if (big) {
        v->kind = NPJ_BIGINT;
        memset(&v->u, 0, sizeof v->u);
        v->u.i.negative = negative;
        return 0;
    }
    v->kind = NPJ_INT;
    v->u.i.negative = negative && m != 0;
    v->u.i.magnitude = m;
    return 0;
}

static int literal(parser *p, const char *word, npj_kind kind, npj_value *v)
{
    size_t n = strlen(word);
    if (p->len - p->pos < n || memcmp(p->t + p->pos, word, n) != 0)
        return perr(p, "invalid value at byte %zu", p->pos);
    p->pos += n;
    if (v != NULL)
        v->kind = kind;
    return 0;
}

/* Room for n children of a container: validate counts it, build takes it from the arena. */
static void *take_nodes(parser *p, size_t n, size_t size)
{
    if (n == 0)
        return NULL;
    size_t bytes = round_node(n * size);
    if (bytes > p->node_bytes - p->nodes_used)
        return NULL;
    void *r = p->nodes + p->nodes_used;
    p->nodes_used += bytes;
    return r;
}

static int key_less(const npj_member *a, const npj_member *b)
{
    size_t n = a->key_len < b->key_len ? a->key_len : b->key_len;
    int c = memcmp(a->key, b->key, n);
    return c < 0 || (c == 0 && a->key_len < b->key_len);
}

static int check_duplicates(parser *p, const npj_value *obj)
{
    const npj_member *m = obj->u.obj.members;
    size_t n = obj->u.obj.n;
    const npj_member *dup = NULL;
    if (n <= 16) {
        for (size_t i = 1; i < n && dup == NULL; i++)
            for (size_t j = 0; j < i; j++)
                if (m[i].key_len == m[j].key_len && memcmp(m[i].key, m[j].key, m[i].key_len) == 0) {
                    dup = &m[i];
                    break;
                }
    } else {
        /* bottom-up merge sort of indices; equal neighbours are duplicates */
        size_t *a = p->sort_a, *b = p->sort_b;
        for (size_t i = 0; i < n; i++)
            a[i] = i;
        for (size_t width = 1; width < n; width *= 2) {
            for (size_t lo = 0; lo < n; lo += 2 * width) {
                size_t mid = lo + width < n ? lo + width : n;
                size_t hi = lo + 2 * width < n ? lo + 2 * width : n;
                size_t i = lo, j = mid, k = lo;
                while (i < mid && j < hi)
                    b[k++] = key_less(&m[a[j]], &m[a[i]]) ? a[j++] : a[i++];
                while (i < mid)
                    b[k++] = a[i++];
                while (j < hi)
                    b[k++] = a[j++];
            }
            size_t *t = a;
            a = b;
            b = t;
        }
        for (size_t i = 1; i < n; i++)
            if (!key_less(&m[a[i - 1]], &m[a[i]])) {
                dup = &m[a[i]];
                break;
            }
    }
    if (dup == NULL)
        return 0;
    /* the key, shown safely: printable ASCII as is, anything else as \xNN, at most 60 bytes */
    char shown[4 * 60 + 4];
    size_t w = 0;
    for (size_t i = 0; i < dup->key_len && i < 60; i++) {
        unsigned char c = (unsigned char)dup->key[i];
        if (c >= 0x20 && c < 0x7F && c != '"' && c != '\\')
            shown[w++] = (char)c;
        else
            w += (size_t)snprintf(shown + w, 5, "\\x%02x", c);
    }
    if (dup->key_len > 60) {
        memcpy(shown + w, "...", 3);
        w += 3;
    }
    shown[w] = '\0';
    return perr(p, "duplicate key \"%s\"", shown);
}

/* One walk over the text: validates (p->build == 0) or builds into root.
 * Long (136 lines), on purpose: the whole grammar is one loop over an explicit stack (no recursion,
 * so no depth can overflow the C stack), and each case is a few lines of that one state machine;
 * cut into functions, the state would travel through every call. */
static int walk(parser *p, npj_value *root)
{
    npj_value *dst = root; /* where the next value goes (build) */
    p->pos = 0;
    p->sp = 0;
    p->next_container = 0;
    for (;;) {
        /* a value */
        skip_ws(p);
        if (p->pos >= p->len)
            return perr(p, "unexpected end of text at byte %zu", p->pos);
        uint8_t c = p->t[p->pos];
        int opened = 0;
        if (c == '[' || c == '{') {
            if (p->sp >= p->stack_cap || p->next_container >= p->ncounts)
                return perr(p, "internal: nesting beyond the measured depth");
            frame *f = &p->stack[p->sp++];
            f->container = p->next_container++;
            f->n = 0;
            f->is_object = c == '{';
            f->v = dst;
            if (p->build) {
                size_t n = p->counts[f->container];
                if (f->is_object) {
                    dst->kind = NPJ_OBJECT;
                    dst->u.obj.n = n;
                    dst->u.obj.members = take_nodes(p, n, sizeof(npj_member));
                    if (n > 0 && dst->u.obj.members == NULL)
                        return perr(p, "internal: node arena exhausted");
                } else {
                    dst->kind = NPJ_ARRAY;
                    dst->u.arr.n = n;
                    dst->u.arr.items = take_nodes(p, n, sizeof(npj_value));
                    if (n > 0 && dst->u.arr.items == NULL)
                        return perr(p, "internal: node arena exhausted");
                }
            }
            p->pos++;
            skip_ws(p);
            if (p->pos < p->len && p->t[p->pos] == (f->is_object ? '}' : ']')) {
                /* empty: closed below */
            } else {
                opened = 1;
            }
        } else if (c == '"') {
            const char *s = NULL;
            size_t n = 0;
            if (parse_string(p, &s, &n) != 0)
                return -1;
            if (p->build) {
                dst->kind = NPJ_STRING;
                dst->u.str.s = s;
                dst->u.str.len = n;
            }
        } else if (c == '-' || (c >= '0' && c <= '9')) {
            if (parse_number(p, p->build ? dst : NULL) != 0)
                return -1;
        } else if (c == 't') {
            if (literal(p, "true", NPJ_TRUE, p->build ? dst : NULL) != 0)
                return -1;
        } else if (c == 'f') {
            if (literal(p, "false", NPJ_FALSE, p->build ? dst : NULL) != 0)
                return -1;
        } else if (c == 'n') {
            if (literal(p, "null", NPJ_NULL, p->build ? dst : NULL) != 0)
                return -1;
        } else if (c == 'N' || c == 'I') {
            return perr(p, "NaN and Infinity are not JSON (byte %zu)", p->pos);
        } else {
            return perr(p, "unexpected character at byte %zu", p->pos);
        }

        /* after a value (or just inside a new container): separators and closing brackets */
        if (!opened) {
            for (;;) {
                skip_ws(p);
                if (p->sp == 0) {
                    if (p->pos != p->len)
                        return perr(p, "trailing data at byte %zu", p->pos);
                    return 0;
                }
                frame *f = &p->stack[p->sp - 1];
                if (p->pos >= p->len)
                    return perr(p, "unexpected end of text at byte %zu", p->pos);
                uint8_t s = p->t[p->pos];
                uint8_t close = f->is_object ? '}' : ']';
                if (s == close) {
                    p->pos++;
                    /* a container closes with f->n children (0 if it was empty) */
                    if (!p->build)
                        p->counts[f->container] = f->n;
                    else {
                        size_t want = f->is_object ? f->v->u.obj.n : f->v->u.arr.n;
                        if (f->n != want)
                            return perr(p, "internal: child count changed");
                        if (f->is_object && check_duplicates(p, f->v) != 0)
                            return -1;
                    }
                    p->sp--;
                    continue;
                }
                if (s == ',') {
                    p->pos++;
                    break;
                }
                return perr(p, "expected '%c' or ',' at byte %zu", close, p->pos);
            }
        }
        /* the next child of the top container */
        frame *f = &p->stack[p->sp - 1];
        if (p->build && f->n >= (f->is_object ? f->v->u.obj.n : f->v->u.arr.n))
            return perr(p, "internal: more children than counted");
        if (f->is_object) {
            skip_ws(p);
            if (p->pos >= p->len || p->t[p->pos] != '"')
                return perr(p, "expected a key string at byte %zu", p->pos);
            const char *k = NULL;
            size_t kn = 0;
            if (parse_string(p, &k, &kn) != 0)
                return -1;
            skip_ws(p);
            if (p->pos >= p->len || p->t[p->pos] != ':')
                return perr(p, "expected ':' at byte %zu", p->pos);
            p->pos++;
            if (p->build) {
                npj_member *m = &f->v->u.obj.members[f->n];
                m->key = k;
                m->key_len = kn;
                dst = &m->value;
            }
        } else if (p->build) {
            dst = &f->v->u.arr.items[f->n];
        }
        f->n++;
    }
}

/* The arena bytes of every container's nodes (bounded by members, the larger node: a second look
 * at each container's kind is not kept) into p->node_bytes, the largest object's size into max_obj. */
static int count_nodes(parser *p, size_t *max_obj)
{
    size_t nodes = 0;
    for (size_t i = 0; i < p->next_container; i++) {
        size_t n = p->counts[i];
        if (n > *max_obj)
            *max_obj = n;
        if (n > SIZE_MAX / sizeof(npj_member) || round_node(n * sizeof(npj_member)) > SIZE_MAX - nodes)
            return perr(p, "text too large");
        nodes += round_node(n * sizeof(npj_member));
    }
    p->node_bytes = nodes;
    return 0;
}

int npj_parse(const uint8_t *text, size_t len, const npj_limits *limits, npj_doc **out, char *err, size_t errlen)
{
    static const npj_limits defaults = {16, 4194304, NPJ_MAX_STRING};
    if (out != NULL)
        *out = NULL;
    if (err != NULL && errlen > 0)
        err[0] = '\0';
    if (out == NULL || (text == NULL && len > 0)) {
        fail(err, errlen, "invalid arguments");
        return -1;
    }
    if (limits == NULL)
        limits = &defaults;
    size_t bad = npj_utf8_invalid_at(text, len);
    if (bad < len) {
        fail(err, errlen, "invalid UTF-8 at byte %zu", bad);
        return -1;
    }
    unsigned depth;
    uint64_t opens, commas;
    npj_shape_counts(text, len, &depth, &opens, &commas);
    if (depth > limits->max_depth) {
        fail(err, errlen, "nesting deeper than %u levels", limits->max_depth);
        return -1;
    }
    if (opens + commas > limits->max_values) {
        fail(err, errlen, "more than %llu values", (unsigned long long)limits->max_values);
        return -1;
    }

    int rc = -1;
    parser p;
    memset(&p, 0, sizeof p);
    p.t = text;
    p.len = len;
    p.err = err;
    p.errlen = errlen;
    p.max_string = limits->max_string ? limits->max_string : NPJ_MAX_STRING;
    npj_doc *doc = NULL;
    /* opens <= len and depth <= len, so these sizes fit */
    p.stack_cap = (size_t)depth + 1;
    p.ncounts = (size_t)opens;
    p.stack = malloc(p.stack_cap * sizeof *p.stack);
    p.counts = malloc((p.ncounts ? p.ncounts : 1) * sizeof *p.counts);
    if (p.stack == NULL || p.counts == NULL) {
        perr(&p, "out of memory");
        goto done;
    }

    /* pass 3: validate and count */
    p.build = 0;
    npj_value scratch_root;
    if (walk(&p, &scratch_root) != 0)
        goto done;
    size_t max_obj = 0;
    if (count_nodes(&p, &max_obj) != 0)
        goto done;

    /* pass 4: build */
    doc = malloc(sizeof *doc);
    if (doc == NULL) {
        perr(&p, "out of memory");
        goto done;
    }
    doc->mem = NULL;
    if (p.node_bytes > SIZE_MAX - p.string_bytes - NODE_ALIGN) {
        perr(&p, "text too large");
        goto done;
    }
    doc->mem = malloc(p.node_bytes + p.string_bytes + 1);
    p.scratch = malloc(p.max_float_len + 1);
    if (max_obj > 16) {
        if (max_obj > SIZE_MAX / sizeof(size_t)) {
            perr(&p, "text too large");
            goto done;
        }
        p.sort_a = malloc(max_obj * sizeof(size_t));
        p.sort_b = malloc(max_obj * sizeof(size_t));
        if (p.sort_a == NULL || p.sort_b == NULL) {
            perr(&p, "out of memory");
            goto done;
        }
    }
    if (doc->mem == NULL || p.scratch == NULL) {
        perr(&p, "out of memory");
        goto done;
    }
    p.nodes = doc->mem;
    p.strings = doc->mem + p.node_bytes;
    p.nodes_used = p.strings_used = 0;
    p.build = 1;
    memset(&doc->root, 0, sizeof doc->root);
    if (walk(&p, &doc->root) != 0)
        goto done;
    rc = 0;
    *out = doc;
    doc = NULL;
done:
    if (doc != NULL) {
        free(doc->mem);
        free(doc);
    }
    free(p.stack);
    free(p.counts);
    free(p.scratch);
    free(p.sort_a);
    free(p.sort_b);
    return rc;
}

void npj_free(npj_doc *doc)
{
    if (doc == NULL)
        return;
    free(doc->mem);
    free(doc);
}

const npj_value *npj_root(const npj_doc *doc)
{
    return doc == NULL ? NULL : &doc->root;
}

const npj_value *npj_get(const npj_value *obj, const char *key)
{
    if (obj == NULL || key == NULL || obj->kind != NPJ_OBJECT)
        return NULL;
    size_t n = strlen(key);
    for (size_t i = 0; i < obj->u.obj.n; i++) {
        const npj_member *m = &obj->u.obj.members[i];
        if (m->key_len == n && memcmp(m->key, key, n) == 0)
            return &m->value;
    }
    return NULL;
}

int npj_as_u64(const npj_value *v, uint64_t max, uint64_t *out)
{
    if (v == NULL || v->kind != NPJ_INT || v->u.i.negative || v->u.i.magnitude > max)
        return -1;
    if (out != NULL)
        *out = v->u.i.magnitude;
    return 0;
}

int npj_as_string(const npj_value *v, const char **s, size_t *len)
{
    if (v == NULL || v->kind != NPJ_STRING)
        return -1;
    if (s != NULL)
        *s = v->u.str.s;
    if (len != NULL)
        *len = v->u.str.len;
    return 0;
}

const char *npj_type_name(const npj_value *v)
{
    switch (v->kind) {
    case NPJ_NULL: return "NoneType";
    case NPJ_FALSE:
    case NPJ_TRUE: return "bool";
    case NPJ_INT:
    case NPJ_BIGINT: return "int";
    case NPJ_FLOAT: return "float";
    case NPJ_STRING: return "str";
    case NPJ_ARRAY: return "list";
    case NPJ_OBJECT: return "dict";
    }
    return "?";
}

static int lower_hex(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

int npj_as_digest(const npj_value *v, uint8_t out[32])
{
    if (v == NULL || v->kind != NPJ_STRING || v->u.str.len != 64)
        return -1;
    uint8_t d[32];
    for (size_t i = 0; i < 32; i++) {
        int a = lower_hex(v->u.str.s[2 * i]), b = lower_hex(v->u.str.s[2 * i + 1]);
        if (a < 0 || b < 0)
            return -1;
        d[i] = (uint8_t)(a << 4 | b);
    }
    if (out != NULL)
        memcpy(out, d, 32);
    return 0;
}
