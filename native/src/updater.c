/* Python twin: nnpatch/delivery/updater.py
 *
 * The device's updater, nnp_update: bring a model file to a release's target, checked by hash and
 * signature, in the order of spec/MANIFEST.md "What an updater checks" and with updater.py's
 * messages, so that the two implementations answer every case of spec/vectors/manifest alike. The
 * model is the old version or the proven new one, never anything else: patches are downloaded and
 * proven (size, BLAKE3, header digests, signature) before nnp_apply or nnp_apply_in_place touches
 * anything, and those prove the result against the manifest's target. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#include "blake3.h"
#include "fetch.h"
#include "fileio.h"
#include "journal.h"
#include "manifest.h"
#include "patch.h"
#include "state.h"
#include "trust.h"

#define PARTIAL_SUFFIX ".nnpatch-part"

nnp_status nnp_hash_file(nnp_ctx *ctx, const char *path, uint8_t out[32])
{
    if (!ctx)
        return NNP_EUSAGE;
    np_clear(ctx);
    if (!path || !out)
        return np_fail(ctx, NNP_KIND_USAGE, "nnp_hash_file needs a path and an output");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat sb;
    if (fd < 0 || fstat(fd, &sb) != 0) {
        int e = errno;
        if (fd >= 0)
            close(fd);
        return np_fail_errno(ctx, e, path, "cannot read");
    }
    nnp_status st = S_ISREG(sb.st_mode) ? np_hash_fd(ctx, fd, (uint64_t)sb.st_size, path, out)
                                        : np_fail(ctx, NNP_KIND_IO, "%s: not a regular file", path);
    close(fd);
    return st;
}

nnp_status nnp_patch_digests_of(nnp_ctx *ctx, const char *patch_path, nnp_patch_digests *out)
{
    if (!ctx)
        return NNP_EUSAGE;
    np_clear(ctx);
    if (!patch_path || !out || out->size != sizeof *out)
        return np_fail(ctx, NNP_KIND_USAGE, "nnp_patch_digests_of needs a path and an NNP_PATCH_DIGESTS_INIT struct");
    np_patch p;
    nnp_status st = np_patch_open(ctx, patch_path, NULL, &p);
    if (st)
        return st;
    memcpy(out->base_blake3, p.base.blake3, 32);
    out->base_size = p.base.size;
    memcpy(out->target_blake3, p.target.blake3, 32);
    out->target_size = p.target.size;
    memcpy(out->trailer_blake3, p.trailer, 32);
    out->is_signed = (p.flags & NP_FLAG_SIGNED) != 0;
    np_patch_close(&p);
    return NNP_OK;
}

/* ---- places --------------------------------------------------------------------------------- */

/* The folder a file is in: a URL up to its last '/' (query and fragment dropped), a path's folder. */
static char *parent_of(const char *location)
{
    if (!np_is_url(location))
        return np_dir_of(location);
    size_t host = strstr(location, "://") - location + 3, end = strcspn(location, "?#");
    char *p = malloc(end + 2);
    if (!p)
        return NULL;
    memcpy(p, location, end);
    p[end] = 0;
    char *slash = strrchr(p + host, '/');
    if (slash)
        slash[1] = 0;
    else
        strcat(p, "/");
    return p;
}

/* name (a plain file name) in the folder base (a path, or a URL ending in '/'). */
static char *resolve(const char *base, const char *name)
{
    size_t bl = strlen(base), nl = strlen(name);
    char *p = malloc(bl + nl + 2);
    if (!p)
        return NULL;
    int sep = !np_is_url(base) && bl && base[bl - 1] != '/';
    snprintf(p, bl + nl + 2, "%s%s%s", base, sep ? "/" : "", name);
    return p;
}

static char *partial_path(const char *model, const uint8_t digest[32])
{
    char hex[65];
    np_hex(digest, 32, hex);
    size_t n = strlen(model) + 1 + 32 + sizeof PARTIAL_SUFFIX;
    char *p = malloc(n);
    if (p)
        snprintf(p, n, "%s.%.32s%s", model, hex, PARTIAL_SUFFIX);
    return p;
}

/* Remove partial downloads of this model that this update does not continue: exactly
 * partial_path's names (another model whose name starts with this one's keeps its downloads). */
