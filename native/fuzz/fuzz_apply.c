/*
 * libFuzzer: apply the input (trailer and signature repaired, fuzz_common.h) to a fixed
 * base, spec/vectors/valid/all-ops/base.safetensors, into /dev/shm. Besides the
 * sanitizers, the harness checks the library's promises: a status from the table with
 * a one-line message on failure, the output present exactly on success, and no
 * temporary file left behind either way.
 */
#include "fuzz_common.h"

static char base[PATH_MAX], out[PATH_MAX + 16];
static const char *verify_names[] = {"default", "full", "touched"};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!base[0]) {
        fz_repo_path(base, sizeof base, "spec/vectors/valid/all-ops/base.safetensors");
        if (access(base, R_OK) != 0) {
            perror(base);
            abort();
        }
        snprintf(out, sizeof out, "%s/out", fz_scratch());
    }
    int sig;
    uint8_t *buf = fz_fix_patch(data, size, &sig);
    char patch[PATH_MAX];
    snprintf(patch, sizeof patch, "%s/patch", fz_scratch());
    fz_write(patch, buf, size);
    free(buf);

    nnp_ctx *ctx = nnp_ctx_new();
    if (!ctx) abort();
    if (sig) {
        uint8_t pk[32], sk[64];
        fz_keypair(pk, sk);
        if (nnp_set_trusted_key(ctx, pk) != NNP_OK) abort();
    }
    /* the verify mode from the input's length, so every mode gets its share */
    if (nnp_set_verify(ctx, (nnp_verify)(size % 3)) != NNP_OK) abort();
    const char *patches[1] = {patch};
    nnp_status st = nnp_apply(ctx, base, patches, 1, out);
    fz_check_status(ctx, st);
    int exists = access(out, F_OK) == 0;
    if (exists != (st == NNP_OK)) {
        fprintf(stderr, "fuzz: status %d (%s), verify %s, but the output %s\n", (int)st, nnp_message(ctx),
                verify_names[size % 3], exists ? "exists" : "is missing");
        abort();
    }
    nnp_ctx_free(ctx);
    unlink(out);
    const char *keep[] = {"patch"};
    if (fz_count_others(keep, 1)) abort();
    unlink(patch);
    return 0;
}
