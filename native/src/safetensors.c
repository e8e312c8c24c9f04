/* safetensors headers. Python twin: nnpatch/weights/safetensors_file.py (the same checks, in order). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blake3.h"
#include "json.h"
#include "safetensors.h"



/* Merge sort of an index array by a comparison with context (qsort has no context in C99). */
typedef int (*np_cmp_fn)(const void *cx, size_t a, size_t b);
static void msort(size_t *v, size_t *tmp, size_t n, np_cmp_fn cmp, const void *cx)
{
    if (n < 2)
        return;
    size_t h = n / 2;
    msort(v, tmp, h, cmp, cx);
    msort(v + h, tmp, n - h, cmp, cx);
    size_t i = 0, j = h, k = 0;
    while (i < h && j < n)
        tmp[k++] = cmp(cx, v[j], v[i]) < 0 ? v[j++] : v[i++];
    while (i < h)
        tmp[k++] = v[i++];
    while (j < n)
        tmp[k++] = v[j++];
    memcpy(v, tmp, n * sizeof *v);
}

static int cmp_by_name(const void *cx, size_t a, size_t b)
{
    const np_tensor *t = cx;
    return np_name_cmp(t[a].name, t[a].name_len, t[b].name, t[b].name_len);
}

static int cmp_by_offset(const void *cx, size_t a, size_t b)
{
    const np_tensor *t = cx;
    if (t[a].begin != t[b].begin)
        return t[a].begin < t[b].begin ? -1 : 1;
    if (t[a].end != t[b].end)
        return t[a].end < t[b].end ? -1 : 1;
    return 0;
}


void np_sort_indices(size_t *v, size_t n, int (*cmp)(const void *, size_t, size_t), const void *cx)
{
    size_t *tmp = n > 1 ? malloc(n * sizeof *tmp) : NULL;
    if (n > 1 && !tmp) { /* insertion sort fallback: no allocation */
        for (size_t i = 1; i < n; i++)
            for (size_t j = i; j > 0 && cmp(cx, v[j], v[j - 1]) < 0; j--) {
                size_t x = v[j];
                v[j] = v[j - 1];
                v[j - 1] = x;
            }
        return;
    }
    msort(v, tmp, n, cmp, cx);
    free(tmp);
}

void np_st_free(np_st *st)
{
    if (!st)
        return;
    free(st->tensors);
    free(st->by_name);
    free(st->arena_);
    memset(st, 0, sizeof *st);
}