static void remove_stale_partials(const char *model, char *const *keep, size_t nkeep)
{
    char *dir = np_dir_of(model);
    const char *base = strrchr(model, '/') ? strrchr(model, '/') + 1 : model;
    size_t bl = strlen(base), sl = strlen(PARTIAL_SUFFIX);
    DIR *d = dir ? opendir(dir) : NULL;
    struct dirent *e;
    while (d && (e = readdir(d))) {
        const char *n = e->d_name;
        if (strlen(n) != bl + 1 + 32 + sl || strncmp(n, base, bl) || n[bl] != '.' || strcmp(n + bl + 33, PARTIAL_SUFFIX))
            continue;
        int hex = 1, kept = 0;
        for (size_t i = bl + 1; i < bl + 33; i++)
            hex &= (n[i] >= '0' && n[i] <= '9') || (n[i] >= 'a' && n[i] <= 'f');
        for (size_t k = 0; k < nkeep; k++) {
            const char *kb = strrchr(keep[k], '/') ? strrchr(keep[k], '/') + 1 : keep[k];
            kept |= !strcmp(kb, n);
        }
        if (hex && !kept) {
            char *path = resolve(dir, n);
            if (path)
                unlink(path);
            free(path);
        }
    }
    if (d)
        closedir(d);
    free(dir);
}

/* ---- checks ----------------------------------------------------------------------------------- */

/* A local patch file: the manifest's size, then its BLAKE3 (IntegrityError otherwise). */
static nnp_status check_patch_file(nnp_ctx *ctx, const char *path, const np_mlink *l)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat sb;
    if (fd < 0 || fstat(fd, &sb) != 0) {
        int e = errno;
        if (fd >= 0)
            close(fd);
        return np_fail(ctx, NNP_KIND_IO, "%s: cannot read patch: %s", path, strerror(e));
    }
    nnp_status st = NNP_OK;
    uint8_t got[32];
    if ((uint64_t)sb.st_size != l->patch_size)
        st = np_fail(ctx, NNP_KIND_INTEGRITY, "%s: %llu bytes, the manifest says %llu%s", path,
                     (unsigned long long)sb.st_size, (unsigned long long)l->patch_size,
                     (uint64_t)sb.st_size < l->patch_size ? " (truncated download?)" : "");
    else if (!(st = np_hash_fd(ctx, fd, (uint64_t)sb.st_size, path, got)) && memcmp(got, l->patch_blake3, 32)) {
        char a[65], b[65];
        np_hex(got, 32, a);
        np_hex(l->patch_blake3, 32, b);
        st = np_fail(ctx, NNP_KIND_INTEGRITY, "%s: BLAKE3 %s does not match the manifest's %s", path, a, b);
    }
    close(fd);
    return st;
}

/* Each patch file is the link the manifest names: made for the right base, making the right
 * target, with the right trailer (and, with a trusted key, signed by it: np_patch_open checks). */
static nnp_status check_links(nnp_ctx *ctx, char **paths, const np_mlink *const *links, size_t n,
                              const uint8_t current[32])
{
    for (size_t i = 0; i < n; i++) {
        np_patch p;
        nnp_status st = np_patch_open(ctx, paths[i], NULL, &p);
        if (st)
            return st;
        const uint8_t *want_base = i == 0 ? current : links[i - 1]->target_blake3;
        char a[65], b[65];
        if (memcmp(p.base.blake3, want_base, 32) || memcmp(p.base.blake3, links[i]->base_blake3, 32)) {
            np_hex(p.base.blake3, 32, a);
            np_hex(want_base, 32, b);
            st = np_fail(ctx, NNP_KIND_INTEGRITY, "%s: made for base %s, expected %s", paths[i], a, b);
        } else if (memcmp(p.target.blake3, links[i]->target_blake3, 32)) {
            np_hex(p.target.blake3, 32, a);
            np_hex(links[i]->target_blake3, 32, b);
            st = np_fail(ctx, NNP_KIND_INTEGRITY, "%s: makes %s, the manifest says %s", paths[i], a, b);
        } else if (memcmp(p.trailer, links[i]->trailer_blake3, 32)) {
            np_hex(p.trailer, 32, a);
            st = np_fail(ctx, NNP_KIND_INTEGRITY, "%s: trailer BLAKE3 %s does not match the manifest", paths[i], a);
        }
        np_patch_close(&p);
        if (st)
            return st;
    }
    return NNP_OK;
}

