/*
 * Recovery of an interrupted in-place update (spec/JOURNAL.md "Recover", Trust steps 3 to 5, then
 * the writes) and the model's lock. Python twin: nnpatch/applier/inplace.py (recover,
 * _recover_locked, locked).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blake3.h"
#include "fileio.h"
#include "journal.h"
#include "safetensors.h"

static nnp_status unlink_or_fail(nnp_ctx *ctx, const char *path)
{
    if (unlink(path) != 0)
        return np_fail_errno(ctx, errno, path, "cannot remove");
    return NNP_OK;
}


/* The model's real safetensors header (8 + the u64 at offset 0 bytes), or fewer bytes when the
 * file cannot hold one (which then matches no journal). Python: inplace._model_header. */
static nnp_status model_header(nnp_ctx *ctx, const char *model, int fd, uint64_t size, uint8_t **out, size_t *len)
{
    uint8_t first[8];
    size_t got;
    *out = NULL;
    *len = 0;
    if (np_pread_all(fd, first, 8, 0, &got) != 0)
        return np_fail_errno(ctx, errno, model, "cannot read");
    uint64_t n = got == 8 ? np_le64(first) : 0;
    uint64_t cap = size >= 8 ? size - 8 : 0;
    if (cap > NP_ST_MAX_HEADER)
        cap = NP_ST_MAX_HEADER;
    size_t total = got;
    if (got == 8 && n <= cap)
        total = (size_t)(8 + n);
    uint8_t *buf = malloc(total ? total : 1);
    if (!buf)
        return np_fail(ctx, NNP_KIND_IO, "%s: out of memory reading its header", model);
    memcpy(buf, first, got);
    if (total > 8) {
        size_t more;
        if (np_pread_all(fd, buf + 8, total - 8, 8, &more) != 0) {
            int e = errno;
            free(buf);
            return np_fail_errno(ctx, e, model, "cannot read");
        }
        total = 8 + more;
    }
    *out = buf;
    *len = total;
    return NNP_OK;
}

/* The BLAKE3 of the entry's tensor as the rollback would leave it, computed without writing. */
static void rolled_back_digest(const uint8_t *model, const np_journal *j, const np_jentry *e, uint8_t out[32])
{
    np_blake3 h;
    np_blake3_init(&h);
    const uint8_t *src = model ? model + e->offset : NULL;
    const uint8_t *idx = j->map + e->index_at, *old = j->map + e->data_at;
    uint64_t cur = 0, nunits = e->unit ? e->nbytes / e->unit : 0;
    for (uint64_t k = 0; k < e->count; k++) {
        uint64_t i = np_le64(idx + 8 * k);
        if (i > cur)
            np_blake3_update(&h, src + cur * e->unit, (size_t)((i - cur) * e->unit));
        np_blake3_update(&h, old + k * e->unit, (size_t)e->unit);
        cur = i + 1;
    }
    if (e->nbytes && nunits > cur)
        np_blake3_update(&h, src + cur * e->unit, (size_t)(e->nbytes - cur * e->unit));
    np_blake3_final(&h, out);
}

/* The entry's unit indices: strictly increasing, each below the tensor's number of units. */
static nnp_status check_indices(nnp_ctx *ctx, const char *jpath, const np_journal *j, const np_jentry *e, const char *q)
{
    if (!e->count)
        return NNP_OK;
    uint64_t bound = e->nbytes / e->unit, prev = 0;
    const uint8_t *idx = j->map + e->index_at;
    for (uint64_t k = 0; k < e->count; k++) {
        uint64_t v = np_le64(idx + 8 * k);
        if (k && v <= prev)
            return np_journal_invalid(ctx, "%s: entry %s: unit indices are not strictly increasing", jpath, q);
        if (v >= bound)
            return np_journal_invalid(ctx, "%s: entry %s: a unit index is >= %llu, the tensor's number of units", jpath,
                                      q, (unsigned long long)bound);
        prev = v;
    }
    return NNP_OK;
}

