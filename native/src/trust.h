/* Trust in a release feed: the DSSE envelope, its PAE and Ed25519 signatures, the key id, expiry
 * and the release number against the state (nnpatch/delivery/trust.py). */
#ifndef NNP_TRUST_H
#define NNP_TRUST_H

#include <stddef.h>
#include <stdint.h>

#include "internal.h"
#include "manifest.h"
#include "state.h"

#define NP_PAYLOAD_TYPE "application/vnd.nnpatch.release-manifest+json"
#define NP_MAX_SIGNATURES 16
/* An envelope carries the manifest in base64 (4 bytes for 3) plus its signatures. */
#define NP_MAX_ENVELOPE (NP_MAX_MANIFEST * 4 / 3 + ((size_t)64 << 10))

typedef struct np_opened {
    uint8_t *payload; /* malloc'd: the manifest's bytes */
    size_t len;
    int is_signed;    /* an envelope */
    int verified;     /* a signature by the trusted key verified */
    char key_id[17];
} np_opened;

/* The manifest bytes in raw: an envelope, or a plain manifest. With key (32 bytes; NULL: none) an
 * envelope with a signature by it that verifies over the PAE, else IntegrityError (4). */
nnp_status np_open_manifest(nnp_ctx *ctx, const uint8_t *raw, size_t len, const uint8_t *key, const char *source,
                            np_opened *out);
void np_opened_free(np_opened *o);

/* First 16 hex digits of the BLAKE3 of the raw public key (what `nnpatch keygen` prints). */

/* Refuse an expired manifest (IntegrityError). */
nnp_status np_check_fresh(nnp_ctx *ctx, const np_manifest *m, long long now, const char *source);
/* Refuse a signed manifest without a release, older than the state's, or the state's release
 * naming another target (IntegrityError). */
nnp_status np_check_not_older(nnp_ctx *ctx, const np_manifest *m, const np_state *state, const char *source);

#endif
