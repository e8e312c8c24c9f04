/*
 * nnpatch._kernel -- the hot loops of `apply`: fused byte-plane decode,
 * element-wise combine, row scatter and the esort stage's inverse.
 *
 * Private module; call it through nnpatch.kernel, which normalises the
 * arguments (mode names, index dtypes, out= buffers) and has a pure-numpy
 * twin that must give bit-identical results.
 *
 * Design notes
 *  - Plain CPython C API plus the buffer protocol: no numpy headers, so the
 *    build needs only a C99 compiler and the Python headers.
 *  - Every argument is validated here as well, whatever the wrapper did:
 *    sizes, width, mode, index bounds and strict increase, overlap.  Errors
 *    are ValueError with a one-line message (TypeError for read-only dst,
 *    raised by the "w*" converter).  No byte outside dst/out is ever
 *    written, and nothing is written at all when validation fails.
 *  - Words are little-endian on disk.  Unaligned words are loaded and stored
 *    with memcpy, which compilers turn into plain moves; on a big-endian host
 *    the load/store helpers assemble bytes instead.
 *  - No intrinsics: the inner loops are written so that gcc/clang -O3
 *    vectorise them (fixed width per instantiation, restrict pointers, mode
 *    switch hoisted out of the loops).
 *  - The GIL is released around every loop.  Buffers stay pinned by their
 *    Py_buffer views; indices are re-checked while writing, so even another
 *    thread mutating the index buffer cannot make us write out of bounds.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

enum { M_REPLACE, M_XOR, M_ADD, M_SUB, M_ZADD, M_ZSUB, M_COUNT };

#define NO_ERROR ((size_t)-1)

/* MSVC's C mode spells C99 `restrict` as `__restrict`. */
#if defined(_MSC_VER) && !defined(__clang__)
#define restrict __restrict
#endif

#if defined(__BYTE_ORDER__) && defined(__ORDER_BIG_ENDIAN__) && \
    __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define NNP_BIG_ENDIAN 1
#endif

/* ---- little-endian word load/store, one pair per width ---------------- */

#ifdef NNP_BIG_ENDIAN
#define DEFINE_LOADSTORE(W, T)                                               \
    static inline T ld##W(const uint8_t *p)                                  \
    {                                                                        \
        T x = 0;                                                             \
        for (int k = 0; k < W; k++)                                          \
            x |= (T)((T)p[k] << (8 * k));                                    \
        return x;                                                            \
    }                                                                        \
    static inline void st##W(uint8_t *p, T x)                                \
    {                                                                        \
        for (int k = 0; k < W; k++)                                          \
            p[k] = (uint8_t)(x >> (8 * k));                                  \
    }
#else
#define DEFINE_LOADSTORE(W, T)                                               \
    static inline T ld##W(const uint8_t *p)                                  \
    {                                                                        \
        T x;                                                                 \
        memcpy(&x, p, W); /* unaligned-safe; compiles to one move */         \
        return x;                                                            \
    }                                                                        \
    static inline void st##W(uint8_t *p, T x) { memcpy(p, &x, W); }
#endif

/* Word `w` of a byte-planar stream of `nw` words: byte k of every word is
 * stored contiguously in plane k, i.e. at v[k*nw + w].  Endian-neutral. */
#define DEFINE_LOADPLANAR(W, T)                                              \
    static inline T ldp##W(const uint8_t *v, size_t nw, size_t w)            \
    {                                                                        \
        T x = 0;                                                             \
        for (int k = 0; k < W; k++)                                          \
            x |= (T)((T)v[(size_t)k * nw + w] << (8 * k));                   \
        return x;                                                            \
    }

DEFINE_LOADSTORE(1, uint8_t)
DEFINE_LOADSTORE(2, uint16_t)
DEFINE_LOADSTORE(4, uint32_t)
DEFINE_LOADSTORE(8, uint64_t)
DEFINE_LOADPLANAR(1, uint8_t)
DEFINE_LOADPLANAR(2, uint16_t)
DEFINE_LOADPLANAR(4, uint32_t)
DEFINE_LOADPLANAR(8, uint64_t)

