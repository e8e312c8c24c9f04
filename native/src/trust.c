/* Python twin: nnpatch/delivery/trust.py
 *
 * The DSSE v1 envelope (spec/MANIFEST.md, "Signature"): the manifest's exact bytes in base64 and
 * Ed25519 signatures over PAE(payloadType, bytes), checked with libsodium against the one pinned
 * key. With a key, every defect of the envelope is a refusal (IntegrityError, 4: MANIFEST.md step
 * 2), which is the spec's answer where trust.py still says 3 (issue 28 item 10); without a key an
 * envelope is opened unchecked and a broken one is invalid (3). */
#include "trust.h"

#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blake3.h"
#include "sign.h"

static int b64v(unsigned char c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '+') return 62;
    if (c == '/') return 63;
    return -1;
}

/* Standard base64 with padding, nothing else (Python's b64decode(validate=True)): 0, or -1. */
static int b64_decode(const char *s, size_t len, uint8_t **out, size_t *outlen)
{
    if (len % 4)
        return -1;
    size_t pad = len && s[len - 1] == '=' ? (len > 1 && s[len - 2] == '=' ? 2 : 1) : 0;
    uint8_t *o = malloc(len / 4 * 3 + 1);
    if (!o)
        return -1;
    size_t n = 0;
    for (size_t i = 0; i < len; i += 4) {
        int v[4];
        for (int k = 0; k < 4; k++) {
            int last = i + 4 == len;
            if (last && k >= 4 - (int)pad) {
                v[k] = 0;
                continue;
            }
            if ((v[k] = b64v((unsigned char)s[i + k])) < 0) {
                free(o);
                return -1;
            }
        }
        uint32_t w = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 | (uint32_t)v[2] << 6 | (uint32_t)v[3];
        o[n++] = (uint8_t)(w >> 16);
        if (!(i + 4 == len && pad == 2))
            o[n++] = (uint8_t)(w >> 8);
        if (!(i + 4 == len && pad >= 1))
            o[n++] = (uint8_t)w;
    }
    *out = o;
    *outlen = n;
    return 0;
}

void np_opened_free(np_opened *o)
{
    free(o->payload);
    memset(o, 0, sizeof *o);
}

/* An envelope defect: refused with a key (4), invalid without one (3). */
static nnp_status defect(nnp_ctx *ctx, const uint8_t *key, const char *source, const char *what)
{
    if (key)
        return np_fail(ctx, NNP_KIND_INTEGRITY, "%s: envelope: %s (a key was given, so a valid signed envelope is "
                       "required)", source, what);
    return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: envelope: %s", source, what);
}

typedef struct sigent {
    const char *kid;
    size_t kid_len;
    uint8_t *sig;
    size_t sig_len;
} sigent;

static nnp_status verify(nnp_ctx *ctx, const uint8_t *key, const char *source, sigent *sigs, size_t n,
                         np_opened *out)
{
    char want[17];
    np_key_id(key, want);
    size_t tl = strlen(NP_PAYLOAD_TYPE);
    char head[128];
    int hl = snprintf(head, sizeof head, "DSSEv1 %zu %s %zu ", tl, NP_PAYLOAD_TYPE, out->len);
    size_t mlen = (size_t)hl + out->len;
    uint8_t *msg = malloc(mlen ? mlen : 1);
    if (!msg)
        return np_fail(ctx, NNP_KIND_IO, "%s: out of memory", source);
    memcpy(msg, head, (size_t)hl);
    if (out->len)
        memcpy(msg + hl, out->payload, out->len);
    int ok = 0, matching = 0;
    /* keyid is only a hint (DSSE): every signature of a matching or missing id is tried */
    for (size_t i = 0; i < n && !ok; i++) {
        int mine = sigs[i].kid_len == 0 || (sigs[i].kid_len == 16 && !memcmp(sigs[i].kid, want, 16));
        matching |= mine;
        if (mine && sigs[i].sig_len == 64 && crypto_sign_verify_detached(sigs[i].sig, msg, mlen, key) == 0)
            ok = 1;
    }
    free(msg);
    if (ok) {
        out->verified = 1;
        memcpy(out->key_id, want, 17);
        return NNP_OK;
    }
    if (!matching) {
        char others[NP_MSG_MAX / 2] = "";
        size_t at = 0;
        for (size_t i = 0; i < n; i++) {
            char q[80];
            np_quote(q, sizeof q, sigs[i].kid, sigs[i].kid_len);
            int w = snprintf(others + at, sizeof others - at, "%s%.*s", at ? ", " : "", (int)strlen(q) - 2, q + 1);
            if (w < 0 || (size_t)w >= sizeof others - at)
                break;
            at += (size_t)w;
        }
        return np_fail(ctx, NNP_KIND_INTEGRITY, "%s: manifest signed by key %s, expected key %s", source, others,
                       want);
    }
    return np_fail(ctx, NNP_KIND_INTEGRITY, "%s: manifest no signature verifies with key %s", source, want);
}

