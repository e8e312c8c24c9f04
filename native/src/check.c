/*
 * The check (nnpatch-apply --check [--base]): every section of a patch decoded and validated
 * without writing anything, and the base proven to be the patch's. Python twin:
 * nnpatch/verifier.py (verify, check_sections). It answers "would this patch apply?".
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "extents.h"
#include "blake3.h"
#include "command.h"
#include "codec.h"
#include "fileio.h"
#include "hashpool.h"
#include "plan.h"
#include "stream.h"

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
        st = np_plan_decode_layout(ctx, p, &lay, &raw, &len);
        if (!st)
            st = np_plan_check_ops(ctx, p, &lay);
        np_st_free(&lay);
        free(raw);
        if (st)
            return st;
        if (np_extents_any(p, 1) && (st = np_extents_check(ctx, p)))
            return st;
        if (p->target.skeleton.present &&
            (st = (np_sec_zstd_base(&p->target.skeleton) ? np_section_check_frame : np_section_drain)(
                 ctx, p, &p->target.skeleton, "target.skeleton")))
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

/* nnp_check of a patch read from a stream (command.h). */
nnp_status np_check_stream(nnp_ctx *ctx, const nnp_source *src, const char *tmp_dir, const char *base_path)
{
    np_clear(ctx);
    char where[4096];
    snprintf(where, sizeof where, "%s/stdin", tmp_dir);
    np_patch p;
    nnp_status st = np_spool(ctx, src, where, &p);
    if (st)
        return st;
    return check_opened(ctx, p, base_path);
}

/* Every tensor of the planned base hashed (on the hashing threads), then proven as apply proves it
 * before it writes: each tensor the patch names against its digest, and the model digest. A base
 * that is not the patch's is a mismatch (exit 1: a report, as `nnpatch verify --base` gives). */
static nnp_status check_digests(nnp_ctx *ctx, const np_chain *c, const np_st *base, const uint8_t *map,
                                const np_patch *first, const char *base_path)
{
    uint8_t (*bd)[32] = calloc(base->n ? base->n : 1, 32);
    np_hash_range *r = calloc(base->n ? base->n : 1, sizeof *r);
    nnp_status st = NNP_OK;
    char q[NP_QUOTE_MAX], a[65], b[65];
    if (!bd || !r) {
        st = np_fail(ctx, NNP_KIND_IO, "out of memory");
        goto out;
    }
    for (size_t k = 0; k < base->n; k++)
        r[k] = (np_hash_range){map ? map + base->tensors[k].begin : (const uint8_t *)"", base->tensors[k].nbytes, 0,
                               bd[k]};
    if ((st = np_hash_ranges(ctx, r, base->n)))
        goto out;
    for (size_t k = 0; k < base->n && !st; k++) {
        const uint8_t *want = np_chain_input_expect(c, k);
        if (want && memcmp(bd[k], want, 32)) {
            np_hex(bd[k], 32, a);
            np_hex(want, 32, b);
            st = np_fail_as(ctx, NNP_KIND_BASE_MISMATCH, NNP_EMISMATCH,
                            "%s: wrong base: tensor %s differs from the patch's base (BLAKE3 %s, expected %s)",
                            base_path, np_quote(q, sizeof q, base->tensors[k].name, base->tensors[k].name_len), a, b);
        }
    }
    uint8_t d[32];
    np_model_digest(base->tensors, base->by_name, base->n, (const uint8_t(*)[32])bd, d);
    if (!st && memcmp(d, first->base.model_blake3, 32)) {
        np_hex(d, 32, a);
        np_hex(first->base.model_blake3, 32, b);
        st = np_fail_as(ctx, NNP_KIND_BASE_MISMATCH, NNP_EMISMATCH,
                        "%s: tensor contents differ from the patch's base (model BLAKE3 %s, expected %s)", base_path,
                        a, b);
    }
out:
    free(bd);
    free(r);
    return st;
}

/* The failure already set, reported as a base that is not the patch's (exit 1). Its message is
 * copied first: formatting ctx->msg into itself overlaps (the message came out empty). */
static nnp_status as_mismatch(nnp_ctx *ctx)
{
    char m[sizeof ctx->msg];
    memcpy(m, ctx->msg, sizeof m);
    return np_fail_as(ctx, NNP_KIND_BASE_MISMATCH, NNP_EMISMATCH, "%s", m);
}

