/* The apply engine: chain plan (plan.py plan_forward) and the one pass (engine.py). */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "apply.h"
#include "blake3.h"
#include "fileio.h"
#include "journal.h"
#include "sign.h"

typedef struct step {
    const np_patch *p;
    const np_op *op;
    const np_section *s;
    int mode;
} step;

typedef struct item {
    const np_tensor *out;
    const np_tensor *src;
    int has_fill;
    step fill;
    size_t s0, ns;
    const uint8_t *expect;
} item;

struct np_chain {
    np_patch *patches;
    size_t n;
    np_st *layouts;
    uint8_t **layout_raw;
    uint64_t *layout_len;
    const np_st *base;
    uint64_t base_size;
    char *base_path;
    item *items;
    size_t nitems;
    step *steps;
    size_t nsteps;
    const uint8_t **input_expect;
    char *scratch_dir; /* for wide chunk buffers: the output's directory (the base's by default) */
};

static char *dir_of(const char *path)
{
    const char *sl = strrchr(path, '/');
    if (!sl)
        return strdup(".");
    if (sl == path)
        return strdup("/");
    char *d = malloc((size_t)(sl - path) + 1);
    if (d) {
        memcpy(d, path, (size_t)(sl - path));
        d[sl - path] = 0;
    }
    return d;
}

static const char *format_name(int f)
{
    switch (f) {
    case NP_FMT_SAFETENSORS: return "safetensors";
    case NP_FMT_DIR: return "safetensors-dir";
    case NP_FMT_PYTORCH: return "pytorch";
    case NP_FMT_ONNX: return "onnx";
    }
    return "?";
}

static const np_op *find_op(const np_patch *p, const char *name, size_t len)
{
    size_t lo = 0, hi = p->nops;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = np_name_cmp(p->ops[mid].name, p->ops[mid].name_len, name, len);
        if (!c)
            return &p->ops[mid];
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

static int same_shape(int d1, unsigned r1, const uint64_t *s1, int d2, unsigned r2, const uint64_t *s2)
{
    return d1 == d2 && r1 == r2 && (r1 == 0 || !memcmp(s1, s2, r1 * sizeof *s1));
}

static void shape_text(char *buf, size_t n, int dtype, unsigned rank, const uint64_t *shape)
{
    size_t o = (size_t)snprintf(buf, n, "%s[", np_dtypes[dtype].name);
    for (unsigned i = 0; i < rank && o < n; i++)
        o += (size_t)snprintf(buf + o, n - o, "%s%llu", i ? ", " : "", (unsigned long long)shape[i]);
    if (o < n)
        snprintf(buf + o, n - o, "]");
}

void np_chain_free(np_chain *c)
{
    if (!c)
        return;
    for (size_t k = 0; k < c->n; k++) {
        np_patch_close(&c->patches[k]);
        if (c->layouts)
            np_st_free(&c->layouts[k]);
        if (c->layout_raw)
            free(c->layout_raw[k]);
    }
    free(c->patches);
    free(c->layouts);
    free(c->layout_raw);
    free(c->layout_len);
    free(c->base_path);
    free(c->items);
    free(c->steps);
    free(c->input_expect);
    free(c->scratch_dir);
    free(c);
}

/* plan.decode_layout of a file target. */
static nnp_status decode_layout(nnp_ctx *ctx, const np_patch *p, np_st *st, uint8_t **raw, uint64_t *rawlen)
{
    const np_section *s = &p->target.layout;
    *raw = NULL;
    if (s->size > 8 + NP_ST_MAX_HEADER)
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: target layout: %llu bytes, more than a safetensors header may "
                       "have", p->name, (unsigned long long)s->size);
    nnp_status r = np_section_decode_all(ctx, p, s, "target.layout", raw);
    if (r)
        return r;
    *rawlen = s->size;
    char what[512];
    snprintf(what, sizeof what, "%s: target layout", p->name);
    if ((r = np_st_parse(ctx, *raw, (size_t)s->size, p->target.size, what, NNP_KIND_PATCH_FORMAT, st)))
        return r;
    uint64_t expect = st->n ? st->data_start : p->target.size;
    if (s->size != expect)
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: target layout carries bytes beyond the safetensors header",
                       p->name);
    return NNP_OK;
}

static nnp_status check_ops_against_layout(nnp_ctx *ctx, const np_patch *p, const np_st *layout)
{
    char q[NP_QUOTE_MAX];
    for (size_t i = 0; i < layout->n; i++) {
        const np_tensor *t = &layout->tensors[i];
        const np_op *op = find_op(p, t->name, t->name_len);
        if (!op)
            continue;
        np_quote(q, sizeof q, t->name, t->name_len);
        if (!op->target.present)
            return np_fail(ctx, NNP_KIND_PATCH_FORMAT,
                           "%s: tensor %s is removed by the patch but present in the target layout", p->name, q);
        if (!same_shape(op->target.dtype, op->target.rank, op->target.shape, t->dtype, t->rank, t->shape))
            return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: tensor %s: op and target layout disagree on dtype or shape",
                           p->name, q);
    }
    for (size_t i = 0; i < p->nops; i++) {
        const np_op *op = &p->ops[i];
        if (op->target.present && !np_st_find(layout, op->name, op->name_len))
            return np_fail(ctx, NNP_KIND_PATCH_FORMAT,
                           "%s: tensor %s is written by an op but missing from the target layout", p->name,
                           np_quote(q, sizeof q, op->name, op->name_len));
    }
    if (layout->n != p->target.tensors)
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: target layout has %zu tensors, the header says %llu", p->name,
                       layout->n, (unsigned long long)p->target.tensors);
    return NNP_OK;
}

static nnp_status check_base(nnp_ctx *ctx, const np_patch *p, const np_st *base, const char *bpath,
                             const np_st *layout)
{
    char q[NP_QUOTE_MAX], a[256], b[256];
    for (size_t i = 0; i < p->nops; i++) {
        const np_op *op = &p->ops[i];
        const np_tensor *t = np_st_find(base, op->name, op->name_len);
        np_quote(q, sizeof q, op->name, op->name_len);
        if (op->base.present) {
            if (!t)
                return np_fail(ctx, NNP_KIND_BASE_MISMATCH, "%s: wrong base: tensor %s is missing", bpath, q);
            if (!same_shape(t->dtype, t->rank, t->shape, op->base.dtype, op->base.rank, op->base.shape)) {
                shape_text(a, sizeof a, t->dtype, t->rank, t->shape);
                shape_text(b, sizeof b, op->base.dtype, op->base.rank, op->base.shape);
                return np_fail(ctx, NNP_KIND_BASE_MISMATCH, "%s: wrong base: tensor %s is %s, the patch expects %s",
                               bpath, q, a, b);
            }
        } else if (t) {
            return np_fail(ctx, NNP_KIND_BASE_MISMATCH, "%s: wrong base: tensor %s already exists, the patch adds it",
                           bpath, q);
        }
    }
    for (size_t i = 0; i < layout->n; i++) {
        const np_tensor *info = &layout->tensors[i];
        if (find_op(p, info->name, info->name_len))
            continue;
        const np_tensor *src = np_st_find(base, info->name, info->name_len);
        np_quote(q, sizeof q, info->name, info->name_len);
        if (!src)
            return np_fail(ctx, NNP_KIND_BASE_MISMATCH, "%s: wrong base: tensor %s is missing", bpath, q);
        if (!same_shape(src->dtype, src->rank, src->shape, info->dtype, info->rank, info->shape)) {
            shape_text(a, sizeof a, src->dtype, src->rank, src->shape);
            shape_text(b, sizeof b, info->dtype, info->rank, info->shape);
            return np_fail(ctx, NNP_KIND_BASE_MISMATCH, "%s: wrong base: tensor %s is %s, the patch expects %s", bpath,
                           q, a, b);
        }
    }
    nnp_status st = check_ops_against_layout(ctx, p, layout);
    if (st)
        return st;
    if (base->n != p->base.tensors)
        return np_fail(ctx, NNP_KIND_BASE_MISMATCH, "%s: wrong base: %zu tensors, the patch's base has %llu", bpath,
                       base->n, (unsigned long long)p->base.tensors);
    return NNP_OK;
}

