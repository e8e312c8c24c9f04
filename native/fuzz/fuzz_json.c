/*
 * libFuzzer: the strict JSON parser of patch headers and journals (npj_parse, json.h)
 * with the format's limits, every value of an accepted document walked, and the
 * pre-parse measure (npj_shape) held to agree: a document the parser accepts never
 * measures deeper than the limit it was parsed under.
 */
#include "fuzz_common.h"
#include "json.h"

static uint64_t walk(const npj_value *v, unsigned depth) {
    uint64_t n = 1, u;
    const char *s;
    size_t len;
    switch (v->kind) {
    case NPJ_STRING:
        if (npj_as_string(v, &s, &len) != 0 || s[len] != 0) abort(); /* NUL-terminated, as json.h says */
        for (size_t i = 0; i < len; i++) n += (unsigned char)s[i] == 0xFF; /* touch every byte */
        break;
    case NPJ_INT:
        (void)npj_as_u64(v, UINT64_MAX, &u);
        break;
    case NPJ_ARRAY:
        for (size_t i = 0; i < v->u.arr.n; i++) n += walk(&v->u.arr.items[i], depth + 1);
        break;
    case NPJ_OBJECT:
        for (size_t i = 0; i < v->u.obj.n; i++) {
            const npj_member *m = &v->u.obj.members[i];
            if (m->key[m->key_len] != 0) abort();
            if (npj_get(v, m->key) == NULL && memchr(m->key, 0, m->key_len) == NULL) abort();
            n += walk(&m->value, depth + 1);
        }
        break;
    default:
        break;
    }
    return n;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    /* the first byte picks the limits: a patch header's or a journal's */
    if (size < 1) return 0;
    npj_limits lim = {data[0] & 1 ? 8u : 16u, data[0] & 2 ? 64u : 4194304u, data[0] & 4 ? 16u : NPJ_MAX_STRING};
    data++, size--;
    npj_doc *doc = NULL;
    char err[256];
    int rc = npj_parse(data, size, &lim, &doc, err, sizeof err);
    if (rc == 0) {
        if (!doc) abort();
        uint64_t n = walk(npj_root(doc), 1);
        (void)n;
        unsigned depth;
        uint64_t values;
        npj_shape(data, size, &depth, &values);
        if (depth > lim.max_depth) {
            fprintf(stderr, "fuzz: accepted under max_depth %u, but npj_shape measures %u\n", lim.max_depth, depth);
            abort();
        }
        npj_free(doc);
    } else if (memchr(err, 0, sizeof err) == NULL || !err[0]) {
        fprintf(stderr, "fuzz: npj_parse failed without a message\n");
        abort();
    }
    return 0;
}