/* Trust steps 3 and 4 for an extents model (1.1): the model's size and the BLAKE3 of its bytes outside
 * the journal's extents are the journal's; each entry lies on one extent, its unit a row, the extent,
 * or an item of 1, 2, 4 or 8 bytes dividing a row (the table names a format's type, not a dtype). */
static nnp_status check_extents_model(nnp_ctx *ctx, const char *model, const char *jpath, const np_journal *j, int fd,
                                      uint64_t size)
{
    const np_ext_table *t = j->ext;
    int same = j->model_size == size;
    if (same) {
        np_blake3 h;
        np_blake3_init(&h);
        uint8_t buf[1 << 16], d[32];
        uint64_t at = 0;
        for (size_t i = 0; i <= t->n; i++) {
            uint64_t end = i < t->n ? t->e[i].offset : t->file_size;
            while (at < end) {
                size_t want = end - at < sizeof buf ? (size_t)(end - at) : sizeof buf, got;
                if (np_pread_all(fd, buf, want, at, &got) != 0)
                    return np_fail_errno(ctx, errno, model, "cannot read");
                if (got != want)
                    return np_fail(ctx, NNP_KIND_IO, "%s: cannot read: the file ends early", model);
                np_blake3_update(&h, buf, want);
                at += want;
            }
            if (i < t->n)
                at = t->e[i].offset + t->e[i].size;
        }
        np_blake3_final(&h, d);
        same = !np_ct_diff(d, j->skeleton_blake3, 32);
    }
    if (!same)
        return np_fail(ctx, NNP_KIND_INTEGRITY,
                       "%s: the undo journal %s belongs to another file (it names a file of %llu bytes and the "
                       "skeleton of its extent table; this one is %llu bytes, or its bytes outside those extents "
                       "differ); not touching either",
                       model, jpath, (unsigned long long)j->model_size, (unsigned long long)size);
    nnp_status s = NNP_OK;
    for (size_t i = 0; i < j->n && !s; i++) {
        const np_jentry *e = &j->entries[i];
        char q[NP_QUOTE_MAX];
        np_quote(q, sizeof q, e->name, e->name_len);
        const np_ext *x = np_ext_find(t, e->name, e->name_len);
        if (!x)
            return np_journal_invalid(ctx, "%s: entry %s: the model has no such tensor", jpath, q);
        if (e->offset != x->offset || e->nbytes != x->size)
            return np_journal_invalid(ctx, "%s: entry %s: bytes %llu..%llu are not the tensor's %llu..%llu", jpath, q,
                                      (unsigned long long)e->offset, (unsigned long long)(e->offset + e->nbytes),
                                      (unsigned long long)x->offset, (unsigned long long)(x->offset + x->size));
        int item = (e->unit == 1 || e->unit == 2 || e->unit == 4 || e->unit == 8) && x->row % e->unit == 0;
        if (!(e->unit == x->size || e->unit == x->row || item) || (e->unit && x->size % e->unit))
            return np_journal_invalid(ctx, "%s: entry %s: unit %llu is not a row, an element or the whole of the tensor",
                                      jpath, q, (unsigned long long)e->unit);
        s = check_indices(ctx, jpath, j, e, q);
    }
    return s;
}