/* Indices are native-endian uint64, possibly unaligned (any buffer). */
static inline uint64_t ld_index(const uint8_t *idx, size_t i)
{
    uint64_t r;
    memcpy(&r, idx + 8 * i, 8);
    return r;
}

/* unzigzag(z) = (z >> 1) ^ -(z & 1) on unsigned words of type T.  The casts
 * keep uint8/uint16 from being promoted to signed int. */
#define UNZZ(T, z) ((T)((T)((z) >> 1) ^ (T)(0u - (T)((z) & 1u))))

/* ---- scatter: the one loop behind combine, scatter_rows/_elements ------ */

typedef struct {
    uint8_t *dst;         /* nrows * rwords * width bytes */
    size_t nrows;
    size_t rwords;        /* words per row */
    const uint8_t *idx;   /* n native uint64, validated strictly increasing */
    size_t n;
    const uint8_t *vals;  /* n * rwords words, plain or byte-planar */
    int mode;
    int planar;
} scatter_job;

#define VAL_PLAIN(W, w) ld##W(vals + (size_t)(w) * W)
#define VAL_PLANAR(W, w) ldp##W(vals, nw, (w))

/* For every selected row, combine its words with the next RR value words.
 * The bound check repeats the validation pass (one compare per row) so that
 * a concurrently mutated index buffer still cannot cause a wild write. */
#define ROWS(W, T, RR, SRC, EXPR)                                            \
    for (size_t i = 0; i < n; i++) {                                         \
        const uint64_t r = ld_index(idx, i);                                 \
        if (r >= nrows)                                                      \
            return i;                                                        \
        uint8_t *restrict row = dst + (size_t)r * (RR) * W;                  \
        const size_t w0 = i * (RR);                                          \
        for (size_t j = 0; j < (RR); j++) {                                  \
            const T v = VAL_##SRC(W, w0 + j);                                \
            const T d = ld##W(row + j * W);                                  \
            (void)d;                                                         \
            st##W(row + j * W, (T)(EXPR));                                   \
        }                                                                    \
    }                                                                        \
    break;

/* One case per (mode, planar); the switch is outside the loops so each
 * loop body is branch-free and vectorisable. */
#define CASES(W, T, RR)                                                      \
    case 2 * M_REPLACE:     ROWS(W, T, RR, PLAIN, v)                         \
    case 2 * M_REPLACE + 1: ROWS(W, T, RR, PLANAR, v)                        \
    case 2 * M_XOR:         ROWS(W, T, RR, PLAIN, d ^ v)                     \
    case 2 * M_XOR + 1:     ROWS(W, T, RR, PLANAR, d ^ v)                    \
    case 2 * M_ADD:         ROWS(W, T, RR, PLAIN, d + v)                     \
    case 2 * M_ADD + 1:     ROWS(W, T, RR, PLANAR, d + v)                    \
    case 2 * M_SUB:         ROWS(W, T, RR, PLAIN, d - v)                     \
    case 2 * M_SUB + 1:     ROWS(W, T, RR, PLANAR, d - v)                    \
    case 2 * M_ZADD:        ROWS(W, T, RR, PLAIN, d + UNZZ(T, v))            \
    case 2 * M_ZADD + 1:    ROWS(W, T, RR, PLANAR, d + UNZZ(T, v))           \
    case 2 * M_ZSUB:        ROWS(W, T, RR, PLAIN, d - UNZZ(T, v))            \
    case 2 * M_ZSUB + 1:    ROWS(W, T, RR, PLANAR, d - UNZZ(T, v))           \
    default: break;

