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

nnp_status np_engine_build(nnp_ctx *ctx, np_chain *c, int base_fd, const uint8_t *base_map, const char *out_path)
{
    const np_patch *last = &c->patches[c->n - 1], *first = &c->patches[0];
    const int hash_all = ctx->verify != NNP_VERIFY_TOUCHED, full = ctx->verify == NNP_VERIFY_FULL;
    const uint64_t size = last->target.size;
    const np_st *base = c->base, *final = &c->layouts[c->n - 1];
    np_tmp t;
    nnp_status st = np_tmp_create(ctx, out_path, ".tmp", &t);
    if (st)
        return st;
    np_chain_set_scratch(c, out_path);
    uint8_t *m = NULL;
    uint8_t (*bd)[32] = calloc(base->n ? base->n : 1, 32);
    uint8_t *bh = calloc(base->n ? base->n : 1, 1);
    uint8_t (*od)[32] = calloc(c->nitems ? c->nitems : 1, 32);
    size_t *hlist = malloc((base->n ? base->n : 1) * sizeof *hlist), nh = 0;
    np_hjob *jobs = malloc((base->n + 2 * c->nitems + 1) * sizeof *jobs);
    np_reuse *rs = calloc(c->nitems ? c->nitems : 1, sizeof *rs);
    pthread_t threads[NP_HASHERS_MAX];
    int nthreads = 0;
    np_hpool pool;
    np_hpool_init(&pool, ctx, jobs);
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
                jobs[pool.n++] = (np_hjob){base_map + base->tensors[k].begin, base->tensors[k].nbytes,
                                        base->tensors[k].nbytes, bd[k], -1, 0, NULL};
            }
        nthreads = np_hpool_start(&pool, threads, NP_HASHERS_MAX);
    }
    while (i < c->nitems) {
        const np_pitem *it = &c->items[i];
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
            if ((st = np_progress(ctx, n + np_hpool_take(&pool))))
                goto out;
            i = j;
            continue;
        }
        uint8_t *dst = m + it->out->begin;
        np_reuse *r = NULL;
        if (it->src) {
            size_t bi = (size_t)(it->src - base->tensors);
            if (bh[bi] != 1 && (hash_all || c->input_expect[bi])) { /* once, if two items start from it */
                bh[bi] = 1;
                /* the base's chaining values for the result's digest, when that is taken too
                 * (--verify full re-hashes every tensor as written: not there) */
                if (!full && (hash_all || it->expect) && reuse_prepare(c, i, &rs[i]))
                    r = &rs[i];
                np_hpool_push(&pool, base_map + it->src->begin, it->src->nbytes, hash_all ? it->src->nbytes : 0, bd[bi], -1,
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
            np_hpool_push(&pool, dst, it->out->nbytes, 0, od[i], t.fd, it->out->begin, r);
        else
            np_release_range(dst, it->out->nbytes, t.fd, it->out->begin);
        if ((st = np_progress(ctx, it->out->nbytes + np_hpool_take(&pool))))
            goto out;
        i++;
    }
    /* every digest is in once the main thread has joined in and the queue is empty */
    if ((st = np_hpool_settle(ctx, &pool)))
        goto out;
    np_hpool_close(&pool, threads, &nthreads);
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
        if ((st = np_hpool_settle(ctx, &pool)) == NNP_OK) {
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
    np_hpool_close(&pool, threads, &nthreads);
    for (size_t k = 0; rs && k < c->nitems; k++) /* those whose result job never ran */
        np_reuse_free(&rs[k]);
    free(rs);
    np_hpool_destroy(&pool);
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