/* ---- room ------------------------------------------------------------------------------------ */

/* Bytes for a message: exact, and in MiB or GiB once that reads better (atomic.py's amount). */
static void amount(uint64_t n, char *out, size_t cap)
{
    if (n >= (1ull << 30))
        snprintf(out, cap, "%llu bytes (%.1f GiB)", (unsigned long long)n, (double)n / (1ull << 30));
    else if (n >= (1ull << 20))
        snprintf(out, cap, "%llu bytes (%.1f MiB)", (unsigned long long)n, (double)n / (1ull << 20));
    else
        snprintf(out, cap, "%llu bytes", (unsigned long long)n);
}

/* Bytes an unprivileged writer may still use beside the model; -1 where that cannot be told. */
static long long free_beside(const char *model)
{
    char *dir = np_dir_of(model);
    struct statvfs sv;
    int ok = dir && statvfs(dir, &sv) == 0;
    free(dir);
    return ok ? (long long)((unsigned long long)sv.f_bavail * sv.f_frsize) : -1;
}

/* Whether to apply in place (updater.py's _choose_in_place): a new file needs the downloads and a
 * whole copy of the target beside the model; in place only the downloads (and the journal, refused
 * cleanly while it is written if even that does not fit). free was measured before this update
 * wrote anything; -1: cannot be told, do as asked and let the writes say. */
static nnp_status choose_in_place(nnp_ctx *ctx, const char *model, int asked, uint64_t download, uint64_t target,
                                  long long free, int *in_place, int *for_room)
{
    char need[64], have[64], alt[64];
    *in_place = asked == 1;
    *for_room = 0;
    if (free < 0)
        return NNP_OK;
    amount((uint64_t)free, have, sizeof have);
    if (asked == 1) {
        if (download <= (uint64_t)free)
            return NNP_OK;
        amount(download, need, sizeof need);
        return np_fail(ctx, NNP_KIND_IO, "%s: the patches need about %s beside the model, %s were free", model, need,
                       have);
    }
    uint64_t new_file = download + target;
    if (new_file <= (uint64_t)free)
        return NNP_OK;
    if (asked == 0 && download <= (uint64_t)free) {
        *in_place = *for_room = 1;
        return NNP_OK;
    }
    amount(new_file, need, sizeof need);
    amount(download, alt, sizeof alt);
    return np_fail(ctx, NNP_KIND_IO, "%s: a new copy beside the model needs about %s (the patches and the new "
                   "version), %s were free%s%s", model, need, have,
                   download <= (uint64_t)free ? "; in place (--in-place) needs only about " : "",
                   download <= (uint64_t)free ? alt : "");
}

/* Bytes still to download beside the model: what the partial files do not hold yet. */
static uint64_t download_need(const char *model, const np_mlink *const *links, size_t n)
{
    uint64_t need = 0;
    for (size_t i = 0; i < n; i++) {
        char *p = partial_path(model, links[i]->patch_blake3);
        struct stat sb;
        uint64_t have = p && stat(p, &sb) == 0 ? (uint64_t)sb.st_size : 0;
        need += have < links[i]->patch_size ? links[i]->patch_size - have : 0;
        free(p);
    }
    return need;
}

/* ---- the update ------------------------------------------------------------------------------ */

typedef struct run {
    nnp_ctx *ctx;
    const char *model;
    nnp_update_options opt;
    nnp_update_result *res;
    np_opened opened;
    np_manifest m;
    char *where;
    char *paths[NP_MAX_CHAIN_LINKS];
    char *partials[NP_MAX_CHAIN_LINKS];
    size_t nlinks, npartials;
} run;

/* An in-place update of the model that was killed leaves its undo journal beside it and the model
 * half-written: no manifest entry would match it. Roll it back first (spec/JOURNAL.md); a dry run
 * changes nothing, so it refuses instead. */
static nnp_status recover_first(run *r)
{
    char *j = np_journal_path(r->model, NP_JOURNAL_SUFFIX);
    if (!j)
        return np_fail(r->ctx, NNP_KIND_IO, "out of memory");
    int there = np_lexists(j);
    nnp_status st = NNP_OK;
    if (there && r->opt.dry_run)
        st = np_fail(r->ctx, NNP_KIND_INTEGRITY, "%s: an in-place update of it was interrupted (undo journal %s); "
                     "update without --dry-run recovers it first, or run `nnpatch recover %s`", r->model, j, r->model);
    else if (there) {
        int rec = 0;
        st = nnp_recover(r->ctx, r->model, &rec);
        r->res->recovered = rec;
    }
    free(j);
    return st;
}