/* Returns NO_ERROR, or the position of an index found out of range. */
#define DEFINE_SCATTER(W, T)                                                 \
    static size_t scatter##W(const scatter_job *jb)                          \
    {                                                                        \
        uint8_t *restrict const dst = jb->dst;                               \
        const uint8_t *restrict const vals = jb->vals;                       \
        const uint8_t *const idx = jb->idx;                                  \
        const size_t n = jb->n, nrows = jb->nrows, R = jb->rwords;           \
        const size_t nw = n * R; /* words in the whole planar stream */      \
        (void)nw;                                                            \
        /* R == 1 (scatter_elements) gets its own copy without the inner     \
         * loop machinery; otherwise the inner loop runs over a row. */      \
        if (R == 1) {                                                        \
            switch (2 * jb->mode + jb->planar) { CASES(W, T, 1) }            \
        }                                                                    \
        else {                                                               \
            switch (2 * jb->mode + jb->planar) { CASES(W, T, R) }            \
        }                                                                    \
        return NO_ERROR;                                                     \
    }

DEFINE_SCATTER(1, uint8_t)
DEFINE_SCATTER(2, uint16_t)
DEFINE_SCATTER(4, uint32_t)
DEFINE_SCATTER(8, uint64_t)

static size_t run_scatter(const scatter_job *jb, int width)
{
    switch (width) {
    case 1: return scatter1(jb);
    case 2: return scatter2(jb);
    case 4: return scatter4(jb);
    case 8: return scatter8(jb);
    }
    return NO_ERROR; /* unreachable: width validated by the caller */
}

/* ---- byte planes ------------------------------------------------------ */

/* planes:   out[k*n + j] = src[j*W + k]
 * unplanes: out[j*W + k] = src[k*n + j]
 * The k loop has a constant trip count, so it unrolls into W streams. */
#define DEFINE_PLANES(W)                                                     \
    static void planes##W(const uint8_t *restrict src,                       \
                          uint8_t *restrict out, size_t n)                   \
    {                                                                        \
        for (size_t j = 0; j < n; j++)                                       \
            for (size_t k = 0; k < W; k++)                                   \
                out[k * n + j] = src[j * W + k];                             \
    }                                                                        \
    static void unplanes##W(const uint8_t *restrict src,                     \
                            uint8_t *restrict out, size_t n)                 \
    {                                                                        \
        for (size_t j = 0; j < n; j++)                                       \
            for (size_t k = 0; k < W; k++)                                   \
                out[j * W + k] = src[k * n + j];                             \
    }

DEFINE_PLANES(2)
DEFINE_PLANES(4)
DEFINE_PLANES(8)

/* ---- validation helpers ----------------------------------------------- */

static int check_width(int width)
{
    if (width == 1 || width == 2 || width == 4 || width == 8)
        return 0;
    PyErr_Format(PyExc_ValueError, "width must be 1, 2, 4 or 8, got %d",
                 width);
    return -1;
}

static int check_mode(int mode)
{
    if (mode >= 0 && mode < M_COUNT)
        return 0;
    PyErr_Format(PyExc_ValueError, "mode must be an integer in 0..%d, got %d",
                 M_COUNT - 1, mode);
    return -1;
}

static int overlaps(const Py_buffer *a, const Py_buffer *b)
{
    const char *pa = (const char *)a->buf, *pb = (const char *)b->buf;
    if (a->len == 0 || b->len == 0)
        return 0;
    return pa < pb + b->len && pb < pa + a->len;
}

static int check_no_overlap(const Py_buffer *a, const char *na,
                            const Py_buffer *b, const char *nb)
{
    if (!overlaps(a, b))
        return 0;
    PyErr_Format(PyExc_ValueError, "%s and %s must not overlap in memory",
                 na, nb);
    return -1;
}

/* Checks row_nbytes / dst / indices / values sizes shared by scatter and
 * gather.  On success sets *nrows and *n. */