/* A name table for the chain checks: every name of the base and of every op, sorted, unique. */
typedef struct nref {
    const char *s;
    size_t n;
} nref;
static int cmp_nref(const void *cx, size_t a, size_t b)
{
    const nref *v = cx;
    return np_name_cmp(v[a].s, v[a].n, v[b].s, v[b].n);
}
static size_t find_name(const nref *names, size_t n, const char *s, size_t len)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = np_name_cmp(names[mid].s, names[mid].n, s, len);
        if (!c)
            return mid;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return (size_t)-1;
}

static nnp_status chain_links(nnp_ctx *ctx, np_chain *c)
{
    size_t total = c->base->n;
    for (size_t k = 0; k < c->n; k++)
        total += c->patches[k].nops;
    nref *all = malloc((total ? total : 1) * sizeof *all);
    size_t *ord = malloc((total ? total : 1) * sizeof *ord);
    nref *names = malloc((total ? total : 1) * sizeof *names);
    uint8_t *present = NULL;
    const uint8_t **known = NULL;
    nnp_status st = NNP_OK;
    if (!all || !ord || !names) {
        st = np_fail(ctx, NNP_KIND_IO, "out of memory");
        goto out;
    }
    size_t m = 0;
    for (size_t i = 0; i < c->base->n; i++)
        all[m++] = (nref){c->base->tensors[i].name, c->base->tensors[i].name_len};
    for (size_t k = 0; k < c->n; k++)
        for (size_t i = 0; i < c->patches[k].nops; i++)
            all[m++] = (nref){c->patches[k].ops[i].name, c->patches[k].ops[i].name_len};
    for (size_t i = 0; i < m; i++)
        ord[i] = i;
    np_sort_indices(ord, m, cmp_nref, all);
    size_t u = 0;
    for (size_t i = 0; i < m; i++)
        if (!u || np_name_cmp(names[u - 1].s, names[u - 1].n, all[ord[i]].s, all[ord[i]].n))
            names[u++] = all[ord[i]];
    present = calloc(u ? u : 1, 1);
    known = calloc(u ? u : 1, sizeof *known);
    if (!present || !known) {
        st = np_fail(ctx, NNP_KIND_IO, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < c->base->n; i++)
        present[find_name(names, u, c->base->tensors[i].name, c->base->tensors[i].name_len)] = 1;
    char q[NP_QUOTE_MAX];
    for (size_t k = 0; k < c->n; k++) {
        const np_patch *p = &c->patches[k];
        for (size_t i = 0; i < p->nops; i++) {
            const np_op *op = &p->ops[i];
            size_t x = find_name(names, u, op->name, op->name_len);
            np_quote(q, sizeof q, op->name, op->name_len);
            if (op->base.present) {
                if (!present[x]) {
                    st = np_fail(ctx, NNP_KIND_BASE_MISMATCH,
                                 "%s: broken chain: tensor %s does not exist before link %zu", p->name, q, k + 1);
                    goto out;
                }
                if (known[x] && memcmp(known[x], op->base.blake3, 32)) {
                    st = np_fail(ctx, NNP_KIND_BASE_MISMATCH,
                                 "%s: broken chain: tensor %s before link %zu is not the one its op expects", p->name,
                                 q, k + 1);
                    goto out;
                }
            } else if (present[x]) {
                st = np_fail(ctx, NNP_KIND_BASE_MISMATCH, "%s: broken chain: link %zu adds %s, which exists", p->name,
                             k + 1, q);
                goto out;
            }
            if (!op->target.present) {
                present[x] = 0;
                known[x] = NULL;
            } else {
                present[x] = 1;
                known[x] = op->target.blake3;
            }
        }
        if (k) {
            const np_st *lay = &c->layouts[k];
            size_t np_ = 0;
            int ok = 1;
            for (size_t i = 0; i < u; i++)
                if (present[i]) {
                    np_++;
                    if (!np_st_find(lay, names[i].s, names[i].n))
                        ok = 0;
                }
            if (!ok || np_ != lay->n) {
                st = np_fail(ctx, NNP_KIND_BASE_MISMATCH,
                             "%s: broken chain: tensor set after link %zu does not match its target layout", p->name,
                             k + 1);
                goto out;
            }
        }
    }
out:
    free(all);
    free(ord);
    free(names);
    free(present);
    free(known);
    return st;
}

static int absolute(const np_op *op)
{
    return op->kind == NP_OP_ADD || (op->kind == NP_OP_WHOLE && !np_sec_delta(&op->values));
}

static nnp_status plan(nnp_ctx *ctx, np_chain *c)
{
    const np_st *final = &c->layouts[c->n - 1];
    c->nitems = final->n;
    c->items = calloc(final->n ? final->n : 1, sizeof *c->items);
    size_t maxsteps = 0;
    for (size_t k = 0; k < c->n; k++)
        maxsteps += c->patches[k].nops;
    c->steps = calloc(maxsteps ? maxsteps : 1, sizeof *c->steps);
    c->input_expect = calloc(c->base->n ? c->base->n : 1, sizeof *c->input_expect);
    if (!c->items || !c->steps || !c->input_expect)
        return np_fail(ctx, NNP_KIND_IO, "out of memory");
    char q[NP_QUOTE_MAX], a[256], b[256];
    for (size_t i = 0; i < final->n; i++) {
        const np_tensor *info = &final->tensors[i];
        item *it = &c->items[i];
        it->out = info;
        size_t start = 0;
        for (size_t k = c->n; k-- > 0;) {
            const np_op *op = find_op(&c->patches[k], info->name, info->name_len);
            if (op && absolute(op)) {
                it->has_fill = 1;
                it->fill = (step){&c->patches[k], op, &op->values, NP_M_REPLACE};
                start = k + 1;
                break;
            }
        }
        np_quote(q, sizeof q, info->name, info->name_len);
        if (!it->has_fill) {
            it->src = np_st_find(c->base, info->name, info->name_len);
            if (!it->src)
                return np_fail(ctx, NNP_KIND_BASE_MISMATCH, "%s: wrong base: tensor %s is missing", c->base_path, q);
        }
        it->s0 = c->nsteps;
        for (size_t k = start; k < c->n; k++) {
            const np_op *op = find_op(&c->patches[k], info->name, info->name_len);
            if (!op)
                continue;
            if (!op->values.present)
                return np_fail(ctx, NNP_KIND_BASE_MISMATCH, "%s: broken chain: link %zu removes %s", c->patches[k].name,
                               k + 1, q);
            c->steps[c->nsteps++] = (step){&c->patches[k], op, &op->values, np_mode_of(&op->values)};
        }
        it->ns = c->nsteps - it->s0;
        for (size_t k = c->n; k-- > 0;) {
            const np_op *op = find_op(&c->patches[k], info->name, info->name_len);
            if (op) {
                it->expect = op->target.present ? op->target.blake3 : NULL;
                break;
            }
        }
        /* an untouched tensor keeps the base's dtype and shape through every link */
        if (!it->has_fill && !it->ns &&
            !same_shape(it->src->dtype, it->src->rank, it->src->shape, info->dtype, info->rank, info->shape)) {
            shape_text(a, sizeof a, it->src->dtype, it->src->rank, it->src->shape);
            shape_text(b, sizeof b, info->dtype, info->rank, info->shape);
            return np_fail(ctx, NNP_KIND_BASE_MISMATCH, "%s: wrong base: tensor %s is %s, the patch expects %s",
                           c->base_path, q, a, b);
        }
        if (it->src && it->src->nbytes != info->nbytes)
            return np_fail(ctx, NNP_KIND_BASE_MISMATCH, "%s: broken chain: tensor %s changes size without a whole op",
                           c->base_path, q);
    }
    for (size_t k = 0; k < c->n; k++) {
        const np_patch *p = &c->patches[k];
        for (size_t i = 0; i < p->nops; i++) {
            const np_op *op = &p->ops[i];
            if (!op->base.present)
                continue;
            const np_tensor *t = np_st_find(c->base, op->name, op->name_len);
            if (!t)
                continue;
            size_t bi = (size_t)(t - c->base->tensors);
            if (c->input_expect[bi])
                continue;
            int earlier = 0;
            for (size_t j = 0; j < k && !earlier; j++)
                if (find_op(&c->patches[j], op->name, op->name_len))
                    earlier = 1;
            if (!earlier)
                c->input_expect[bi] = op->base.blake3;
        }
    }
    return NNP_OK;
}

static nnp_status refuse_target(nnp_ctx *ctx, const np_patch *p)
{
    if (p->target.format == NP_FMT_SAFETENSORS)
        return NNP_OK;
    return np_fail(ctx, NNP_KIND_UNSUPPORTED_VERSION,
                   "%s: target format '%s' (%s) is not supported by the native applier, which writes safetensors "
                   "files; use `nnpatch apply`",
                   p->name, format_name(p->target.format),
                   p->target.format == NP_FMT_DIR ? "a model directory"
                   : p->target.format == NP_FMT_ONNX ? "an ONNX model" : "a PyTorch checkpoint");
}

nnp_status np_chain_open_patches(nnp_ctx *ctx, np_patch *patches, size_t n, const np_st *base, uint64_t base_size,
                                 const char *base_path, np_chain **out)
{
    *out = NULL;
    np_chain *c = calloc(1, sizeof *c);
    if (!c) {
        for (size_t k = 0; k < n; k++)
            np_patch_close(&patches[k]);
        return np_fail(ctx, NNP_KIND_IO, "out of memory");
    }
    c->patches = malloc(n * sizeof *c->patches);
    c->layouts = calloc(n, sizeof *c->layouts);
    c->layout_raw = calloc(n, sizeof *c->layout_raw);
    c->layout_len = calloc(n, sizeof *c->layout_len);
    c->base_path = strdup(base_path);
    if (!c->patches || !c->layouts || !c->layout_raw || !c->layout_len || !c->base_path) {
        if (c->patches)
            memcpy(c->patches, patches, n * sizeof *patches);
        else
            for (size_t k = 0; k < n; k++)
                np_patch_close(&patches[k]);
        c->n = c->patches ? n : 0;
        np_chain_free(c);
        return np_fail(ctx, NNP_KIND_IO, "out of memory");
    }
    memcpy(c->patches, patches, n * sizeof *patches);
    c->n = n;
    c->scratch_dir = dir_of(base_path);
    c->base = base;
    c->base_size = base_size;
    nnp_status st = NNP_OK;
    for (size_t k = 0; k < n && !st; k++)
        st = refuse_target(ctx, &c->patches[k]);
    for (size_t k = 0; k < n && !st; k++) {
        const np_patch *p = &c->patches[k];
        if ((st = decode_layout(ctx, p, &c->layouts[k], &c->layout_raw[k], &c->layout_len[k])))
            break;
        if (k == 0)
            st = check_base(ctx, p, base, base_path, &c->layouts[0]);
        else if (!(st = check_ops_against_layout(ctx, p, &c->layouts[k])) &&
                 memcmp(p->base.model_blake3, c->patches[k - 1].target.model_blake3, 32)) {
            char a[65], b[65];
            np_hex(p->base.model_blake3, 32, a);
            np_hex(c->patches[k - 1].target.model_blake3, 32, b);
            st = np_fail(ctx, NNP_KIND_BASE_MISMATCH,
                         "%s: broken chain: link %zu was made for another base than the target of link %zu (%s) (model "
                         "BLAKE3 %s, expected %s)",
                         p->name, k + 1, k, c->patches[k - 1].name, a, b);
        }
    }
    if (!st)
        st = chain_links(ctx, c);
    if (!st)
        st = plan(ctx, c);
    if (st) {
        np_chain_free(c);
        return st;
    }
    *out = c;
    return NNP_OK;
}

nnp_status np_chain_open(nnp_ctx *ctx, const char *const *patch_paths, size_t n, const np_st *base,
                         uint64_t base_size, const char *base_path, np_chain **out)
{
    *out = NULL;
    if (n == 0)
        return np_fail(ctx, NNP_KIND_USAGE, "apply needs at least one patch");
    np_patch *ps = calloc(n, sizeof *ps);
    if (!ps)
        return np_fail(ctx, NNP_KIND_IO, "out of memory");
    for (size_t k = 0; k < n; k++) {
        nnp_status st = np_patch_open(ctx, patch_paths[k], NULL, &ps[k]);
        if (st) {
            for (size_t j = 0; j < k; j++)
                np_patch_close(&ps[j]);
            free(ps);
            return st;
        }
    }
    nnp_status st = np_chain_open_patches(ctx, ps, n, base, base_size, base_path, out);
    free(ps);
    return st;
}

void np_chain_get_info(const np_chain *c, np_chain_info *o)
{
    memset(o, 0, sizeof *o);
    const np_patch *first = &c->patches[0], *last = &c->patches[c->n - 1];
    o->single_file = last->target.format == NP_FMT_SAFETENSORS;
    o->layout = c->layout_raw[c->n - 1];
    o->layout_len = c->layout_len[c->n - 1];
    o->size = last->target.size;
    memcpy(o->base_blake3, first->base.blake3, 32);
    memcpy(o->base_model, first->base.model_blake3, 32);
    memcpy(o->target_blake3, last->target.blake3, 32);
    memcpy(o->target_model, last->target.model_blake3, 32);
    memcpy(o->patch_trailer, last->trailer, 32);
    o->n_items = c->nitems;
}

void np_chain_item(const np_chain *c, size_t i, np_item *o)
{
    const item *it = &c->items[i];
    memset(o, 0, sizeof *o);
    o->out = it->out;
    o->src = it->src;
    o->has_fill = it->has_fill;
    o->n_steps = it->ns;
    o->touched = it->has_fill || it->ns;
    const np_op *op = it->has_fill ? it->fill.op : it->ns ? c->steps[it->s0].op : NULL;
    o->first_kind = op ? op->kind : 0;
    o->count = op ? op->count : 0;
    o->expect = o->touched ? it->expect : NULL;
}

const uint8_t *np_chain_input_expect(const np_chain *c, size_t k) { return c->input_expect[k]; }

nnp_status np_chain_indices(nnp_ctx *ctx, np_chain *c, size_t i, np_index_fn fn, void *user)
{
    const item *it = &c->items[i];
    const step *s = it->has_fill ? &it->fill : it->ns ? &c->steps[it->s0] : NULL;
    if (!s || !(s->op->kind == NP_OP_ROWS || s->op->kind == NP_OP_ELEMENTS || s->op->kind == NP_OP_QROWS))
        return np_fail(ctx, NNP_KIND_USAGE, "item %zu has no index", i);
    uint64_t bound = s->op->kind == NP_OP_ELEMENTS ? it->out->numel : it->out->shape[0];
    return np_idx_validate(ctx, s->p, s->op, bound, fn, user);
}

static nnp_status run(nnp_ctx *ctx, const item *it, const step *s, uint8_t *dst, const char *scratch)
{
    np_step_job j = {s->p, s->op, s->s, s->mode, it->out->dtype, it->out->rank, it->out->shape, it->out->numel,
                     it->out->nbytes, scratch};
    return np_run_step(ctx, &j, dst);
}

nnp_status np_chain_apply_item(nnp_ctx *ctx, np_chain *c, size_t i, uint8_t *dst)
{
    const item *it = &c->items[i];
    nnp_status st;
    if (it->has_fill && (st = run(ctx, it, &it->fill, dst, c->scratch_dir)))
        return st;
    for (size_t k = 0; k < it->ns; k++)
        if ((st = run(ctx, it, &c->steps[it->s0 + k], dst, c->scratch_dir)))
            return st;
    return NNP_OK;
}

/* ---- the engine ---------------------------------------------------------------------------- */

static void hash_range(const uint8_t *p, uint64_t n, uint8_t out[32])
{
    np_blake3_hash(p, (size_t)n, out);
}

/*
 * Chaining-value reuse (blake3.h np_blake3_hash_keep / np_blake3_hash_reuse). A tensor that only
 * rows, elements or qrows ops change keeps most of its bytes: the result's bytes outside the
 * units the ops write are the base's bytes, copied, at the same offsets (the digest is of the
 * tensor's bytes alone, chunk counters from 0). So when its base tensor is hashed anyway (it is
 * checked against the patch), the hasher keeps the chaining values of its 64 KiB subtrees (and,
 * in those the ops write into, of their 4 KiB subtrees); the result is then hashed from those
 * and from the bytes of the 4 KiB subtrees the ops write (as written), which gives exactly the
 * digest of the result's bytes when the base is the one checked. The marks come from the ops'
 * indices, decoded before the base job is queued. Memory: 34 bytes per 64 KiB of such a tensor,
 * 512 more per 64 KiB subtree with a change; freed once the result is hashed.
 */
typedef struct reuse {
    size_t nsub;            /* np_blake3_subtrees(nbytes) >= 1 */
    uint16_t *dirty;        /* nsub masks of 16 fine subtrees */
    uint8_t *sub_cv, *fine_cv;
    int done;               /* the base job has written sub_cv and fine_cv (under the pool's lock) */
} reuse;

static void reuse_free(reuse *r)
{
    free(r->dirty);
    free(r->sub_cv);
    free(r->fine_cv);
    memset(r, 0, sizeof *r);
}

typedef struct marker {
    uint16_t *dirty;
    uint64_t nfine, unit;
} marker;

static nnp_status mark_units(void *user, const uint64_t *idx, size_t n)
{
    marker *m = user;
    for (size_t i = 0; i < n; i++) {
        /* the validated position is below the op's bound: its unit lies in the tensor */
        uint64_t f = idx[i] * m->unit / NP_BLAKE3_FINE_LEN, e = (idx[i] * m->unit + m->unit - 1) / NP_BLAKE3_FINE_LEN;
        for (; f <= e && f < m->nfine; f++)
            m->dirty[f / 16] |= (uint16_t)(1u << (f % 16));
    }
    return NNP_OK;
}

/* Item i's reuse state, filled with the marks of every unit its steps write; 0 when it does not
 * qualify (a fill, a step of another kind, a tensor of one subtree or less: hashed in full). */
static int reuse_prepare(np_chain *c, size_t i, reuse *r)
{
    const item *it = &c->items[i];
    memset(r, 0, sizeof *r);
    if (it->has_fill || !it->ns || !it->src || it->src->nbytes != it->out->nbytes)
        return 0;
    size_t nsub = np_blake3_subtrees((size_t)it->out->nbytes), ndirty = 0;
    if (!nsub)
        return 0;
    for (size_t k = 0; k < it->ns; k++) {
        int kind = c->steps[it->s0 + k].op->kind;
        if (kind != NP_OP_ROWS && kind != NP_OP_ELEMENTS && kind != NP_OP_QROWS)
            return 0;
        if (kind != NP_OP_ELEMENTS && (!it->out->rank || !it->out->shape[0]))
            return 0;
    }
    r->dirty = calloc(nsub, sizeof *r->dirty);
    r->sub_cv = malloc(nsub * 32);
    if (!r->dirty || !r->sub_cv)
        goto no;
    /* a context of its own: a failure here is no error (the step meets it again and reports it) */
    nnp_ctx *quiet = nnp_ctx_new();
    if (!quiet)
        goto no;
    for (size_t k = 0; k < it->ns; k++) {
        const step *s = &c->steps[it->s0 + k];
        int elements = s->op->kind == NP_OP_ELEMENTS;
        uint64_t bound = elements ? it->out->numel : it->out->shape[0];
        marker m = {r->dirty, (uint64_t)nsub * 16, elements ? np_dtypes[it->out->dtype].size : it->out->nbytes / bound};
        if (!m.unit || np_idx_validate(quiet, s->p, s->op, bound, mark_units, &m)) {
            nnp_ctx_free(quiet);
            goto no;
        }
    }
    nnp_ctx_free(quiet);
    for (size_t b = 0; b < nsub; b++)
        ndirty += r->dirty[b] != 0;
    if (ndirty && !(r->fine_cv = malloc(ndirty * 16 * 32)))
        goto no;
    r->nsub = nsub;
    return 1;
no:
    reuse_free(r);
    return 0;
}

/* Hashing threads: a queue of (range, digest) jobs, each hashed exactly once (its digest
 * written by one thread only). build() queues the base tensors no touched item starts from,
 * then, item by item, the base tensor a touched item starts from (before it is copied) and the
 * output tensor (once its ops have run); the main thread only copies and patches, then joins in.
 * Every digest is compared on the main thread, after hpool_settle, in the order a serial pass
 * would have met it, so the first error reported stays the same. The queue is sized up front:
 * one job per base tensor and two per item at most. */
typedef struct hjob {
    const uint8_t *p;
    uint64_t n, count; /* count: the bytes it adds to progress */
    uint8_t *out;
    int fd; /* >= 0: a range of the new file (mapped at p, at offset off of fd), released once hashed */
    uint64_t off;
    reuse *r; /* a base job keeps chaining values in it, a result job (fd >= 0) hashes from them */
} hjob;

/* A range of the new file is done with: its pages leave this process's map, then their write-back
 * starts. In that order: cleaning a page that is still mapped writable costs a TLB shootdown of
 * its own (an interrupt to every CPU running a thread of this process, here the hashers); the
 * map's range is dropped with one. The data stays in the page cache (a shared file map). */
static void release_range(uint8_t *p, uint64_t n, int fd, uint64_t off)
{
    if (!n)
        return;
#if defined(__linux__) && defined(MADV_DONTNEED) /* there, dropping a shared file map's pages keeps their data */
    long pg = sysconf(_SC_PAGESIZE);
    uintptr_t ps = pg > 0 ? (uintptr_t)pg : 4096, a = (uintptr_t)p & ~(ps - 1);
    uintptr_t e = ((uintptr_t)p + (uintptr_t)n + ps - 1) & ~(ps - 1);
    madvise((void *)a, e - a, MADV_DONTNEED);
#else
    (void)p;
#endif
    np_writeback(fd, off, n);
}

typedef struct hpool {
    pthread_mutex_t mu;
    pthread_cond_t more, idle; /* a job was queued (or the queue closed); no job is being hashed */
    pthread_cond_t kept;       /* a base job's chaining values are in (reuse.done) */
    hjob *jobs;
    size_t n, next, busy;
    int closed;
    uint64_t hashed;
    nnp_ctx *ctx;
} hpool;

static void hpool_push(hpool *h, const uint8_t *p, uint64_t n, uint64_t count, uint8_t *out, int fd, uint64_t off,
                       reuse *r)
{
    pthread_mutex_lock(&h->mu);
    h->jobs[h->n++] = (hjob){p, n, count, out, fd, off, r};
    pthread_cond_signal(&h->more);
    pthread_mutex_unlock(&h->mu);
}

/* Take and hash one job; the lock is held on entry and on return. 0 when none is left. */
static int hpool_run_one(hpool *h)
{
    if (h->next >= h->n || np_cancelled(h->ctx))
        return 0;
    hjob j = h->jobs[h->next++];
    h->busy++;
    /* a result job waits for its base job's chaining values: that job was queued before it, so it
     * has been taken, and it finishes without waiting for anything */
    while (j.r && j.fd >= 0 && !j.r->done)
        pthread_cond_wait(&h->kept, &h->mu);
    pthread_mutex_unlock(&h->mu);
    if (!j.r) {
        hash_range(j.p, j.n, j.out);
    } else if (j.fd < 0) {
        np_blake3_hash_keep(NP_BLAKE3_IMPL_AUTO, j.p, (size_t)j.n, j.r->dirty, j.r->sub_cv, j.r->fine_cv, j.out);
    } else {
        np_blake3_hash_reuse(NP_BLAKE3_IMPL_AUTO, j.p, (size_t)j.n, j.r->dirty, j.r->sub_cv, j.r->fine_cv, j.out);
        reuse_free(j.r); /* its last use */
    }
    if (j.fd >= 0)
        release_range((uint8_t *)(uintptr_t)j.p, j.n, j.fd, j.off);
    pthread_mutex_lock(&h->mu);
    if (j.r && j.fd < 0) {
        j.r->done = 1;
        pthread_cond_broadcast(&h->kept);
    }
    h->hashed += j.count;
    if (!--h->busy)
        pthread_cond_broadcast(&h->idle);
    return 1;
}

static void *hworker(void *arg)
{
    hpool *h = arg;
    pthread_mutex_lock(&h->mu);
    for (;;) {
        if (hpool_run_one(h))
            continue;
        if (h->closed || np_cancelled(h->ctx))
            break;
        pthread_cond_wait(&h->more, &h->mu);
    }
    pthread_mutex_unlock(&h->mu);
    return NULL;
}

static uint64_t hpool_take(hpool *h)
{
    pthread_mutex_lock(&h->mu);
    uint64_t n = h->hashed;
    h->hashed = 0;
    pthread_mutex_unlock(&h->mu);
    return n;
}

/* The main thread joins in until every queued job is hashed (progress reported as it goes). */
static nnp_status hpool_settle(nnp_ctx *ctx, hpool *h)
{
    nnp_status st;
    pthread_mutex_lock(&h->mu);
    for (;;) {
        int ran = hpool_run_one(h);
        uint64_t done = h->hashed;
        h->hashed = 0;
        if (!ran && (np_cancelled(ctx) || !h->busy)) {
            pthread_mutex_unlock(&h->mu);
            if ((st = np_progress(ctx, done)))
                return st;
            if (h->next < h->n || h->busy) /* cancelled, with jobs unhashed */
                return np_check_cancel(ctx);
            return NNP_OK;
        }
        if (!ran)
            pthread_cond_wait(&h->idle, &h->mu);
        if (done) {
            pthread_mutex_unlock(&h->mu);
            if ((st = np_progress(ctx, done)))
                return st;
            pthread_mutex_lock(&h->mu);
        }
    }
}

/* Stop the workers: nothing more is taken; what is being hashed is finished. */
static void hpool_close(hpool *h, pthread_t *threads, int *nthreads)
{
    pthread_mutex_lock(&h->mu);
    h->closed = 1;
    h->n = h->next;
    pthread_cond_broadcast(&h->more);
    pthread_mutex_unlock(&h->mu);
    for (int w = 0; w < *nthreads; w++)
        pthread_join(threads[w], NULL);
    *nthreads = 0;
}

static void hpool_init(hpool *h, nnp_ctx *ctx, hjob *jobs)
{
    memset(h, 0, sizeof *h);
    pthread_mutex_init(&h->mu, NULL);
    pthread_cond_init(&h->more, NULL);
    pthread_cond_init(&h->idle, NULL);
    pthread_cond_init(&h->kept, NULL);
    h->jobs = jobs;
    h->ctx = ctx;
}

static void hpool_destroy(hpool *h)
{
    pthread_cond_destroy(&h->more);
    pthread_cond_destroy(&h->idle);
    pthread_cond_destroy(&h->kept);
    pthread_mutex_destroy(&h->mu);
}

/* Helper threads for the pool: cpus-1 of them, at most `most` (<= NP_HASHERS_MAX); the count started. */
#define NP_HASHERS_MAX 7
static int hpool_start(hpool *h, pthread_t threads[NP_HASHERS_MAX], size_t most)
{
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    size_t want = cpus > 1 ? (size_t)(cpus > NP_HASHERS_MAX + 1 ? NP_HASHERS_MAX : cpus - 1) : 0;
    if (want > most)
        want = most;
    int started = 0;
    pthread_attr_t attr;
    int have_attr = pthread_attr_init(&attr) == 0;
    if (have_attr)
        pthread_attr_setstacksize(&attr, (size_t)1 << 20); /* a hasher needs a few KiB */
    for (size_t w = 0; w < want; w++)
        if (pthread_create(&threads[started], have_attr ? &attr : NULL, hworker, h) == 0)
            started++;
    if (have_attr)
        pthread_attr_destroy(&attr);
    return started;
}

nnp_status np_hash_ranges(nnp_ctx *ctx, const np_hash_range *ranges, size_t n)
{
    hjob *jobs = malloc((n ? n : 1) * sizeof *jobs);
    if (!jobs)
        return np_fail(ctx, NNP_KIND_IO, "out of memory");
    hpool pool;
    hpool_init(&pool, ctx, jobs);
    for (size_t k = 0; k < n; k++)
        jobs[pool.n++] = (hjob){ranges[k].p, ranges[k].n, ranges[k].count, ranges[k].out, -1, 0, NULL};
    pthread_t threads[NP_HASHERS_MAX];
    int nthreads = n > 1 ? hpool_start(&pool, threads, n - 1) : 0;
    nnp_status st = hpool_settle(ctx, &pool);
    hpool_close(&pool, threads, &nthreads);
    hpool_destroy(&pool);
    free(jobs);
    return st;
}

/* The digests of item i (base tensor, then result), compared as a serial pass would have: the
 * base's only when it was hashed (hb), the result's only when `result` (its job was queued). */
static nnp_status check_item(nnp_ctx *ctx, const np_chain *c, size_t i, const uint8_t (*bd)[32],
                             const uint8_t (*od)[32], const uint8_t *hb, int result)
{
    const item *it = &c->items[i];
    char q[NP_QUOTE_MAX], a[65], b[65];
    if (it->src && (it->has_fill || it->ns)) {
        size_t bi = (size_t)(it->src - c->base->tensors);
        const uint8_t *want = c->input_expect[bi];
        if (hb[bi] == 1 && want && memcmp(bd[bi], want, 32)) {
            np_hex(bd[bi], 32, a);
            np_hex(want, 32, b);
            return np_fail(ctx, NNP_KIND_BASE_MISMATCH,
                           "%s: wrong base: tensor %s differs from the patch's base (BLAKE3 %s, expected %s)",
                           c->base_path, np_quote(q, sizeof q, it->src->name, it->src->name_len), a, b);
        }
    }
    if (result && (it->has_fill || it->ns) && it->expect && memcmp(od[i], it->expect, 32)) {
        np_hex(od[i], 32, a);
        np_hex(it->expect, 32, b);
        return np_fail(ctx, NNP_KIND_INTEGRITY,
                       "tensor %s: result does not match the patch's target (BLAKE3 %s, expected %s)",
                       np_quote(q, sizeof q, it->out->name, it->out->name_len), a, b);
    }
    return NNP_OK;
}

static nnp_status build(nnp_ctx *ctx, np_chain *c, int base_fd, const uint8_t *base_map, const char *out_path)
{
    const np_patch *last = &c->patches[c->n - 1], *first = &c->patches[0];
    const int hash_all = ctx->verify != NNP_VERIFY_TOUCHED, full = ctx->verify == NNP_VERIFY_FULL;
    const uint64_t size = last->target.size;
    const np_st *base = c->base, *final = &c->layouts[c->n - 1];
    np_tmp t;
    nnp_status st = np_tmp_create(ctx, out_path, ".tmp", &t);
    if (st)
        return st;
    char *sd = dir_of(out_path);
    if (sd) {
        free(c->scratch_dir);
        c->scratch_dir = sd;
    }
    uint8_t *m = NULL;
    uint8_t (*bd)[32] = calloc(base->n ? base->n : 1, 32);
    uint8_t *bh = calloc(base->n ? base->n : 1, 1);
    uint8_t (*od)[32] = calloc(c->nitems ? c->nitems : 1, 32);
    size_t *hlist = malloc((base->n ? base->n : 1) * sizeof *hlist), nh = 0;
    hjob *jobs = malloc((base->n + 2 * c->nitems + 1) * sizeof *jobs);
    reuse *rs = calloc(c->nitems ? c->nitems : 1, sizeof *rs);
    pthread_t threads[NP_HASHERS_MAX];
    int nthreads = 0;
    hpool pool;
    hpool_init(&pool, ctx, jobs);
    size_t i = 0; /* the item being built (for the digests to compare when it fails) */
    char a[65], b[65], q[NP_QUOTE_MAX];
    if (!bd || !bh || !od || !hlist || !jobs || !rs) {
        st = np_fail(ctx, NNP_KIND_IO, "out of memory");
        goto out;
    }
    if (size > (uint64_t)SIZE_MAX / 2) {
        st = np_fail(ctx, NNP_KIND_IO, "%s: the new model (%llu bytes) is too large for this platform's address space",
                     out_path, (unsigned long long)size);
        goto out;
    }
    if ((st = np_reserve(ctx, t.fd, size, out_path)))
        goto out;
    if (size) {
        void *mm = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, t.fd, 0);
        if (mm == MAP_FAILED) {
            st = np_fail_errno(ctx, errno, out_path, "cannot map the new file");
            goto out;
        }
        m = mm;
    }
    uint64_t base_data = base->data_end - base->data_start;
    np_progress_total(ctx, size + (hash_all ? base_data : 0) + (full ? size : 0));
    if (c->layout_len[c->n - 1] > size) {
        st = np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: target layout is longer than the target", last->name);
        goto out;
    }
    if (c->layout_len[c->n - 1])
        memcpy(m, c->layout_raw[c->n - 1], (size_t)c->layout_len[c->n - 1]);
    /* first in the queue, every base tensor that no touched item starts from: all of them
     * (default, full), or those an op names (touched: removed tensors, and tensors an absolute op
     * replaces, must still be the patch's base) */
    {
        for (size_t k = 0; k < c->nitems; k++)
            if (c->items[k].src && (c->items[k].has_fill || c->items[k].ns))
                bh[c->items[k].src - base->tensors] = 2; /* queued with its item */
        for (size_t k = 0; k < base->n; k++)
            if (!bh[k] && (hash_all || c->input_expect[k])) {
                hlist[nh++] = k;
                jobs[pool.n++] = (hjob){base_map + base->tensors[k].begin, base->tensors[k].nbytes,
                                        base->tensors[k].nbytes, bd[k], -1, 0, NULL};
            }
        nthreads = hpool_start(&pool, threads, NP_HASHERS_MAX);
    }
    while (i < c->nitems) {
        const item *it = &c->items[i];
        if (!it->has_fill && !it->ns) {
            /* a run of unchanged tensors, contiguous in base and output */
            size_t j = i + 1;
            uint64_t n = it->out->nbytes;
            while (j < c->nitems && !c->items[j].has_fill && !c->items[j].ns &&
                   c->items[j].src->begin == it->src->begin + n && c->items[j].out->begin == it->out->begin + n) {
                n += c->items[j].out->nbytes;
                j++;
            }
            if (n && (st = np_copy_range(ctx, base_fd, it->src->begin, t.fd, it->out->begin, n, base_map, m, out_path)))
                goto out;
            np_writeback(t.fd, it->out->begin, n);
            if ((st = np_progress(ctx, n + hpool_take(&pool))))
                goto out;
            i = j;
            continue;
        }
        uint8_t *dst = m + it->out->begin;
        reuse *r = NULL;
        if (it->src) {
            size_t bi = (size_t)(it->src - base->tensors);
            if (bh[bi] != 1 && (hash_all || c->input_expect[bi])) { /* once, if two items start from it */
                bh[bi] = 1;
                /* the base's chaining values for the result's digest, when that is taken too
                 * (--verify full re-hashes every tensor as written: not there) */
                if (!full && (hash_all || it->expect) && reuse_prepare(c, i, &rs[i]))
                    r = &rs[i];
                hpool_push(&pool, base_map + it->src->begin, it->src->nbytes, hash_all ? it->src->nbytes : 0, bd[bi], -1,
                           0, r);
            }
            /* a kernel copy: only the pages the ops change are then written through the map */
            if (it->out->nbytes && (st = np_copy_range(ctx, base_fd, it->src->begin, t.fd, it->out->begin,
                                                       it->out->nbytes, base_map, m, out_path)))
                goto out;
        }
        if ((st = np_chain_apply_item(ctx, c, i, dst)))
            goto out;
        if (hash_all || it->expect) /* hashed, then released, by whichever thread takes it */
            hpool_push(&pool, dst, it->out->nbytes, 0, od[i], t.fd, it->out->begin, r);
        else
            release_range(dst, it->out->nbytes, t.fd, it->out->begin);
        if ((st = np_progress(ctx, it->out->nbytes + hpool_take(&pool))))
            goto out;
        i++;
    }
    /* every digest is in once the main thread has joined in and the queue is empty */
    if ((st = hpool_settle(ctx, &pool)))
        goto out;
    hpool_close(&pool, threads, &nthreads);
    for (size_t k = 0; k < c->nitems; k++)
        if ((st = check_item(ctx, c, k, (const uint8_t(*)[32])bd, (const uint8_t(*)[32])od, bh,
                             hash_all || c->items[k].expect)))
            goto out;
    for (size_t x = 0; x < nh; x++) {
        size_t k = hlist[x];
        const uint8_t *want = c->input_expect[k];
        if (want && memcmp(bd[k], want, 32)) {
            np_hex(bd[k], 32, a);
            np_hex(want, 32, b);
            st = np_fail(ctx, NNP_KIND_BASE_MISMATCH,
                         "%s: wrong base: tensor %s differs from the patch's base (BLAKE3 %s, expected %s)",
                         c->base_path, np_quote(q, sizeof q, base->tensors[k].name, base->tensors[k].name_len), a, b);
            goto out;
        }
    }
    i = c->nitems;
    if (hash_all) {
        uint8_t got[32];
        np_model_digest(base->tensors, base->by_name, base->n, (const uint8_t(*)[32])bd, got);
        if (memcmp(got, first->base.model_blake3, 32)) {
            np_hex(got, 32, a);
            np_hex(first->base.model_blake3, 32, b);
            st = np_fail(ctx, NNP_KIND_BASE_MISMATCH,
                         "%s: wrong base: tensor contents differ from the patch's base (model BLAKE3 %s, expected %s)",
                         c->base_path, a, b);
            goto out;
        }
        for (size_t k = 0; k < c->nitems; k++)
            if (!c->items[k].has_fill && !c->items[k].ns)
                memcpy(od[k], bd[c->items[k].src - base->tensors], 32);
        /* od is indexed like final->tensors (items are in that order) */
        np_model_digest(final->tensors, final->by_name, final->n, (const uint8_t(*)[32])od, got);
        if (memcmp(got, last->target.model_blake3, 32)) {
            np_hex(got, 32, a);
            np_hex(last->target.model_blake3, 32, b);
            st = np_fail(ctx, NNP_KIND_INTEGRITY,
                         "result does not match the patch's target model digest (model BLAKE3 %s, expected %s)", a, b);
            goto out;
        }
    }
    if (full) {
        uint8_t got[32];
        np_blake3 h;
        np_blake3_init(&h);
        for (uint64_t off = 0; off < size;) {
            uint64_t k = size - off < ((uint64_t)64 << 20) ? size - off : (uint64_t)64 << 20;
            np_blake3_update(&h, m + off, (size_t)k);
            off += k;
            if ((st = np_progress(ctx, k)))
                goto out;
        }
        np_blake3_final(&h, got);
        if (memcmp(got, last->target.blake3, 32)) {
            np_hex(got, 32, a);
            np_hex(last->target.blake3, 32, b);
            st = np_fail(ctx, NNP_KIND_INTEGRITY, "result does not match the patch's target (BLAKE3 %s, expected %s)",
                         a, b);
            goto out;
        }
    }
    if (ctx->progress_total > ctx->progress_done && (st = np_progress(ctx, ctx->progress_total - ctx->progress_done)))
        goto out;
    if (m) {
        munmap(m, (size_t)size);
        m = NULL;
    }
    st = np_tmp_commit(ctx, &t, "new model");
out:
    if (st && st != NNP_ECANCELLED && i < c->nitems && jobs) {
        /* item i failed: what a serial pass would have found first (a base or result digest of
         * an earlier item, or item i's base) is the error, once the hashing of them is done */
        nnp_status failed = st;
        char msg[NP_MSG_MAX];
        nnp_error_kind kind = ctx->kind;
        memcpy(msg, ctx->msg, sizeof msg);
        if ((st = hpool_settle(ctx, &pool)) == NNP_OK) {
            for (size_t k = 0; k <= i && !st; k++)
                st = check_item(ctx, c, k, (const uint8_t(*)[32])bd, (const uint8_t(*)[32])od, bh,
                                k < i && (hash_all || c->items[k].expect));
            if (!st) {
                st = failed;
                ctx->kind = kind;
                memcpy(ctx->msg, msg, sizeof msg);
            }
        }
    }
    hpool_close(&pool, threads, &nthreads);
    for (size_t k = 0; rs && k < c->nitems; k++) /* those whose result job never ran */
        reuse_free(&rs[k]);
    free(rs);
    hpool_destroy(&pool);
    free(jobs);
    free(hlist);
    if (m)
        munmap(m, (size_t)size);
    if (st)
        np_tmp_abort(&t);
    free(bd);
    free(bh);
    free(od);
    return st;
}

