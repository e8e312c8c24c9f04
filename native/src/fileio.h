/* Files: temporary files beside a destination, commit by fsync + rename + directory fsync,
 * copies between files (copy_file_range, else through the maps), base sniffing. */
#ifndef NNP_FILEIO_H
#define NNP_FILEIO_H

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

#endif
