/*
 * BLAKE3, default hash mode, 32-byte output, C99. Python twin: nnpatch/hashing.py (which calls
 * the blake3 package, this file's counterpart there).
 * A chunk state, a stack of chaining values merged lazily, and a fully unrolled compression
 * function (after the BLAKE3 paper and spec). Whole chunks are hashed straight from the input,
 * in power-of-two subtrees aligned to the chunk counter: the subtree's chunks go through a SIMD
 * kernel several at a time (blake3_x86.c, blake3_neon.c; see blake3_impl.h), then its parent
 * levels, each level's nodes several at a time too. The portable compression function below is
 * the fallback and does the rest (a partial chunk, the root, fewer nodes than the lanes).
 */
#include "blake3.h"
#include "blake3_impl.h"

#include <string.h>

enum {
    CHUNK_START = NP_B3_CHUNK_START,
    CHUNK_END = NP_B3_CHUNK_END,
    PARENT = NP_B3_PARENT,
    ROOT = NP_B3_ROOT,
};

static const uint32_t IV[8] = {
    0x6A09E667u, 0xBB67AE85u, 0x3C6EF372u, 0xA54FF53Au,
    0x510E527Fu, 0x9B05688Cu, 0x1F83D9ABu, 0x5BE0CD19u,
};

static inline uint32_t load32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static inline void store32(uint8_t *p, uint32_t w)
{
    p[0] = (uint8_t)w;
    p[1] = (uint8_t)(w >> 8);
    p[2] = (uint8_t)(w >> 16);
    p[3] = (uint8_t)(w >> 24);
}

static inline uint32_t rotr32(uint32_t w, unsigned c)
{
    return (w >> c) | (w << (32 - c));
}

#define G(a, b, c, d, x, y)                 \
    do {                                    \
        a = a + b + (x);                    \
        d = rotr32(d ^ a, 16);              \
        c = c + d;                          \
        b = rotr32(b ^ c, 12);              \
        a = a + b + (y);                    \
        d = rotr32(d ^ a, 8);               \
        c = c + d;                          \
        b = rotr32(b ^ c, 7);               \
    } while (0)

/* One round with message words m[s0..s15] (the schedule of that round). */
#define ROUND(s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15) \
    do {                                                                          \
        G(v0, v4, v8, v12, m[s0], m[s1]);                                         \
        G(v1, v5, v9, v13, m[s2], m[s3]);                                         \
        G(v2, v6, v10, v14, m[s4], m[s5]);                                        \
        G(v3, v7, v11, v15, m[s6], m[s7]);                                        \
        G(v0, v5, v10, v15, m[s8], m[s9]);                                        \
        G(v1, v6, v11, v12, m[s10], m[s11]);                                      \
        G(v2, v7, v8, v13, m[s12], m[s13]);                                       \
        G(v3, v4, v9, v14, m[s14], m[s15]);                                       \
    } while (0)

/* The seven rounds; row r is the message permutation applied r times. */
#define ROUNDS()                                                   \
    ROUND(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);   \
    ROUND(2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8);   \
    ROUND(3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1);   \
    ROUND(10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6);   \
    ROUND(12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4);   \
    ROUND(9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7);   \
    ROUND(11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13)

/* cv = the first 8 words of compress(cv, block, counter, block_len, flags). */
static void compress_in_place(uint32_t cv[8], const uint8_t block[NP_BLAKE3_BLOCK_LEN], uint8_t block_len,
                              uint64_t counter, uint8_t flags)
{
    uint32_t m[16];
    for (int i = 0; i < 16; i++)
        m[i] = load32(block + 4 * i);
    uint32_t v0 = cv[0], v1 = cv[1], v2 = cv[2], v3 = cv[3];
    uint32_t v4 = cv[4], v5 = cv[5], v6 = cv[6], v7 = cv[7];
    uint32_t v8 = IV[0], v9 = IV[1], v10 = IV[2], v11 = IV[3];
    uint32_t v12 = (uint32_t)counter, v13 = (uint32_t)(counter >> 32), v14 = block_len, v15 = flags;
    ROUNDS();
    cv[0] = v0 ^ v8;
    cv[1] = v1 ^ v9;
    cv[2] = v2 ^ v10;
    cv[3] = v3 ^ v11;
    cv[4] = v4 ^ v12;
    cv[5] = v5 ^ v13;
    cv[6] = v6 ^ v14;
    cv[7] = v7 ^ v15;
}