static nnp_status check_model(nnp_ctx *ctx, const char *model, const char *jpath, np_journal *j, int fd, uint64_t size)
{
    if (j->ext)
        return check_extents_model(ctx, model, jpath, j, fd, size);
    uint8_t *head;
    size_t hl;
    nnp_status s = model_header(ctx, model, fd, size, &head, &hl);
    if (s)
        return s;
    uint8_t hd[32];
    np_blake3_hash(head, hl, hd);
    if (j->model_size != size || j->header_len != hl || np_ct_diff(hd, j->header_blake3, 32)) {
        free(head);
        return np_fail(ctx, NNP_KIND_INTEGRITY,
                       "%s: the undo journal %s belongs to another file (it names a file of %llu bytes with a "
                       "%llu-byte safetensors header; this one is %llu bytes with a %zu-byte header, or its header "
                       "differs); not touching either",
                       model, jpath, (unsigned long long)j->model_size, (unsigned long long)j->header_len,
                       (unsigned long long)size, hl);
    }
    np_st st;
    s = np_st_parse(ctx, head, hl, size, model, NNP_KIND_WEIGHTS, &st);
    free(head);
    if (s) {
        char why[NP_MSG_MAX];
        snprintf(why, sizeof why, "%s", nnp_message(ctx));
        np_st_free(&st);
        return np_journal_invalid(ctx, "%s: the model it names is not a valid safetensors file (%s)", jpath, why);
    }
    for (size_t i = 0; i < j->n && !s; i++) {
        const np_jentry *e = &j->entries[i];
        char q[NP_QUOTE_MAX];
        np_quote(q, sizeof q, e->name, e->name_len);
        const np_tensor *t = np_st_find(&st, e->name, e->name_len);
        if (!t) {
            s = np_journal_invalid(ctx, "%s: entry %s: the model has no such tensor", jpath, q);
            break;
        }
        if (e->offset != t->begin || e->nbytes != t->nbytes) {
            s = np_journal_invalid(ctx, "%s: entry %s: bytes %llu..%llu are not the tensor's %llu..%llu", jpath, q,
                    (unsigned long long)e->offset, (unsigned long long)(e->offset + e->nbytes),
                    (unsigned long long)t->begin, (unsigned long long)t->end);
            break;
        }
        /* a row (op rows), an element (op elements) or the whole tensor: what inplace.c writes */
        uint64_t item = np_dtypes[t->dtype].size;
        uint64_t row = (t->rank && t->shape[0]) ? t->nbytes / t->shape[0] : UINT64_MAX;
        int ok = e->unit == t->nbytes || e->unit == item || e->unit == row;
        if (!ok || (e->unit && t->nbytes % e->unit)) {
            s = np_journal_invalid(ctx, "%s: entry %s: unit %llu is not a row, an element or the whole of the tensor", jpath, q,
                    (unsigned long long)e->unit);
            break;
        }
        s = check_indices(ctx, jpath, j, e, q);
    }
    np_st_free(&st);
    return s;
}

/* A tensor whose rolled-back bytes (digest d) are not its base: before any write (written == 0,
 * Trust step 5) or after the writes (storage that did not keep them). */
static nnp_status not_base(nnp_ctx *ctx, const char *model, const char *jpath, const np_jentry *e,
                           const uint8_t d[32], int written)
{
    char q[NP_QUOTE_MAX], a[65], b[65];
    np_quote(q, sizeof q, e->name, e->name_len);
    np_hex(d, 32, a);
    np_hex(e->base_blake3, 32, b);
    if (!written)
        return np_fail(ctx, NNP_KIND_INTEGRITY,
                       "%s: the undo journal %s does not roll tensor %s back to its base (it would be BLAKE3 %s, the "
                       "journal expects %s): the model changed since, or the journal is not its; the journal is "
                       "kept and the model was not written",
                       model, jpath, q, a, b);
    return np_fail(ctx, NNP_KIND_INTEGRITY,
                   "%s: rollback left tensor %s different from the base (BLAKE3 %s, expected %s); the journal %s is kept",
                   model, q, a, b, jpath);
}

/* Whether `name` (in the model's folder) is a staging file of an extents apply of this model
 * (extents.c: MODEL.nnpatch-staged-PID, and the engine's .MODEL.nnpatch-staged-PID.XXXXXXXX.tmp, with
 * more leading dots when staged twice, as Python's safetensors staging of a target is)
 * left by a process that no longer exists: a killed apply's model-sized leftover. */
