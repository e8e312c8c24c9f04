/*
 * libFuzzer: apply the input (trailer and signature repaired, fuzz_common.h) to a fixed
 * base, spec/vectors/valid/all-ops/base.safetensors, in /dev/shm, one of three ways
 * picked from the input's length: to a new file from the patch file (nnp_apply), to a
 * new file from a stream read in short chunks (nnp_apply_streams), or in place on a
 * copy of the base behind the undo journal (nnp_apply_in_place). Besides the
 * sanitizers, the harness checks the library's promises: a status from the table with a
 * one-line message on failure; a new file present exactly on success; a model updated
 * in place left as it was on failure; no temporary file or journal left either way.
 */
#include "fuzz_common.h"

static char base[PATH_MAX], out[PATH_MAX + 16], model[PATH_MAX + 16], patch[PATH_MAX + 16];
static uint8_t *base_bytes;
static size_t base_len;

struct stream {
    const uint8_t *p;
    size_t left, chunk;
};

static long long read_chunk(void *user, uint8_t *buf, size_t len) {
    struct stream *s = user;
    size_t k = len < s->chunk ? len : s->chunk;
    if (k > s->left) k = s->left;
    memcpy(buf, s->p, k);
    s->p += k;
    s->left -= k;
    return (long long)k;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!base[0]) {
        fz_repo_path(base, sizeof base, "spec/vectors/valid/all-ops/base.safetensors");
        base_bytes = fz_read(base, &base_len);
        snprintf(out, sizeof out, "%s/out", fz_scratch());
        snprintf(model, sizeof model, "%s/model", fz_scratch());
        snprintf(patch, sizeof patch, "%s/patch", fz_scratch());
    }
    int sig;
    uint8_t *buf = fz_fix_patch(data, size, &sig);
    fz_write(patch, buf, size);

    nnp_ctx *ctx = nnp_ctx_new();
    if (!ctx) abort();
    if (sig) {
        uint8_t pk[32], sk[64];
        fz_keypair(pk, sk);
        if (nnp_set_trusted_key(ctx, pk) != NNP_OK) abort();
    }
    int mode = (int)(size % 3);             /* new file, stream, in place */
    nnp_verify verify = (nnp_verify)(size / 3 % 3); /* default, full, touched */
    if (nnp_set_verify(ctx, verify) != NNP_OK) abort();
    const char *patches[1] = {patch};
    nnp_status st;
    if (mode == 0) {
        st = nnp_apply(ctx, base, patches, 1, out);
    } else if (mode == 1) {
        struct stream s = {buf, size, 1 + size / 7 % 4093};
        nnp_source src = NNP_SOURCE_INIT(read_chunk, &s, "-");
        st = nnp_apply_streams(ctx, base, &src, 1, out);
    } else {
        fz_write(model, base_bytes, base_len);
        st = nnp_apply_in_place(ctx, model, patches, 1);
    }
    fz_check_status(ctx, st);
    if (mode < 2) {
        int exists = access(out, F_OK) == 0;
        if (exists != (st == NNP_OK)) {
            fprintf(stderr, "fuzz: mode %d: status %d (%s), but the output %s\n", mode, (int)st, nnp_message(ctx),
                    exists ? "exists" : "is missing");
            abort();
        }
        unlink(out);
    } else {
        size_t len;
        uint8_t *now = fz_read(model, &len);
        if (st != NNP_OK && (len != base_len || memcmp(now, base_bytes, len) != 0)) {
            fprintf(stderr, "fuzz: in place: status %d (%s), but the model changed\n", (int)st, nnp_message(ctx));
            abort();
        }
        free(now);
        unlink(model);
    }
    free(buf);
    nnp_ctx_free(ctx);
    const char *keep[] = {"patch"};
    if (fz_count_others(keep, 1)) abort(); /* a temporary file, a spool or a journal left behind */
    unlink(patch);
    return 0;
}