static void words_to_bytes(const uint32_t w[8], uint8_t out[32])
{
    for (int i = 0; i < 8; i++)
        store32(out + 4 * i, w[i]);
}

/* An output node not yet compressed: what the final compression of a chunk or parent takes. */
typedef struct output {
    uint32_t cv[8];
    uint8_t block[NP_BLAKE3_BLOCK_LEN];
    uint8_t block_len;
    uint64_t counter;
    uint8_t flags;
} output;

static void output_cv(const output *o, uint8_t out[32])
{
    uint32_t cv[8];
    memcpy(cv, o->cv, sizeof cv);
    compress_in_place(cv, o->block, o->block_len, o->counter, o->flags);
    words_to_bytes(cv, out);
}

static void output_root(const output *o, uint8_t out[32])
{
    uint32_t cv[8];
    memcpy(cv, o->cv, sizeof cv);
    compress_in_place(cv, o->block, o->block_len, 0, (uint8_t)(o->flags | ROOT));
    words_to_bytes(cv, out);
}

static output parent_output(const uint8_t block[NP_BLAKE3_BLOCK_LEN], const uint32_t key[8], uint8_t flags)
{
    output o;
    memcpy(o.cv, key, sizeof o.cv);
    memcpy(o.block, block, NP_BLAKE3_BLOCK_LEN);
    o.block_len = NP_BLAKE3_BLOCK_LEN;
    o.counter = 0;
    o.flags = (uint8_t)(flags | PARENT);
    return o;
}

/* --- chunk state ---------------------------------------------------------------------------- */

static void chunk_init(np_blake3_chunk *c, const uint32_t key[8], uint64_t counter, uint8_t flags)
{
    memcpy(c->cv, key, sizeof c->cv);
    c->chunk_counter = counter;
    memset(c->buf, 0, sizeof c->buf);
    c->buf_len = 0;
    c->blocks_compressed = 0;
    c->flags = flags;
}

static size_t chunk_len(const np_blake3_chunk *c)
{
    return (size_t)NP_BLAKE3_BLOCK_LEN * c->blocks_compressed + c->buf_len;
}

static uint8_t chunk_start_flag(const np_blake3_chunk *c)
{
    return c->blocks_compressed == 0 ? CHUNK_START : 0;
}

/* Callers pass at most CHUNK_LEN - chunk_len(c) bytes. */
static void chunk_update(np_blake3_chunk *c, const uint8_t *in, size_t len)
{
    if (c->buf_len > 0) {
        size_t take = NP_BLAKE3_BLOCK_LEN - c->buf_len;
        if (take > len)
            take = len;
        memcpy(c->buf + c->buf_len, in, take);
        c->buf_len = (uint8_t)(c->buf_len + take);
        in += take;
        len -= take;
        if (len == 0)
            return;
        /* the buffered block is full and more input follows: it is not the chunk's last */
        compress_in_place(c->cv, c->buf, NP_BLAKE3_BLOCK_LEN, c->chunk_counter,
                          (uint8_t)(c->flags | chunk_start_flag(c)));
        c->blocks_compressed++;
        c->buf_len = 0;
        memset(c->buf, 0, sizeof c->buf);
    }
    while (len > NP_BLAKE3_BLOCK_LEN) {
        compress_in_place(c->cv, in, NP_BLAKE3_BLOCK_LEN, c->chunk_counter,
                          (uint8_t)(c->flags | chunk_start_flag(c)));
        c->blocks_compressed++;
        in += NP_BLAKE3_BLOCK_LEN;
        len -= NP_BLAKE3_BLOCK_LEN;
    }
    memcpy(c->buf, in, len);
    c->buf_len = (uint8_t)len;
}

