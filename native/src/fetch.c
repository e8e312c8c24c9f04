/* Python twin: nnpatch/delivery/fetch.py
 *
 * The library never opens a connection: the app's fetch callback (nnp_fetch_fn) does, and this
 * room decides what its bytes are worth. A piece is placed by its position in the resource, so a
 * server that ignored a Range request costs a re-read, never a wrong byte; nothing past the
 * manifest's size is kept; a cut, stall or busy server is tried again after a growing pause; a
 * finished file must have the manifest's BLAKE3, and a resumed one that does not is fetched once
 * more from byte 0 before it is refused (a byte flipped in transit, a file changed under a resume). */
#include "fetch.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "blake3.h"
#include "fileio.h"
#include "hashpool.h"
#include "manifest.h"

nnp_status np_hash_fd(nnp_ctx *ctx, int fd, uint64_t size, const char *path, uint8_t out[32])
{
    if (size == 0) {
        np_blake3_hash(NULL, 0, out);
        return NNP_OK;
    }
    if (size > SIZE_MAX)
        return np_fail(ctx, NNP_KIND_IO, "%s: too large to map", path);
    void *m = mmap(NULL, (size_t)size, PROT_READ, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED)
        return np_fail_errno(ctx, errno, path, "cannot map");
    nnp_status st = np_hash_file(ctx, m, size, out); /* the hashing threads: a model can be gigabytes */
    munmap(m, (size_t)size);
    return st;
}

/* Sleep ms, waking every 50 ms to see a cancel, and to report progress (no new bytes): a
 * progress callback that stops the update (a Java thread's interrupt, seen by the JNI glue's)
 * is heard during a pause too, not only at the next try. */
static nnp_status pause_ms(nnp_ctx *ctx, unsigned ms)
{
    while (ms) {
        unsigned step = ms < 50 ? ms : 50;
        struct timespec ts = {0, (long)step * 1000000L};
        nanosleep(&ts, NULL);
        ms -= step;
        if (np_progress(ctx, 0))
            return NNP_ECANCELLED;
    }
    return NNP_OK;
}

/* ---- where the bytes go --------------------------------------------------------------------- */

typedef struct sink {
    nnp_ctx *ctx;
    uint64_t pos, cap; /* bytes held; the most to hold */
    int fd;            /* a partial file, or -1: into mem */
    uint8_t *mem;
    const char *path;
    int gap;           /* a piece began past pos: the server did not send what was asked */
    int failed;        /* a write failed: ctx holds why (never worth another try) */
    uint64_t received;
} sink;

static int take(void *user, uint64_t at, const uint8_t *buf, size_t len)
{
    sink *s = user;
    if (np_cancelled(s->ctx))
        return 1;
    if (at > s->pos) {
        s->gap = 1;
        return 1;
    }
    uint64_t skip = s->pos - at; /* bytes this piece repeats (a range ignored): already held */
    if (skip >= len)
        return s->pos >= s->cap;
    buf += skip;
    len -= (size_t)skip;
    if (len > s->cap - s->pos)
        len = (size_t)(s->cap - s->pos);
    if (s->fd >= 0) {
        if (pwrite(s->fd, buf, len, (off_t)s->pos) != (ssize_t)len) {
            int e = errno ? errno : ENOSPC;
            np_fail_errno(s->ctx, e, s->path, "cannot write");
            s->failed = 1;
            return 1;
        }
    } else {
        memcpy(s->mem + s->pos, buf, len);
    }
    s->pos += len;
    s->received += len;
    if (np_progress(s->ctx, len) != NNP_OK)
        return 1;
    return s->pos >= s->cap;
}

typedef enum { TRY_OK, TRY_AGAIN, TRY_STOP } try_result;