static int stale_staging(const char *name, const char *base)
{
    static const char tag[] = ".nnpatch-staged-";
    size_t bl = strlen(base);
    const char *p = name;
    /* more than one leading dot: the staging file of a staging file, which names its parent */
    while (strncmp(p, base, bl) != 0 || strncmp(p + bl, tag, sizeof tag - 1) != 0)
        if (*p++ != '.')
            return 0;
    int hidden = p != name;
    p += bl + sizeof tag - 1;
    if (*p < '1' || *p > '9') /* digits only, as written: no sign, space or leading zero */
        return 0;
    char *end;
    errno = 0;
    long pid = strtol(p, &end, 10);
    if (end == p || pid <= 0 || errno)
        return 0;
    size_t rest = strlen(end);
    if (hidden ? !(end[0] == '.' && rest > 4 && !strcmp(end + rest - 4, ".tmp")) : rest != 0)
        return 0;
    return kill((pid_t)pid, 0) != 0 && errno == ESRCH; /* EPERM: another user's live process */
}

/* Under the model's lock no apply of it runs; a staging file whose process is gone is removed
 * (best effort: a folder that cannot be listed keeps its files, and recovery goes on). */
static void remove_stale_staging(const char *model)
{
    char *dir = np_dir_of(model);
    const char *base = strrchr(model, '/');
    base = base ? base + 1 : model;
    DIR *d = dir ? opendir(dir) : NULL;
    if (d) {
        struct dirent *e;
        while ((e = readdir(d)))
            if (stale_staging(e->d_name, base))
                unlinkat(dirfd(d), e->d_name, 0);
        closedir(d);
    }
    free(dir);
}

nnp_status np_recover_locked(nnp_ctx *ctx, const char *model, int fd, int *recovered)
{
    if (recovered)
        *recovered = 0;
    remove_stale_staging(model);
    char *jpath = np_journal_path(model, NP_JOURNAL_SUFFIX);
    char *tpath = np_journal_path(model, NP_JOURNAL_TMP_SUFFIX);
    nnp_status s = NNP_OK;
    np_journal j;
    memset(&j, 0, sizeof j);
    uint8_t *m = NULL;
    uint64_t msize = 0;
    if (!jpath || !tpath) {
        s = np_fail(ctx, NNP_KIND_IO, "%s: out of memory", model);
        goto out;
    }
    if (np_lexists(tpath)) { /* never committed: the model was not written */
        if ((s = unlink_or_fail(ctx, tpath)))
            goto out;
        (void)np_fsync_dir_of(model); /* best effort: not a commit point later writes rely on */
    }
    if (!np_lexists(jpath))
        goto out;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        s = np_fail_errno(ctx, errno, model, "cannot stat");
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        s = np_fail(ctx, NNP_KIND_USAGE, "%s: not a file, so the undo journal %s cannot be its; not touching either",
                    model, jpath);
        goto out;
    }
    msize = (uint64_t)st.st_size;
    int torn;
    if ((s = np_journal_read(ctx, jpath, msize, &j, &torn)))
        goto out;
    if (torn) {
        /* A journal reaches its final name only complete and fsynced, and the model is written only after
         * that: a torn one means the storage lost it, and the model was never written through it. */
        np_clear(ctx);
        if ((s = unlink_or_fail(ctx, jpath)))
            goto out;
        (void)np_fsync_dir_of(model); /* best effort: not a commit point later writes rely on */
        goto out;
    }
    if ((s = check_model(ctx, model, jpath, &j, fd, msize)))
        goto out;
    if (j.n && msize) {
        if (msize > SIZE_MAX) {
            s = np_fail(ctx, NNP_KIND_IO, "%s: too large to map", model);
            goto out;
        }
        void *p = mmap(NULL, (size_t)msize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) {
            s = np_fail_errno(ctx, errno, model, "cannot map for writing");
            goto out;
        }
        m = p;
    }
    for (size_t i = 0; i < j.n; i++) { /* Trust step 5: the result, before any write */
        const np_jentry *e = &j.entries[i];
        uint8_t d[32];
        rolled_back_digest(m, &j, e, d);
        if (np_ct_diff(d, e->base_blake3, 32)) {
            s = not_base(ctx, model, jpath, e, d, 0);
            goto out;
        }
    }
    for (size_t i = 0; i < j.n; i++) { /* the writes */
        const np_jentry *e = &j.entries[i];
        const uint8_t *idx = j.map + e->index_at, *old = j.map + e->data_at;
        for (uint64_t k = 0; k < e->count; k++)
            memcpy(m + e->offset + np_le64(idx + 8 * k) * e->unit, old + k * e->unit, (size_t)e->unit);
    }
    if (m && msync(m, (size_t)msize, MS_SYNC) != 0) {
        s = np_fail_errno(ctx, errno, model, "cannot write back the journal's bytes");
        goto out;
    }
    if (fsync(fd) != 0) {
        s = np_fail_errno(ctx, errno, model, "cannot write back the journal's bytes");
        goto out;
    }
    for (size_t i = 0; i < j.n; i++) { /* catches storage that did not keep what was written */
        const np_jentry *e = &j.entries[i];
        uint8_t d[32];
        np_blake3_hash(m ? m + e->offset : (const uint8_t *)"", (size_t)e->nbytes, d);
        if (np_ct_diff(d, e->base_blake3, 32)) {
            s = not_base(ctx, model, jpath, e, d, 1);
            goto out;
        }
    }
    if ((s = unlink_or_fail(ctx, jpath)))
        goto out;
    (void)np_fsync_dir_of(model); /* best effort: not a commit point later writes rely on */
    if (recovered)
        *recovered = 1;