static output chunk_output(const np_blake3_chunk *c)
{
    output o;
    memcpy(o.cv, c->cv, sizeof o.cv);
    memcpy(o.block, c->buf, NP_BLAKE3_BLOCK_LEN); /* bytes past buf_len are zero */
    o.block_len = c->buf_len;
    o.counter = c->chunk_counter;
    o.flags = (uint8_t)(c->flags | chunk_start_flag(c) | CHUNK_END);
    return o;
}

/* --- many inputs at once -------------------------------------------------------------------- */

/* n inputs of `blocks` whole blocks each, input i at in + i * stride: their chaining values to
 * out + 32 * i (the kernel contract in blake3_impl.h), one at a time. */
static void hash_many_scalar(const uint8_t *in, size_t n, size_t stride, size_t blocks, const uint32_t key[8],
                             uint64_t counter, int increment, uint8_t flags, uint8_t flags_start,
                             uint8_t flags_end, uint8_t *out)
{
    for (size_t i = 0; i < n; i++) {
        uint32_t cv[8];
        memcpy(cv, key, sizeof cv);
        for (size_t b = 0; b < blocks; b++) {
            unsigned f = flags;
            if (b == 0)
                f |= flags_start;
            if (b + 1 == blocks)
                f |= flags_end;
            compress_in_place(cv, in + i * stride + b * NP_BLAKE3_BLOCK_LEN, NP_BLAKE3_BLOCK_LEN, counter,
                              (uint8_t)f);
        }
        words_to_bytes(cv, out + 32 * i);
        if (increment)
            counter++;
    }
}

/* hash_many_scalar's contract, through impl's widest kernel first. */
static void hash_many(uint8_t impl, const uint8_t *in, size_t n, size_t stride, size_t blocks, const uint32_t key[8],
                      uint64_t counter, int increment, uint8_t flags, uint8_t flags_start, uint8_t flags_end,
                      uint8_t *out)
{
#ifdef NP_B3_X86
    if (impl == NP_BLAKE3_IMPL_AVX512) {
        for (; n >= 16; n -= 16, in += 16 * stride, out += 16 * 32, counter += increment ? 16 : 0)
            np_b3_hash16_avx512(in, stride, blocks, key, counter, increment, flags, flags_start, flags_end, out);
        for (; n >= 8; n -= 8, in += 8 * stride, out += 8 * 32, counter += increment ? 8 : 0)
            np_b3_hash8_avx512(in, stride, blocks, key, counter, increment, flags, flags_start, flags_end, out);
    }
    if (impl == NP_BLAKE3_IMPL_AVX2) {
        for (; n >= 8; n -= 8, in += 8 * stride, out += 8 * 32, counter += increment ? 8 : 0)
            np_b3_hash8_avx2(in, stride, blocks, key, counter, increment, flags, flags_start, flags_end, out);
    }
    if (impl == NP_BLAKE3_IMPL_AVX512 || impl == NP_BLAKE3_IMPL_AVX2 || impl == NP_BLAKE3_IMPL_SSE41) {
        for (; n >= 4; n -= 4, in += 4 * stride, out += 4 * 32, counter += increment ? 4 : 0)
            np_b3_hash4_sse41(in, stride, blocks, key, counter, increment, flags, flags_start, flags_end, out);
    }
#endif
#ifdef NP_B3_NEON
    if (impl == NP_BLAKE3_IMPL_NEON) {
        for (; n >= 4; n -= 4, in += 4 * stride, out += 4 * 32, counter += increment ? 4 : 0)
            np_b3_hash4_neon(in, stride, blocks, key, counter, increment, flags, flags_start, flags_end, out);
    }
#endif
    (void)impl;
    hash_many_scalar(in, n, stride, blocks, key, counter, increment, flags, flags_start, flags_end, out);
}

/* The largest subtree hashed in one go: 64 chunks (its chaining values fit in 2 KiB of stack). */
#define MAX_SUBTREE_CHUNKS 64

/* n chaining values at cv (at most MAX_SUBTREE_CHUNKS, a multiple of 2^levels), the nodes of one
 * level of aligned subtrees side by side: reduced `levels` levels up (each adjacent pair of
 * chaining values is one parent block), the n >> levels results to out (which may be cv). */
