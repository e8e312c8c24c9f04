/*
 * libFuzzer: recover a fixed model (native/fuzz/data/journal-model.safetensors, left by
 * the Python in-place apply with every tensor written) from the input as its undo
 * journal, the journal's trailer repaired first. Besides the sanitizers, the harness
 * checks spec/JOURNAL.md's promises: a refused journal writes nothing to the model, and
 * no journal, whatever it says, changes the model's safetensors header.
 */
#include "fuzz_common.h"

static uint8_t *model_bytes;
static size_t model_len, header_end;
static char model[PATH_MAX], journal[PATH_MAX + 32];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!model_bytes) {
        char src[PATH_MAX];
        fz_repo_path(src, sizeof src, "native/fuzz/data/journal-model.safetensors");
        model_bytes = fz_read(src, &model_len);
        if (model_len < 8) abort();
        uint64_t h = 0;
        for (int i = 7; i >= 0; i--) h = h << 8 | model_bytes[i];
        header_end = 8 + (size_t)h;
        snprintf(model, sizeof model, "%s/model.safetensors", fz_scratch());
        snprintf(journal, sizeof journal, "%s.nnpatch-journal", model);
    }
    fz_write(model, model_bytes, model_len);
    uint8_t *buf = fz_fix_journal(data, size);
    fz_write(journal, buf, size);
    free(buf);

    nnp_ctx *ctx = nnp_ctx_new();
    if (!ctx) abort();
    int recovered = -1;
    nnp_status st = nnp_recover(ctx, model, &recovered);
    fz_check_status(ctx, st);
    size_t len;
    uint8_t *now = fz_read(model, &len);
    if (len != model_len || memcmp(now, model_bytes, header_end) != 0) {
        fprintf(stderr, "fuzz: the model's size or safetensors header changed (status %d: %s)\n", (int)st,
                nnp_message(ctx));
        abort();
    }
    if (st != NNP_OK && memcmp(now, model_bytes, model_len) != 0) {
        fprintf(stderr, "fuzz: a refused journal wrote to the model (status %d: %s)\n", (int)st, nnp_message(ctx));
        abort();
    }
    if (st == NNP_OK && recovered != 0 && recovered != 1) {
        fprintf(stderr, "fuzz: recovered is %d\n", recovered);
        abort();
    }
    free(now);
    nnp_ctx_free(ctx);
    unlink(journal);
    char tmp[PATH_MAX + 64];
    snprintf(tmp, sizeof tmp, "%s.tmp", journal);
    unlink(tmp);
    const char *keep[] = {"model.safetensors"};
    if (fz_count_others(keep, 1)) abort();
    return 0;
}