/* Open the base (a safetensors file) and its header. */
static nnp_status open_base(nnp_ctx *ctx, const char *path, int *fd, np_st *st, uint64_t *size)
{
    *fd = -1;
    nnp_status s = np_sniff_safetensors(ctx, path);
    if (s)
        return s;
    *fd = open(path, O_RDONLY | O_CLOEXEC);
    if (*fd < 0)
        return np_fail_errno(ctx, errno, path, "cannot open");
    struct stat sb;
    if (fstat(*fd, &sb) != 0) {
        s = np_fail_errno(ctx, errno, path, "cannot stat");
        close(*fd);
        *fd = -1;
        return s;
    }
    *size = (uint64_t)sb.st_size;
    if (*size > (uint64_t)SIZE_MAX / 2) {
        close(*fd);
        *fd = -1;
        return np_fail(ctx, NNP_KIND_IO, "%s: %llu bytes is too large for this platform's address space", path,
                       (unsigned long long)*size);
    }
    if ((s = np_st_read_fd(ctx, *fd, path, st))) {
        close(*fd);
        *fd = -1;
    }
    return s;
}

/* explain_wrong_base: a wrong base said the way a user can check it (the file digests), unless the
 * file is the patch's base after all (a later link of a chain does not fit). */
static void explain_wrong_base(nnp_ctx *ctx, const char *path, int fd, uint64_t size, const np_patch *first)
{
    if (ctx->kind != NNP_KIND_BASE_MISMATCH || fd < 0)
        return;
    uint8_t d[32];
    const uint8_t *map = NULL;
    if (size) {
        void *mm = mmap(NULL, (size_t)size, PROT_READ, MAP_SHARED, fd, 0);
        if (mm == MAP_FAILED)
            return;
        map = mm;
    }
    np_blake3_hash(map, (size_t)size, d);
    if (map)
        munmap((void *)map, (size_t)size);
    if (!memcmp(d, first->base.blake3, 32))
        return;
    char detail[NP_MSG_MAX], a[65], b[65];
    const char *m = ctx->msg;
    size_t pl = strlen(path);
    if (!strncmp(m, path, pl) && !strncmp(m + pl, ": ", 2))
        m += pl + 2;
    if (!strncmp(m, "wrong base: ", 12))
        m += 12;
    snprintf(detail, sizeof detail, "%s", m);
    np_hex(first->base.blake3, 32, a);
    np_hex(d, 32, b);
    np_fail(ctx, NNP_KIND_BASE_MISMATCH,
            "%s: wrong base: the patch was made for the file with BLAKE3 %s (%llu bytes); this one has BLAKE3 %s (%llu "
            "bytes); %s",
            path, a, (unsigned long long)first->base.size, b, (unsigned long long)size, detail);
}