nnp_status np_open_manifest(nnp_ctx *ctx, const uint8_t *raw, size_t len, const uint8_t *key, const char *source,
                            np_opened *out)
{
    memset(out, 0, sizeof *out);
    npj_doc *doc = NULL;
    nnp_status st = np_load_object(ctx, raw, len, NP_MAX_ENVELOPE, "manifest", source, &doc);
    if (st)
        return st;
    const npj_value *root = npj_root(doc);
    const npj_value *type = npj_get(root, "payloadType"), *sigs = npj_get(root, "signatures");
    sigent ents[NP_MAX_SIGNATURES];
    size_t n = 0;
    if (!type || !sigs) { /* a plain manifest */
        npj_free(doc);
        if (key)
            return np_fail(ctx, NNP_KIND_INTEGRITY, "%s: the manifest is not signed (a key was given, so a "
                           "signature is required)", source);
        out->payload = malloc(len ? len : 1);
        if (!out->payload)
            return np_fail(ctx, NNP_KIND_IO, "%s: out of memory", source);
        memcpy(out->payload, raw, len);
        out->len = len;
        return NNP_OK;
    }
    out->is_signed = 1;
    const npj_value *payload = npj_get(root, "payload");
    if (type->kind != NPJ_STRING || strlen(NP_PAYLOAD_TYPE) != type->u.str.len ||
        memcmp(type->u.str.s, NP_PAYLOAD_TYPE, type->u.str.len)) {
        st = defect(ctx, key, source, "payloadType must be '" NP_PAYLOAD_TYPE "'");
        goto done;
    }
    if (!payload || payload->kind != NPJ_STRING) {
        st = defect(ctx, key, source, "'payload' is not a string");
        goto done;
    }
    if (b64_decode(payload->u.str.s, payload->u.str.len, &out->payload, &out->len) != 0) {
        st = defect(ctx, key, source, "'payload' is not base64");
        goto done;
    }
    if (sigs->kind != NPJ_ARRAY || sigs->u.arr.n == 0 || sigs->u.arr.n > NP_MAX_SIGNATURES) {
        st = defect(ctx, key, source, "'signatures' must be a list of 1 to 16");
        goto done;
    }
    for (; n < sigs->u.arr.n; n++) {
        const npj_value *s = &sigs->u.arr.items[n], *kid = npj_get(s, "keyid"), *sig = npj_get(s, "sig");
        char what[96];
        if (s->kind != NPJ_OBJECT || (kid && kid->kind != NPJ_STRING)) {
            snprintf(what, sizeof what, "signatures[%zu] is not an object with a string 'keyid'", n);
            st = defect(ctx, key, source, what);
            goto done;
        }
        ents[n].kid = kid ? kid->u.str.s : "";
        ents[n].kid_len = kid ? kid->u.str.len : 0;
        if (!sig || sig->kind != NPJ_STRING) {
            snprintf(what, sizeof what, "'signatures[%zu].sig' is not a string", n);
            st = defect(ctx, key, source, what);
            goto done;
        }
        if (b64_decode(sig->u.str.s, sig->u.str.len, &ents[n].sig, &ents[n].sig_len) != 0) {
            snprintf(what, sizeof what, "'signatures[%zu].sig' is not base64", n);
            st = defect(ctx, key, source, what);
            goto done;
        }
    }
    if (key)
        st = verify(ctx, key, source, ents, n, out);
done:
    for (size_t i = 0; i < n; i++)
        free(ents[i].sig);
    npj_free(doc);
    if (st)
        np_opened_free(out);
    return st;
}

nnp_status np_check_fresh(nnp_ctx *ctx, const np_manifest *m, long long now, const char *source)
{
    long long when;
    if (!m->expires || np_parse_time(m->expires, strlen(m->expires), &when) != 0 || now < when)
        return NNP_OK;
    char t[21];
    np_format_time(now, t);
    return np_fail(ctx, NNP_KIND_INTEGRITY, "%s: the manifest expired at %s (now %s); the feed is stale or frozen",
                   source, m->expires, t);
}

nnp_status np_check_not_older(nnp_ctx *ctx, const np_manifest *m, const np_state *state, const char *source)
{
    if (!m->has_release)
        return np_fail(ctx, NNP_KIND_INTEGRITY, "%s: a signed manifest must carry a release number", source);
    if (!state)
        return NNP_OK;
    unsigned long long r = m->release, s = state->release;
    if (r < s)
        return np_fail(ctx, NNP_KIND_INTEGRITY, "%s: release %llu is older than release %llu, which this device "
                       "already accepted (replayed or stale feed)", source, r, s);
    char t[65];
    np_hex(m->target_blake3, 32, t);
    if (r == s && strcmp(t, state->target_blake3) != 0)
        return np_fail(ctx, NNP_KIND_INTEGRITY, "%s: release %llu names another target than the release %llu this "
                       "device accepted", source, r, s);
    return NNP_OK;
}
