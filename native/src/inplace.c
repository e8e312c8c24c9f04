/*
 * nnp_apply_in_place and nnp_recover (spec/JOURNAL.md; Python: nnpatch/applier/inplace.py).
 *
 *  1. exclusive flock on the model (a second updater fails at once, exit 5);
 *  2. recover first if a journal is there;
 *  3. plan the chain against the model's header; a layout change falls back to a new
 *     file renamed over the model (nnp_apply);
 *  4. journal the old bytes of every unit about to be written into MODEL.nnpatch-journal.tmp,
 *     check the base, fsync, rename, fsync the directory (commit point of the journal);
 *  5. write the new bytes through a shared map, msync, fsync;
 *  6. hash the written tensors (and the target model digest, or with --verify full the
 *     whole file); on a mismatch roll back;
 *  7. delete the journal, fsync the directory (commit point of the update).
 */
#include "inplace.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "blake3.h"
#include "journal.h"
#include "safetensors.h"

#include "hashpool.h"
#include "plan.h"

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

static void test_pause(void)
{
    const char *v = getenv(NP_TEST_PAUSE_ENV);
    if (!v || !*v)
        return;
    long ms = strtol(v, NULL, 10);
    if (ms <= 0)
        return;
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
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

static void hexd(const uint8_t d[32], char out[65]) { np_hex(d, 32, out); }

/* Everything after the plan, under the lock, for a same-layout update. */
static nnp_status apply_locked(nnp_ctx *ctx, const char *model, int fd, const np_st *st, const uint8_t *head,
                               uint64_t size, np_chain *chain, const np_chain_info *info)
{
    int whole_base = ctx->verify != NNP_VERIFY_TOUCHED, rehash = ctx->verify == NNP_VERIFY_FULL;
    size_t nt = st->n, ni = info->n_items;
    nnp_status s = NNP_OK;
    np_jentry *entries = calloc(ni ? ni : 1, sizeof *entries);
    size_t *item_of = calloc(ni ? ni : 1, sizeof *item_of);
    uint8_t(*dig)[32] = calloc(nt ? nt : 1, 32);      /* base digests, indexed as st->tensors */
    uint8_t(*fin)[32] = calloc(nt ? nt : 1, 32);      /* output digests, indexed as st->tensors */
    unsigned char *hashed = calloc(nt ? nt : 1, 1);
    size_t *base_of = calloc(ni ? ni : 1, sizeof *base_of); /* item -> index in st->tensors */
    np_hash_range *jobs = calloc((nt > ni ? nt : ni) + 1, sizeof *jobs); /* ranges to hash (steps 1 and 4) */
    char *jpath = np_journal_path(model, NP_JOURNAL_SUFFIX);
    uint8_t *m = NULL;
    np_jwriter w;
    memset(&w, 0, sizeof w);
    w.fd = -1;
    int committed = 0;
    if (!entries || !item_of || !dig || !fin || !hashed || !base_of || !jpath || !jobs) {
        s = np_fail(ctx, NNP_KIND_IO, "%s: out of memory", model);
        goto out;
    }
    if (size > SIZE_MAX) {
        s = np_fail(ctx, NNP_KIND_IO, "%s: too large to map", model);
        goto out;
    }
    if (size) {
        void *p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) {
            s = np_fail_errno(ctx, errno, model, "cannot map for writing");
            goto out;
        }
        m = p;
    }
    /* the journal's entries: one per touched tensor, as inplace._entries */
    size_t ne = 0;
    uint64_t touched_bytes = 0;
    for (size_t i = 0; i < ni; i++) {
        np_item it;
        np_chain_item(chain, i, &it);
        const np_tensor *t = np_st_find(st, it.out->name, it.out->name_len);
        if (!t || t->begin != it.out->begin || t->nbytes != it.out->nbytes) {
            s = np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: the plan does not match the model's layout", model);
            goto out;
        }
        base_of[i] = (size_t)(t - st->tensors);
        if (!it.touched)
            continue;
        np_jentry *e = &entries[ne];
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
        item_of[ne++] = i;
        touched_bytes += t->nbytes;
    }
    np_progress_total(ctx, (whole_base ? size : touched_bytes) + touched_bytes * 2 + (rehash ? size : 0));

    /* 1. the base digests: every tensor, or (touched) those the patch expects */
    size_t nj = 0;
    for (size_t k = 0; k < nt; k++) {
        const uint8_t *want = np_chain_input_expect(chain, k);
        if (!whole_base && !want)
            continue;
        const np_tensor *t = &st->tensors[k];
        jobs[nj++] = (np_hash_range){m ? m + t->begin : (const uint8_t *)"", t->nbytes, t->nbytes, dig[k]};
        hashed[k] = 1;
    }
    if ((s = np_hash_ranges(ctx, jobs, nj)))
        goto out;
    for (size_t x = 0; x < ne; x++) { /* what a rollback must give: the tensor as it is now */
        size_t k = base_of[item_of[x]];
        if (!hashed[k]) {
            const np_tensor *t = &st->tensors[k];
            np_blake3_hash(m ? m + t->begin : (const uint8_t *)"", (size_t)t->nbytes, dig[k]);
            hashed[k] = 1;
        }
        memcpy(entries[x].base_blake3, dig[k], 32);
    }

    /* 2. the journal */
    np_jmeta meta;
    memset(&meta, 0, sizeof meta);
    meta.model_size = size;
    meta.header_len = st->data_start;
    np_blake3_hash(head, (size_t)st->data_start, meta.header_blake3);
    memcpy(meta.base_blake3, info->base_blake3, 32);
    memcpy(meta.base_model, info->base_model, 32);
    memcpy(meta.target_blake3, info->target_blake3, 32);
    memcpy(meta.target_model, info->target_model, 32);
    memcpy(meta.patch, info->patch_trailer, 32);
    if ((s = np_jw_open(ctx, &w, jpath, &meta, entries, ne)))
        goto out;
    for (size_t x = 0; x < ne; x++) {
        np_jentry *e = &entries[x];
        if (e->count == 0)
            continue;
        const uint8_t *src = m + e->offset;
        if (e->unit == e->nbytes && e->count == 1) {
            uint8_t zero[8] = {0};
            if ((s = np_jw_write(ctx, &w, zero, 8)) || (s = np_jw_end_part(ctx, &w)) ||
                (s = np_jw_write(ctx, &w, src, (size_t)e->nbytes)) || (s = np_jw_end_part(ctx, &w)))
                goto out;
        } else {
            tj t = {ctx, &w, src, e->unit};
            if ((s = np_chain_indices(ctx, chain, item_of[x], put_indices, &t)) || (s = np_jw_end_part(ctx, &w)) ||
                (s = np_chain_indices(ctx, chain, item_of[x], put_units, &t)) || (s = np_jw_end_part(ctx, &w)))
                goto out;
        }
        if ((s = np_check_cancel(ctx)))
            goto out;
    }
    /* the base, checked before the commit point (a wrong base: nothing was written) */
    for (size_t k = 0; k < nt; k++) {
        const uint8_t *want = np_chain_input_expect(chain, k);
        if (want && np_ct_diff(dig[k], want, 32)) {
            char q[NP_QUOTE_MAX], a[65], b[65];
            np_quote(q, sizeof q, st->tensors[k].name, st->tensors[k].name_len);
            hexd(dig[k], a);
            hexd(want, b);
            s = np_fail(ctx, NNP_KIND_BASE_MISMATCH,
                        "%s: wrong base: tensor %s differs from the patch's base (BLAKE3 %s, expected %s)", model, q,
                        a, b);
            goto out;
        }
    }
    if (whole_base) {
        uint8_t md[32];
        np_model_digest(st->tensors, st->by_name, nt, (const uint8_t(*)[32])dig, md);
        if (np_ct_diff(md, info->base_model, 32)) {
            char a[65], b[65];
            hexd(md, a);
            hexd(info->base_model, b);
            s = np_fail(ctx, NNP_KIND_BASE_MISMATCH,
                        "%s: wrong base: tensor contents differ from the patch's base (model BLAKE3 %s, expected %s)",
                        model, a, b);
            goto out;
        }
    }
    if ((s = np_check_cancel(ctx)))
        goto out;
    if ((s = np_jw_commit(ctx, &w)))
        goto out;
    committed = 1;
    test_pause();

    /* 3. the new bytes */
    for (size_t x = 0; x < ne; x++) {
        if ((s = np_chain_apply_item(ctx, chain, item_of[x], m + entries[x].offset)))
            goto out;
        if ((s = np_progress(ctx, entries[x].nbytes)))
            goto out;
    }
    if (m && msync(m, (size_t)size, MS_SYNC) != 0) {
        s = np_fail_errno(ctx, errno, model, "cannot write");
        goto out;
    }
    if (fsync(fd) != 0) {
        s = np_fail_errno(ctx, errno, model, "cannot write");
        goto out;
    }
    test_pause();

    /* 4. proof: the written tensors hashed at once, then compared in order */
    memcpy(fin, dig, (size_t)nt * 32);
    for (size_t x = 0; x < ne; x++)
        jobs[x] = (np_hash_range){m + entries[x].offset, entries[x].nbytes, 0, fin[base_of[item_of[x]]]};
    if ((s = np_hash_ranges(ctx, jobs, ne)))
        goto out;
    for (size_t x = 0; x < ne; x++) {
        np_item it;
        np_chain_item(chain, item_of[x], &it);
        size_t k = base_of[item_of[x]];
        if (np_ct_diff(fin[k], it.expect, 32)) {
            char q[NP_QUOTE_MAX], a[65], b[65];
            np_quote(q, sizeof q, entries[x].name, entries[x].name_len);
            hexd(fin[k], a);
            hexd(it.expect, b);
            s = np_fail(ctx, NNP_KIND_INTEGRITY,
                        "tensor %s: result does not match the patch's target (BLAKE3 %s, expected %s)", q, a, b);
            goto out;
        }
        if ((s = np_progress(ctx, entries[x].nbytes)))
            goto out;
    }
    if (whole_base) {
        uint8_t md[32];
        np_model_digest(st->tensors, st->by_name, nt, (const uint8_t(*)[32])fin, md);
        if (np_ct_diff(md, info->target_model, 32)) {
            char a[65], b[65];
            hexd(md, a);
            hexd(info->target_model, b);
            s = np_fail(ctx, NNP_KIND_INTEGRITY,
                        "result does not match the patch's target model digest (model BLAKE3 %s, expected %s)", a, b);
            goto out;
        }
    }
    if (rehash) {
        uint8_t fd32[32];
        np_blake3_hash(m ? m : (const uint8_t *)"", (size_t)size, fd32);
        if (np_ct_diff(fd32, info->target_blake3, 32)) {
            char a[65], b[65];
            hexd(fd32, a);
            hexd(info->target_blake3, b);
            s = np_fail(ctx, NNP_KIND_INTEGRITY, "%s: result does not match the patch's target (BLAKE3 %s, expected %s)",
                        model, a, b);
            goto out;
        }
        if ((s = np_progress(ctx, size)))
            goto out;
    }
    /* 5. commit point of the update */
    if (unlink(jpath) != 0) {
        s = np_fail_errno(ctx, errno, jpath, "cannot remove");
        goto out;
    }
    (void)np_fsync_dir_of(model); /* best effort: not a commit point later writes rely on */
out:
    if (!committed)
        np_jw_abort(&w); /* removes the .tmp journal (also on cancel) */
    if (m)
        munmap(m, (size_t)size);
    if (s && committed) {
        /* put the old bytes back: the model is OLD again; the first error is the one reported,
         * unless the rollback itself fails (then the journal is kept, and that is what counts) */
        char msg[NP_MSG_MAX];
        nnp_error_kind kind = ctx->kind;
        snprintf(msg, sizeof msg, "%s", ctx->msg);
        if (np_recover_locked(ctx, model, fd, NULL) == NNP_OK) {
            snprintf(ctx->msg, sizeof ctx->msg, "%s", msg);
            ctx->kind = kind;
        }
    }
    free(entries);
    free(item_of);
    free(dig);
    free(fin);
    free(hashed);
    free(jobs);
    free(base_of);
    free(jpath);
    return s;
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
            int fmt = p.target.format;
            np_patch_close(&p);
            if (fmt != NP_FMT_SAFETENSORS)
                return np_fail(ctx, NNP_KIND_UNSUPPORTED_VERSION,
                               "%s: target format '%s' (%s) is not supported by the native applier, which writes "
                               "safetensors files; use `nnpatch apply`",
                               paths[i], fmt == NP_FMT_DIR ? "safetensors-dir" : fmt == NP_FMT_ONNX ? "onnx" : "pytorch",
                               fmt == NP_FMT_DIR    ? "a model directory"
                               : fmt == NP_FMT_ONNX ? "an ONNX model"
                                                    : "a PyTorch checkpoint");
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
        s = apply_locked(ctx, model, fd, &st, head, size, chain, &info);
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
