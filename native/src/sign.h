/* Ed25519 signatures of patches (spec/FORMAT.md section 4.1), with libsodium. */
#ifndef NNP_SIGN_H
#define NNP_SIGN_H

#include <stdint.h>

#include "internal.h"

/* With the trusted key in ctx: IntegrityError (4) unless block (96 bytes: public key and
 * signature; NULL when the patch is unsigned) is that key's signature of the trailer. */
nnp_status np_sign_check(nnp_ctx *ctx, const char *name, const uint8_t trailer[32], const uint8_t *block);

/* A key's id: the first 16 hex digits of BLAKE3 of its raw 32 bytes, NUL-terminated. */
void np_key_id(const uint8_t key[32], char out[17]);

/* The raw key of a PEM SubjectPublicKeyInfo Ed25519 public key (text[0..len)). */
nnp_status np_pem_public_key(nnp_ctx *ctx, const char *path, const char *text, size_t len, uint8_t key[32]);

#endif
