/*
 * nnp_apply_in_place and nnp_recover (spec/JOURNAL.md; Python twin: nnpatch/applier/inplace.py).
 *
 *  1. exclusive flock on the model (a second updater fails at once, exit 5);
 *  2. recover first if a journal is there;
 *  3. plan the chain against the model's header; a layout change falls back to a new
 *     file renamed over the model (nnp_apply);
 *  4. journal the old bytes of every unit about to be written into MODEL.nnpatch-journal.tmp,
 *     check the base, fsync, rename, fsync the directory (commit point of the journal);
 *  5. write the new bytes through a shared map, msync, fsync;
 *  6. hash the written tensors, the whole file (every verify mode: policy.c) and, but with
 *     --verify touched, the target model digest; on a mismatch roll back;
 *  7. delete the journal, fsync the directory (commit point of the update).
 */
#include "extents.h"
#include "inplace.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blake3.h"
#include "journal.h"
#include "safetensors.h"

#include "hashpool.h"
#include "plan.h"
#include "policy.h"

nnp_status nnp_recover(nnp_ctx *ctx, const char *model_path, int *recovered)
{
    if (recovered)
        *recovered = 0;
    if (!ctx)
        return NNP_EUSAGE;
    np_clear(ctx);
    if (!model_path || !*model_path)
        return np_fail(ctx, NNP_KIND_USAGE, "recover needs a model path");
    int fd;
    nnp_status s = np_lock_model(ctx, model_path, &fd);
    if (s)
        return s;
    s = np_recover_locked(ctx, model_path, fd, recovered);
    close(fd); /* releases the lock */
    return s;
}


typedef struct tj {
    nnp_ctx *ctx;
    np_jwriter *w;
    const uint8_t *src; /* the tensor's bytes in the model */
    uint64_t unit;
} tj;

static nnp_status put_indices(void *user, const uint64_t *idx, size_t n)
{
    tj *t = user;
    uint8_t buf[8 * 512];
    while (n) {
        size_t k = n < 512 ? n : 512;
        for (size_t i = 0; i < k; i++)
            np_put_le64(buf + 8 * i, idx[i]);
        nnp_status s = np_jw_write(t->ctx, t->w, buf, 8 * k);
        if (s)
            return s;
        idx += k;
        n -= k;
    }
    return NNP_OK;
}

static nnp_status put_units(void *user, const uint64_t *idx, size_t n)
{
    tj *t = user;
    for (size_t i = 0; i < n; i++) {
        /* run of adjacent units: one write */
        size_t j = i + 1;
        while (j < n && idx[j] == idx[j - 1] + 1)
            j++;
        nnp_status s = np_jw_write(t->ctx, t->w, t->src + idx[i] * t->unit, (size_t)((j - i) * t->unit));
        if (s)
            return s;
        i = j - 1;
    }
    return NNP_OK;
}

/* One same-layout update's state, under the lock. */
typedef struct ipstate {
    np_verify v;
    const char *model;
    int fd;
    const np_st *st;          /* the model's header (its tensors: the base) */
    const uint8_t *head;      /* its bytes */
    const np_extents_model *ext; /* an extents model (GGUF): what names it instead of a header */
    uint64_t size;
    np_chain *chain;
    const np_chain_info *info;
    uint8_t *m;               /* the model, mapped writable */
    np_jentry *entries;       /* one per touched tensor, in output order */
    size_t ne;
    size_t *item_of;          /* entry -> item */
    size_t *base_of;          /* item -> index in st->tensors */
    uint8_t (*dig)[32];       /* base digests, indexed as st->tensors */
    uint8_t (*fin)[32];       /* output digests, indexed as st->tensors */
    unsigned char *hashed;
    np_hash_range *jobs;      /* ranges to hash (steps 1 and 4) */
    uint64_t touched_bytes;
    char *jpath;
    np_jwriter w;
    int committed;
} ipstate;