/* The apply from opened patches (taken over). */
static nnp_status apply_opened(nnp_ctx *ctx, const char *old_path, np_patch *ps, size_t n, const char *out_path)
{
    nnp_status st = NNP_OK;
    for (size_t k = 0; k < n && !st; k++)
        st = refuse_target(ctx, &ps[k]);
    int fd = -1;
    np_st base;
    memset(&base, 0, sizeof base);
    uint64_t size = 0;
    if (!st)
        st = open_base(ctx, old_path, &fd, &base, &size);
    if (st) {
        for (size_t k = 0; k < n; k++)
            np_patch_close(&ps[k]);
        np_st_free(&base);
        return st;
    }
    np_chain *c = NULL;
    uint8_t first_blake3[32]; /* for explain_wrong_base (the chain owns the patches) */
    uint64_t first_size = ps[0].base.size;
    memcpy(first_blake3, ps[0].base.blake3, 32);
    st = np_chain_open_patches(ctx, ps, n, &base, size, old_path, &c);
    const uint8_t *map = NULL;
    if (!st && size) {
        void *mm = mmap(NULL, (size_t)size, PROT_READ, MAP_SHARED, fd, 0);
        if (mm == MAP_FAILED)
            st = np_fail_errno(ctx, errno, old_path, "cannot map");
        else
            map = mm;
    }
    if (!st)
        st = build(ctx, c, fd, map, out_path);
    if (map)
        munmap((void *)map, (size_t)size);
    if (st == NNP_EINTEGRITY) {
        np_patch fake;
        memset(&fake, 0, sizeof fake);
        memcpy(fake.base.blake3, first_blake3, 32);
        fake.base.size = first_size;
        explain_wrong_base(ctx, old_path, fd, size, &fake);
    }
    np_chain_free(c);
    np_st_free(&base);
    close(fd);
    return st;
}