static int check_rows(Py_ssize_t row_nbytes, int width, const Py_buffer *tensor,
                      const char *tname, const Py_buffer *ix,
                      const Py_buffer *vals, const char *vname, size_t *nrows,
                      size_t *n)
{
    if (row_nbytes <= 0 || row_nbytes % width != 0) {
        PyErr_Format(PyExc_ValueError,
                     "row_nbytes must be a positive multiple of width %d, "
                     "got %zd", width, row_nbytes);
        return -1;
    }
    if (tensor->len % row_nbytes != 0) {
        PyErr_Format(PyExc_ValueError,
                     "%s size %zd is not a multiple of row_nbytes %zd", tname,
                     tensor->len, row_nbytes);
        return -1;
    }
    if (ix->len % 8 != 0) {
        PyErr_Format(PyExc_ValueError,
                     "indices size %zd is not a multiple of 8 (native uint64 "
                     "expected)", ix->len);
        return -1;
    }
    *nrows = (size_t)(tensor->len / row_nbytes);
    *n = (size_t)(ix->len / 8);
    /* Compare by division: n * row_nbytes could overflow. */
    if (vals->len % row_nbytes != 0 ||
        (size_t)(vals->len / row_nbytes) != *n) {
        PyErr_Format(PyExc_ValueError,
                     "%s size %zd does not match %zu indices x %zd row bytes",
                     vname, vals->len, *n, row_nbytes);
        return -1;
    }
    return 0;
}

/* Validation pass over the indices (GIL released by the caller).
 * Returns 0 if all are < nrows and strictly increasing; else 1 (out of
 * range) or 2 (not increasing) with the position in *pos. */
static int scan_indices(const uint8_t *idx, size_t n, size_t nrows,
                        size_t *pos)
{
    uint64_t prev = 0;
    for (size_t i = 0; i < n; i++) {
        const uint64_t r = ld_index(idx, i);
        if (r >= nrows) {
            *pos = i;
            return 1;
        }
        if (i > 0 && r <= prev) {
            *pos = i;
            return 2;
        }
        prev = r;
    }
    return 0;
}

static void raise_index_error(int kind, const uint8_t *idx, size_t pos,
                              size_t nrows)
{
    const unsigned long long r = (unsigned long long)ld_index(idx, pos);
    if (kind == 1)
        PyErr_Format(PyExc_ValueError,
                     "index %llu at position %zu is out of range for %zu rows",
                     r, pos, nrows);
    else
        PyErr_Format(PyExc_ValueError,
                     "indices must be strictly increasing: position %zu has "
                     "%llu after %llu", pos, r,
                     (unsigned long long)ld_index(idx, pos - 1));
}

/* ---- Python entry points ---------------------------------------------- */

PyDoc_STRVAR(planes_doc,
"planes(src, out, width) -> None\n\n"
"Byte-plane split: out[k*n + j] = src[j*width + k], n = len(src) // width.");

PyDoc_STRVAR(unplanes_doc,
"unplanes(src, out, width) -> None\n\nInverse of planes().");

static PyObject *do_planes(PyObject *args, int inverse)
{
    Py_buffer src = {0}, out = {0};
    int width;
    PyObject *ret = NULL;

    if (!PyArg_ParseTuple(args, "y*w*i", &src, &out, &width))
        return NULL;
    if (check_width(width) < 0)
        goto done;
    if (src.len % width != 0) {
        PyErr_Format(PyExc_ValueError,
                     "src size %zd is not a multiple of width %d", src.len,
                     width);
        goto done;
    }
    if (out.len != src.len) {
        PyErr_Format(PyExc_ValueError, "out size %zd != src size %zd",
                     out.len, src.len);
        goto done;
    }
    if (check_no_overlap(&src, "src", &out, "out") < 0)
        goto done;

    {
        const uint8_t *s = (const uint8_t *)src.buf;
        uint8_t *o = (uint8_t *)out.buf;
        const size_t n = (size_t)src.len / (size_t)width;
        Py_BEGIN_ALLOW_THREADS
        switch (width) {
        case 1: memcpy(o, s, n); break;  /* one plane: a copy */
        case 2: inverse ? unplanes2(s, o, n) : planes2(s, o, n); break;
        case 4: inverse ? unplanes4(s, o, n) : planes4(s, o, n); break;
        case 8: inverse ? unplanes8(s, o, n) : planes8(s, o, n); break;
        }
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&out);
    return ret;
}