static nnp_status ip_open(nnp_ctx *ctx, ipstate *s)
{
    size_t nt = s->st->n, ni = s->info->n_items;
    s->entries = calloc(ni ? ni : 1, sizeof *s->entries);
    s->item_of = calloc(ni ? ni : 1, sizeof *s->item_of);
    s->dig = calloc(nt ? nt : 1, 32);
    s->fin = calloc(nt ? nt : 1, 32);
    s->hashed = calloc(nt ? nt : 1, 1);
    s->base_of = calloc(ni ? ni : 1, sizeof *s->base_of);
    s->jobs = calloc((nt > ni ? nt : ni) + 1, sizeof *s->jobs);
    s->jpath = np_journal_path(s->model, NP_JOURNAL_SUFFIX);
    if (!s->entries || !s->item_of || !s->dig || !s->fin || !s->hashed || !s->base_of || !s->jpath || !s->jobs)
        return np_fail(ctx, NNP_KIND_IO, "%s: out of memory", s->model);
    if (s->size > SIZE_MAX)
        return np_fail(ctx, NNP_KIND_IO, "%s: too large to map", s->model);
    if (s->size) {
        void *p = mmap(NULL, (size_t)s->size, PROT_READ | PROT_WRITE, MAP_SHARED, s->fd, 0);
        if (p == MAP_FAILED)
            return np_fail_errno(ctx, errno, s->model, "cannot map for writing");
        s->m = p;
    }
    return NNP_OK;
}

/* The journal's entries: one per touched tensor, as inplace._entries. */
static nnp_status ip_entries(nnp_ctx *ctx, ipstate *s)
{
    for (size_t i = 0; i < s->info->n_items; i++) {
        np_item it;
        np_chain_item(s->chain, i, &it);
        const np_tensor *t = np_st_find(s->st, it.out->name, it.out->name_len);
        /* an extents target's items lie where its safetensors rendering puts them: the model's are the extents */
        if (!t || (!s->ext && t->begin != it.out->begin) || t->nbytes != it.out->nbytes)
            return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: the plan does not match the model's layout", s->model);
        s->base_of[i] = (size_t)(t - s->st->tensors);
        if (!it.touched)
            continue;
        np_jentry *e = &s->entries[s->ne];
        e->name = t->name;
        e->name_len = t->name_len;
        e->offset = t->begin;
        e->nbytes = t->nbytes;
        /* a qrows op changes rows as a rows op does: the journal keeps the same units, the old rows */
        int by_rows = it.first_kind == NP_OP_ROWS || it.first_kind == NP_OP_QROWS;
        int rows_ok = by_rows && t->rank && t->shape[0];
        if (!it.has_fill && it.n_steps == 1 && (rows_ok || it.first_kind == NP_OP_ELEMENTS)) {
            e->unit = by_rows ? t->nbytes / t->shape[0] : np_dtypes[t->dtype].size;
            e->count = it.count;
        } else {
            e->unit = t->nbytes;
            e->count = t->nbytes ? 1 : 0;
        }
        memcpy(e->target_blake3, it.expect, 32);
        s->item_of[s->ne++] = i;
        s->touched_bytes += t->nbytes;
    }
    return NNP_OK;
}

/* 1. The base digests: every tensor, or (touched) those the patch expects; then those of the
 * touched tensors not hashed yet (what a rollback must give: the tensor as it is now). */
static nnp_status ip_hash_base(nnp_ctx *ctx, ipstate *s)
{
    size_t nj = 0;
    nnp_status r;
    for (size_t k = 0; k < s->st->n; k++) {
        const uint8_t *want = np_chain_input_expect(s->chain, k);
        if (!s->v.whole_base && !want)
            continue;
        const np_tensor *t = &s->st->tensors[k];
        s->jobs[nj++] = (np_hash_range){s->m ? s->m + t->begin : (const uint8_t *)"", t->nbytes, t->nbytes, s->dig[k]};
        s->hashed[k] = 1;
    }
    if ((r = np_hash_ranges(ctx, s->jobs, nj)))
        return r;
    for (size_t x = 0; x < s->ne; x++) {
        size_t k = s->base_of[s->item_of[x]];
        if (!s->hashed[k]) {
            const np_tensor *t = &s->st->tensors[k];
            np_blake3_hash(s->m ? s->m + t->begin : (const uint8_t *)"", (size_t)t->nbytes, s->dig[k]);
            s->hashed[k] = 1;
        }
        memcpy(s->entries[x].base_blake3, s->dig[k], 32);
    }
    return NNP_OK;
}

