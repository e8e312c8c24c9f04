/* Files: temporary files beside a destination, commit by fsync + rename + directory fsync,
 * copies between files (copy_file_range, else through the maps), base sniffing, and the shared
 * descriptor helpers. Python twin: nnpatch/atomic.py and nnpatch/applier/oscopy.py. */
#ifndef NNP_FILEIO_H
#define NNP_FILEIO_H

#include <stddef.h>
#include <stdint.h>

#include "internal.h"

typedef struct np_tmp {
    char *path; /* the temporary file; NULL when none */
    char *dest;
    int fd;
} np_tmp;

/* Create "<dir of dest>/.<name of dest>.<random><suffix>" (O_EXCL, mode 0644 less the umask). */
nnp_status np_tmp_create(nnp_ctx *ctx, const char *dest, const char *suffix, np_tmp *t);
/* fsync, close, rename over dest, fsync the directory. t is cleared. */
nnp_status np_tmp_commit(nnp_ctx *ctx, np_tmp *t, const char *what);
/* Close and remove (safe twice). */
void np_tmp_abort(np_tmp *t);

/* Reserve size bytes (disk full is reported now, not as SIGBUS on a mapped write). */
nnp_status np_reserve(nnp_ctx *ctx, int fd, uint64_t size, const char *path);

/* Copy n bytes in_fd@in_off -> out_fd@out_off; falls back to memcpy between the maps. */
nnp_status np_copy_range(nnp_ctx *ctx, int in_fd, uint64_t in_off, int out_fd, uint64_t out_off, uint64_t n,
                         const uint8_t *in_map, uint8_t *out_map, const char *out_path);

/* Start writing back dirty pages of a range (bounded page cache); no-op where unsupported. */
void np_writeback(int fd, uint64_t off, uint64_t n);

/* The kind of model at path: "safetensors", or a NULL return with a WEIGHTS/IO failure set
 * naming what it is ("a model directory", "a PyTorch checkpoint", "an ONNX model"). */
nnp_status np_sniff_safetensors(nnp_ctx *ctx, const char *path);

/* The folder holding path ("." for a bare name, "/" at the root), malloc'd, or NULL. */
char *np_dir_of(const char *path);

/* fsync the directory holding `path`: 0, or the errno of a failure other than a file system that
 * cannot sync directories (as Python's fsync_dir; callers that want it best effort ignore it, the
 * journal's commit point does not). */
int np_fsync_dir_of(const char *path);

/* Write all n bytes (EINTR retried): 0, or the errno of the failure. */
int np_write_all(int fd, const void *buf, size_t n);
/* Write all n bytes at off (EINTR retried): 0, or the errno of the failure. */
int np_pwrite_all(int fd, const void *buf, size_t n, uint64_t off);
/* Read up to n bytes at off into buf, stopping early only at the end of the file: 0 with *got
 * set, or -1 with errno set. */
int np_pread_all(int fd, void *buf, size_t n, uint64_t off, size_t *got);
/* Whether something (a dangling link too) has this name. */
int np_lexists(const char *path);

#endif