static nnp_status check_args(nnp_ctx *ctx, const char *old_path, const void *patches, size_t n, const char *out)
{
    if (!old_path || !patches || !out)
        return np_fail(ctx, NNP_KIND_USAGE, "apply needs a base, at least one patch and an output");
    if (n == 0)
        return np_fail(ctx, NNP_KIND_USAGE, "apply needs at least one patch");
    return NNP_OK;
}

static nnp_status spool(nnp_ctx *ctx, const nnp_source *src, const char *out_path, np_patch *p);

/* Open patch k from paths[k] when there is one, else spool the stream srcs[k] (the command
 * mixes both), then apply the chain; every patch opened so far is closed on a failure. */
static nnp_status open_and_apply(nnp_ctx *ctx, const char *old_path, const char *const *paths,
                                 const nnp_source *srcs, size_t n, const char *out_path)
{
    np_patch *ps = calloc(n, sizeof *ps);
    if (!ps)
        return np_fail(ctx, NNP_KIND_IO, "out of memory");
    nnp_status st = NNP_OK;
    for (size_t k = 0; k < n && !st; k++) {
        if (paths && paths[k])
            st = np_patch_open(ctx, paths[k], NULL, &ps[k]);
        else if (srcs)
            st = spool(ctx, &srcs[k], out_path, &ps[k]);
        else
            st = np_fail(ctx, NNP_KIND_USAGE, "patch %zu is NULL", k + 1);
        if (st)
            for (size_t j = 0; j < k; j++)
                np_patch_close(&ps[j]);
    }
    if (!st)
        st = apply_opened(ctx, old_path, ps, n, out_path);
    free(ps);
    return st;
}

