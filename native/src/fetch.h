/* Fetching a release's files through the app's fetch callback: small files (the manifest) into
 * memory, patches into a locked partial file beside the model, resumed, retried with a growing
 * pause, never more than the manifest's size, proven by BLAKE3 (nnpatch/delivery/fetch.py). */
#ifndef NNP_FETCH_H
#define NNP_FETCH_H

#include <stddef.h>
#include <stdint.h>

#include "internal.h"

/* At most limit + 1 bytes of a local file or (through opt->fetch) a URL: the caller refuses more. */
nnp_status np_read_small(nnp_ctx *ctx, const nnp_update_options *opt, const char *location, size_t limit,
                         uint8_t **out, size_t *len);

typedef struct np_download {
    uint64_t received;     /* bytes over the network */
    uint64_t resumed_from; /* bytes the partial file already held */
} np_dlstats;

/* Bring `partial` to exactly the `size` bytes at url whose BLAKE3 is blake3: continues what it
 * holds; kept on a network failure (for the next run), removed on a refused digest. */
nnp_status np_download(nnp_ctx *ctx, const nnp_update_options *opt, const char *url, const char *partial,
                       uint64_t size, const uint8_t blake3[32], np_dlstats *stats);

/* Open (read-write, blocking) or create the partial download `partial` beside a model: never
 * through a symlink, and only nnpatch's own regular file with one link; anything else under the
 * name is removed and the file created afresh (nnpatch/sidefile.py's open_beside). */
nnp_status np_open_partial(nnp_ctx *ctx, const char *partial, int *fd_out);

/* The BLAKE3 of an open file's first size bytes. */
nnp_status np_hash_fd(nnp_ctx *ctx, int fd, uint64_t size, const char *path, uint8_t out[32]);

#endif