/* One request for what s lacks. TRY_STOP: ctx holds the status to return. */
static try_result one_try(nnp_ctx *ctx, const nnp_update_options *opt, const char *url, sink *s, int exact,
                          char *why, size_t whylen)
{
    why[0] = 0;
    s->gap = 0;
    uint64_t from = s->pos;
    int r = opt->fetch(opt->fetch_user, url, from, s->cap - from, take, s, why, whylen);
    if (s->failed)
        return TRY_STOP;
    if (np_check_cancel(ctx))
        return TRY_STOP;
    if (s->gap) {
        snprintf(why, whylen, "%s: the server sent bytes past %llu where bytes %llu- were asked for", url,
                 (unsigned long long)from, (unsigned long long)from);
        return TRY_AGAIN;
    }
    if (r == NNP_FETCH_RESTART) { /* what it holds does not fit the server's file now: from byte 0 */
        if (s->fd >= 0 && ftruncate(s->fd, 0) != 0) {
            np_fail_errno(ctx, errno, s->path, "cannot truncate");
            return TRY_STOP;
        }
        s->pos = 0;
        if (!why[0])
            snprintf(why, whylen, "%s: the server's file does not fit the partial download", url);
        return TRY_AGAIN;
    }
    if (r == NNP_FETCH_FAIL) {
        np_fail(ctx, NNP_KIND_IO, "%s", why[0] ? why : url);
        return TRY_STOP;
    }
    if (r != NNP_FETCH_OK) {
        if (!why[0])
            snprintf(why, whylen, "%s: the transfer failed", url);
        return TRY_AGAIN;
    }
    if (exact && s->pos < s->cap) {
        snprintf(why, whylen, "%s: the connection closed after %llu of %llu bytes", url,
                 (unsigned long long)s->pos, (unsigned long long)s->cap);
        return TRY_AGAIN;
    }
    return TRY_OK;
}

/* Try until done, pausing after each transient failure. */
static nnp_status tries(nnp_ctx *ctx, const nnp_update_options *opt, const char *url, sink *s, int exact)
{
    char why[NP_MSG_MAX / 2] = "";
    unsigned pause = opt->backoff_ms;
    for (unsigned n = 0; n <= opt->retries; n++) {
        if (np_check_cancel(ctx)) /* a context cancelled before the update began fetches nothing */
            return NNP_ECANCELLED;
        if (n) {
            nnp_status p = pause_ms(ctx, pause);
            if (p)
                return p;
            pause = pause > (1u << 30) ? pause : pause * 2;
        }
        try_result r = one_try(ctx, opt, url, s, exact, why, sizeof why);
        if (r == TRY_OK)
            return NNP_OK;
        if (r == TRY_STOP)
            return np_check_cancel(ctx) ? NNP_ECANCELLED : np_status_of(nnp_error(ctx));
    }
    return np_fail(ctx, NNP_KIND_IO, "%s (gave up after %u tries)", why, opt->retries + 1);
}

nnp_status np_read_small(nnp_ctx *ctx, const nnp_update_options *opt, const char *location, size_t limit,
                         uint8_t **out, size_t *len)
{
    *out = malloc(limit + 1);
    *len = 0;
    if (!*out)
        return np_fail(ctx, NNP_KIND_IO, "%s: out of memory", location);
    if (!np_is_url(location)) {
        int fd = open(location, O_RDONLY | O_CLOEXEC);
        size_t got = 0;
        if (fd < 0 || np_pread_all(fd, *out, limit + 1, 0, &got) != 0) {
            int e = errno;
            if (fd >= 0)
                close(fd);
            free(*out);
            *out = NULL;
            return np_fail_errno(ctx, e, location, "cannot read");
        }
        close(fd);
        *len = got;
        return NNP_OK;
    }
    if (!opt->fetch) {
        free(*out);
        *out = NULL;
        return np_fail(ctx, NNP_KIND_USAGE, "%s: a URL, and no fetch callback was given", location);
    }
    sink s = {ctx, 0, (uint64_t)limit + 1, -1, *out, location, 0, 0, 0};
    nnp_status st = tries(ctx, opt, location, &s, 0);
    if (st) {
        free(*out);
        *out = NULL;
        return st;
    }
    *len = (size_t)s.pos;
    return NNP_OK;
}

static nnp_status fill_and_prove(nnp_ctx *ctx, const nnp_update_options *opt, const char *url, int fd,
                                 const char *partial, uint64_t size, const uint8_t want[32], np_dlstats *stats)
{
    struct stat sb;
    if (fstat(fd, &sb) != 0)
        return np_fail_errno(ctx, errno, partial, "cannot stat");
    uint64_t have = (uint64_t)sb.st_size;
    if (have > size) {
        if (ftruncate(fd, 0) != 0)
            return np_fail_errno(ctx, errno, partial, "cannot truncate");
        have = 0;
    }
    stats->resumed_from = have;
    for (int fresh = 0; fresh < 2; fresh++) {
        if (fresh) {
            if (ftruncate(fd, 0) != 0)
                return np_fail_errno(ctx, errno, partial, "cannot truncate");
            have = 0;
        }
        sink s = {ctx, have, size, fd, NULL, partial, 0, 0, 0};
        nnp_status st = tries(ctx, opt, url, &s, 1);
        stats->received += s.received;
        if (st)
            return st;
        if (fsync(fd) != 0)
            return np_fail_errno(ctx, errno, partial, "cannot sync");
        uint8_t got[32];
        if ((st = np_hash_fd(ctx, fd, size, partial, got)))
            return st;
        if (!memcmp(got, want, 32))
            return NNP_OK;
        if (fresh) {
            char a[65], b[65];
            np_hex(got, 32, a);
            np_hex(want, 32, b);
            return np_fail(ctx, NNP_KIND_INTEGRITY, "%s: downloaded BLAKE3 %s does not match the manifest's %s", url,
                           a, b);
        }
    }
    return NNP_OK;
}

