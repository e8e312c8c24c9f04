/*
 * The hashing threads and chaining-value reuse (hashpool.c); Python twin: the hashing of
 * nnpatch/applier/engine.py.
 */
#ifndef NNP_HASHPOOL_H
#define NNP_HASHPOOL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "internal.h"

/* The BLAKE3 digest of each range into its `out`, on the hashing threads (cpus-1 helpers, at
 * most NP_HASHERS_MAX) and the calling thread; `count` bytes a range go to progress. Every digest
 * is in when it returns NNP_OK; the caller compares them, in its own order. */
typedef struct np_hash_range {
    const uint8_t *p;
    uint64_t n, count;
    uint8_t *out;
} np_hash_range;
nnp_status np_hash_ranges(nnp_ctx *ctx, const np_hash_range *ranges, size_t n);

/* The BLAKE3 of p[0 .. n) (a whole file, mapped), hashed in pieces of whole subtrees on the
 * hashing threads, joined on the calling thread; n bytes go to progress. */
nnp_status np_hash_file(nnp_ctx *ctx, const uint8_t *p, uint64_t n, uint8_t out[32]);

/*
 * Chaining-value reuse (blake3.h np_blake3_hash_keep / np_blake3_hash_reuse). A tensor that only
 * rows, elements or qrows ops change keeps most of its bytes: the result's bytes outside the
 * units the ops write are the base's bytes, copied, at the same offsets (the digest is of the
 * tensor's bytes alone, chunk counters from 0). So when its base tensor is hashed anyway (it is
 * checked against the patch), the hasher keeps the chaining values of its 64 KiB subtrees (and,
 * in those the ops write into, of their 4 KiB subtrees); the result is then hashed from those
 * and from the bytes of the 4 KiB subtrees the ops write (as written), which gives exactly the
 * digest of the result's bytes when the base is the one checked. The marks come from the ops'
 * indices, decoded before the base job is queued. Memory: 34 bytes per 64 KiB of such a tensor,
 * 512 more per 64 KiB subtree with a change; freed once the result is hashed.
 */
typedef struct np_reuse {
    size_t nsub;            /* np_blake3_subtrees(nbytes) >= 1 */
    uint16_t *dirty;        /* nsub masks of 16 fine subtrees */
    uint8_t *sub_cv, *fine_cv;
    int done;               /* the base job has written sub_cv and fine_cv (under the pool's lock) */
} np_reuse;
void np_reuse_free(np_reuse *r);

/* Hashing threads: a queue of (range, digest) jobs, each hashed exactly once (its digest
 * written by one thread only). The engine (engine.c) queues the base tensors no touched item starts from,
 * then, item by item, the base tensor a touched item starts from (before it is copied) and the
 * output tensor (once its ops have run); the main thread only copies and patches, then joins in.
 * Every digest is compared on the main thread, after np_hpool_settle, in the order a serial pass
 * would have met it, so the first error reported stays the same. The queue is sized up front:
 * one job per base tensor and two per item at most. */
typedef struct np_hjob {
    const uint8_t *p;
    uint64_t n, count; /* count: the bytes it adds to progress */
    uint8_t *out;
    int fd; /* >= 0: a range of the new file (mapped at p, at offset off of fd), released once hashed */
    uint64_t off;
    np_reuse *r; /* a base job keeps chaining values in it, a result job (fd >= 0) hashes from them */
    int cvs;     /* a piece of a file hash: the chaining values of its whole subtrees (np_hash_file) */
    size_t first; /* with cvs: the index of the piece's first subtree in the file */
} np_hjob;

typedef struct np_hpool {
    pthread_mutex_t mu;
    pthread_cond_t more, idle; /* a job was queued (or the queue closed); no job is being hashed */
    pthread_cond_t kept;       /* a base job's chaining values are in (reuse.done) */
    np_hjob *jobs;
    size_t n, next, busy;
    int closed;
    uint64_t hashed;
    nnp_ctx *ctx;
} np_hpool;

/* Set up a pool over a queue of jobs (sized by the caller up front); no thread yet. */
void np_hpool_init(np_hpool *h, nnp_ctx *ctx, np_hjob *jobs);
/* Helper threads for the pool: cpus-1 of them, at most `most` (<= NP_HASHERS_MAX); the count started. */
#define NP_HASHERS_MAX 7
int np_hpool_start(np_hpool *h, pthread_t threads[NP_HASHERS_MAX], size_t most);
/* Queue one job (fd >= 0: a range of the new file, released once hashed; r: see np_reuse). */
void np_hpool_push(np_hpool *h, const uint8_t *p, uint64_t n, uint64_t count, uint8_t *out, int fd, uint64_t off,
                   np_reuse *r);
/* The progress bytes hashed since the last call. */
uint64_t np_hpool_take(np_hpool *h);
/* The calling thread joins in until every queued job is hashed (progress reported as it goes). */
nnp_status np_hpool_settle(nnp_ctx *ctx, np_hpool *h);
/* Stop the workers: nothing more is taken; what is being hashed is finished. */
void np_hpool_close(np_hpool *h, pthread_t *threads, int *nthreads);
void np_hpool_destroy(np_hpool *h);

/* A range of the new file is done with: dropped from the map, its write-back started. */
void np_release_range(uint8_t *p, uint64_t n, int fd, uint64_t off);

#endif