/* 2. The journal (not yet committed): its header, then the old bytes of every unit to be written. */
static nnp_status ip_write_journal(nnp_ctx *ctx, ipstate *s)
{
    np_jmeta meta;
    memset(&meta, 0, sizeof meta);
    meta.model_size = s->size;
    if (s->ext) {
        meta.extents = s->ext->table;
        meta.extents_len = s->ext->table_len;
        memcpy(meta.skeleton_blake3, s->ext->skeleton_blake3, 32);
    } else {
        meta.header_len = s->st->data_start;
        np_blake3_hash(s->head, (size_t)s->st->data_start, meta.header_blake3);
    }
    memcpy(meta.base_blake3, s->info->base_blake3, 32);
    memcpy(meta.base_model, s->info->base_model, 32);
    memcpy(meta.target_blake3, s->info->target_blake3, 32);
    memcpy(meta.target_model, s->info->target_model, 32);
    memcpy(meta.patch, s->info->patch_trailer, 32);
    nnp_status r;
    if ((r = np_jw_open(ctx, &s->w, s->jpath, &meta, s->entries, s->ne)))
        return r;
    for (size_t x = 0; x < s->ne; x++) {
        np_jentry *e = &s->entries[x];
        if (e->count == 0)
            continue;
        const uint8_t *src = s->m + e->offset;
        if (e->unit == e->nbytes && e->count == 1) {
            uint8_t zero[8] = {0};
            if ((r = np_jw_write(ctx, &s->w, zero, 8)) || (r = np_jw_end_part(ctx, &s->w)) ||
                (r = np_jw_write(ctx, &s->w, src, (size_t)e->nbytes)) || (r = np_jw_end_part(ctx, &s->w)))
                return r;
        } else {
            tj t = {ctx, &s->w, src, e->unit};
            if ((r = np_chain_indices(ctx, s->chain, s->item_of[x], put_indices, &t)) ||
                (r = np_jw_end_part(ctx, &s->w)) ||
                (r = np_chain_indices(ctx, s->chain, s->item_of[x], put_units, &t)) || (r = np_jw_end_part(ctx, &s->w)))
                return r;
        }
        if ((r = np_check_cancel(ctx)))
            return r;
    }
    return NNP_OK;
}

/* The base, checked before the commit point (a wrong base: nothing was written). */
static nnp_status ip_check_base(nnp_ctx *ctx, ipstate *s)
{
    char q[NP_QUOTE_MAX], a[65], b[65];
    for (size_t k = 0; k < s->st->n; k++) {
        const uint8_t *want = np_chain_input_expect(s->chain, k);
        if (want && np_ct_diff(s->dig[k], want, 32)) {
            np_quote(q, sizeof q, s->st->tensors[k].name, s->st->tensors[k].name_len);
            np_hex(s->dig[k], 32, a);
            np_hex(want, 32, b);
            return np_fail(ctx, NNP_KIND_BASE_MISMATCH,
                           "%s: wrong base: tensor %s differs from the patch's base (BLAKE3 %s, expected %s)", s->model,
                           q, a, b);
        }
    }
    if (s->v.whole_base) {
        uint8_t md[32];
        np_model_digest(s->st->tensors, s->st->by_name, s->st->n, (const uint8_t(*)[32])s->dig, md);
        if (np_ct_diff(md, s->info->base_model, 32)) {
            np_hex(md, 32, a);
            np_hex(s->info->base_model, 32, b);
            return np_fail(ctx, NNP_KIND_BASE_MISMATCH,
                           "%s: wrong base: tensor contents differ from the patch's base (model BLAKE3 %s, expected %s)",
                           s->model, a, b);
        }
    }
    return np_check_cancel(ctx);
}

typedef struct pw {
    nnp_ctx *ctx;
    const char *model;
    int fd;
    const uint8_t *src; /* the tensor's new bytes (in the private map) */
    uint64_t offset, unit;
} pw;

/* Write runs of adjacent changed units with pwrite. */
static nnp_status put_new_units(void *user, const uint64_t *idx, size_t n)
{
    pw *t = user;
    for (size_t i = 0; i < n; i++) {
        size_t j = i + 1;
        while (j < n && idx[j] == idx[j - 1] + 1)
            j++;
        uint64_t at = idx[i] * t->unit;
        int e = np_pwrite_all(t->fd, t->src + at, (size_t)((j - i) * t->unit), t->offset + at);
        if (e)
            return np_fail_errno(t->ctx, e, t->model, "cannot write");
        i = j - 1;
    }
    return NNP_OK;
}

/* Let the private map's copied pages of [off, off + len) go (they were written to the file: reading them
 * again reads the file), so a dense update holds one tensor's copy at a time, not the model's. Pages it
 * shares with a neighbour lose nothing: the tensors before are written, those after not yet touched. */
static void drop_private(uint8_t *priv, uint64_t off, uint64_t len)
{
    uintptr_t pg = (uintptr_t)sysconf(_SC_PAGESIZE);
    uintptr_t a = (uintptr_t)(priv + off) & ~(pg - 1), b = (uintptr_t)(priv + off + len);
    if (b > a)
        (void)madvise((void *)a, (size_t)(b - a), MADV_DONTNEED);
}