static void reduce_levels(uint8_t impl, const uint8_t *cv, size_t n, unsigned levels, const uint32_t key[8],
                          uint8_t flags, uint8_t *out)
{
    uint8_t a[MAX_SUBTREE_CHUNKS / 2 * 32], b[MAX_SUBTREE_CHUNKS / 4 * 32 + 32];
    const uint8_t *cur = cv;
    uint8_t *next = a;
    if (!levels) {
        memmove(out, cv, n * 32);
        return;
    }
    for (unsigned l = 0; l < levels; l++) {
        n /= 2;
        hash_many(impl, cur, n, NP_BLAKE3_BLOCK_LEN, 1, key, 0, 0, (uint8_t)(flags | PARENT), 0, 0, next);
        cur = next;
        next = next == a ? b : a;
    }
    memcpy(out, cur, n * 32);
}

static unsigned log2_pow2(size_t n)
{
    unsigned l = 0;
    while (n > 1) {
        n /= 2;
        l++;
    }
    return l;
}

/* The chaining value (never the root) of the subtree of n whole chunks at in, n a power of two
 * at most MAX_SUBTREE_CHUNKS, the first one chunk number counter. */
static void hash_subtree(uint8_t impl, const uint8_t *in, size_t n, const uint32_t key[8], uint64_t counter,
                         uint8_t flags, uint8_t out[32])
{
    uint8_t a[MAX_SUBTREE_CHUNKS * 32];
    hash_many(impl, in, n, NP_BLAKE3_CHUNK_LEN, NP_BLAKE3_CHUNK_LEN / NP_BLAKE3_BLOCK_LEN, key, counter, 1, flags,
              CHUNK_START, CHUNK_END, a);
    reduce_levels(impl, a, n, log2_pow2(n), key, flags, out);
}

/* --- hasher ------------------------------------------------------------------------------- */

static unsigned popcount64(uint64_t x)
{
    unsigned n = 0;
    while (x) {
        x &= x - 1;
        n++;
    }
    return n;
}

/* Merge completed subtrees so that the stack holds one CV per 1 bit of total_chunks. */
static void merge_cv_stack(np_blake3 *h, uint64_t total_chunks)
{
    unsigned keep = popcount64(total_chunks);
    while (h->cv_stack_len > keep) {
        uint8_t *pair = &h->cv_stack[(size_t)(h->cv_stack_len - 2) * NP_BLAKE3_OUT_LEN];
        output o = parent_output(pair, h->key, h->chunk.flags);
        output_cv(&o, pair);
        h->cv_stack_len--;
    }
}

static void push_cv(np_blake3 *h, const uint8_t cv[32], uint64_t chunk_counter)
{
    merge_cv_stack(h, chunk_counter);
    memcpy(&h->cv_stack[(size_t)h->cv_stack_len * NP_BLAKE3_OUT_LEN], cv, NP_BLAKE3_OUT_LEN);
    h->cv_stack_len++;
}

int np_blake3_impl_available(int impl)
{
    switch (impl) {
    case NP_BLAKE3_IMPL_SCALAR:
        return 1;
#ifdef NP_B3_X86
    case NP_BLAKE3_IMPL_SSE41:
        return np_b3_have_sse41();
    case NP_BLAKE3_IMPL_AVX2:
        return np_b3_have_avx2() && np_b3_have_sse41();
    case NP_BLAKE3_IMPL_AVX512:
        return np_b3_have_avx512() && np_b3_have_avx2() && np_b3_have_sse41();
#endif
#ifdef NP_B3_NEON
    case NP_BLAKE3_IMPL_NEON:
        return 1;
#endif
    default:
        return 0;
    }
}

/* Asked of the CPU at each call (a few loads): no global state to initialize or race on. */
int np_blake3_impl_best(void)
{
    static const int order[] = {NP_BLAKE3_IMPL_AVX512, NP_BLAKE3_IMPL_AVX2, NP_BLAKE3_IMPL_SSE41, NP_BLAKE3_IMPL_NEON};
    for (size_t i = 0; i < sizeof order / sizeof order[0]; i++)
        if (np_blake3_impl_available(order[i]))
            return order[i];
    return NP_BLAKE3_IMPL_SCALAR;
}

