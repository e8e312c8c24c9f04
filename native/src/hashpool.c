/*
 * The hashing threads: a queue of (range, digest) jobs hashed on cpus-1 helper threads and the
 * calling thread, each digest written once; and the chaining-value reuse of a tensor that only
 * rows, elements or qrows ops change. Python twin: nnpatch/applier/engine.py, its hashing
 * (its worker threads hashing from the page cache). It answers "what is the BLAKE3 of each of
 * these ranges?", for the engine (engine.c) and the in-place path (inplace.c).
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "blake3.h"
#include "fileio.h"
#include "hashpool.h"

static void hash_range(const uint8_t *p, uint64_t n, uint8_t out[32])
{
    np_blake3_hash(p, (size_t)n, out);
}

void np_reuse_free(np_reuse *r)
{
    free(r->dirty);
    free(r->sub_cv);
    free(r->fine_cv);
    memset(r, 0, sizeof *r);
}

/* A range of the new file is done with: its pages leave this process's map, then their write-back
 * starts. In that order: cleaning a page that is still mapped writable costs a TLB shootdown of
 * its own (an interrupt to every CPU running a thread of this process, here the hashers); the
 * map's range is dropped with one. The data stays in the page cache (a shared file map). */
void np_release_range(uint8_t *p, uint64_t n, int fd, uint64_t off)
{
    if (!n)
        return;
#if defined(__linux__) && defined(MADV_DONTNEED) /* there, dropping a shared file map's pages keeps their data */
    long pg = sysconf(_SC_PAGESIZE);
    uintptr_t ps = pg > 0 ? (uintptr_t)pg : 4096, a = (uintptr_t)p & ~(ps - 1);
    uintptr_t e = ((uintptr_t)p + (uintptr_t)n + ps - 1) & ~(ps - 1);
    madvise((void *)a, e - a, MADV_DONTNEED);
#else
    (void)p;
#endif
    np_writeback(fd, off, n);
}

void np_hpool_push(np_hpool *h, const uint8_t *p, uint64_t n, uint64_t count, uint8_t *out, int fd, uint64_t off,
                       np_reuse *r)
{
    pthread_mutex_lock(&h->mu);
    h->jobs[h->n++] = (np_hjob){p, n, count, out, fd, off, r, 0, 0};
    pthread_cond_signal(&h->more);
    pthread_mutex_unlock(&h->mu);
}

/* Take and hash one job; the lock is held on entry and on return. 0 when none is left. */
static int hpool_run_one(np_hpool *h)
{
    if (h->next >= h->n || np_cancelled(h->ctx))
        return 0;
    np_hjob j = h->jobs[h->next++];
    h->busy++;
    /* a result job waits for its base job's chaining values: that job was queued before it, so it
     * has been taken, and it finishes without waiting for anything */
    while (j.r && j.fd >= 0 && !j.r->done)
        pthread_cond_wait(&h->kept, &h->mu);
    pthread_mutex_unlock(&h->mu);
    if (j.cvs) {
        np_blake3_subtree_cvs(NP_BLAKE3_IMPL_AUTO, j.p, j.first, (size_t)(j.n / NP_BLAKE3_SUB_LEN), j.out);
    } else if (!j.r) {
        hash_range(j.p, j.n, j.out);
    } else if (j.fd < 0) {
        np_blake3_hash_keep(NP_BLAKE3_IMPL_AUTO, j.p, (size_t)j.n, j.r->dirty, j.r->sub_cv, j.r->fine_cv, j.out);
    } else {
        np_blake3_hash_reuse(NP_BLAKE3_IMPL_AUTO, j.p, (size_t)j.n, j.r->dirty, j.r->sub_cv, j.r->fine_cv, j.out);
        np_reuse_free(j.r); /* its last use */
    }
    if (j.fd >= 0)
        np_release_range((uint8_t *)(uintptr_t)j.p, j.n, j.fd, j.off);
    pthread_mutex_lock(&h->mu);
    if (j.r && j.fd < 0) {
        j.r->done = 1;
        pthread_cond_broadcast(&h->kept);
    }
    h->hashed += j.count;
    if (!--h->busy)
        pthread_cond_broadcast(&h->idle);
    return 1;
}

static void *hworker(void *arg)
{
    np_hpool *h = arg;
    pthread_mutex_lock(&h->mu);
    for (;;) {
        if (hpool_run_one(h))
            continue;
        if (h->closed || np_cancelled(h->ctx))
            break;
        pthread_cond_wait(&h->more, &h->mu);
    }
    pthread_mutex_unlock(&h->mu);
    return NULL;
}

uint64_t np_hpool_take(np_hpool *h)
{
    pthread_mutex_lock(&h->mu);
    uint64_t n = h->hashed;
    h->hashed = 0;
    pthread_mutex_unlock(&h->mu);
    return n;
}

/* The main thread joins in until every queued job is hashed (progress reported as it goes). */
nnp_status np_hpool_settle(nnp_ctx *ctx, np_hpool *h)
{
    nnp_status st;
    pthread_mutex_lock(&h->mu);
    for (;;) {
        int ran = hpool_run_one(h);
        uint64_t done = h->hashed;
        h->hashed = 0;
        if (!ran && (np_cancelled(ctx) || !h->busy)) {
            pthread_mutex_unlock(&h->mu);
            if ((st = np_progress(ctx, done)))
                return st;
            if (h->next < h->n || h->busy) /* cancelled, with jobs unhashed */
                return np_check_cancel(ctx);
            return NNP_OK;
        }
        if (!ran)
            pthread_cond_wait(&h->idle, &h->mu);
        if (done) {
            pthread_mutex_unlock(&h->mu);
            if ((st = np_progress(ctx, done)))
                return st;
            pthread_mutex_lock(&h->mu);
        }
    }
}

