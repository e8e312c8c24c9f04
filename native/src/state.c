/* Python twin: nnpatch/delivery/state.py
 *
 * MODEL.nnpatch-state, in exactly the bytes state.py writes (json.dumps(indent=2, sort_keys=True)
 * and a newline), so that a state written by either implementation is honoured by the other. */
#include "state.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fileio.h"
#include "manifest.h"

#define FIX "; it keeps the last release this device accepted: remove it only to trust the feed afresh"

char *np_state_path(const char *model)
{
    size_t n = strlen(model);
    char *p = malloc(n + sizeof NP_STATE_SUFFIX);
    if (p) {
        memcpy(p, model, n);
        memcpy(p + n, NP_STATE_SUFFIX, sizeof NP_STATE_SUFFIX);
    }
    return p;
}

static int str_copy(const npj_value *v, char *out, size_t cap)
{
    if (!v || v->kind != NPJ_STRING || v->u.str.len >= cap || memchr(v->u.str.s, 0, v->u.str.len))
        return -1;
    memcpy(out, v->u.str.s, v->u.str.len + 1);
    return 0;
}

static int lower_hex(const char *s, size_t n)
{
    if (strlen(s) != n)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    return 1;
}

static int is_time(const char *s)
{
    long long t;
    return np_parse_time(s, strlen(s), &t) == 0;
}

static int fill(const npj_value *o, np_state *st)
{
    const npj_value *f = npj_get(o, "format"), *v = npj_get(o, "version"), *e = npj_get(o, "expires");
    if (!f || f->kind != NPJ_STRING || strcmp(f->u.str.s, "nnpatch-update-state") ||
        f->u.str.len != strlen("nnpatch-update-state"))
        return -1;
    if (!v || v->kind != NPJ_INT || v->u.i.negative || v->u.i.magnitude != 1)
        return -1;
    if (npj_as_u64(npj_get(o, "release"), NP_MAX_RELEASE, &st->release) != 0)
        return -1;
    if (str_copy(npj_get(o, "target_blake3"), st->target_blake3, 65) || !lower_hex(st->target_blake3, 64) ||
        str_copy(npj_get(o, "manifest_blake3"), st->manifest_blake3, 65) || !lower_hex(st->manifest_blake3, 64) ||
        str_copy(npj_get(o, "key_id"), st->key_id, 17) || !lower_hex(st->key_id, 16) ||
        str_copy(npj_get(o, "accepted"), st->accepted, 21) || !is_time(st->accepted))
        return -1;
    st->expires[0] = 0;
    if (e && e->kind != NPJ_NULL && (str_copy(e, st->expires, 21) || !is_time(st->expires)))
        return -1;
    return 0;
}

nnp_status np_state_read(nnp_ctx *ctx, const char *model, np_state *st, int *present)
{
    *present = 0;
    memset(st, 0, sizeof *st);
    char *path = np_state_path(model);
    if (!path)
        return np_fail(ctx, NNP_KIND_IO, "%s: out of memory", model);
    if (!np_lexists(path)) {
        free(path);
        return NNP_OK;
    }
    nnp_status s = NNP_OK;
    uint8_t *buf = malloc(NP_MAX_STATE + 1);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    size_t got = 0;
    if (!buf) {
        s = np_fail(ctx, NNP_KIND_IO, "%s: out of memory", path);
    } else if (fd < 0 || np_pread_all(fd, buf, NP_MAX_STATE + 1, 0, &got) != 0) {
        s = np_fail_errno(ctx, errno, path, "cannot read");
    } else {
        npj_doc *doc = NULL;
        s = np_load_object(ctx, buf, got, NP_MAX_STATE, "update state", path, &doc);
        if (s)
            np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s" FIX, nnp_message(ctx));
        else if (fill(npj_root(doc), st) != 0)
            s = np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: not an nnpatch update state" FIX, path);
        else
            *present = 1;
        npj_free(doc);
    }
    if (fd >= 0)
        close(fd);
    free(buf);
    free(path);
    return s;
}

nnp_status np_state_write(nnp_ctx *ctx, const char *model, const np_state *st)
{
    char text[1024], expires[32];
    if (st->expires[0])
        snprintf(expires, sizeof expires, "\"%s\"", st->expires);
    else
        snprintf(expires, sizeof expires, "null");
    int n = snprintf(text, sizeof text,
                     "{\n  \"accepted\": \"%s\",\n  \"expires\": %s,\n  \"format\": \"nnpatch-update-state\",\n"
                     "  \"key_id\": \"%s\",\n  \"manifest_blake3\": \"%s\",\n  \"release\": %llu,\n"
                     "  \"target_blake3\": \"%s\",\n  \"version\": 1\n}\n",
                     st->accepted, expires, st->key_id, st->manifest_blake3, (unsigned long long)st->release,
                     st->target_blake3);
    char *path = np_state_path(model);
    if (!path)
        return np_fail(ctx, NNP_KIND_IO, "%s: out of memory", model);
    np_tmp t;
    nnp_status s = np_tmp_create(ctx, path, ".tmp", &t);
    if (!s) {
        int e = np_write_all(t.fd, text, (size_t)n);
        s = e ? np_fail_errno(ctx, e, path, "cannot write") : np_tmp_commit(ctx, &t, "update state");
        if (s)
            np_tmp_abort(&t);
    }
    free(path);
    return s;
}