nnp_status nnp_apply(nnp_ctx *ctx, const char *old_path, const char *const *patch_paths, size_t n,
                     const char *out_path)
{
    if (!ctx)
        return NNP_EUSAGE;
    np_clear(ctx);
    nnp_status st = check_args(ctx, old_path, patch_paths, n, out_path);
    if (st || (st = np_journal_refuse_unfinished(ctx, old_path)))
        return st;
    return open_and_apply(ctx, old_path, patch_paths, NULL, n, out_path);
}

/* ---- streams ----------------------------------------------------------------------------- */

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
static nnp_status spool(nnp_ctx *ctx, const nnp_source *src, const char *out_path, np_patch *p)
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

nnp_status nnp_apply_streams(nnp_ctx *ctx, const char *old_path, const nnp_source *patches, size_t n,
                             const char *out_path)
{
    if (!ctx)
        return NNP_EUSAGE;
    np_clear(ctx);
    nnp_status st = check_args(ctx, old_path, patches, n, out_path);
    if (st || (st = np_journal_refuse_unfinished(ctx, old_path)))
        return st;
    if ((st = np_check_sources(ctx, patches, n)))
        return st;
    return open_and_apply(ctx, old_path, NULL, patches, n, out_path);
}

/* Mixed inputs for the command: path, or NULL for a stream (srcs[k]). Not public. */
nnp_status np_apply_mixed(nnp_ctx *ctx, const char *old_path, const char *const *paths, const nnp_source *srcs,
                          size_t n, const char *out_path);
