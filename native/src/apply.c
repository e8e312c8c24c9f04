/*
 * The apply entry points (nnp_apply, nnp_apply_streams and the command's mixed inputs): refuse
 * an unfinished in-place update, open the patches (files or streams), open the base, plan, build.
 * Python twin: nnpatch/applier/api.py (apply). It answers "apply these patches to this base".
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blake3.h"
#include "command.h"
#include "engine.h"
#include "extents.h"
#include "fileio.h"
#include "journal.h"
#include "plan.h"
#include "stream.h"

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
    if (np_extents_any(ps, n)) /* GGUF and the like: a base read by its extent table (extents.c) */
        return np_extents_apply(ctx, old_path, ps, n, out_path);
    for (size_t k = 0; k < n && !st; k++)
        st = np_plan_refuse_target(ctx, &ps[k], "nnpatch apply");
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
        st = np_engine_build(ctx, c, fd, map, out_path);
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
            st = np_spool(ctx, &srcs[k], out_path, &ps[k]);
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

/* Mixed inputs for the command (command.h): path, or NULL for a stream (srcs[k]). */
nnp_status np_apply_mixed(nnp_ctx *ctx, const char *old_path, const char *const *paths, const nnp_source *srcs,
                          size_t n, const char *out_path)
{
    np_clear(ctx);
    nnp_status st = check_args(ctx, old_path, paths, n, out_path);
    if (st || (st = np_journal_refuse_unfinished(ctx, old_path)))
        return st;
    return open_and_apply(ctx, old_path, paths, srcs, n, out_path);
}