static PyObject *k_planes(PyObject *self, PyObject *args)
{
    (void)self;
    return do_planes(args, 0);
}

static PyObject *k_unplanes(PyObject *self, PyObject *args)
{
    (void)self;
    return do_planes(args, 1);
}

PyDoc_STRVAR(combine_doc,
"combine(dst, values, width, mode, planar) -> None\n\n"
"In place on dst: dst[j] = op(dst[j], values[j]) on little-endian words of\n"
"`width` bytes; mode is an index into nnpatch.kernel.MODES; planar means\n"
"values is byte-planed.");

static PyObject *k_combine(PyObject *self, PyObject *args)
{
    Py_buffer dst = {0}, vals = {0};
    int width, mode, planar;
    PyObject *ret = NULL;
    (void)self;

    if (!PyArg_ParseTuple(args, "w*y*iip", &dst, &vals, &width, &mode,
                          &planar))
        return NULL;
    if (check_width(width) < 0 || check_mode(mode) < 0)
        goto done;
    if (dst.len != vals.len) {
        PyErr_Format(PyExc_ValueError, "dst size %zd != values size %zd",
                     dst.len, vals.len);
        goto done;
    }
    if (dst.len % width != 0) {
        PyErr_Format(PyExc_ValueError,
                     "size %zd is not a multiple of width %d", dst.len, width);
        goto done;
    }
    if (check_no_overlap(&dst, "dst", &vals, "values") < 0)
        goto done;

    if (dst.len > 0) {
        /* The whole buffer is one row selected by index 0. */
        static const uint64_t zero = 0;
        scatter_job jb;
        jb.dst = (uint8_t *)dst.buf;
        jb.nrows = 1;
        jb.rwords = (size_t)dst.len / (size_t)width;
        jb.idx = (const uint8_t *)&zero;
        jb.n = 1;
        jb.vals = (const uint8_t *)vals.buf;
        jb.mode = mode;
        jb.planar = planar;
        Py_BEGIN_ALLOW_THREADS
        (void)run_scatter(&jb, width);
        Py_END_ALLOW_THREADS
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&dst);
    PyBuffer_Release(&vals);
    return ret;
}

PyDoc_STRVAR(scatter_doc,
"scatter(dst, row_nbytes, indices, values, width, mode, planar) -> None\n\n"
"For each i: combine row indices[i] of dst (rows of row_nbytes bytes) with\n"
"row i of values.  indices: native uint64, strictly increasing, < nrows.\n"
"planar: values is ONE byte-planed stream of len(values)/width words.");