/* 3. The new bytes: each tensor's steps run on a private (copy-on-write) map of the model, then only
 * the units its op changes are written to the file with pwrite, and fsynced. Writing through the
 * shared map would write back every page a changed row touches (4x the rows' bytes for 2 KiB GGUF
 * rows spread over a tensor); pwrite hands storage the changed bytes only, as Python's
 * _write_rows does. The shared map (s->m) sees the new bytes for the proof: both are the page cache. */
static nnp_status ip_write_new(nnp_ctx *ctx, ipstate *s)
{
    nnp_status r = NNP_OK;
    uint8_t *priv = NULL;
    if (s->size) {
        void *p = mmap(NULL, (size_t)s->size, PROT_READ | PROT_WRITE, MAP_PRIVATE, s->fd, 0);
        if (p == MAP_FAILED)
            return np_fail_errno(ctx, errno, s->model, "cannot map");
        priv = p;
    }
    for (size_t x = 0; x < s->ne && !r; x++) {
        const np_jentry *e = &s->entries[x];
        if ((r = np_chain_apply_item(ctx, s->chain, s->item_of[x], priv + e->offset)))
            break;
        if (e->count && e->unit != e->nbytes) {
            pw t = {ctx, s->model, s->fd, priv + e->offset, e->offset, e->unit};
            r = np_chain_indices(ctx, s->chain, s->item_of[x], put_new_units, &t);
        } else if (e->nbytes) {
            int err = np_pwrite_all(s->fd, priv + e->offset, (size_t)e->nbytes, e->offset);
            if (err)
                r = np_fail_errno(ctx, err, s->model, "cannot write");
        }
        if (!r && e->nbytes)
            drop_private(priv, e->offset, e->nbytes);
        if (!r)
            r = np_progress(ctx, e->nbytes);
    }
    if (priv)
        munmap(priv, (size_t)s->size);
    if (!r && fsync(s->fd) != 0)
        r = np_fail_errno(ctx, errno, s->model, "cannot write");
    return r;
}

/* 4. Proof: the written tensors hashed at once, then compared in order; the target model digest
 * (default, full) and the file digest (policy.h). */
static nnp_status ip_prove(nnp_ctx *ctx, ipstate *s)
{
    char q[NP_QUOTE_MAX], a[65], b[65];
    nnp_status r;
    memcpy(s->fin, s->dig, (size_t)s->st->n * 32);
    for (size_t x = 0; x < s->ne; x++)
        s->jobs[x] = (np_hash_range){s->m + s->entries[x].offset, s->entries[x].nbytes, 0,
                                     s->fin[s->base_of[s->item_of[x]]]};
    if ((r = np_hash_ranges(ctx, s->jobs, s->ne)))
        return r;
    for (size_t x = 0; x < s->ne; x++) {
        np_item it;
        np_chain_item(s->chain, s->item_of[x], &it);
        size_t k = s->base_of[s->item_of[x]];
        if (np_ct_diff(s->fin[k], it.expect, 32)) {
            np_quote(q, sizeof q, s->entries[x].name, s->entries[x].name_len);
            np_hex(s->fin[k], 32, a);
            np_hex(it.expect, 32, b);
            return np_fail(ctx, NNP_KIND_INTEGRITY,
                           "tensor %s: result does not match the patch's target (BLAKE3 %s, expected %s)", q, a, b);
        }
        if ((r = np_progress(ctx, s->entries[x].nbytes)))
            return r;
    }
    if (s->v.whole_base) {
        uint8_t md[32];
        np_model_digest(s->st->tensors, s->st->by_name, s->st->n, (const uint8_t(*)[32])s->fin, md);
        if (np_ct_diff(md, s->info->target_model, 32)) {
            np_hex(md, 32, a);
            np_hex(s->info->target_model, 32, b);
            return np_fail(ctx, NNP_KIND_INTEGRITY,
                           "result does not match the patch's target model digest (model BLAKE3 %s, expected %s)", a,
                           b);
        }
    }
    if (s->v.prove_file) {
        uint8_t fd32[32];
        if ((r = np_hash_file(ctx, s->m, s->size, fd32)))
            return r;
        const uint8_t *want = s->ext ? s->ext->file_blake3 : s->info->target_blake3;
        if (np_ct_diff(fd32, want, 32)) {
            np_hex(fd32, 32, a);
            np_hex(want, 32, b);
            return np_fail(ctx, NNP_KIND_INTEGRITY,
                           "%s: result does not match the patch's target (BLAKE3 %s, expected %s)", s->model, a, b);
        }
    }
    return NNP_OK;
}