out:
    if (m)
        munmap(m, (size_t)msize);
    np_journal_close(&j);
    free(jpath);
    free(tpath);
    return s;
}

nnp_status np_lock_model(nnp_ctx *ctx, const char *model, int *fdp)
{
    *fdp = -1;
    struct stat st;
    int isdir = stat(model, &st) == 0 && S_ISDIR(st.st_mode);
    /* a model directory is locked through its directory's descriptor */
    int fd = open(model, (isdir ? O_RDONLY : O_RDWR) | O_CLOEXEC);
    if (fd < 0)
        return np_fail_errno(ctx, errno, model, "cannot open for writing");
    while (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        int e = errno;
        if (e == EINTR)
            continue;
        close(fd);
        if (e == EWOULDBLOCK)
            return np_fail(ctx, NNP_KIND_IO,
                           "%s: locked: another nnpatch is updating this model; try again when it has finished", model);
        return np_fail_errno(ctx, e, model, "cannot lock");
    }
    struct stat a, b;
    if (fstat(fd, &a) != 0 || stat(model, &b) != 0 || a.st_ino != b.st_ino || a.st_dev != b.st_dev) {
        close(fd);
        return np_fail(ctx, NNP_KIND_IO, "%s: replaced while waiting for the lock; try again", model);
    }
    *fdp = fd;
    return NNP_OK;
}

nnp_status np_journal_refuse_unfinished(nnp_ctx *ctx, const char *model)
{
    char *jpath = np_journal_path(model, NP_JOURNAL_SUFFIX);
    if (!jpath)
        return np_fail(ctx, NNP_KIND_IO, "%s: out of memory", model);
    struct stat st;
    nnp_status s = NNP_OK;
    if (stat(jpath, &st) == 0)
        s = np_fail(ctx, NNP_KIND_INTEGRITY,
                    "%s: an in-place update of this model was interrupted (undo journal %s); run `nnpatch recover %s` "
                    "first",
                    model, jpath, model);
    free(jpath);
    return s;
}