nnp_status np_apply_mixed(nnp_ctx *ctx, const char *old_path, const char *const *paths, const nnp_source *srcs,
                          size_t n, const char *out_path)
{
    np_clear(ctx);
    nnp_status st = check_args(ctx, old_path, paths, n, out_path);
    if (st || (st = np_journal_refuse_unfinished(ctx, old_path)))
        return st;
    return open_and_apply(ctx, old_path, paths, srcs, n, out_path);
}

/* ---- check ----------------------------------------------------------------------------------- */

static nnp_status check_sections(nnp_ctx *ctx, const np_patch *p)
{
    nnp_status st;
    char where[300], q[NP_QUOTE_MAX];
    if (p->target.format != NP_FMT_DIR) { /* a file's tensors as safetensors (PyTorch and ONNX targets too) */
        np_st lay;
        uint8_t *raw = NULL;
        uint64_t len = 0;
        memset(&lay, 0, sizeof lay);
        st = decode_layout(ctx, p, &lay, &raw, &len);
        if (!st)
            st = check_ops_against_layout(ctx, p, &lay);
        np_st_free(&lay);
        free(raw);
        if (st)
            return st;
        if (p->target.skeleton.present && (st = np_section_drain(ctx, p, &p->target.skeleton, "target.skeleton")))
            return st;
    } else {
        const np_section *ss[] = {&p->target.layout, &p->target.skeleton};
        for (int i = 0; i < 2; i++)
            if (ss[i]->present && (st = np_section_drain(ctx, p, ss[i], i ? "target.skeleton" : "target.layout")))
                return st;
        for (size_t i = 0; i < p->target.nfiles; i++) {
            const np_tfile *f = &p->target.files[i];
            np_quote(q, sizeof q, f->path, f->path_len);
            snprintf(where, sizeof where, "file %s", q);
            if (f->layout.present && (st = np_section_drain(ctx, p, &f->layout, where)))
                return st;
            if (f->content.present) {
                np_secreader r;
                uint8_t *buf = malloc(1 << 20);
                np_blake3 h;
                np_blake3_init(&h);
                st = buf ? np_secreader_open(ctx, &r, p, &f->content, where) : np_fail(ctx, NNP_KIND_IO, "out of memory");
                for (uint64_t left = f->content.size; !st && left;) {
                    size_t k = left > (1u << 20) ? 1u << 20 : (size_t)left;
                    if (!(st = np_secreader_read(ctx, &r, buf, k)))
                        np_blake3_update(&h, buf, k);
                    left -= k;
                }
                if (!st)
                    st = np_secreader_finish(ctx, &r);
                if (buf)
                    np_secreader_close(&r);
                free(buf);
                if (st)
                    return st;
                uint8_t d[32];
                char a[65], b[65];
                np_blake3_final(&h, d);
                if (memcmp(d, f->blake3, 32)) {
                    np_hex(d, 32, a);
                    np_hex(f->blake3, 32, b);
                    return np_fail(ctx, NNP_KIND_PATCH_FORMAT,
                                   "%s: file %s carried by the patch does not match its digest (BLAKE3 %s, expected %s)",
                                   p->name, q, a, b);
                }
            }
        }
    }
    for (size_t i = 0; i < p->nops; i++) {
        const np_op *op = &p->ops[i];
        np_quote(q, sizeof q, op->name, op->name_len);
        if (op->index.present) {
            uint64_t bound = op->kind == NP_OP_ELEMENTS ? op->target.numel : op->target.shape[0];
            if ((st = np_idx_validate(ctx, p, op, bound, NULL, NULL)))
                return st;
        }
        if (op->kind == NP_OP_QROWS && (st = np_qrows_check(ctx, p, op))) /* verifier.check_sections */
            return st;
        snprintf(where, sizeof where, "%s.values", q);
        if (op->values.present && (st = np_section_drain(ctx, p, &op->values, where)))
            return st;
        snprintf(where, sizeof where, "%s.base_values", q);
        if (op->base_values.present && (st = np_section_drain(ctx, p, &op->base_values, where)))
            return st;
    }
    return NNP_OK;
}