static PyObject *k_scatter(PyObject *self, PyObject *args)
{
    Py_buffer dst = {0}, ix = {0}, vals = {0};
    Py_ssize_t row_nbytes;
    int width, mode, planar;
    size_t nrows, n, pos = 0;
    int bad = 0;
    size_t late = NO_ERROR;
    PyObject *ret = NULL;
    (void)self;

    if (!PyArg_ParseTuple(args, "w*ny*y*iip", &dst, &row_nbytes, &ix, &vals,
                          &width, &mode, &planar))
        return NULL;
    if (check_width(width) < 0 || check_mode(mode) < 0)
        goto done;
    if (check_rows(row_nbytes, width, &dst, "dst", &ix, &vals, "values",
                   &nrows, &n) < 0)
        goto done;
    if (check_no_overlap(&dst, "dst", &vals, "values") < 0 ||
        check_no_overlap(&dst, "dst", &ix, "indices") < 0)
        goto done;

    {
        scatter_job jb;
        jb.dst = (uint8_t *)dst.buf;
        jb.nrows = nrows;
        jb.rwords = (size_t)row_nbytes / (size_t)width;
        jb.idx = (const uint8_t *)ix.buf;
        jb.n = n;
        jb.vals = (const uint8_t *)vals.buf;
        jb.mode = mode;
        jb.planar = planar;
        Py_BEGIN_ALLOW_THREADS
        /* Validate everything before writing anything. */
        bad = scan_indices(jb.idx, n, nrows, &pos);
        if (!bad)
            late = run_scatter(&jb, width);
        Py_END_ALLOW_THREADS
    }
    if (bad) {
        raise_index_error(bad, (const uint8_t *)ix.buf, pos, nrows);
        goto done;
    }
    if (late != NO_ERROR) {
        /* Only possible if the index buffer changed during the call. */
        PyErr_Format(PyExc_ValueError,
                     "index at position %zu changed during scatter and is "
                     "out of range for %zu rows", late, nrows);
        goto done;
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&dst);
    PyBuffer_Release(&ix);
    PyBuffer_Release(&vals);
    return ret;
}

PyDoc_STRVAR(gather_doc,
"gather(src, row_nbytes, indices, out) -> None\n\n"
"out = concatenation of rows indices[i] of src (rows of row_nbytes bytes).\n"
"indices: native uint64, strictly increasing, < nrows.");

static PyObject *k_gather(PyObject *self, PyObject *args)
{
    Py_buffer src = {0}, ix = {0}, out = {0};
    Py_ssize_t row_nbytes;
    size_t nrows, n, pos = 0;
    int bad = 0;
    PyObject *ret = NULL;
    (void)self;

    if (!PyArg_ParseTuple(args, "y*ny*w*", &src, &row_nbytes, &ix, &out))
        return NULL;
    if (check_rows(row_nbytes, 1, &src, "src", &ix, &out, "out", &nrows,
                   &n) < 0)
        goto done;
    if (check_no_overlap(&src, "src", &out, "out") < 0 ||
        check_no_overlap(&ix, "indices", &out, "out") < 0)
        goto done;

    {
        const uint8_t *s = (const uint8_t *)src.buf;
        const uint8_t *idx = (const uint8_t *)ix.buf;
        uint8_t *o = (uint8_t *)out.buf;
        const size_t rb = (size_t)row_nbytes;
        Py_BEGIN_ALLOW_THREADS
        bad = scan_indices(idx, n, nrows, &pos);
        if (!bad) {
            for (size_t i = 0; i < n; i++) {
                const uint64_t r = ld_index(idx, i);
                if (r >= nrows)  /* mutated under us: stop, stay in bounds */
                    break;
                /* Constant sizes let the compiler inline the copy. */
                switch (rb) {
                case 1: o[i] = s[r]; break;
                case 2: memcpy(o + 2 * i, s + 2 * r, 2); break;
                case 4: memcpy(o + 4 * i, s + 4 * r, 4); break;
                case 8: memcpy(o + 8 * i, s + 8 * r, 8); break;
                default: memcpy(o + rb * i, s + rb * (size_t)r, rb); break;
                }
            }
        }
        Py_END_ALLOW_THREADS
    }
    if (bad) {
        raise_index_error(bad, (const uint8_t *)ix.buf, pos, nrows);
        goto done;
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&ix);
    PyBuffer_Release(&out);
    return ret;
}

PyDoc_STRVAR(unsort_doc,
"unsort(old, vals, out, width, planar, shift, mask) -> None\n\n"
"Undo the esort stage: vals holds n words stored in stable order of the key\n"
"of each old word, key = (top >> shift) & mask where top is the old word's\n"
"two high bytes as a little-endian uint16 (its only byte when width is 1);\n"
"out receives them back in position order.  planar: vals and out are\n"
"byte-planed (plane p of n bytes each).");

