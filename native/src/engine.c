/*
 * The build: one pass over the base that copies unchanged tensors, runs the plan's steps on the
 * touched ones in the output's map, hashes both on the hashing threads and proves the result
 * (tensor, model and file digests, as the verify policy asks). Python twin:
 * nnpatch/applier/engine.py (build_file). It answers "write this plan's output, or say why not".
 */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "blake3.h"
#include "engine.h"
#include "fileio.h"
#include "hashpool.h"
#include "policy.h"

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
static int reuse_prepare(np_chain *c, size_t i, np_reuse *r)
{
    const np_pitem *it = &c->items[i];
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
        const np_step *s = &c->steps[it->s0 + k];
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
    np_reuse_free(r);
    return 0;
}

/* The digests of item i (base tensor, then result), compared as a serial pass would have: the
 * base's only when it was hashed (hb), the result's only when `result` (its job was queued). */
static nnp_status check_item(nnp_ctx *ctx, const np_chain *c, size_t i, const uint8_t (*bd)[32],
                             const uint8_t (*od)[32], const uint8_t *hb, int result)
{
    const np_pitem *it = &c->items[i];
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

/* One build's state: the new file and its map, the digests, the hashing pool. */
typedef struct bstate {
    np_verify v;
    uint64_t size;
    np_tmp t;
    int have_t;
    uint8_t *m;            /* the new file, mapped */
    uint8_t (*bd)[32];     /* base digests, indexed as base->tensors */
    uint8_t *bh;           /* per base tensor: 2 queued with its item (later), 1 hashed with it */
    uint8_t (*od)[32];     /* output digests, indexed as the items (= the final layout's tensors) */
    size_t *hlist, nh;     /* the base tensors queued up front */
    np_hjob *jobs;
    np_reuse *rs;
    pthread_t threads[NP_HASHERS_MAX];
    int nthreads;
    np_hpool pool;
    size_t i;              /* the item being built (for the digests to compare when it fails) */
} bstate;

/* The new file beside out_path, reserved and mapped, its header (the target layout) written. */
static nnp_status build_open(nnp_ctx *ctx, np_chain *c, bstate *b, const char *out_path)
{
    const np_st *base = c->base;
    const np_patch *last = &c->patches[c->n - 1];
    nnp_status st;
    b->bd = calloc(base->n ? base->n : 1, 32);
    b->bh = calloc(base->n ? base->n : 1, 1);
    b->od = calloc(c->nitems ? c->nitems : 1, 32);
    b->hlist = malloc((base->n ? base->n : 1) * sizeof *b->hlist);
    b->jobs = malloc((base->n + 2 * c->nitems + 1) * sizeof *b->jobs);
    b->rs = calloc(c->nitems ? c->nitems : 1, sizeof *b->rs);
    np_hpool_init(&b->pool, ctx, b->jobs);
    if (!b->bd || !b->bh || !b->od || !b->hlist || !b->jobs || !b->rs)
        return np_fail(ctx, NNP_KIND_IO, "out of memory");
    if (b->size > (uint64_t)SIZE_MAX / 2)
        return np_fail(ctx, NNP_KIND_IO, "%s: the new model (%llu bytes) is too large for this platform's address space",
                       out_path, (unsigned long long)b->size);
    if ((st = np_reserve(ctx, b->t.fd, b->size, out_path)))
        return st;
    if (b->size) {
        void *mm = mmap(NULL, (size_t)b->size, PROT_READ | PROT_WRITE, MAP_SHARED, b->t.fd, 0);
        if (mm == MAP_FAILED)
            return np_fail_errno(ctx, errno, out_path, "cannot map the new file");
        b->m = mm;
    }
    uint64_t base_data = base->data_end - base->data_start;
    np_progress_total(ctx, b->size + (b->v.whole_base ? base_data : 0) + (b->v.prove_file ? b->size : 0));
    if (c->layout_len[c->n - 1] > b->size)
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: target layout is longer than the target", last->name);
    if (c->layout_len[c->n - 1])
        memcpy(b->m, c->layout_raw[c->n - 1], (size_t)c->layout_len[c->n - 1]);
    return NNP_OK;
}

/* First in the queue, every base tensor that no touched item starts from: all of them (default,
 * full), or those an op names (touched: removed tensors, and tensors an absolute op replaces,
 * must still be the patch's base); then the helper threads start. */
static void queue_bases(np_chain *c, bstate *b, const uint8_t *base_map)
{
    const np_st *base = c->base;
    for (size_t k = 0; k < c->nitems; k++)
        if (c->items[k].src && (c->items[k].has_fill || c->items[k].ns))
            b->bh[c->items[k].src - base->tensors] = 2; /* queued with its item */
    for (size_t k = 0; k < base->n; k++)
        if (!b->bh[k] && (b->v.whole_base || c->input_expect[k])) {
            b->hlist[b->nh++] = k;
            b->jobs[b->pool.n++] = (np_hjob){base_map + base->tensors[k].begin, base->tensors[k].nbytes,
                                             base->tensors[k].nbytes, b->bd[k], -1, 0, NULL, 0, 0};
        }
    b->nthreads = np_hpool_start(&b->pool, b->threads, NP_HASHERS_MAX);
}

/* Items b->i.. while unchanged: one run, contiguous in base and output, copied at once. */
static nnp_status copy_run(nnp_ctx *ctx, np_chain *c, bstate *b, int base_fd, const uint8_t *base_map,
                           const char *out_path)
{
    const np_pitem *it = &c->items[b->i];
    size_t j = b->i + 1;
    uint64_t n = it->out->nbytes;
    while (j < c->nitems && !c->items[j].has_fill && !c->items[j].ns &&
           c->items[j].src->begin == it->src->begin + n && c->items[j].out->begin == it->out->begin + n) {
        n += c->items[j].out->nbytes;
        j++;
    }
    nnp_status st;
    if (n && (st = np_copy_range(ctx, base_fd, it->src->begin, b->t.fd, it->out->begin, n, base_map, b->m, out_path)))
        return st;
    np_writeback(b->t.fd, it->out->begin, n);
    b->i = j;
    return np_progress(ctx, n + np_hpool_take(&b->pool));
}

/* Touched item b->i: its base tensor queued for hashing (once) and copied, its steps run in the
 * map, the result queued for hashing. */
static nnp_status build_item(nnp_ctx *ctx, np_chain *c, bstate *b, int base_fd, const uint8_t *base_map,
                             const char *out_path)
{
    const np_pitem *it = &c->items[b->i];
    const int whole = b->v.whole_base;
    uint8_t *dst = b->m + it->out->begin;
    np_reuse *r = NULL;
    nnp_status st;
    if (it->src) {
        size_t bi = (size_t)(it->src - c->base->tensors);
        if (b->bh[bi] != 1 && (whole || c->input_expect[bi])) { /* once, if two items start from it */
            b->bh[bi] = 1;
            /* the base's chaining values for the result's digest, when that is taken too */
            if (b->v.reuse_cvs && (whole || it->expect) && reuse_prepare(c, b->i, &b->rs[b->i]))
                r = &b->rs[b->i];
            np_hpool_push(&b->pool, base_map + it->src->begin, it->src->nbytes, whole ? it->src->nbytes : 0,
                          b->bd[bi], -1, 0, r);
        }
        /* a kernel copy: only the pages the ops change are then written through the map */
        if (it->out->nbytes && (st = np_copy_range(ctx, base_fd, it->src->begin, b->t.fd, it->out->begin,
                                                   it->out->nbytes, base_map, b->m, out_path)))
            return st;
    }
    if ((st = np_chain_apply_item(ctx, c, b->i, dst)))
        return st;
    if (whole || it->expect) /* hashed, then released, by whichever thread takes it */
        np_hpool_push(&b->pool, dst, it->out->nbytes, 0, b->od[b->i], b->t.fd, it->out->begin, r);
    else
        np_release_range(dst, it->out->nbytes, b->t.fd, it->out->begin);
    if ((st = np_progress(ctx, it->out->nbytes + np_hpool_take(&b->pool))))
        return st;
    b->i++;
    return NNP_OK;
}

static nnp_status wrong_tensor(nnp_ctx *ctx, const np_chain *c, const np_tensor *t, const uint8_t *got,
                               const uint8_t *want)
{
    char q[NP_QUOTE_MAX], a[65], b[65];
    np_hex(got, 32, a);
    np_hex(want, 32, b);
    return np_fail(ctx, NNP_KIND_BASE_MISMATCH,
                   "%s: wrong base: tensor %s differs from the patch's base (BLAKE3 %s, expected %s)", c->base_path,
                   np_quote(q, sizeof q, t->name, t->name_len), a, b);
}

/* The base and target model digests (default, full). */
static nnp_status prove_models(nnp_ctx *ctx, const np_chain *c, bstate *b)
{
    const np_st *base = c->base, *final = &c->layouts[c->n - 1];
    const np_patch *first = &c->patches[0], *last = &c->patches[c->n - 1];
    uint8_t got[32];
    char x[65], y[65];
    np_model_digest(base->tensors, base->by_name, base->n, (const uint8_t(*)[32])b->bd, got);
    if (memcmp(got, first->base.model_blake3, 32)) {
        np_hex(got, 32, x);
        np_hex(first->base.model_blake3, 32, y);
        return np_fail(ctx, NNP_KIND_BASE_MISMATCH,
                       "%s: wrong base: tensor contents differ from the patch's base (model BLAKE3 %s, expected %s)",
                       c->base_path, x, y);
    }
    for (size_t k = 0; k < c->nitems; k++)
        if (!c->items[k].has_fill && !c->items[k].ns)
            memcpy(b->od[k], b->bd[c->items[k].src - base->tensors], 32);
    /* od is indexed like final->tensors (items are in that order) */
    np_model_digest(final->tensors, final->by_name, final->n, (const uint8_t(*)[32])b->od, got);
    if (memcmp(got, last->target.model_blake3, 32)) {
        np_hex(got, 32, x);
        np_hex(last->target.model_blake3, 32, y);
        return np_fail(ctx, NNP_KIND_INTEGRITY,
                       "result does not match the patch's target model digest (model BLAKE3 %s, expected %s)", x, y);
    }
    return NNP_OK;
}

/* The output file's BLAKE3, read again from the bytes written, against the patch's target digest. */
static nnp_status prove_file(nnp_ctx *ctx, const np_chain *c, bstate *b)
{
    const np_patch *last = &c->patches[c->n - 1];
    uint8_t got[32];
    char x[65], y[65];
    nnp_status st = np_hash_file(ctx, b->m, b->size, got);
    if (st)
        return st;
    if (memcmp(got, last->target.blake3, 32)) {
        np_hex(got, 32, x);
        np_hex(last->target.blake3, 32, y);
        return np_fail(ctx, NNP_KIND_INTEGRITY, "result does not match the patch's target (BLAKE3 %s, expected %s)", x,
                       y);
    }
    return NNP_OK;
}

/* Every digest in (the main thread joins the pool), then compared in the order a serial pass
 * would have met them, then the model and file digests the policy asks for. */
static nnp_status build_prove(nnp_ctx *ctx, np_chain *c, bstate *b)
{
    nnp_status st;
    if ((st = np_hpool_settle(ctx, &b->pool)))
        return st;
    np_hpool_close(&b->pool, b->threads, &b->nthreads);
    for (size_t k = 0; k < c->nitems; k++)
        if ((st = check_item(ctx, c, k, (const uint8_t(*)[32])b->bd, (const uint8_t(*)[32])b->od, b->bh,
                             b->v.whole_base || c->items[k].expect)))
            return st;
    for (size_t x = 0; x < b->nh; x++) {
        size_t k = b->hlist[x];
        const uint8_t *want = c->input_expect[k];
        if (want && memcmp(b->bd[k], want, 32))
            return wrong_tensor(ctx, c, &c->base->tensors[k], b->bd[k], want);
    }
    if (b->v.whole_base && (st = prove_models(ctx, c, b)))
        return st;
    if (b->v.prove_file && (st = prove_file(ctx, c, b)))
        return st;
    if (ctx->progress_total > ctx->progress_done && (st = np_progress(ctx, ctx->progress_total - ctx->progress_done)))
        return st;
    return NNP_OK;
}

/* Item b->i failed with st: what a serial pass would have found first (a base or result digest
 * of an earlier item, or item i's base) is the error, once the hashing of them is done. */
static nnp_status first_error(nnp_ctx *ctx, const np_chain *c, bstate *b, nnp_status failed)
{
    char msg[NP_MSG_MAX];
    nnp_error_kind kind = ctx->kind;
    memcpy(msg, ctx->msg, sizeof msg);
    nnp_status st = np_hpool_settle(ctx, &b->pool);
    if (st)
        return st;
    for (size_t k = 0; k <= b->i && !st; k++)
        st = check_item(ctx, c, k, (const uint8_t(*)[32])b->bd, (const uint8_t(*)[32])b->od, b->bh,
                        k < b->i && (b->v.whole_base || c->items[k].expect));
    if (!st) {
        st = failed;
        ctx->kind = kind;
        memcpy(ctx->msg, msg, sizeof msg);
    }
    return st;
}

static void build_close(const np_chain *c, bstate *b, nnp_status st)
{
    np_hpool_close(&b->pool, b->threads, &b->nthreads);
    for (size_t k = 0; b->rs && k < c->nitems; k++) /* those whose result job never ran */
        np_reuse_free(&b->rs[k]);
    free(b->rs);
    np_hpool_destroy(&b->pool);
    free(b->jobs);
    free(b->hlist);
    if (b->m)
        munmap(b->m, (size_t)b->size);
    if (st)
        np_tmp_abort(&b->t);
    free(b->bd);
    free(b->bh);
    free(b->od);
}

nnp_status np_engine_build(nnp_ctx *ctx, np_chain *c, int base_fd, const uint8_t *base_map, const char *out_path)
{
    bstate b;
    memset(&b, 0, sizeof b);
    b.v = np_verify_policy(ctx);
    b.size = c->patches[c->n - 1].target.size;
    nnp_status st = np_tmp_create(ctx, out_path, ".tmp", &b.t);
    if (st)
        return st;
    np_chain_set_scratch(c, out_path);
    if ((st = build_open(ctx, c, &b, out_path)))
        goto out;
    queue_bases(c, &b, base_map);
    while (b.i < c->nitems) {
        const np_pitem *it = &c->items[b.i];
        st = !it->has_fill && !it->ns ? copy_run(ctx, c, &b, base_fd, base_map, out_path)
                                      : build_item(ctx, c, &b, base_fd, base_map, out_path);
        if (st)
            goto out;
    }
    if ((st = build_prove(ctx, c, &b)))
        goto out;
    if (b.m)
        munmap(b.m, (size_t)b.size);
    b.m = NULL;
    st = np_tmp_commit(ctx, &b.t, "new model");
out:
    if (st && st != NNP_ECANCELLED && b.i < c->nitems && b.jobs)
        st = first_error(ctx, c, &b, st);
    build_close(c, &b, st);
    return st;
}