/* The base file opened and mapped; NNP_OK with *fd >= 0, else p is closed. */
static nnp_status open_base(nnp_ctx *ctx, np_patch *p, const char *base_path, int *fd, const uint8_t **map,
                            uint64_t *size)
{
    struct stat sb;
    *map = NULL;
    *fd = open(base_path, O_RDONLY | O_CLOEXEC);
    if (*fd < 0 || fstat(*fd, &sb) != 0 || S_ISDIR(sb.st_mode)) {
        int e = errno, dir = *fd >= 0;
        if (*fd >= 0)
            close(*fd);
        *fd = -1;
        np_patch_close(p);
        if (dir)
            return np_fail(ctx, NNP_KIND_WEIGHTS,
                           "%s: a model directory: nnpatch-apply checks safetensors files only (use `nnpatch verify`)",
                           base_path);
        np_fail_errno(ctx, e, base_path, "cannot open");
        return as_mismatch(ctx);
    }
    nnp_status st = NNP_OK;
    *size = (uint64_t)sb.st_size;
    if (*size > (uint64_t)SIZE_MAX / 2) {
        st = np_fail(ctx, NNP_KIND_IO, "%s: too large for this platform's address space", base_path);
    } else if (*size) {
        void *mm = mmap(NULL, (size_t)*size, PROT_READ, MAP_SHARED, *fd, 0);
        if (mm == MAP_FAILED)
            st = np_fail_errno(ctx, errno, base_path, "cannot map");
        else
            *map = mm;
    }
    if (st) {
        close(*fd);
        *fd = -1;
        np_patch_close(p);
    }
    return st;
}

/* The patch against a base: the rules apply applies before it writes, by the same code (issue 28
 * item 9): the base's header read, the chain planned against it (plan.c: the target kind, layout,
 * tensor set, dtypes, shapes), then its tensors proven (check_digests). p is taken over. */
static nnp_status check_against_base(nnp_ctx *ctx, np_patch p, const char *base_path)
{
    int fd;
    const uint8_t *map;
    uint64_t size = 0;
    nnp_status st = open_base(ctx, &p, base_path, &fd, &map, &size);
    if (st)
        return st;
    np_st base;
    memset(&base, 0, sizeof base);
    np_chain *c = NULL;
    np_patch first; /* what check_digests needs of the patch, which the chain owns */
    memset(&first, 0, sizeof first);
    memcpy(first.base.model_blake3, p.base.model_blake3, 32);
    if (p.base.format == NP_FMT_EXTENTS ? (st = np_extents_base_st(ctx, &p, size, base_path, &base)) != NNP_OK
                                         : (st = np_sniff_safetensors(ctx, base_path)) ||
                                               (st = np_st_read_fd(ctx, fd, base_path, &base))) {
        st = as_mismatch(ctx);
        np_patch_close(&p);
    } else if ((st = np_extents_check_skeleton(ctx, &p, map, size, base_path))) { /* a skeleton delta (1.5) */
        if (ctx->kind == NNP_KIND_BASE_MISMATCH)
            st = as_mismatch(ctx);
        np_patch_close(&p);
    } else if ((st = np_chain_open_patches(ctx, &p, 1, &base, size, base_path, &c))) {
        if (ctx->kind == NNP_KIND_BASE_MISMATCH)
            st = as_mismatch(ctx);
    } else {
        st = check_digests(ctx, c, &base, map, &first, base_path);
    }
    np_chain_free(c);
    np_st_free(&base);
    if (map)
        munmap((void *)map, (size_t)size);
    close(fd);
    return st;
}

/* A target the native applier does not write is refused by --check as apply refuses it (exit 3),
 * with or without a base: its skeleton's rules (spec 5.7, PyTorch's pickle) are not checked here,
 * so exit 0 would vouch for what nnpatch-apply never looked at. A directory target alone (no base)
 * is checked whole by check_sections: its contents against their digests. */
static nnp_status check_opened(nnp_ctx *ctx, np_patch p, const char *base_path)
{
    nnp_status st;
    if (p.target.format != NP_FMT_DIR || base_path)
        st = np_plan_refuse_target(ctx, &p, "nnpatch verify");
    else
        st = NNP_OK;
    if (st || (st = check_sections(ctx, &p)) || !base_path) {
        np_patch_close(&p);
        return st;
    }
    return check_against_base(ctx, p, base_path);
}
