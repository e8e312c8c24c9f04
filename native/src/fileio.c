/* Files: temporary files beside a destination and their commit, copies between files, and the
 * small descriptor helpers the other modules share (whole writes, whole reads, directory fsync).
 * Python twin: nnpatch/atomic.py (temporary file, rename, fsync_dir), with the copies of
 * nnpatch/applier/oscopy.py. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#ifdef __linux__
#include <sys/syscall.h>
#endif
#include <time.h>
#include <unistd.h>

#include "fileio.h"

char *np_dir_of(const char *path)
{
    const char *slash = strrchr(path, '/');
    if (!slash)
        return strdup(".");
    if (slash == path)
        return strdup("/");
    return strndup(path, (size_t)(slash - path));
}

int np_fsync_dir_of(const char *path)
{
    char *dir = np_dir_of(path);
    if (!dir)
        return 0;
    int err = 0;
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) { /* some file systems cannot open directories: nothing to sync then */
        if (fsync(fd) != 0)
            err = errno;
        close(fd);
    }
    free(dir);
    /* a file system that cannot sync directories at all: its entries are as durable as it makes them */
    if (err == EINVAL || err == EBADF || err == ENOTSUP || err == EOPNOTSUPP)
        err = 0;
    return err;
}

int np_write_all(int fd, const void *buf, size_t n)
{
    const uint8_t *p = buf;
    while (n) {
        ssize_t k = write(fd, p, n);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

int np_pwrite_all(int fd, const void *buf, size_t n, uint64_t off)
{
    const uint8_t *p = buf;
    while (n) {
        ssize_t k = pwrite(fd, p, n, (off_t)off);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (k == 0)
            return EIO;
        p += k;
        n -= (size_t)k;
        off += (uint64_t)k;
    }
    return 0;
}

int np_pread_all(int fd, void *buf, size_t n, uint64_t off, size_t *got)
{
    uint8_t *p = buf;
    size_t done = 0;
    while (done < n) {
        ssize_t k = pread(fd, p + done, n - done, (off_t)(off + done));
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (k == 0)
            break;
        done += (size_t)k;
    }
    *got = done;
    return 0;
}

int np_lexists(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0;
}

nnp_status np_tmp_create(nnp_ctx *ctx, const char *dest, const char *suffix, np_tmp *t)
{
    memset(t, 0, sizeof *t);
    t->fd = -1;
    char *dir = np_dir_of(dest);
    const char *base = strrchr(dest, '/');
    base = base ? base + 1 : dest;
    size_t cap = strlen(dest) + strlen(suffix) + 64;
    t->path = malloc(cap);
    t->dest = strdup(dest);
    if (!dir || !t->path || !t->dest) {
        free(dir);
        np_tmp_abort(t);
        return np_fail(ctx, NNP_KIND_IO, "%s: out of memory", dest);
    }
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t seed = (uint64_t)ts.tv_nsec * 6364136223846793005ULL ^ (uint64_t)ts.tv_sec ^ ((uint64_t)getpid() << 32) ^
                    (uint64_t)(uintptr_t)t;
    for (int attempt = 0; attempt < 100; attempt++) {
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        snprintf(t->path, cap, "%s/.%.100s.%08llx%s", dir, base, (unsigned long long)(seed >> 32), suffix);
        t->fd = open(t->path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (t->fd >= 0)
            break;
        if (errno != EEXIST) {
            nnp_status st = np_fail_errno(ctx, errno, dest, "cannot write");
            free(dir);
            free(t->path);
            t->path = NULL;
            np_tmp_abort(t);
            return st;
        }
    }
    free(dir);
    if (t->fd < 0) {
        free(t->path);
        t->path = NULL;
        np_tmp_abort(t);
        return np_fail(ctx, NNP_KIND_IO, "%s: cannot create a temporary file beside it", dest);
    }
    return NNP_OK;
}

void np_tmp_abort(np_tmp *t)
{
    if (t->fd >= 0)
        close(t->fd);
    t->fd = -1;
    if (t->path)
        unlink(t->path);
    free(t->path);
    free(t->dest);
    t->path = t->dest = NULL;
}

nnp_status np_tmp_commit(nnp_ctx *ctx, np_tmp *t, const char *what)
{
    (void)what;
    if (fsync(t->fd) != 0) {
        nnp_status st = np_fail_errno(ctx, errno, t->dest, "cannot write");
        np_tmp_abort(t);
        return st;
    }
    if (close(t->fd) != 0) {
        t->fd = -1;
        nnp_status st = np_fail_errno(ctx, errno, t->dest, "cannot write");
        np_tmp_abort(t);
        return st;
    }
    t->fd = -1;
    if (rename(t->path, t->dest) != 0) {
        nnp_status st = np_fail_errno(ctx, errno, t->dest, "cannot write");
        np_tmp_abort(t);
        return st;
    }
    (void)np_fsync_dir_of(t->dest); /* best effort: the file is whole and renamed already */
    free(t->path);
    free(t->dest);
    t->path = t->dest = NULL;
    return NNP_OK;
}

nnp_status np_reserve(nnp_ctx *ctx, int fd, uint64_t size, const char *path)
{
    if (size == 0)
        return NNP_OK;
    if ((uint64_t)(off_t)size != size || (off_t)size < 0)
        return np_fail(ctx, NNP_KIND_IO, "%s: cannot write %llu bytes", path, (unsigned long long)size);
#ifdef __linux__
    if (fallocate(fd, 0, 0, (off_t)size) == 0)
        return NNP_OK;
    if (errno == ENOSPC || errno == EFBIG || errno == EDQUOT)
        return np_fail(ctx, NNP_KIND_IO, "%s: cannot write the new model (%llu bytes): %s", path,
                       (unsigned long long)size, strerror(errno));
#endif
#if defined(__APPLE__)
    /* macOS and iOS: no posix_fallocate; F_PREALLOCATE reserves the blocks */
    fstore_t fs = {F_ALLOCATEALL, F_PEOFPOSMODE, 0, (off_t)size, 0};
    if (fcntl(fd, F_PREALLOCATE, &fs) != 0 && (errno == ENOSPC || errno == EDQUOT))
        return np_fail(ctx, NNP_KIND_IO, "%s: cannot write the new model (%llu bytes): %s", path,
                       (unsigned long long)size, strerror(errno));
#else
    int e = posix_fallocate(fd, 0, (off_t)size);
    if (e == 0)
        return NNP_OK;
    if (e == ENOSPC || e == EFBIG || e == EDQUOT)
        return np_fail(ctx, NNP_KIND_IO, "%s: cannot write the new model (%llu bytes): %s", path,
                       (unsigned long long)size, strerror(e));
#endif
    if (ftruncate(fd, (off_t)size) != 0)
        return np_fail_errno(ctx, errno, path, "cannot write");
    return NNP_OK;
}

nnp_status np_copy_range(nnp_ctx *ctx, int in_fd, uint64_t in_off, int out_fd, uint64_t out_off, uint64_t n,
                         const uint8_t *in_map, uint8_t *out_map, const char *out_path)
{
#if defined(__linux__) && defined(SYS_copy_file_range)
    /* the system call itself: older C libraries (Android before API 34) have no wrapper */
    int64_t a = (int64_t)in_off, b = (int64_t)out_off;
    while (n) {
        size_t k = n > ((uint64_t)1 << 30) ? (size_t)1 << 30 : (size_t)n;
        ssize_t r = (ssize_t)syscall(SYS_copy_file_range, in_fd, &a, out_fd, &b, k, 0u);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break; /* EXDEV, EINVAL, ENOSYS, EOPNOTSUPP, ...: the maps below */
        n -= (uint64_t)r;
    }
    in_off = (uint64_t)a;
    out_off = (uint64_t)b;
#else
    (void)in_fd;
    (void)out_fd;
#endif
    (void)out_path;
    (void)ctx;
    if (n)
        memcpy(out_map + out_off, in_map + in_off, (size_t)n);
    return NNP_OK;
}

void np_writeback(int fd, uint64_t off, uint64_t n)
{
#ifdef __linux__
    if (n)
        sync_file_range(fd, (off_t)off, (off_t)n, SYNC_FILE_RANGE_WRITE);
#else
    (void)fd;
    (void)off;
    (void)n;
#endif
}

nnp_status np_sniff_safetensors(nnp_ctx *ctx, const char *path)
{
    struct stat sb;
    if (stat(path, &sb) != 0)
        return np_fail_errno(ctx, errno, path, "cannot open");
    if (S_ISDIR(sb.st_mode))
        return np_fail(ctx, NNP_KIND_WEIGHTS,
                       "%s: a model directory: nnpatch-apply reads safetensors files only (use `nnpatch apply`)", path);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return np_fail_errno(ctx, errno, path, "cannot open");
    uint8_t h[16];
    ssize_t n = pread(fd, h, sizeof h, 0);
    int e = errno;
    close(fd);
    if (n < 0)
        return np_fail_errno(ctx, e, path, "cannot read");
    if (n >= 9) {
        uint64_t len = np_le64(h);
        if (len <= 100000000ULL && 8 + len <= (uint64_t)sb.st_size && h[8] == '{')
            return NNP_OK;
    }
    if (n >= 4 && h[0] == 'P' && h[1] == 'K' && h[2] == 3 && h[3] == 4)
        return np_fail(ctx, NNP_KIND_WEIGHTS,
                       "%s: a zip archive (a PyTorch checkpoint?): nnpatch-apply reads safetensors files only "
                       "(use `nnpatch apply`)",
                       path);
    if (n >= 2 && h[0] == 0x80 && h[1] >= 2 && h[1] <= 5)
        return np_fail(ctx, NNP_KIND_WEIGHTS,
                       "%s: a PyTorch checkpoint (legacy pickle): nnpatch-apply reads safetensors files only (use "
                       "`nnpatch apply`)",
                       path);
    if (n >= 2 && h[0] == 0x08 && h[1] >= 1 && h[1] <= 64)
        return np_fail(ctx, NNP_KIND_WEIGHTS,
                       "%s: an ONNX model: nnpatch-apply reads safetensors files only (use `nnpatch apply`)", path);
    if (n >= 4 && !memcmp(h, "GGUF", 4)) /* applied through an extents patch only (extents.c) */
        return np_fail(ctx, NNP_KIND_WEIGHTS,
                       "%s: a GGUF file: nnpatch-apply reads one only as the base of a GGUF patch (this patch's base "
                       "is a safetensors file)",
                       path);
    return np_fail(ctx, NNP_KIND_WEIGHTS,
                   "%s: not a model nnpatch can read (safetensors, PyTorch checkpoint, ONNX, GGUF, or a Hugging Face "
                   "model directory)",
                   path);
}