const char *np_blake3_impl_name(int impl)
{
    switch (impl) {
    case NP_BLAKE3_IMPL_AUTO:
        return "auto";
    case NP_BLAKE3_IMPL_SCALAR:
        return "scalar";
    case NP_BLAKE3_IMPL_SSE41:
        return "sse41";
    case NP_BLAKE3_IMPL_AVX2:
        return "avx2";
    case NP_BLAKE3_IMPL_NEON:
        return "neon";
    case NP_BLAKE3_IMPL_AVX512:
        return "avx512";
    default:
        return NULL;
    }
}

int np_blake3_init_impl(np_blake3 *h, int impl)
{
    int ok = impl == NP_BLAKE3_IMPL_AUTO || np_blake3_impl_available(impl);
    memcpy(h->key, IV, sizeof h->key);
    chunk_init(&h->chunk, h->key, 0, 0);
    h->cv_stack_len = 0;
    memset(h->cv_stack, 0, sizeof h->cv_stack);
    h->impl = (uint8_t)(ok && impl != NP_BLAKE3_IMPL_AUTO ? impl : np_blake3_impl_best());
    return ok ? 0 : -1;
}

void np_blake3_init(np_blake3 *h)
{
    (void)np_blake3_init_impl(h, NP_BLAKE3_IMPL_AUTO);
}

void np_blake3_update(np_blake3 *h, const void *data, size_t len)
{
    const uint8_t *in = (const uint8_t *)data;
    if (len == 0)
        return;
    if (chunk_len(&h->chunk) > 0) {
        size_t take = NP_BLAKE3_CHUNK_LEN - chunk_len(&h->chunk);
        if (take > len)
            take = len;
        chunk_update(&h->chunk, in, take);
        in += take;
        len -= take;
        if (len == 0)
            return;
        /* the chunk is full and more input follows, so it is not the root */
        uint8_t cv[32];
        output o = chunk_output(&h->chunk);
        output_cv(&o, cv);
        push_cv(h, cv, h->chunk.chunk_counter);
        chunk_init(&h->chunk, h->key, h->chunk.chunk_counter + 1, h->chunk.flags);
    }
    /*
     * Whole chunks straight from the input, as power-of-two subtrees aligned to the chunk
     * counter (a subtree of n chunks starts at a multiple of n), each pushed as one chaining
     * value; push_cv merges lazily (before a push, never after), so the stack may end with two
     * subtrees of equal size that np_blake3_final joins. The one chunk that must wait is the
     * first chunk of the input when it is all there is so far: it may be the root.
     */
    while (len >= NP_BLAKE3_CHUNK_LEN) {
        uint64_t counter = h->chunk.chunk_counter;
        size_t whole = len / NP_BLAKE3_CHUNK_LEN;
        size_t n = MAX_SUBTREE_CHUNKS;
        while (n > whole || (counter & (n - 1)) != 0)
            n /= 2;
        if (counter == 0 && n * NP_BLAKE3_CHUNK_LEN == len)
            n /= 2; /* it would be the whole tree, whose top node is the root */
        if (n == 0)
            break;
        uint8_t cv[32];
        hash_subtree(h->impl, in, n, h->key, counter, h->chunk.flags, cv);
        push_cv(h, cv, counter);
        h->chunk.chunk_counter = counter + n;
        in += n * NP_BLAKE3_CHUNK_LEN;
        len -= n * NP_BLAKE3_CHUNK_LEN;
    }
    chunk_update(&h->chunk, in, len);
    /* more input follows the stack's subtrees (the chunk's), so they may merge as far as they go */
    if (chunk_len(&h->chunk) > 0)
        merge_cv_stack(h, h->chunk.chunk_counter);
}