static PyObject *k_unsort(PyObject *self, PyObject *args)
{
    Py_buffer old = {0}, vals = {0}, out = {0};
    int width, planar, shift, mask;
    PyObject *ret = NULL;
    size_t *start = NULL;
    (void)self;

    if (!PyArg_ParseTuple(args, "y*y*w*ipii", &old, &vals, &out, &width,
                          &planar, &shift, &mask))
        return NULL;
    if (check_width(width) < 0)
        goto done;
    if (shift < 0 || shift > 15 || mask < 0 || mask > 0xFFFF) {
        PyErr_Format(PyExc_ValueError, "bad key field: shift %d, mask %d",
                     shift, mask);
        goto done;
    }
    if (old.len != vals.len || out.len != vals.len || vals.len % width) {
        PyErr_Format(PyExc_ValueError,
                     "old, values and out must be the same whole number of "
                     "words (%zd, %zd, %zd bytes, width %d)",
                     old.len, vals.len, out.len, width);
        goto done;
    }
    if (check_no_overlap(&vals, "values", &out, "out") < 0 ||
        check_no_overlap(&old, "old", &out, "out") < 0)
        goto done;
    start = (size_t *)PyMem_Calloc((size_t)mask + 1, sizeof(size_t));
    if (start == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    {
        const uint8_t *o = (const uint8_t *)old.buf;
        const uint8_t *v = (const uint8_t *)vals.buf;
        uint8_t *dst = (uint8_t *)out.buf;
        const size_t w = (size_t)width, n = (size_t)vals.len / w;
        const uint8_t *hi = o + (w - 1), *lo = w > 1 ? o + (w - 2) : o;
        const unsigned sh = (unsigned)shift, mk = (unsigned)mask;
#define KEY(i) ((((w > 1 ? (unsigned)hi[(i) * w] << 8 | lo[(i) * w]      \
                         : (unsigned)hi[(i) * w])) >> sh) & mk)
        Py_BEGIN_ALLOW_THREADS
        /* a counting sort: word j of vals belongs at the i-th position whose
           key ranks it there, so one pass over the keys finds it */
        for (size_t i = 0; i < n; i++)
            start[KEY(i)]++;
        size_t sum = 0;
        for (size_t k = 0; k <= mk; k++) {
            const size_t c = start[k];
            start[k] = sum;
            sum += c;
        }
        if (planar) {
            for (size_t i = 0; i < n; i++) {
                const size_t j = start[KEY(i)]++;
                for (size_t p = 0; p < w; p++)
                    dst[p * n + i] = v[p * n + j];
            }
        } else {
            for (size_t i = 0; i < n; i++) {
                const size_t j = start[KEY(i)]++;
                memcpy(dst + i * w, v + j * w, w);
            }
        }
        Py_END_ALLOW_THREADS
#undef KEY
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyMem_Free(start);
    PyBuffer_Release(&old);
    PyBuffer_Release(&vals);
    PyBuffer_Release(&out);
    return ret;
}

static PyMethodDef kernel_methods[] = {
    {"planes", k_planes, METH_VARARGS, planes_doc},
    {"unplanes", k_unplanes, METH_VARARGS, unplanes_doc},
    {"combine", k_combine, METH_VARARGS, combine_doc},
    {"scatter", k_scatter, METH_VARARGS, scatter_doc},
    {"gather", k_gather, METH_VARARGS, gather_doc},
    {"unsort", k_unsort, METH_VARARGS, unsort_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef kernel_module = {
    PyModuleDef_HEAD_INIT,
    "nnpatch._kernel",
    "C loops for nnpatch.kernel (byte planes, combine, row scatter/gather).",
    -1,
    kernel_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kernel(void)
{
    return PyModule_Create(&kernel_module);
}