/* Why a file nnpatch keeps beside a model is not one it may reuse (sidefile.py's why_not_own), or NULL. */
static const char *why_not_own(const struct stat *sb)
{
    if (!S_ISREG(sb->st_mode))
        return "is not a regular file";
    if (sb->st_nlink != 1)
        return "has more than one link (a hard link to another file)";
    if (sb->st_uid != geteuid())
        return "belongs to another user";
    return NULL;
}

nnp_status np_open_partial(nnp_ctx *ctx, const char *partial, int *fd_out)
{
    /* O_NOFOLLOW: a symlink planted under the name is refused by the kernel, not after a check that
     * could race; O_NONBLOCK: a FIFO opens at once instead of waiting for a writer. Whatever is not
     * our own regular file holds nothing worth keeping: its name is removed (never what it points
     * at) and the file created afresh (SECURITY.md, "Files beside the model"). */
    for (int tries = 0; tries < 3; tries++) {
        int fd = open(partial, O_RDWR | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0 && errno == ENOENT) {
            fd = open(partial, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
            if (fd < 0 && errno == EEXIST)
                continue;
            if (fd < 0)
                return np_fail_errno(ctx, errno, partial, "cannot create the partial download");
            *fd_out = fd;
            return NNP_OK;
        }
        if (fd < 0) {
            int e = errno;
            if (e != ELOOP && e != ENXIO && e != EISDIR && e != EACCES && e != EPERM)
                return np_fail_errno(ctx, e, partial, "cannot open the partial download");
            if (unlink(partial) != 0 && errno != ENOENT)
                return np_fail_errno(ctx, errno, partial, "cannot remove what lies under the partial download's name");
            continue;
        }
        struct stat sb;
        if (fstat(fd, &sb) != 0) {
            int e = errno;
            close(fd);
            return np_fail_errno(ctx, e, partial, "cannot read the partial download");
        }
        if (!why_not_own(&sb)) {
            int fl = fcntl(fd, F_GETFL);
            if (fl >= 0)
                fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
            *fd_out = fd;
            return NNP_OK;
        }
        close(fd);
        if (unlink(partial) != 0 && errno != ENOENT)
            return np_fail(ctx, NNP_KIND_IO, "%s: the partial download %s, and it cannot be removed: %s", partial,
                           why_not_own(&sb), strerror(errno));
    }
    return np_fail(ctx, NNP_KIND_IO, "%s: the partial download keeps changing under nnpatch; is another process "
                   "writing it?", partial);
}

nnp_status np_download(nnp_ctx *ctx, const nnp_update_options *opt, const char *url, const char *partial,
                       uint64_t size, const uint8_t blake3[32], np_dlstats *stats)
{
    memset(stats, 0, sizeof *stats);
    if (!opt->fetch)
        return np_fail(ctx, NNP_KIND_USAGE, "%s: a URL, and no fetch callback was given", url);
    int fd;
    nnp_status opened = np_open_partial(ctx, partial, &fd);
    if (opened)
        return opened;
    /* two updaters appending to one partial file would only make garbage */
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        close(fd);
        return np_fail(ctx, NNP_KIND_IO, "%s: another update is downloading this patch", partial);
    }
    nnp_status st = fill_and_prove(ctx, opt, url, fd, partial, size, blake3, stats);
    struct stat sb;
    /* the server's file is not the manifest's: nothing in it is worth resuming; an empty one is
     * not worth keeping either; anything else is kept for the next run to continue */
    if (st == NNP_EINTEGRITY || (st && fstat(fd, &sb) == 0 && sb.st_size == 0))
        unlink(partial);
    close(fd);
    return st;
}
