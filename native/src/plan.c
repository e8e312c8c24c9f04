/*
 * The chain plan: which tensors the output has, where each starts from (a base tensor or a
 * patch's values) and which steps of which links run on it, checked against the base's header
 * before any tensor is hashed or any byte written. Python twin: nnpatch/applier/plan.py
 * (plan_forward, decode_layout). It answers "what will be built, and does this base fit it?".
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blake3.h"
#include "fileio.h"
#include "plan.h"

/* The scratch directory of wide chunk buffers: the output's directory from now on. */
void np_chain_set_scratch(np_chain *c, const char *out_path)
{
    char *sd = np_dir_of(out_path);
    if (sd) {
        free(c->scratch_dir);
        c->scratch_dir = sd;
    }
}

static const char *format_name(int f)
{
    switch (f) {
    case NP_FMT_SAFETENSORS: return "safetensors";
    case NP_FMT_DIR: return "safetensors-dir";
    case NP_FMT_PYTORCH: return "pytorch";
    case NP_FMT_ONNX: return "onnx";
    case NP_FMT_EXTENTS: return "extents";
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
nnp_status np_plan_decode_layout(nnp_ctx *ctx, const np_patch *p, np_st *st, uint8_t **raw, uint64_t *rawlen)
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

nnp_status np_plan_check_ops(nnp_ctx *ctx, const np_patch *p, const np_st *layout)
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

nnp_status np_plan_check_base(nnp_ctx *ctx, const np_patch *p, const np_st *base, const char *bpath,
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
    nnp_status st = np_plan_check_ops(ctx, p, layout);
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
        np_pitem *it = &c->items[i];
        it->out = info;
        size_t start = 0;
        for (size_t k = c->n; k-- > 0;) {
            const np_op *op = find_op(&c->patches[k], info->name, info->name_len);
            if (op && absolute(op)) {
                it->has_fill = 1;
                it->fill = (np_step){&c->patches[k], op, &op->values, NP_M_REPLACE};
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
            c->steps[c->nsteps++] = (np_step){&c->patches[k], op, &op->values, np_mode_of(&op->values)};
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

nnp_status np_plan_refuse_target(nnp_ctx *ctx, const np_patch *p, const char *instead)
{
    /* an extents target's tensors are the safetensors file of its layout, which extents.c stages */
    if (p->target.format == NP_FMT_SAFETENSORS || p->target.format == NP_FMT_EXTENTS)
        return NNP_OK;
    return np_fail(ctx, NNP_KIND_UNSUPPORTED_VERSION,
                   "%s: target format '%s' (%s) is not supported by the native applier, which writes safetensors "
                   "files; use `%s`",
                   p->name, format_name(p->target.format),
                   p->target.format == NP_FMT_DIR ? "a model directory"
                   : p->target.format == NP_FMT_ONNX ? "an ONNX model" : "a PyTorch checkpoint", instead);
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
    c->scratch_dir = np_dir_of(base_path);
    c->base = base;
    c->base_size = base_size;
    nnp_status st = NNP_OK;
    for (size_t k = 0; k < n && !st; k++)
        st = np_plan_refuse_target(ctx, &c->patches[k], "nnpatch apply");
    for (size_t k = 0; k < n && !st; k++) {
        const np_patch *p = &c->patches[k];
        if ((st = np_plan_decode_layout(ctx, p, &c->layouts[k], &c->layout_raw[k], &c->layout_len[k])))
            break;
        if (k == 0)
            st = np_plan_check_base(ctx, p, base, base_path, &c->layouts[0]);
        else if (!(st = np_plan_check_ops(ctx, p, &c->layouts[k])) &&
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
    const np_pitem *it = &c->items[i];
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
    const np_pitem *it = &c->items[i];
    const np_step *s = it->has_fill ? &it->fill : it->ns ? &c->steps[it->s0] : NULL;
    if (!s || !(s->op->kind == NP_OP_ROWS || s->op->kind == NP_OP_ELEMENTS || s->op->kind == NP_OP_QROWS))
        return np_fail(ctx, NNP_KIND_USAGE, "item %zu has no index", i);
    uint64_t bound = s->op->kind == NP_OP_ELEMENTS ? it->out->numel : it->out->shape[0];
    return np_idx_validate(ctx, s->p, s->op, bound, fn, user);
}

static nnp_status run(nnp_ctx *ctx, const np_pitem *it, const np_step *s, uint8_t *dst, const char *scratch)
{
    np_step_job j = {s->p, s->op, s->s, s->mode, it->out->dtype, it->out->rank, it->out->shape, it->out->numel,
                     it->out->nbytes, scratch};
    return np_run_step(ctx, &j, dst);
}

nnp_status np_chain_apply_item(nnp_ctx *ctx, np_chain *c, size_t i, uint8_t *dst)
{
    const np_pitem *it = &c->items[i];
    nnp_status st;
    if (it->has_fill && (st = run(ctx, it, &it->fill, dst, c->scratch_dir)))
        return st;
    for (size_t k = 0; k < it->ns; k++)
        if ((st = run(ctx, it, &c->steps[it->s0 + k], dst, c->scratch_dir)))
            return st;
    return NNP_OK;
}