/* Fetch, open (checking the signature) and validate the manifest. One fetched over the network
 * that fails is fetched once more: a byte damaged in transit, or a manifest replaced while it was
 * read, is no reason to give up. */
static nnp_status fetch_manifest(run *r, const uint8_t *key)
{
    const char *loc = r->opt.manifest;
    for (int again = np_is_url(loc) ? 0 : 1; again < 2; again++) {
        uint8_t *raw;
        size_t len;
        nnp_status st = np_read_small(r->ctx, &r->opt, loc, NP_MAX_ENVELOPE, &raw, &len);
        if (st)
            return st;
        st = np_open_manifest(r->ctx, raw, len, key, loc, &r->opened);
        free(raw);
        if (!st && (st = np_manifest_parse(r->ctx, r->opened.payload, r->opened.len, loc, &r->m)))
            np_opened_free(&r->opened);
        if (st != NNP_EFORMAT && st != NNP_EINTEGRITY)
            return st;
        if (again)
            return st;
    }
    return NNP_OK;
}

static void set_name(char *dst, size_t cap, const char *name)
{
    snprintf(dst, cap, "%s", name ? name : "");
}

/* Record the accepted release in the state file (state.py's accepted_state). */
static nnp_status accept(run *r, long long now)
{
    np_state acc;
    memset(&acc, 0, sizeof acc);
    acc.release = r->m.release;
    np_hex(r->m.target_blake3, 32, acc.target_blake3);
    memcpy(acc.key_id, r->opened.key_id, 17);
    uint8_t md[32];
    np_blake3_hash(r->opened.payload, r->opened.len, md);
    np_hex(md, 32, acc.manifest_blake3);
    np_format_time(now, acc.accepted);
    set_name(acc.expires, sizeof acc.expires, r->m.expires);
    return np_state_write(r->ctx, r->model, &acc);
}

/* Each patch of the chosen links, downloaded beside the model (a remote feed) or found beside the
 * manifest, proven by size and BLAKE3 (MANIFEST.md step 8); r->paths then names them. */
static nnp_status fetch_patches(run *r, const np_mlink *const *links)
{
    nnp_ctx *ctx = r->ctx;
    nnp_update_result *res = r->res;
    nnp_status st = NNP_OK;
    int remote = np_is_url(r->where);
    if (remote) {
        for (size_t i = 0; i < r->nlinks; i++, r->npartials++)
            if (!(r->partials[i] = partial_path(r->model, links[i]->patch_blake3)))
                return np_fail(ctx, NNP_KIND_IO, "out of memory");
        remove_stale_partials(r->model, r->partials, r->npartials);
    }
    for (size_t i = 0; i < r->nlinks; i++) {
        char *location = resolve(r->where, links[i]->patch);
        if (!location)
            return np_fail(ctx, NNP_KIND_IO, "out of memory");
        if (remote) {
            np_dlstats got;
            st = np_download(ctx, &r->opt, location, r->partials[i], links[i]->patch_size, links[i]->patch_blake3,
                             &got);
            res->downloaded_bytes += got.received;
            res->resumed_bytes += got.resumed_from;
            free(location);
            r->paths[i] = strdup(r->partials[i]);
            if (!st && !r->paths[i])
                st = np_fail(ctx, NNP_KIND_IO, "out of memory");
        } else {
            st = check_patch_file(ctx, location, links[i]);
            r->paths[i] = location;
        }
        if (st)
            return st;
    }
    return NNP_OK;
}

/* ---- the full model ---------------------------------------------------------------------------- */