void np_blake3_final(const np_blake3 *h, uint8_t out[NP_BLAKE3_OUT_LEN])
{
    if (h->cv_stack_len == 0) {
        output o = chunk_output(&h->chunk);
        output_root(&o, out);
        return;
    }
    output o;
    size_t remaining;
    if (chunk_len(&h->chunk) > 0) {
        remaining = h->cv_stack_len;
        o = chunk_output(&h->chunk);
    } else {
        /* the input ended with a whole subtree: the stack holds at least two (np_blake3_update) */
        remaining = (size_t)h->cv_stack_len - 2;
        o = parent_output(&h->cv_stack[remaining * NP_BLAKE3_OUT_LEN], h->key, h->chunk.flags);
    }
    while (remaining > 0) {
        remaining--;
        uint8_t block[NP_BLAKE3_BLOCK_LEN];
        memcpy(block, &h->cv_stack[remaining * NP_BLAKE3_OUT_LEN], NP_BLAKE3_OUT_LEN);
        output_cv(&o, block + NP_BLAKE3_OUT_LEN);
        o = parent_output(block, h->key, h->chunk.flags);
    }
    output_root(&o, out);
}

void np_blake3_hash(const void *data, size_t len, uint8_t out[NP_BLAKE3_OUT_LEN])
{
    np_blake3 h;
    np_blake3_init(&h);
    np_blake3_update(&h, data, len);
    np_blake3_final(&h, out);
}

/* --- a tensor's digest again, from the chaining values of its unchanged subtrees -------------- */

/* Whole coarse subtrees (NP_BLAKE3_SUB_LEN bytes, aligned) and their fine ones (NP_BLAKE3_FINE_LEN). */
#define SUB_CHUNKS (NP_BLAKE3_SUB_LEN / NP_BLAKE3_CHUNK_LEN)
#define FINE_CHUNKS (NP_BLAKE3_FINE_LEN / NP_BLAKE3_CHUNK_LEN)
#define FINE_PER_SUB (NP_BLAKE3_SUB_LEN / NP_BLAKE3_FINE_LEN)

size_t np_blake3_subtrees(size_t len)
{
    return len > NP_BLAKE3_SUB_LEN ? len / NP_BLAKE3_SUB_LEN : 0;
}

/*
 * Both functions below hash as np_blake3_update does with the whole input at once: coarse
 * subtree b (chunks 64 b .. 64 b + 63) is pushed as one chaining value at chunk counter 64 b,
 * then the rest (less than a subtree) goes through np_blake3_update, then np_blake3_final. The
 * hasher's stack thus goes through the same states, so the digest is np_blake3_hash's. That
 * needs len > NP_BLAKE3_SUB_LEN: a subtree that is the whole input is the root, not a node
 * (np_blake3_subtrees is then 0 and the input is hashed as it is).
 */
static void push_subtree(np_blake3 *h, const uint8_t cv[32], size_t b)
{
    push_cv(h, cv, (uint64_t)b * SUB_CHUNKS);
    h->chunk.chunk_counter = (uint64_t)(b + 1) * SUB_CHUNKS;
}

void np_blake3_hash_keep(int impl, const void *data, size_t len, const uint16_t *dirty, uint8_t *sub_cv,
                         uint8_t *fine_cv, uint8_t out[NP_BLAKE3_OUT_LEN])
{
    const uint8_t *in = (const uint8_t *)data;
    np_blake3 h;
    (void)np_blake3_init_impl(&h, impl);
    size_t nsub = np_blake3_subtrees(len), k = 0;
    for (size_t b = 0; b < nsub; b++) {
        const uint8_t *p = in + b * NP_BLAKE3_SUB_LEN;
        uint8_t *cv = sub_cv + 32 * b;
        if (dirty[b]) {
            /* the fine subtrees' chaining values are one level of the coarse subtree */
            uint8_t a[SUB_CHUNKS * 32];
            uint8_t *fine = fine_cv + (size_t)32 * FINE_PER_SUB * k++;
            hash_many(h.impl, p, SUB_CHUNKS, NP_BLAKE3_CHUNK_LEN, NP_BLAKE3_CHUNK_LEN / NP_BLAKE3_BLOCK_LEN, h.key,
                      (uint64_t)b * SUB_CHUNKS, 1, h.chunk.flags, CHUNK_START, CHUNK_END, a);
            reduce_levels(h.impl, a, SUB_CHUNKS, log2_pow2(FINE_CHUNKS), h.key, h.chunk.flags, fine);
            reduce_levels(h.impl, fine, FINE_PER_SUB, log2_pow2(FINE_PER_SUB), h.key, h.chunk.flags, cv);
        } else {
            hash_subtree(h.impl, p, SUB_CHUNKS, h.key, (uint64_t)b * SUB_CHUNKS, h.chunk.flags, cv);
        }
        push_subtree(&h, cv, b);
    }
    np_blake3_update(&h, in + nsub * NP_BLAKE3_SUB_LEN, len - nsub * NP_BLAKE3_SUB_LEN);
    np_blake3_final(&h, out);
}

