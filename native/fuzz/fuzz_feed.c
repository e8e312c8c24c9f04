/*
 * libFuzzer: the release-feed parsers of the native updater (native/src/trust.c, manifest.c,
 * state.c): the DSSE envelope (with the test key pinned, and without a key), the manifest, and
 * the state file, each under the library's rules (a status from the table, one message exactly
 * when it failed). An accepted state file is written back and read again: the same fields (the
 * bytes state.py writes). The first byte picks the parser.
 */
#include "fuzz_common.h"
#include "internal.h"
#include "manifest.h"
#include "state.h"
#include "trust.h"

/* spec/vectors/manifest/TEST-ONLY-release-key.pub.pem: the seeds' envelopes verify with it */
static const uint8_t KEY[32] = {0xf1, 0x36, 0x0c, 0x70, 0x2a, 0x31, 0xde, 0x92, 0x7a, 0x38, 0x74,
                                0x35, 0x17, 0x72, 0xcd, 0x22, 0x3a, 0x79, 0x88, 0x72, 0xb4, 0xf5,
                                0x28, 0xe5, 0x13, 0x75, 0xb5, 0x00, 0xbd, 0x2a, 0x29, 0x8e};

static void manifest_walk(const np_manifest *m) {
    for (size_t i = 0; i < m->nbases; i++) {
        const np_mbase *b = &m->bases[i];
        if (!np_plain_name(b->direct.patch, strlen(b->direct.patch), 200)) abort();
        if (b->has_chain && (b->nlinks < 1 || b->nlinks > NP_MAX_CHAIN_LINKS)) abort();
        for (size_t j = 0; j < b->nlinks; j++)
            if (!np_plain_name(b->links[j].patch, strlen(b->links[j].patch), 200)) abort();
    }
    if (m->has_release && m->release > NP_MAX_RELEASE) abort();
    if (m->base_url && m->base_url[strlen(m->base_url) - 1] != '/') abort();
}

static void envelope(nnp_ctx *ctx, const uint8_t *data, size_t size, int keyed) {
    np_opened o;
    nnp_status st = np_open_manifest(ctx, data, size, keyed ? KEY : NULL, "fuzz", &o);
    fz_check_status(ctx, st);
    if (st) return;
    if (keyed && (!o.verified || strlen(o.key_id) != 16)) abort();
    np_manifest m;
    np_clear(ctx);
    st = np_manifest_parse(ctx, o.payload, o.len, "fuzz", &m);
    fz_check_status(ctx, st);
    if (!st) {
        manifest_walk(&m);
        np_manifest_free(&m);
    }
    np_opened_free(&o);
}

static void state(nnp_ctx *ctx, const uint8_t *data, size_t size) {
    char model[128], path[160];
    snprintf(model, sizeof model, "%s/m", fz_scratch());
    snprintf(path, sizeof path, "%s" NP_STATE_SUFFIX, model);
    fz_write(path, data, size);
    np_state a, b;
    int present = 0;
    nnp_status st = np_state_read(ctx, model, &a, &present);
    fz_check_status(ctx, st);
    if (st) return;
    if (!present) abort();
    np_clear(ctx);
    if (np_state_write(ctx, model, &a) != NNP_OK || np_state_read(ctx, model, &b, &present) != NNP_OK ||
        memcmp(&a, &b, sizeof a) != 0) {
        fprintf(stderr, "fuzz: a state read, written and read again differs: %s\n", nnp_message(ctx));
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    nnp_ctx *ctx = nnp_ctx_new();
    if (!ctx) abort();
    uint8_t which = data[0] % 4;
    data++, size--;
    if (which == 0 || which == 1) {
        envelope(ctx, data, size, which == 0);
    } else if (which == 2) {
        np_manifest m;
        nnp_status st = np_manifest_parse(ctx, data, size, "fuzz", &m);
        fz_check_status(ctx, st);
        if (!st) {
            manifest_walk(&m);
            np_manifest_free(&m);
        }
    } else {
        state(ctx, data, size);
    }
    nnp_ctx_free(ctx);
    return 0;
}