/* A local full model copied into its partial file (opened as a download's is: np_open_partial). */
static nnp_status copy_beside(nnp_ctx *ctx, const char *source, const char *partial, uint64_t size)
{
    int in = open(source, O_RDONLY | O_CLOEXEC), out;
    if (in < 0)
        return np_fail_errno(ctx, errno, source, "cannot read the full model");
    nnp_status st = np_open_partial(ctx, partial, &out);
    if (st) {
        close(in);
        return st;
    }
    const size_t cap = 1 << 20;
    uint8_t *buf = malloc(cap);
    uint64_t done = 0;
    int e = !buf ? ENOMEM : ftruncate(out, 0) != 0 ? errno : 0;
    while (!e && done < size) {
        ssize_t n = read(in, buf, size - done < cap ? (size_t)(size - done) : cap);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) /* shorter than its size a moment ago: check_patch_file says so next */
            break;
        e = np_write_all(out, buf, (size_t)n);
        done += (uint64_t)n;
    }
    free(buf);
    if (e)
        st = np_fail_errno(ctx, e, partial, "cannot write the full model");
    if (!st && fsync(out) != 0)
        st = np_fail_errno(ctx, errno, partial, "cannot sync");
    close(in);
    close(out);
    return st;
}

/* Rename the proven partial file over the model (same folder: atomic), with the model's mode; the
 * file is opened without following a link so that the mode and the sync reach the proven file. */