void np_blake3_hash_reuse(int impl, const void *data, size_t len, const uint16_t *dirty, const uint8_t *sub_cv,
                          const uint8_t *fine_cv, uint8_t out[NP_BLAKE3_OUT_LEN])
{
    const uint8_t *in = (const uint8_t *)data;
    np_blake3 h;
    (void)np_blake3_init_impl(&h, impl);
    size_t nsub = np_blake3_subtrees(len), k = 0;
    for (size_t b = 0; b < nsub; b++) {
        const uint8_t *p = in + b * NP_BLAKE3_SUB_LEN;
        uint64_t counter = (uint64_t)b * SUB_CHUNKS;
        uint8_t cv[32];
        if (!dirty[b]) {
            memcpy(cv, sub_cv + 32 * b, 32);
        } else {
            uint8_t fine[FINE_PER_SUB * 32], a[SUB_CHUNKS * 32];
            memcpy(fine, fine_cv + (size_t)32 * FINE_PER_SUB * k++, sizeof fine);
            /* each run of dirty fine subtrees, its chunks through the kernels at once */
            for (unsigned j = 0; j < FINE_PER_SUB;) {
                if (!(dirty[b] >> j & 1)) {
                    j++;
                    continue;
                }
                unsigned e = j;
                while (e < FINE_PER_SUB && (dirty[b] >> e & 1))
                    e++;
                size_t nch = (size_t)(e - j) * FINE_CHUNKS;
                hash_many(h.impl, p + (size_t)j * NP_BLAKE3_FINE_LEN, nch, NP_BLAKE3_CHUNK_LEN,
                          NP_BLAKE3_CHUNK_LEN / NP_BLAKE3_BLOCK_LEN, h.key, counter + (uint64_t)j * FINE_CHUNKS, 1,
                          h.chunk.flags, CHUNK_START, CHUNK_END, a);
                /* fine subtrees are aligned in the run, so pairing the run's nodes level by level stays
                 * inside each of them */
                reduce_levels(h.impl, a, nch, log2_pow2(FINE_CHUNKS), h.key, h.chunk.flags, fine + 32 * j);
                j = e;
            }
            reduce_levels(h.impl, fine, FINE_PER_SUB, log2_pow2(FINE_PER_SUB), h.key, h.chunk.flags, cv);
        }
        push_subtree(&h, cv, b);
    }
    np_blake3_update(&h, in + nsub * NP_BLAKE3_SUB_LEN, len - nsub * NP_BLAKE3_SUB_LEN);
    np_blake3_final(&h, out);
}

void np_blake3_subtree_cvs(int impl, const void *data, size_t first, size_t n, uint8_t *sub_cv)
{
    const uint8_t *in = (const uint8_t *)data;
    np_blake3 h;
    (void)np_blake3_init_impl(&h, impl);
    for (size_t b = 0; b < n; b++)
        hash_subtree(h.impl, in + b * NP_BLAKE3_SUB_LEN, SUB_CHUNKS, h.key, (uint64_t)(first + b) * SUB_CHUNKS,
                     h.chunk.flags, sub_cv + 32 * b);
}

void np_hex(const uint8_t *bytes, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[bytes[i] >> 4];
        out[2 * i + 1] = digits[bytes[i] & 15];
    }
    out[2 * n] = '\0';
}
