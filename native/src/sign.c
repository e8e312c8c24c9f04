/* Ed25519 signatures with libsodium (Debian's libsodium23: audited, constant-time,
 * and the verifier rejects non-canonical and small-order inputs, as RFC 8032 asks).
 * Python twin: nnpatch/signing.py. */
#include <errno.h>
#include <fcntl.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "blake3.h"
#include "sign.h"

static const char DOMAIN[] = "nnpatch-signature-v1"; /* + its NUL: 21 bytes */

/* A key's id: the first 16 hex digits of BLAKE3 of its raw 32 bytes (what `nnpatch keygen` prints;
 * signing.key_id). Patch signatures and manifest envelopes both name keys by it. */
void np_key_id(const uint8_t key[32], char out[17])
{
    uint8_t h[32];
    char hex[65];
    np_blake3_hash(key, 32, h);
    np_hex(h, 8, hex);
    memcpy(out, hex, 16);
    out[16] = 0;
}

nnp_status np_sign_check(nnp_ctx *ctx, const char *name, const uint8_t trailer[32], const uint8_t *block)
{
    if (!ctx->have_key)
        return NNP_OK;
    char want[17], got[17];
    np_key_id(ctx->key, want);
    if (!block)
        return np_fail(ctx, NNP_KIND_INTEGRITY, "%s: patch is not signed (a key was given, so a signature is required)",
                       name);
    np_key_id(block, got);
    if (np_ct_diff(block, ctx->key, 32))
        return np_fail(ctx, NNP_KIND_INTEGRITY, "%s: signed by key %s, expected key %s", name, got, want);
    uint8_t msg[53];
    memcpy(msg, DOMAIN, 21);
    memcpy(msg + 21, trailer, 32);
    if (sodium_init() < 0)
        return np_fail(ctx, NNP_KIND_INTEGRITY, "%s: cannot initialise libsodium to check the signature", name);
    if (crypto_sign_verify_detached(block + 32, msg, sizeof msg, block) != 0)
        return np_fail(ctx, NNP_KIND_INTEGRITY, "%s: signature does not verify with key %s", name, got);
    return NNP_OK;
}

static int b64val(int c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

/* Decode the base64 body between begin and end lines; returns bytes or -1. */
static long b64_body(const char *s, size_t n, uint8_t *out, size_t cap)
{
    uint32_t acc = 0;
    int bits = 0, pad = 0;
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        int c = (unsigned char)s[i];
        if (c == '\r' || c == '\n' || c == ' ' || c == '\t')
            continue;
        if (c == '=') {
            pad++;
            continue;
        }
        if (pad)
            return -1;
        int v = b64val(c);
        if (v < 0)
            return -1;
        acc = acc << 6 | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            if (o >= cap)
                return -1;
            out[o++] = (uint8_t)(acc >> bits);
        }
    }
    if (pad > 2)
        return -1;
    return (long)o;
}

static const char *find(const char *s, size_t n, const char *needle)
{
    size_t k = strlen(needle);
    for (size_t i = 0; i + k <= n; i++)
        if (!memcmp(s + i, needle, k))
            return s + i;
    return NULL;
}

nnp_status np_pem_public_key(nnp_ctx *ctx, const char *path, const char *text, size_t len, uint8_t key[32])
{
    static const uint8_t SPKI[12] = {0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00};
    const char *b = find(text, len, "-----BEGIN PUBLIC KEY-----");
    if (!b) {
        if (find(text, len, "PRIVATE KEY-----"))
            return np_fail(ctx, NNP_KIND_USAGE,
                           "%s: this is a private key; --key takes the public key (the .pub PEM file `nnpatch keygen` "
                           "wrote), which is the one to ship with the app",
                           path);
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: not a PEM Ed25519 public key", path);
    }
    b += strlen("-----BEGIN PUBLIC KEY-----");
    const char *e = find(b, len - (size_t)(b - text), "-----END PUBLIC KEY-----");
    uint8_t der[128];
    long n = e ? b64_body(b, (size_t)(e - b), der, sizeof der) : -1;
    if (n != 44 || memcmp(der, SPKI, sizeof SPKI))
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: not a PEM Ed25519 public key", path);
    memcpy(key, der + 12, 32);
    return NNP_OK;
}

nnp_status nnp_set_trusted_key(nnp_ctx *ctx, const uint8_t public_key[32])
{
    if (!ctx)
        return NNP_EUSAGE;
    np_clear(ctx);
    if (!public_key) {
        ctx->have_key = 0;
        return NNP_OK;
    }
    memcpy(ctx->key, public_key, 32);
    ctx->have_key = 1;
    return NNP_OK;
}

nnp_status nnp_set_trusted_key_file(nnp_ctx *ctx, const char *pem_path)
{
    if (!ctx)
        return NNP_EUSAGE;
    np_clear(ctx);
    if (!pem_path)
        return np_fail(ctx, NNP_KIND_USAGE, "no key file given");
    int fd = open(pem_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return np_fail_errno(ctx, errno, pem_path, "cannot read");
    char buf[8192];
    size_t n = 0;
    for (;;) {
        ssize_t r = read(fd, buf + n, sizeof buf - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            int e = errno;
            close(fd);
            return np_fail_errno(ctx, e, pem_path, "cannot read");
        }
        if (r == 0)
            break;
        n += (size_t)r;
        if (n == sizeof buf) {
            close(fd);
            return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: not a PEM Ed25519 public key (over 8 KiB)", pem_path);
        }
    }
    close(fd);
    uint8_t key[32];
    nnp_status st = np_pem_public_key(ctx, pem_path, buf, n, key);
    if (st)
        return st;
    return nnp_set_trusted_key(ctx, key);
}

nnp_status nnp_set_trusted_key_pem(nnp_ctx *ctx, const char *pem, size_t len)
{
    if (!ctx)
        return NNP_EUSAGE;
    np_clear(ctx);
    if (!pem)
        return np_fail(ctx, NNP_KIND_USAGE, "no key given");
    uint8_t key[32];
    nnp_status st = np_pem_public_key(ctx, "the key", pem, len, key);
    if (st)
        return st;
    return nnp_set_trusted_key(ctx, key);
}