static nnp_status commit_file(nnp_ctx *ctx, const char *done, const char *model, mode_t mode)
{
    int fd = open(done, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return np_fail_errno(ctx, errno, done, "cannot open the downloaded model");
    (void)fchmod(fd, mode & 07777); /* best effort, as updater.py's _commit_file */
    int bad = fsync(fd) != 0;
    int e = errno;
    close(fd);
    if (bad)
        return np_fail_errno(ctx, e, done, "cannot sync");
    if (rename(done, model) != 0)
        return np_fail_errno(ctx, errno, model, "cannot replace");
    (void)np_fsync_dir_of(model);
    return NNP_OK;
}

/* No patch leads from the model's version: fetch the whole target the manifest lists (its size
 * and BLAKE3 are the target's, checked as a patch's are) and rename it over the model
 * (updater.py's _fall_back_to_full). */
static nnp_status fall_back_to_full(run *r, const struct stat *model_sb, long long free_space)
{
    nnp_ctx *ctx = r->ctx;
    nnp_update_result *res = r->res;
    const char *url = r->m.full_url;
    r->where = r->m.base_url ? strdup(r->m.base_url) : parent_of(r->opt.manifest);
    char *location = !r->where ? NULL : np_is_url(url) ? strdup(url) : resolve(r->where, url);
    char *partial = partial_path(r->model, r->m.target_blake3);
    nnp_status st = NNP_OK;
    if (!location || !partial) {
        st = np_fail(ctx, NNP_KIND_IO, "out of memory");
        goto out;
    }
    struct stat pb;
    uint64_t have = stat(partial, &pb) == 0 ? (uint64_t)pb.st_size : 0;
    uint64_t need = have < r->m.target_size ? r->m.target_size - have : 0;
    if (free_space >= 0 && need > (uint64_t)free_space) {
        char a[64], b[64];
        amount(need, a, sizeof a);
        amount((uint64_t)free_space, b, sizeof b);
        st = np_fail(ctx, NNP_KIND_IO, "%s: the full model needs about %s beside it, %s were free", r->model, a, b);
        goto out;
    }
    res->in_place = res->in_place_for_room = 0;
    res->full = 1;
    res->npatches = 1;
    res->patch_bytes = r->m.target_size;
    /* the file's name, as updater.py's basename of the URL with its trailing '/' dropped */
    size_t end = strlen(url);
    while (end && url[end - 1] == '/')
        end--;
    size_t start = end;
    while (start && url[start - 1] != '/')
        start--;
    if (start == end)
        set_name(res->patches[0], sizeof res->patches[0], url);
    else
        snprintf(res->patches[0], sizeof res->patches[0], "%.*s", (int)(end - start), url + start);
    if (r->opt.dry_run) {
        res->status = NNP_UPDATE_WOULD_UPDATE;
        goto out;
    }
    remove_stale_partials(r->model, &partial, 1);
    np_mlink whole;
    memset(&whole, 0, sizeof whole);
    whole.patch_size = r->m.target_size;
    memcpy(whole.patch_blake3, r->m.target_blake3, 32);
    if (np_is_url(location)) {
        np_dlstats got;
        st = np_download(ctx, &r->opt, location, partial, r->m.target_size, r->m.target_blake3, &got);
        res->downloaded_bytes += got.received;
        res->resumed_bytes += got.resumed_from;
    } else if (!(st = copy_beside(ctx, location, partial, r->m.target_size)) && /* the copy is what is */
               (st = check_patch_file(ctx, partial, &whole)) == NNP_EINTEGRITY) {     /* committed: checked once */
        unlink(partial);
    }
    if (!st && !(st = commit_file(ctx, partial, r->model, model_sb->st_mode)))
        res->status = NNP_UPDATE_UPDATED;
out:
    free(location);
    free(partial);
    return st;
}

static nnp_status update(run *r)
{
    nnp_ctx *ctx = r->ctx;
    nnp_update_result *res = r->res;
    const uint8_t *key = ctx->have_key ? ctx->key : NULL;
    struct stat sb;
    if (stat(r->model, &sb) != 0)
        return np_fail(ctx, NNP_KIND_IO, "%s: no such file or directory", r->model);
    if (S_ISDIR(sb.st_mode) && r->opt.fallback_full) /* updater.py's words (and status) for a directory */
        return np_fail(ctx, NNP_KIND_NO_UPDATE_PATH, "%s: a model directory; the native updater updates model "
                       "files, and a full download replaces a model file only", r->model);
    if (S_ISDIR(sb.st_mode))
        return np_fail(ctx, NNP_KIND_WEIGHTS, "%s: a model directory; the native updater updates model files",
                       r->model);
    nnp_status st = recover_first(r);
    if (st)
        return st;
    long long free_space = free_beside(r->model); /* before this update writes anything */
    np_state state;
    int have_state;
    if ((st = np_state_read(ctx, r->model, &state, &have_state)))
        return st;
    if (have_state && !key) {
        char *sp = np_state_path(r->model);
        st = np_fail(ctx, NNP_KIND_INTEGRITY, "%s: this device follows a signed feed (key %s, release %llu, %s); "
                     "pass --key to update it", r->model, state.key_id, (unsigned long long)state.release,
                     sp ? sp : "");
        free(sp);
        return st;
    }
    if ((st = fetch_manifest(r, key)))
        return st;
    const char *src = r->opt.manifest;
    long long now = r->opt.now ? r->opt.now : (long long)time(NULL);
    if ((st = np_check_fresh(ctx, &r->m, now, src)))
        return st;
    if (key) {
        if ((st = np_check_not_older(ctx, &r->m, have_state ? &state : NULL, src)))
            return st;
        if (!r->opt.dry_run && (st = accept(r, now))) /* before any patch is fetched (MANIFEST.md step 5) */
            return st;
    }
    /* what the result says from here on */
    res->has_release = r->m.has_release;
    res->release = r->m.release;
    set_name(res->expires, sizeof res->expires, r->m.expires);
    set_name(res->to_name, sizeof res->to_name, r->m.target_name);
    res->is_signed = r->opened.is_signed;
    set_name(res->key_id, sizeof res->key_id, r->opened.verified ? r->opened.key_id : NULL);
    res->in_place = r->opt.in_place == 1;
    uint8_t current[32];
    if ((st = nnp_hash_file(ctx, r->model, current)))
        return st;
    np_hex(current, 32, res->from_blake3);
    np_hex(r->m.target_blake3, 32, res->to_blake3);
    if (!memcmp(current, r->m.target_blake3, 32)) {
        /* a download an earlier run left (killed between its apply and its clean-up) is worth nothing now */
        if (!r->opt.dry_run)
            remove_stale_partials(r->model, NULL, 0);
        res->status = NNP_UPDATE_CURRENT;
        set_name(res->from_name, sizeof res->from_name, r->m.target_name);
        return NNP_OK;
    }
    const np_mbase *e = NULL;
    for (size_t i = 0; i < r->m.nbases && !e; i++)
        if (!memcmp(r->m.bases[i].base_blake3, current, 32))
            e = &r->m.bases[i];
    if (!e && r->opt.fallback_full && r->m.has_full)
        return fall_back_to_full(r, &sb, free_space);
    if (!e)
        return np_fail(ctx, NNP_KIND_NO_UPDATE_PATH, "%s: no patch for this model version (BLAKE3 %s) in %s: a full "
                       "download is needed%s", r->model, res->from_blake3, src,
                       r->opt.fallback_full ? " and the manifest lists no full model"
                       : r->m.has_full     ? "; --fallback full downloads it" : "");
    if ((uint64_t)sb.st_size != e->base_size)
        return np_fail(ctx, NNP_KIND_INTEGRITY, "%s: %llu bytes, the manifest says %llu for BLAKE3 %s", r->model,
                       (unsigned long long)sb.st_size, (unsigned long long)e->base_size, res->from_blake3);
    const np_mlink *links[NP_MAX_CHAIN_LINKS];
    int chain = e->has_chain && (r->opt.prefer == NNP_PREFER_CHAIN ||
                                 (r->opt.prefer == NNP_PREFER_SMALLEST && e->chain_size < e->direct.patch_size));
    r->nlinks = chain ? e->nlinks : 1;
    for (size_t i = 0; i < r->nlinks; i++)
        links[i] = chain ? &e->links[i] : &e->direct;
    if (memcmp(links[r->nlinks - 1]->target_blake3, r->m.target_blake3, 32))
        return np_fail(ctx, NNP_KIND_INTEGRITY, "%s: the manifest's patches do not lead to its target", src);
    set_name(res->from_name, sizeof res->from_name, e->name);
    res->npatches = r->nlinks;
    for (size_t i = 0; i < r->nlinks; i++) {
        set_name(res->patches[i], sizeof res->patches[i], links[i]->patch);
        res->patch_bytes += links[i]->patch_size;
    }
    r->where = r->m.base_url ? strdup(r->m.base_url) : parent_of(src);
    if (!r->where)
        return np_fail(ctx, NNP_KIND_IO, "out of memory");
    int in_place, for_room;
    uint64_t download = np_is_url(r->where) ? download_need(r->model, links, r->nlinks) : 0;
    if ((st = choose_in_place(ctx, r->model, r->opt.in_place, download, r->m.target_size, free_space, &in_place,
                              &for_room)))
        return st;
    res->in_place = in_place;
    res->in_place_for_room = for_room;
    if (r->opt.dry_run) {
        res->status = NNP_UPDATE_WOULD_UPDATE;
        return NNP_OK;
    }
    if ((st = fetch_patches(r, links)))
        return st;
    if ((st = check_links(ctx, r->paths, links, r->nlinks, current)))
        return st;
    const char *const *paths = (const char *const *)r->paths;
    st = in_place ? nnp_apply_in_place(ctx, r->model, paths, r->nlinks)
                         : nnp_apply(ctx, r->model, paths, r->nlinks, r->model);
    if (st)
        return st;
    for (size_t i = 0; i < r->npartials; i++)
        unlink(r->partials[i]);
    res->status = NNP_UPDATE_UPDATED;
    return NNP_OK;
}

nnp_status nnp_update(nnp_ctx *ctx, const char *model_path, const nnp_update_options *options,
                      nnp_update_result *result)
{
    if (!ctx)
        return NNP_EUSAGE;
    np_clear(ctx);
    if (!model_path || !options || !options->manifest)
        return np_fail(ctx, NNP_KIND_USAGE, "nnp_update needs a model, options and a manifest");
    /* a shorter (older) options struct: the members it lacks are zero; a longer one is unknown */
    if (options->size < offsetof(nnp_update_options, in_place) || options->size > sizeof *options)
        return np_fail(ctx, NNP_KIND_USAGE, "nnp_update: options of %zu bytes (use NNP_UPDATE_OPTIONS_INIT)",
                       options->size);
    /* a shorter (older) result struct gets the members it has */
    if (result && (result->size < offsetof(nnp_update_result, full) || result->size > sizeof *result))
        return np_fail(ctx, NNP_KIND_USAGE, "nnp_update: a result of %zu bytes (use NNP_UPDATE_RESULT_INIT)",
                       result->size);
    run r;
    memset(&r, 0, sizeof r);
    memcpy(&r.opt, options, options->size);
    r.opt.size = sizeof r.opt;
    if ((unsigned)r.opt.prefer > NNP_PREFER_CHAIN)
        return np_fail(ctx, NNP_KIND_USAGE, "prefer must be direct, smallest or chain");
    nnp_update_result local = NNP_UPDATE_RESULT_INIT;
    r.ctx = ctx;
    r.model = model_path;
    r.res = &local;
    nnp_status st = update(&r);
    if (!st && result) {
        local.size = result->size;
        memcpy(result, &local, result->size);
    }
    for (size_t i = 0; i < NP_MAX_CHAIN_LINKS; i++) {
        free(r.paths[i]);
        free(r.partials[i]);
    }
    free(r.where);
    np_manifest_free(&r.m);
    np_opened_free(&r.opened);
    return st;
}