const np_tensor *np_st_find(const np_st *st, const char *name, size_t len)
{
    size_t lo = 0, hi = st->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const np_tensor *t = &st->tensors[st->by_name[mid]];
        int c = np_name_cmp(t->name, t->name_len, name, len);
        if (c == 0)
            return t;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

#define WFAIL(...) np_fail(ctx, kind, __VA_ARGS__)

/* "<what>: tensor 'name': " */
static const char *tq(char *buf, size_t n, const char *s, size_t len) { return np_quote(buf, n, s, len); }

/* One tensor's entry into t: dtype, shape (into *shapes), data_offsets against dtype and shape, its
 * name (into *names); both cursors move past what it took. */
static nnp_status read_entry(nnp_ctx *ctx, nnp_error_kind kind, const char *what, const npj_member *m,
                             uint64_t data_start, np_tensor *t, uint64_t **shapes, char **names)
{
    char q[NP_QUOTE_MAX];
    tq(q, sizeof q, m->key, m->key_len);
    const npj_value *e = &m->value;
    if (e->kind != NPJ_OBJECT)
        return WFAIL("%s: tensor %s: entry is not an object", what, q);
    const npj_value *dt = npj_get(e, "dtype"), *sh = npj_get(e, "shape"), *of = npj_get(e, "data_offsets");
    int dtype = dt && dt->kind == NPJ_STRING ? np_dtype_find(dt->u.str.s, dt->u.str.len) : -1;
    if (dtype < 0) {
        char dq[64];
        if (dt && dt->kind == NPJ_STRING)
            np_quote(dq, sizeof dq, dt->u.str.s, dt->u.str.len);
        else
            snprintf(dq, sizeof dq, "%s", dt ? "(not a string)" : "None");
        return WFAIL("%s: tensor %s: unknown dtype %s", what, q, dq);
    }
    if (!sh || sh->kind != NPJ_ARRAY || sh->u.arr.n > NP_MAX_RANK)
        return WFAIL("%s: tensor %s: invalid shape (a list of at most %d dimensions)", what, q, NP_MAX_RANK);
    t->rank = (unsigned)sh->u.arr.n;
    t->shape = *shapes;
    int zero = 0, over = 0;
    uint64_t numel = 1;
    for (unsigned d = 0; d < t->rank; d++) {
        const npj_value *v = &sh->u.arr.items[d];
        if (v->kind != NPJ_INT || v->u.i.negative || v->u.i.magnitude >= NP_LIMIT_62)
            return WFAIL("%s: tensor %s: invalid shape", what, q);
        (*shapes)[d] = v->u.i.magnitude;
        if (!(*shapes)[d])
            zero = 1;
        else if (!over && np_mul(numel, (*shapes)[d], &numel))
            over = 1;
    }
    *shapes += t->rank;
    if (!of || of->kind != NPJ_ARRAY || of->u.arr.n != 2 || of->u.arr.items[0].kind != NPJ_INT ||
        of->u.arr.items[1].kind != NPJ_INT || of->u.arr.items[0].u.i.negative ||
        of->u.arr.items[1].u.i.negative || of->u.arr.items[0].u.i.magnitude > of->u.arr.items[1].u.i.magnitude)
        return WFAIL("%s: tensor %s: invalid data_offsets", what, q);
    uint64_t nbytes = 0;
    if (zero)
        numel = 0;
    if (!zero && (over || np_mul(numel, np_dtypes[dtype].size, &nbytes) || nbytes >= NP_LIMIT_62))
        return WFAIL("%s: tensor %s: shape holds more than 2^62 bytes", what, q);
    uint64_t o0 = of->u.arr.items[0].u.i.magnitude, o1 = of->u.arr.items[1].u.i.magnitude;
    if (o1 - o0 != nbytes)
        return WFAIL("%s: tensor %s: data_offsets span %llu bytes, dtype and shape need %llu", what, q,
                     (unsigned long long)(o1 - o0), (unsigned long long)nbytes);
    t->dtype = dtype;
    t->numel = numel;
    t->nbytes = nbytes;
    memcpy(*names, m->key, m->key_len);
    (*names)[m->key_len] = 0;
    t->name = *names;
    t->name_len = m->key_len;
    *names += m->key_len + 1;
    if (np_add(data_start, o0, &t->begin) || np_add(data_start, o1, &t->end))
        return WFAIL("%s: tensor %s: data_offsets out of range", what, q);
    return NNP_OK;
}

/* The tensors in file order, contiguous from the data start to the end of the file. */
static nnp_status order_by_offset(nnp_ctx *ctx, nnp_error_kind kind, const char *what, uint64_t file_size, np_st *out)
{
    size_t count = out->n;
    char q[NP_QUOTE_MAX];
    /* file order and contiguity */
    {
        size_t *ord = malloc((count ? count : 1) * sizeof *ord);
        if (!ord)
            return WFAIL("%s: out of memory", what);
        for (size_t i = 0; i < count; i++)
            ord[i] = i;
        np_sort_indices(ord, count, cmp_by_offset, out->tensors);
        np_tensor *sorted = malloc((count ? count : 1) * sizeof *sorted);
        if (!sorted) {
            free(ord);
            return WFAIL("%s: out of memory", what);
        }
        for (size_t i = 0; i < count; i++)
            sorted[i] = out->tensors[ord[i]];
        free(out->tensors);
        out->tensors = sorted;
        free(ord);
    }
    uint64_t cursor = out->data_start;
    for (size_t i = 0; i < count; i++) {
        const np_tensor *t = &out->tensors[i];
        if (t->begin != cursor)
            return WFAIL("%s: data offsets are not contiguous: tensor %s %s", what,
                         tq(q, sizeof q, t->name, t->name_len),
                         t->begin < cursor ? "overlaps the previous tensor" : "leaves a hole before it");
        cursor = t->end;
    }
    out->data_end = cursor;
    if (file_size != UINT64_MAX && cursor != file_size)
        return WFAIL("%s: file is %llu bytes but the header describes %llu%s", what, (unsigned long long)file_size,
                     (unsigned long long)cursor, file_size < cursor ? " (truncated)" : " (trailing bytes)");
    return NNP_OK;
}

nnp_status np_st_parse(nnp_ctx *ctx, const uint8_t *raw, size_t len, uint64_t file_size, const char *what,
                       nnp_error_kind kind, np_st *out)
{
    memset(out, 0, sizeof *out);
    if (len < 8)
        return WFAIL("%s: not a safetensors file: %zu bytes, need at least 8", what, len);
    uint64_t n = np_le64(raw);
    if (n > NP_ST_MAX_HEADER)
        return WFAIL("%s: safetensors header of %llu bytes exceeds the %llu limit", what, (unsigned long long)n,
                     (unsigned long long)NP_ST_MAX_HEADER);
    if (len - 8 < n)
        return WFAIL("%s: safetensors header truncated: declares %llu bytes, %zu present", what,
                     (unsigned long long)n, len - 8);
    const uint8_t *text = raw + 8;
    if (n == 0 || text[0] != '{')
        return WFAIL("%s: not a safetensors file: header does not start with '{'", what);
    /* spec/FORMAT.md section 12, as Python's parse_safetensors_header: 64 levels, 4,194,304 values */
    npj_limits lim = {64, (uint64_t)1 << 22, NPJ_MAX_STRING};
    npj_doc *doc = NULL;
    char err[256];
    if (npj_parse(text, (size_t)n, &lim, &doc, err, sizeof err) != 0)
        return WFAIL("%s: invalid safetensors header: %s", what, err);
    const npj_value *root = npj_root(doc);
    nnp_status st = NNP_OK;
    if (root->kind != NPJ_OBJECT) {
        st = WFAIL("%s: invalid safetensors header: not a JSON object", what);
        goto done;
    }
    size_t count = 0;
    uint64_t arena = 0, name_bytes = 0;
    for (size_t i = 0; i < root->u.obj.n; i++) {
        const npj_member *m = &root->u.obj.members[i];
        if (m->key_len == 12 && memcmp(m->key, "__metadata__", 12) == 0) {
            const npj_value *md = &m->value;
            int ok = md->kind == NPJ_OBJECT || md->kind == NPJ_NULL;
            if (md->kind == NPJ_OBJECT)
                for (size_t k = 0; k < md->u.obj.n; k++)
                    if (md->u.obj.members[k].value.kind != NPJ_STRING)
                        ok = 0;
            if (!ok) {
                st = WFAIL("%s: invalid safetensors header: __metadata__ must map strings to strings", what);
                goto done;
            }
            out->has_metadata = md->kind == NPJ_OBJECT;
            continue;
        }
        count++;
        arena += m->key_len + 1;
        name_bytes += m->key_len;
    }
    /* the names total at most 16 MiB (section 12): a reader keeps every one */
    if (name_bytes > ((uint64_t)1 << 24)) {
        st = WFAIL("%s: invalid safetensors header: the tensor names total more than 16777216 bytes of UTF-8", what);
        goto done;
    }
    out->data_start = 8 + n;
    out->header_len = n;
    out->n = count;
    /* shapes: at most 64 dims each, checked below before storing */
    out->tensors = calloc(count ? count : 1, sizeof *out->tensors);
    out->by_name = calloc(count ? count : 1, sizeof *out->by_name);
    uint64_t shape_words = 0;
    for (size_t i = 0; i < root->u.obj.n; i++) {
        const npj_value *e = &root->u.obj.members[i].value;
        const npj_value *sh = npj_get(e, "shape");
        if (sh && sh->kind == NPJ_ARRAY && sh->u.arr.n <= NP_MAX_RANK)
            shape_words += sh->u.arr.n;
    }
    out->arena_ = malloc((size_t)(arena + shape_words * 8 + 8));
    if (!out->tensors || !out->by_name || !out->arena_) {
        st = WFAIL("%s: out of memory for %zu tensors", what, count);
        goto done;
    }
    uint64_t *shapes = out->arena_;
    char *names = (char *)(shapes + shape_words);
    size_t ti = 0;
    for (size_t i = 0; i < root->u.obj.n && !st; i++) {
        const npj_member *m = &root->u.obj.members[i];
        if (m->key_len == 12 && memcmp(m->key, "__metadata__", 12) == 0)
            continue;
        st = read_entry(ctx, kind, what, m, out->data_start, &out->tensors[ti++], &shapes, &names);
    }
    if (st)
        goto done;
    if ((st = order_by_offset(ctx, kind, what, file_size, out)))
        goto done;
    for (size_t i = 0; i < count; i++)
        out->by_name[i] = i;
    np_sort_indices(out->by_name, count, cmp_by_name, out->tensors);
done:
    npj_free(doc);
    if (st != NNP_OK)
        np_st_free(out);

    return st;
}

nnp_status np_st_read_fd(nnp_ctx *ctx, int fd, const char *path, np_st *out)
{
    memset(out, 0, sizeof *out);
    struct stat sb;
    if (fstat(fd, &sb) != 0)
        return np_fail_errno(ctx, errno, path, "cannot stat");
    uint64_t size = (uint64_t)sb.st_size;
    uint8_t head[8];
    size_t got = 0;
    while (got < 8 && got < size) {
        ssize_t r = pread(fd, head + got, 8 - got, (off_t)got);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return np_fail_errno(ctx, errno, path, "cannot read");
        }
        if (r == 0)
            break;
        got += (size_t)r;
    }
    if (got < 8)
        return np_fail(ctx, NNP_KIND_WEIGHTS, "%s: not a safetensors file: %zu bytes, need at least 8", path, got);
    uint64_t n = np_le64(head);
    if (n > NP_ST_MAX_HEADER)
        return np_fail(ctx, NNP_KIND_WEIGHTS, "%s: safetensors header of %llu bytes exceeds the %llu limit", path,
                       (unsigned long long)n, (unsigned long long)NP_ST_MAX_HEADER);
    uint64_t want = 8 + n;
    if (want > size)
        want = size;
    uint8_t *buf = malloc((size_t)want);
    if (!buf)
        return np_fail(ctx, NNP_KIND_IO, "%s: out of memory reading a %llu-byte header", path,
                       (unsigned long long)n);
    memcpy(buf, head, 8);
    got = 8;
    while (got < want) {
        ssize_t r = pread(fd, buf + got, (size_t)(want - got), (off_t)got);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            free(buf);
            return np_fail_errno(ctx, errno, path, "cannot read");
        }
        if (r == 0)
            break;
        got += (size_t)r;
    }
    nnp_status st = np_st_parse(ctx, buf, got, size, path, NNP_KIND_WEIGHTS, out);
    free(buf);
    return st;
}

void np_model_digest(const np_tensor *t, const size_t *order, size_t n, const uint8_t (*dig)[32], uint8_t out[32])
{
    np_blake3 h;
    np_blake3_init(&h);
    np_blake3_update(&h, "nnpatch-model-v1\0", 17);
    for (size_t i = 0; i < n; i++) {
        const np_tensor *x = &t[order[i]];
        uint8_t b[4];
        np_put_le32(b, (uint32_t)x->name_len);
        np_blake3_update(&h, b, 4);
        np_blake3_update(&h, x->name, x->name_len);
        const char *dn = np_dtypes[x->dtype].name;
        uint8_t dl = (uint8_t)strlen(dn);
        np_blake3_update(&h, &dl, 1);
        np_blake3_update(&h, dn, dl);
        uint8_t r = (uint8_t)x->rank;
        np_blake3_update(&h, &r, 1);
        for (unsigned d = 0; d < x->rank; d++) {
            uint8_t s[8];
            np_put_le64(s, x->shape[d]);
            np_blake3_update(&h, s, 8);
        }
        np_blake3_update(&h, dig[order[i]], 32);
    }
    np_blake3_final(&h, out);
}
