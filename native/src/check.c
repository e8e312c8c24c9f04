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

#include "blake3.h"
#include "codec.h"
#include "fileio.h"
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
    nnp_status st = np_spool(ctx, src, where, &p);
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
        st = np_plan_decode_layout(ctx, &p, &lay, &raw, &len);
        if (!st && (st = np_plan_check_base(ctx, &p, &base, base_path, &lay)) && ctx->kind == NNP_KIND_BASE_MISMATCH)
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