static void ip_close(nnp_ctx *ctx, ipstate *s, nnp_status r)
{
    if (!s->committed)
        np_jw_abort(&s->w); /* removes the .tmp journal (also on cancel) */
    if (s->m)
        munmap(s->m, (size_t)s->size);
    if (r && s->committed) {
        /* put the old bytes back: the model is OLD again; the first error is the one reported,
         * unless the rollback itself fails (then the journal is kept, and that is what counts) */
        char msg[NP_MSG_MAX];
        nnp_error_kind kind = ctx->kind;
        snprintf(msg, sizeof msg, "%s", ctx->msg);
        if (np_recover_locked(ctx, s->model, s->fd, NULL) == NNP_OK) {
            snprintf(ctx->msg, sizeof ctx->msg, "%s", msg);
            ctx->kind = kind;
        }
    }
    free(s->entries);
    free(s->item_of);
    free(s->dig);
    free(s->fin);
    free(s->hashed);
    free(s->jobs);
    free(s->base_of);
    free(s->jpath);
}

/* Everything after the plan, under the lock, for a same-layout update. */
static nnp_status apply_locked(nnp_ctx *ctx, const char *model, int fd, const np_st *st, const uint8_t *head,
                               const np_extents_model *ext, uint64_t size, np_chain *chain, const np_chain_info *info)
{
    ipstate s;
    memset(&s, 0, sizeof s);
    s.v = np_verify_policy(ctx);
    s.model = model;
    s.fd = fd;
    s.st = st;
    s.head = head;
    s.ext = ext;
    s.size = size;
    s.chain = chain;
    s.info = info;
    s.w.fd = -1;
    nnp_status r;
    if ((r = ip_open(ctx, &s)) || (r = ip_entries(ctx, &s)))
        goto out;
    np_progress_total(ctx, (s.v.whole_base ? size : s.touched_bytes) + s.touched_bytes * 2 +
                               (s.v.prove_file ? size : 0));
    if ((r = ip_hash_base(ctx, &s)) || (r = ip_write_journal(ctx, &s)) || (r = ip_check_base(ctx, &s)))
        goto out;
    if ((r = np_jw_commit(ctx, &s.w)))
        goto out;
    s.committed = 1;
    np_test_pause();
    if ((r = ip_write_new(ctx, &s)))
        goto out;
    np_test_pause();
    if ((r = ip_prove(ctx, &s)))
        goto out;
    /* 5. commit point of the update */
    if (unlink(s.jpath) != 0) {
        r = np_fail_errno(ctx, errno, s.jpath, "cannot remove");
        goto out;
    }
    (void)np_fsync_dir_of(model); /* best effort: not a commit point later writes rely on */
out:
    ip_close(ctx, &s, r);
    return r;
}