static nnp_status check_opened(nnp_ctx *ctx, np_patch p, const char *base_path);

nnp_status nnp_check(nnp_ctx *ctx, const char *patch_path, const char *base_path)
{
    if (!ctx)
        return NNP_EUSAGE;
    np_clear(ctx);
    if (!patch_path)
        return np_fail(ctx, NNP_KIND_USAGE, "check needs a patch");
    np_patch p;
    nnp_status st = np_patch_open(ctx, patch_path, NULL, &p);
    if (st)
        return st;
    return check_opened(ctx, p, base_path);
}

/* nnp_check of a patch read from a stream (spooled in tmp_dir, named src->name or "<stdin>"). */
nnp_status np_check_stream(nnp_ctx *ctx, const nnp_source *src, const char *tmp_dir, const char *base_path);
nnp_status np_check_stream(nnp_ctx *ctx, const nnp_source *src, const char *tmp_dir, const char *base_path)
{
    np_clear(ctx);
    char where[4096];
    snprintf(where, sizeof where, "%s/stdin", tmp_dir);
    np_patch p;
    nnp_status st = spool(ctx, src, where, &p);
    if (st)
        return st;
    return check_opened(ctx, p, base_path);
}

static nnp_status check_opened(nnp_ctx *ctx, np_patch p, const char *base_path)
{
    nnp_status st;
    if ((st = check_sections(ctx, &p)) || !base_path) {
        np_patch_close(&p);
        return st;
    }
    /* the base: its file digest, else the same tensors (a re-serialized base) */
    int fd = open(base_path, O_RDONLY | O_CLOEXEC);
    struct stat sb;
    if (fd < 0 || fstat(fd, &sb) != 0 || S_ISDIR(sb.st_mode)) {
        int e = errno;
        if (fd >= 0)
            close(fd);
        np_patch_close(&p);
        if (fd >= 0)
            return np_fail(ctx, NNP_KIND_WEIGHTS,
                           "%s: a model directory: nnpatch-apply checks safetensors files only (use `nnpatch verify`)",
                           base_path);
        np_fail_errno(ctx, e, base_path, "cannot open");
        return np_fail_as(ctx, NNP_KIND_BASE_MISMATCH, NNP_EMISMATCH, "%s", ctx->msg);
    }
    uint64_t size = (uint64_t)sb.st_size;
    const uint8_t *map = NULL;
    if (size > (uint64_t)SIZE_MAX / 2) {
        close(fd);
        np_patch_close(&p);
        return np_fail(ctx, NNP_KIND_IO, "%s: too large for this platform's address space", base_path);
    }
    if (size) {
        void *mm = mmap(NULL, (size_t)size, PROT_READ, MAP_SHARED, fd, 0);
        if (mm == MAP_FAILED) {
            st = np_fail_errno(ctx, errno, base_path, "cannot map");
            close(fd);
            np_patch_close(&p);
            return st;
        }
        map = mm;
    }
    uint8_t d[32];
    np_blake3_hash(map, (size_t)size, d);
    if (!memcmp(d, p.base.blake3, 32)) {
        st = NNP_OK;
        goto done;
    }
    np_st base;
    memset(&base, 0, sizeof base);
    if ((st = np_sniff_safetensors(ctx, base_path)) || (st = np_st_read_fd(ctx, fd, base_path, &base))) {
        st = np_fail_as(ctx, NNP_KIND_BASE_MISMATCH, NNP_EMISMATCH, "%s", ctx->msg);
        np_st_free(&base);
        goto done;
    }
    if (p.target.format != NP_FMT_DIR) {
        np_st lay;
        uint8_t *raw = NULL;
        uint64_t len;
        memset(&lay, 0, sizeof lay);
        st = decode_layout(ctx, &p, &lay, &raw, &len);
        if (!st && (st = check_base(ctx, &p, &base, base_path, &lay)) && ctx->kind == NNP_KIND_BASE_MISMATCH)
            st = np_fail_as(ctx, NNP_KIND_BASE_MISMATCH, NNP_EMISMATCH, "%s", ctx->msg);
        np_st_free(&lay);
        free(raw);
    }
    if (!st) {
        uint8_t (*bd)[32] = calloc(base.n ? base.n : 1, 32);
        if (!bd) {
            st = np_fail(ctx, NNP_KIND_IO, "out of memory");
        } else {
            for (size_t k = 0; k < base.n; k++)
                np_blake3_hash(map + base.tensors[k].begin, (size_t)base.tensors[k].nbytes, bd[k]);
            np_model_digest(base.tensors, base.by_name, base.n, (const uint8_t(*)[32])bd, d);
            free(bd);
            if (memcmp(d, p.base.model_blake3, 32)) {
                char a[65], b[65];
                np_hex(d, 32, a);
                np_hex(p.base.model_blake3, 32, b);
                st = np_fail_as(ctx, NNP_KIND_BASE_MISMATCH, NNP_EMISMATCH,
                                "%s: tensor contents differ from the patch's base (model BLAKE3 %s, expected %s)",
                                base_path, a, b);
            }
        }
    }
    np_st_free(&base);
done:
    if (map)
        munmap((void *)map, (size_t)size);
    close(fd);
    np_patch_close(&p);
    return st;
}