/* Stop the workers: nothing more is taken; what is being hashed is finished. */
void np_hpool_close(np_hpool *h, pthread_t *threads, int *nthreads)
{
    pthread_mutex_lock(&h->mu);
    h->closed = 1;
    h->n = h->next;
    pthread_cond_broadcast(&h->more);
    pthread_mutex_unlock(&h->mu);
    for (int w = 0; w < *nthreads; w++)
        pthread_join(threads[w], NULL);
    *nthreads = 0;
}

void np_hpool_init(np_hpool *h, nnp_ctx *ctx, np_hjob *jobs)
{
    memset(h, 0, sizeof *h);
    pthread_mutex_init(&h->mu, NULL);
    pthread_cond_init(&h->more, NULL);
    pthread_cond_init(&h->idle, NULL);
    pthread_cond_init(&h->kept, NULL);
    h->jobs = jobs;
    h->ctx = ctx;
}

void np_hpool_destroy(np_hpool *h)
{
    pthread_cond_destroy(&h->more);
    pthread_cond_destroy(&h->idle);
    pthread_cond_destroy(&h->kept);
    pthread_mutex_destroy(&h->mu);
}

int np_hpool_start(np_hpool *h, pthread_t threads[NP_HASHERS_MAX], size_t most)
{
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    size_t want = cpus > 1 ? (size_t)(cpus > NP_HASHERS_MAX + 1 ? NP_HASHERS_MAX : cpus - 1) : 0;
    if (want > most)
        want = most;
    int started = 0;
    pthread_attr_t attr;
    int have_attr = pthread_attr_init(&attr) == 0;
    if (have_attr)
        pthread_attr_setstacksize(&attr, (size_t)1 << 20); /* a hasher needs a few KiB */
    for (size_t w = 0; w < want; w++)
        if (pthread_create(&threads[started], have_attr ? &attr : NULL, hworker, h) == 0)
            started++;
    if (have_attr)
        pthread_attr_destroy(&attr);
    return started;
}

nnp_status np_hash_ranges(nnp_ctx *ctx, const np_hash_range *ranges, size_t n)
{
    np_hjob *jobs = malloc((n ? n : 1) * sizeof *jobs);
    if (!jobs)
        return np_fail(ctx, NNP_KIND_IO, "out of memory");
    np_hpool pool;
    np_hpool_init(&pool, ctx, jobs);
    for (size_t k = 0; k < n; k++)
        jobs[pool.n++] = (np_hjob){ranges[k].p, ranges[k].n, ranges[k].count, ranges[k].out, -1, 0, NULL, 0, 0};
    pthread_t threads[NP_HASHERS_MAX];
    int nthreads = n > 1 ? np_hpool_start(&pool, threads, n - 1) : 0;
    nnp_status st = np_hpool_settle(ctx, &pool);
    np_hpool_close(&pool, threads, &nthreads);
    np_hpool_destroy(&pool);
    free(jobs);
    return st;
}

/* Subtrees a piece of a file hash holds: 16 MiB, a few dozen pieces for a model of a few GB. */
#define NP_FILE_PIECE_SUBS 256

nnp_status np_hash_file(nnp_ctx *ctx, const uint8_t *p, uint64_t n, uint8_t out[32])
{
    size_t nsub = np_blake3_subtrees((size_t)n), npieces = (nsub + NP_FILE_PIECE_SUBS - 1) / NP_FILE_PIECE_SUBS;
    if (npieces < 2) { /* one piece or less: no thread is worth starting */
        np_blake3_hash(p ? p : (const uint8_t *)"", (size_t)n, out);
        return np_progress(ctx, n);
    }
    np_hjob *jobs = malloc(npieces * sizeof *jobs);
    uint8_t *cvs = malloc(nsub * 32);
    uint16_t *dirty = calloc(nsub, sizeof *dirty); /* none: every subtree from its chaining value */
    nnp_status st = NNP_OK;
    if (!jobs || !cvs || !dirty) {
        st = np_fail(ctx, NNP_KIND_IO, "out of memory");
        goto out;
    }
    np_hpool pool;
    np_hpool_init(&pool, ctx, jobs);
    for (size_t b = 0; b < nsub; b += NP_FILE_PIECE_SUBS) {
        size_t k = nsub - b < NP_FILE_PIECE_SUBS ? nsub - b : NP_FILE_PIECE_SUBS;
        uint64_t len = (uint64_t)k * NP_BLAKE3_SUB_LEN;
        jobs[pool.n++] = (np_hjob){p + (uint64_t)b * NP_BLAKE3_SUB_LEN, len, len, cvs + 32 * b, -1, 0, NULL, 1, b};
    }
    pthread_t threads[NP_HASHERS_MAX];
    int nthreads = np_hpool_start(&pool, threads, npieces - 1);
    st = np_hpool_settle(ctx, &pool);
    np_hpool_close(&pool, threads, &nthreads);
    np_hpool_destroy(&pool);
    if (!st) { /* the subtrees' chaining values, then the bytes after the last whole one */
        np_blake3_hash_reuse(NP_BLAKE3_IMPL_AUTO, p, (size_t)n, dirty, cvs, NULL, out);
        st = np_progress(ctx, n - (uint64_t)nsub * NP_BLAKE3_SUB_LEN);
    }
out:
    free(jobs);
    free(cvs);
    free(dirty);
    return st;
}