static nnp_status fallback_new_file(nnp_ctx *ctx, const char *model, const char *const *paths, size_t n)
{
    /* the layout changes: a new file beside the model, renamed over it (nnp_apply's own
     * temporary file, fsync and rename; the lock is held meanwhile) */
    struct stat before;
    int have = stat(model, &before) == 0;
    nnp_status s = nnp_apply(ctx, model, paths, n, model);
    if (s == NNP_OK && have) { /* the model keeps its permissions, as Python's replace does */
        /* through a descriptor opened without following links: a symbolic link swapped in under
         * the model's name never passes the mode on to its target */
        int fd = open(model, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        struct stat now;
        if (fd >= 0 && fstat(fd, &now) == 0 && S_ISREG(now.st_mode) &&
            (now.st_mode & 07777) != (before.st_mode & 07777))
            (void)fchmod(fd, before.st_mode & 07777);
        if (fd >= 0)
            close(fd);
    }
    return s;
}

/* One patch on an extents model (GGUF): when it keeps the extent table and the skeleton, only the
 * changed rows are written behind the journal (1.1); otherwise a new file renamed over the model. */
static nnp_status extents_in_place(nnp_ctx *ctx, const char *model, int fd, const char *path)
{
    struct stat fs;
    if (fstat(fd, &fs) != 0)
        return np_fail_errno(ctx, errno, model, "cannot stat");
    uint64_t size = (uint64_t)fs.st_size;
    np_patch p;
    nnp_status s = np_patch_open(ctx, path, NULL, &p);
    if (s)
        return s;
    np_extents_model em;
    if ((s = np_extents_in_place(ctx, &p, fd, size, model, &em)) || !em.same) {
        np_patch_close(&p);
        return s ? s : fallback_new_file(ctx, model, &path, 1);
    }
    np_chain *chain = NULL;
    if (!(s = np_chain_open_patches(ctx, &p, 1, &em.base, size, model, &chain))) {
        np_chain_info info;
        np_chain_get_info(chain, &info);
        s = apply_locked(ctx, model, fd, &em.base, NULL, &em, size, chain, &info);
    }
    np_chain_free(chain);
    np_st_free(&em.base);
    free(em.table);
    return s;
}

nnp_status nnp_apply_in_place(nnp_ctx *ctx, const char *model, const char *const *paths, size_t n)
{
    if (!ctx)
        return NNP_EUSAGE;
    np_clear(ctx);
    if (!model || !*model || !paths || n == 0)
        return np_fail(ctx, NNP_KIND_USAGE, "apply --in-place needs a model and at least one patch");
    for (size_t i = 0; i < n; i++)
        if (!paths[i])
            return np_fail(ctx, NNP_KIND_USAGE, "patch %zu: no path", i + 1);
    struct stat sb;
    if (stat(model, &sb) == 0 && S_ISDIR(sb.st_mode)) {
        /* a patch that makes a directory (or another kind): the native applier's refusal (3);
         * a single-file patch on a directory: Python's usage error (2) */
        for (size_t i = 0; i < n; i++) {
            np_patch p;
            nnp_status ps = np_patch_open(ctx, paths[i], NULL, &p);
            if (ps)
                return ps;
            ps = np_plan_refuse_target(ctx, &p, "nnpatch apply");
            np_patch_close(&p);
            if (ps)
                return ps;
        }
        return np_fail(ctx, NNP_KIND_USAGE,
                       "%s: the patch makes a single file, so it cannot update this directory in place; write the "
                       "result with -o",
                       model);
    }
    int fd;
    nnp_status s = np_lock_model(ctx, model, &fd);
    if (s)
        return s;
    np_st st;
    memset(&st, 0, sizeof st);
    uint8_t *head = NULL;
    np_chain *chain = NULL;
    if ((s = np_recover_locked(ctx, model, fd, NULL)))
        goto out;
    for (size_t i = 0; i < n; i++) { /* an extents file (GGUF): in place, or a new file renamed over it */
        np_patch p;
        if ((s = np_patch_open(ctx, paths[i], NULL, &p)))
            goto out;
        int ext = np_extents_any(&p, 1);
        np_patch_close(&p);
        if (ext) {
            s = n == 1 ? extents_in_place(ctx, model, fd, paths[0]) : fallback_new_file(ctx, model, paths, n);
            goto out;
        }
    }
    if ((s = np_st_read_fd(ctx, fd, model, &st)))
        goto out;
    struct stat fs;
    if (fstat(fd, &fs) != 0) {
        s = np_fail_errno(ctx, errno, model, "cannot stat");
        goto out;
    }
    uint64_t size = (uint64_t)fs.st_size;
    head = malloc((size_t)st.data_start);
    if (!head) {
        s = np_fail(ctx, NNP_KIND_IO, "%s: out of memory", model);
        goto out;
    }
    {
        size_t done = 0;
        while (done < st.data_start) {
            ssize_t k = pread(fd, head + done, (size_t)st.data_start - done, (off_t)done);
            if (k < 0 && errno == EINTR)
                continue;
            if (k <= 0) {
                s = k < 0 ? np_fail_errno(ctx, errno, model, "cannot read")
                          : np_fail(ctx, NNP_KIND_WEIGHTS, "%s: header changed while reading", model);
                goto out;
            }
            done += (size_t)k;
        }
    }
    if ((s = np_chain_open(ctx, paths, n, &st, size, model, &chain)))
        goto out;
    np_chain_info info;
    np_chain_get_info(chain, &info);
    int same = info.single_file && info.layout_len == st.data_start && info.size == size &&
               memcmp(info.layout, head, (size_t)st.data_start) == 0;
    if (same) {
        s = apply_locked(ctx, model, fd, &st, head, NULL, size, chain, &info);
    } else {
        np_chain_free(chain);
        chain = NULL;
        s = fallback_new_file(ctx, model, paths, n);
    }
out:
    np_chain_free(chain);
    free(head);
    np_st_free(&st);
    close(fd);
    return s;
}
