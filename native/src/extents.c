/*
 * Extents models (format 1.4, spec/FORMAT.md section 5.8). Python twin: nnpatch/weights/extents.py
 * (the table and the join) and nnpatch/applier/targets.py (_build_extents).
 *
 * A GGUF file (and later other device formats) is a skeleton plus one extent per tensor. The
 * applier needs no parser of the format: the base's extent table says where each base tensor
 * lies (a base np_st is made from it, with the dtypes and shapes the patch gives), the engine
 * builds the target's tensors as the safetensors file the patch's layout describes (proven as
 * any apply is), and this room then writes the target file: the skeleton's bytes with each tensor
 * at its extent, hashed as written, renamed in only when it has the digest of target.outputs[0].
 * Chains too (the base table of the first link, the target of the last); new file only (in place:
 * a new file renamed over the model).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blake3.h"
#include "engine.h"
#include "extents.h"
#include "fileio.h"
#include "hashpool.h"
#include "json.h"
#include "plan.h"
#include "skeldelta.h"
#include "zstdframe.h"

#define EXT_MAX ((uint64_t)1 << 18)
#define EXT_MIN_ENTRY 31 /* 3 × u64, a 1-byte type length and 1 byte of type, a u32 name length and 1 byte */
#define PF(...) np_fail(ctx, NNP_KIND_PATCH_FORMAT, __VA_ARGS__)

typedef np_ext ext;
typedef np_ext_table ext_table;

void np_ext_table_free(np_ext_table *t)
{
    free(t->raw);
    free(t->e);
    free(t->order);
    memset(t, 0, sizeof *t);
}
#define table_free np_ext_table_free

static int type_ok(const uint8_t *s, size_t n)
{
    if (n < 1 || n > 32)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= 'A' && s[i] <= 'Z') || (s[i] >= 'a' && s[i] <= 'z') || (s[i] >= '0' && s[i] <= '9') ||
              s[i] == '_'))
            return 0;
    return 1;
}

static int cmp_ext_name(const void *cx, size_t a, size_t b)
{
    const ext *e = cx;
    return np_name_cmp(e[a].name, e[a].name_len, e[b].name, e[b].name_len);
}

/* extents.decode_table: every rule of spec 5.8 on t->raw (len bytes), in the Python twin's order and
 * words, each failure of `kind` and prefixed by `where` ("NAME: base.extents"). */
nnp_status np_ext_parse(nnp_ctx *ctx, np_ext_table *t, uint64_t len, nnp_error_kind kind, const char *where)
{
#define TF(fmt, ...) np_fail(ctx, kind, "%s: " fmt, where, __VA_ARGS__)
    const uint8_t *r = t->raw;
    if (len < 8 || memcmp(r, "NNPEXT1\0", 8))
        return np_fail(ctx, kind, "%s: the extent table does not start with NNPEXT1", where);
    if (len < 24)
        return np_fail(ctx, kind, "%s: the extent table is truncated", where);
    uint64_t fsize = np_le64(r + 8), count = np_le64(r + 16);
    if (count > EXT_MAX || count > (len - 24) / EXT_MIN_ENTRY)
        return TF("the extent table claims %llu extents, more than its %llu bytes hold or the limit of %llu",
                  (unsigned long long)count, (unsigned long long)len, (unsigned long long)EXT_MAX);
    if (fsize >= (uint64_t)1 << 62)
        return TF("the file size %llu is not below 2^62", (unsigned long long)fsize);
    t->file_size = fsize;
    t->e = calloc(count ? (size_t)count : 1, sizeof *t->e);
    t->order = calloc(count ? (size_t)count : 1, sizeof *t->order);
    if (!t->e || !t->order)
        return np_fail(ctx, NNP_KIND_IO, "%s: out of memory for %llu extents", where, (unsigned long long)count);
    uint64_t pos = 24, end_prev = 0;
    nnp_status st = NNP_OK;
    char q[NP_QUOTE_MAX];
    for (uint64_t i = 0; i < count && !st; i++) {
        ext *e = &t->e[i];
        if (len - pos < 25) {
            st = TF("extent %llu is truncated", (unsigned long long)i);
            break;
        }
        e->offset = np_le64(r + pos);
        e->size = np_le64(r + pos + 8);
        e->row = np_le64(r + pos + 16);
        size_t tlen = r[pos + 24];
        pos += 25;
        if (len - pos < tlen || !type_ok(r + pos, tlen)) {
            st = TF("extent %llu: the type must be 1 to 32 ASCII letters, digits or '_'", (unsigned long long)i);
            break;
        }
        pos += tlen;
        if (len - pos < 4) {
            st = TF("extent %llu is truncated", (unsigned long long)i);
            break;
        }
        uint64_t nlen = np_le32(r + pos);
        pos += 4;
        if (nlen < 1 || nlen > NP_MAX_NAME || len - pos < nlen) {
            st = TF("extent %llu: the name must be 1 to 65536 bytes", (unsigned long long)i);
            break;
        }
        e->name = (const char *)r + pos;
        e->name_len = (size_t)nlen;
        pos += nlen;
        np_quote(q, sizeof q, e->name, e->name_len);
        if (npj_utf8_invalid_at((const uint8_t *)e->name, e->name_len) != e->name_len)
            st = TF("extent %llu: the name is not UTF-8", (unsigned long long)i);
        else if (e->offset < end_prev)
            st = TF("extent %s at %llu overlaps the one before it or is out of order", q, (unsigned long long)e->offset);
        else if (e->size > fsize || e->offset > fsize - e->size)
            st = TF("extent %s (%llu + %llu) runs past the end of the %llu-byte file", q, (unsigned long long)e->offset,
                    (unsigned long long)e->size, (unsigned long long)fsize);
        else if (e->size && (e->row == 0 || e->size % e->row))
            st = TF("extent %s: its %llu bytes are not whole rows of %llu bytes", q, (unsigned long long)e->size,
                    (unsigned long long)e->row);
        end_prev = e->offset + e->size;
        t->n = (size_t)i + 1;
    }
    if (!st && pos != len)
        st = TF("%llu bytes follow the extent table", (unsigned long long)(len - pos));
    if (!st) {
        for (size_t i = 0; i < t->n; i++)
            t->order[i] = i;
        np_sort_indices(t->order, t->n, cmp_ext_name, t->e);
        for (size_t i = 1; i < t->n && !st; i++) {
            const ext *a = &t->e[t->order[i - 1]], *b = &t->e[t->order[i]];
            if (!np_name_cmp(a->name, a->name_len, b->name, b->name_len)) {
                np_quote(q, sizeof q, b->name, b->name_len);
                st = TF("extent %s appears twice", q);
            }
        }
    }
    return st;
#undef TF
}

const np_ext *np_ext_find(const np_ext_table *t, const char *name, size_t len)
{
    size_t lo = 0, hi = t->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        const ext *e = &t->e[t->order[mid]];
        int c = np_name_cmp(e->name, e->name_len, name, len);
        if (!c)
            return e;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

static nnp_status read_table(nnp_ctx *ctx, const np_patch *p, const char *role, const np_section *s,
                             uint64_t tensors, ext_table *t)
{
    memset(t, 0, sizeof *t);
    /* an entry is at most 57 bytes and a name: a bigger section is not a table of these tensors */
    uint64_t most = tensors < EXT_MAX ? tensors + 1 : EXT_MAX; /* no overflow below */
    if (s->size > 24 + most * (57 + 65536))
        return PF("%s: %s.extents: %llu bytes, more than a table of %llu tensors takes", p->name, role,
                  (unsigned long long)s->size, (unsigned long long)tensors);
    nnp_status st = np_section_decode_all(ctx, p, s, role[0] == 'b' ? "base.extents" : "target.extents", &t->raw);
    if (st)
        return st;
    char where[NP_MSG_MAX];
    snprintf(where, sizeof where, "%s: %s.extents", p->name, role);
    return np_ext_parse(ctx, t, s->size, NNP_KIND_PATCH_FORMAT, where);
}

static uint64_t outside(const ext_table *t)
{
    uint64_t in = 0;
    for (size_t i = 0; i < t->n; i++)
        in += t->e[i].size;
    return t->file_size - in; /* extents lie inside the file without overlapping: no wrap */
}

/* targets._extents_plan: the target's table against its output, skeleton and layout's tensors. */
static nnp_status check_target(nnp_ctx *ctx, const np_patch *p, const ext_table *t, const np_st *layout)
{
    const np_model *m = &p->target;
    if (t->file_size != m->output_size)
        return PF("%s: target.extents: the table describes a %llu-byte file, the output is %llu", p->name,
                  (unsigned long long)t->file_size, (unsigned long long)m->output_size);
    if (m->skeleton.size != outside(t))
        return PF("%s: target.skeleton: %llu bytes, but the file leaves %llu outside its extents", p->name,
                  (unsigned long long)m->skeleton.size, (unsigned long long)outside(t));
    char q[NP_QUOTE_MAX];
    if (t->n != layout->n)
        return PF("%s: target.extents: the extent table and the tensors differ (%zu extents, %zu tensors)", p->name,
                  t->n, layout->n);
    for (size_t i = 0; i < t->n; i++) {
        const ext *e = &t->e[i];
        const np_tensor *x = np_st_find(layout, e->name, e->name_len);
        np_quote(q, sizeof q, e->name, e->name_len);
        if (!x)
            return PF("%s: target.extents: the extent table and the tensors differ (first: %s)", p->name, q);
        if (x->nbytes != e->size)
            return PF("%s: target.extents: extent %s is %llu bytes, its tensor %llu", p->name, q,
                      (unsigned long long)e->size, (unsigned long long)x->nbytes);
        uint64_t rows = x->rank ? x->shape[0] : 1;
        if (e->size && (e->size / e->row != rows))
            return PF("%s: target.extents: extent %s: %llu rows of %llu bytes are not its %llu bytes", p->name, q,
                      (unsigned long long)rows, (unsigned long long)e->row, (unsigned long long)e->size);
    }
    return NNP_OK;
}

/* The dtype and shape of base tensor `name`: the op's base reference, else the target layout's
 * (an unchanged tensor); 0 when neither names it. */
static int base_shape(const np_patch *p, const np_st *layout, const char *name, size_t len, int *dtype,
                      unsigned *rank, const uint64_t **shape, uint64_t *numel, uint64_t *nbytes)
{
    for (size_t i = 0; i < p->nops; i++) {
        const np_op *op = &p->ops[i];
        if (op->name_len == len && !memcmp(op->name, name, len)) {
            if (!op->base.present)
                return 0;
            *dtype = op->base.dtype, *rank = op->base.rank, *shape = op->base.shape;
            *numel = op->base.numel, *nbytes = op->base.nbytes;
            return 1;
        }
    }
    const np_tensor *x = np_st_find(layout, name, len);
    if (!x)
        return 0;
    *dtype = x->dtype, *rank = x->rank, *shape = x->shape, *numel = x->numel, *nbytes = x->nbytes;
    return 1;
}

static int cmp_tensor_name(const void *cx, size_t a, size_t b)
{
    const np_tensor *t = cx;
    return np_name_cmp(t[a].name, t[a].name_len, t[b].name, t[b].name_len);
}

/* A base np_st from the base's extent table: each tensor at its extent, typed as the patch says;
 * names and shapes copied into the st's own arena, so it outlives the table and the layout. */
static nnp_status base_st(nnp_ctx *ctx, const np_patch *p, const ext_table *t, const np_st *layout,
                          uint64_t base_size, const char *base_path, np_st *out)
{
    memset(out, 0, sizeof *out);
    if (t->file_size != base_size)
        return np_fail(ctx, NNP_KIND_BASE_MISMATCH,
                       "%s: wrong base: the patch's base is %llu bytes, this one %llu", base_path,
                       (unsigned long long)t->file_size, (unsigned long long)base_size);
    out->tensors = calloc(t->n ? t->n : 1, sizeof *out->tensors);
    if (!out->tensors)
        return np_fail(ctx, NNP_KIND_IO, "out of memory for %zu tensors", t->n);
    char q[NP_QUOTE_MAX];
    const uint64_t **shapes = calloc(t->n ? t->n : 1, sizeof *shapes);
    if (!shapes)
        return np_fail(ctx, NNP_KIND_IO, "out of memory for %zu tensors", t->n);
    uint64_t arena = 8;
    for (size_t i = 0; i < t->n; i++) { /* the shapes the patch gives, then their room: rank, name, alignment */
        const ext *e = &t->e[i];
        np_tensor *x = &out->tensors[i];
        if (!base_shape(p, layout, e->name, e->name_len, &x->dtype, &x->rank, &shapes[i], &x->numel, &x->nbytes)) {
            free(shapes);
            np_quote(q, sizeof q, e->name, e->name_len);
            return np_fail(ctx, NNP_KIND_BASE_MISMATCH,
                           "%s: base tensor %s is neither changed by the patch nor in its target", p->name, q);
        }
        arena += (uint64_t)x->rank * 8 + e->name_len + 1 + 8;
    }
    out->by_name = calloc(t->n ? t->n : 1, sizeof *out->by_name);
    out->arena_ = arena <= SIZE_MAX ? malloc((size_t)arena) : NULL;
    if (!out->by_name || !out->arena_) {
        free(shapes);
        return np_fail(ctx, NNP_KIND_IO, "out of memory for %zu tensors", t->n);
    }
    uint8_t *own = out->arena_;
    out->n = t->n;
    out->data_start = t->n ? t->e[0].offset : 0;
    out->data_end = t->n ? t->e[t->n - 1].offset + t->e[t->n - 1].size : 0;
    nnp_status st = NNP_OK;
    for (size_t i = 0; i < t->n; i++) {
        const ext *e = &t->e[i];
        np_tensor *x = &out->tensors[i];
        x->begin = e->offset;
        x->end = e->offset + e->size;
        memcpy(own, shapes[i], (size_t)x->rank * 8); /* 8-byte aligned: each piece is padded to 8 */
        x->shape = (const uint64_t *)own;
        own += (size_t)x->rank * 8;
        memcpy(own, e->name, e->name_len);
        own[e->name_len] = 0;
        x->name = (const char *)own;
        x->name_len = e->name_len;
        own += e->name_len + 1;
        own += (8 - ((uintptr_t)own & 7)) & 7;
        if (x->nbytes != e->size && !st) {
            np_quote(q, sizeof q, e->name, e->name_len);
            st = PF("%s: base.extents: extent %s is %llu bytes, its tensor %llu", p->name, q,
                    (unsigned long long)e->size, (unsigned long long)x->nbytes);
        }
        out->by_name[i] = i;
    }
    free(shapes);
    if (st)
        return st;
    np_sort_indices(out->by_name, out->n, cmp_tensor_name, out->tensors);
    return NNP_OK;
}

/* A skeleton delta (1.5, skeldelta.c), decoded against the base file's bytes outside its table
 * once the file is proven to be the patch's base byte for byte (its digest, base.blake3). */
static nnp_status delta_skeleton(nnp_ctx *ctx, const np_patch *ps, size_t n, const ext_table *bt, const uint8_t *map,
                                 uint64_t size, const char *base_path, uint8_t **skel)
{
    uint8_t *bs = NULL, d[32];
    uint64_t len = outside(bt), at = 0, k = 0;
    nnp_status st = NNP_OK;
    if (np_skel_needs_base(ps, n)) {
        if ((st = np_hash_file(ctx, map, size, d)))
            return st;
        if (memcmp(d, ps[0].base.blake3, 32)) {
            char a[65], b[65];
            np_hex(ps[0].base.blake3, 32, a);
            np_hex(d, 32, b);
            return np_fail(ctx, NNP_KIND_BASE_MISMATCH, "%s: wrong base: the patch's skeleton is a delta against "
                           "base file %s, this one is %s", base_path, a, b);
        }
        if (!(bs = malloc(len ? (size_t)len : 1)))
            return np_fail(ctx, NNP_KIND_IO, "out of memory for the base's skeleton");
        for (size_t i = 0; i <= bt->n; i++) { /* the gaps between extents, and the tail */
            uint64_t end = i < bt->n ? bt->e[i].offset : bt->file_size;
            memcpy(bs + k, map + at, (size_t)(end - at));
            k += end - at;
            at = i < bt->n ? end + bt->e[i].size : end;
        }
    }
    st = np_skel_target(ctx, ps, n, bs, len, skel);
    free(bs);
    return st;
}

/* Write the target file from the skeleton and the staged tensors, hashed as written. */
static nnp_status join(nnp_ctx *ctx, const np_patch *p, const ext_table *t, const uint8_t *skel,
                       const char *staged, const np_st *layout, const char *out_path)
{
    int sfd = open(staged, O_RDONLY | O_CLOEXEC);
    if (sfd < 0)
        return np_fail_errno(ctx, errno, staged, "cannot open");
    struct stat sb;
    if (fstat(sfd, &sb) != 0) {
        close(sfd);
        return np_fail_errno(ctx, errno, staged, "cannot stat");
    }
    const uint8_t *smap = NULL;
    if (sb.st_size) {
        void *mm = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_SHARED, sfd, 0);
        if (mm == MAP_FAILED) {
            nnp_status s = np_fail_errno(ctx, errno, staged, "cannot map");
            close(sfd);
            return s;
        }
        smap = mm;
    }
    np_tmp tmp;
    nnp_status st = np_tmp_create(ctx, out_path, ".tmp", &tmp);
    np_blake3 h;
    np_blake3_init(&h);
    uint64_t at = 0, sk = 0;
#define PUT(ptr, n)                                                                                                 \
    do {                                                                                                            \
        int e_ = np_write_all(tmp.fd, (ptr), (size_t)(n));                                                          \
        if (e_) {                                                                                                   \
            st = np_fail_errno(ctx, e_, out_path, "cannot write");                                                  \
            break;                                                                                                  \
        }                                                                                                           \
        np_blake3_update(&h, (ptr), (size_t)(n));                                                                   \
    } while (0)
    for (size_t i = 0; i < t->n && !st; i++) {
        const ext *e = &t->e[i];
        const np_tensor *x = np_st_find(layout, e->name, e->name_len);
        uint64_t gap = e->offset - at;
        PUT(skel + sk, gap);
        if (st)
            break;
        sk += gap;
        if ((uint64_t)sb.st_size < x->end) {
            st = np_fail(ctx, NNP_KIND_INTEGRITY, "%s: the staged tensors end early", staged);
            break;
        }
        PUT(smap + x->begin, e->size);
        at = e->offset + e->size;
    }
    if (!st)
        PUT(skel + sk, t->file_size - at);
#undef PUT
    if (smap)
        munmap((void *)smap, (size_t)sb.st_size);
    close(sfd);
    if (!st) {
        uint8_t d[32];
        np_blake3_final(&h, d);
        if (memcmp(d, p->target.output_blake3, 32)) {
            char a[65], b[65];
            np_hex(d, 32, a);
            np_hex(p->target.output_blake3, 32, b);
            st = np_fail(ctx, NNP_KIND_INTEGRITY,
                         "%s: the file rebuilt does not match the patch's target (BLAKE3 %s, expected %s)", out_path, a,
                         b);
        }
    }
    if (!st)
        return np_tmp_commit(ctx, &tmp, "the target file");
    np_tmp_abort(&tmp);
    return st;
}

nnp_status np_extents_check(nnp_ctx *ctx, const np_patch *p)
{
    np_st layout;
    memset(&layout, 0, sizeof layout);
    uint8_t *raw = NULL;
    uint64_t len = 0;
    ext_table bt, tt;
    memset(&bt, 0, sizeof bt);
    memset(&tt, 0, sizeof tt);
    nnp_status st = np_plan_decode_layout(ctx, p, &layout, &raw, &len);
    if (!st && p->base.format == NP_FMT_EXTENTS)
        st = read_table(ctx, p, "base", &p->base.extents, p->base.tensors, &bt);
    if (!st && p->target.format == NP_FMT_EXTENTS && !(st = read_table(ctx, p, "target", &p->target.extents,
                                                                       p->target.tensors, &tt)))
        st = check_target(ctx, p, &tt, &layout);
    np_st_free(&layout);
    free(raw);
    table_free(&bt);
    table_free(&tt);
    return st;
}

nnp_status np_extents_base_st(nnp_ctx *ctx, const np_patch *p, uint64_t base_size, const char *base_path, np_st *out)
{
    np_st layout;
    memset(&layout, 0, sizeof layout);
    memset(out, 0, sizeof *out);
    uint8_t *raw = NULL;
    uint64_t len = 0;
    ext_table bt;
    memset(&bt, 0, sizeof bt);
    nnp_status st = np_plan_decode_layout(ctx, p, &layout, &raw, &len);
    if (!st)
        st = read_table(ctx, p, "base", &p->base.extents, p->base.tensors, &bt);
    if (!st)
        st = base_st(ctx, p, &bt, &layout, base_size, base_path, out);
    if (st)
        np_st_free(out);
    np_st_free(&layout);
    free(raw);
    table_free(&bt);
    return st;
}

nnp_status np_extents_apply(nnp_ctx *ctx, const char *base_path, np_patch *ps, size_t n, const char *out_path)
{
    nnp_status st = NNP_OK;
    np_patch *p0 = &ps[0], *pl = &ps[n - 1]; /* the chain's first link (its base) and last (its target) */
    if (p0->base.format != NP_FMT_EXTENTS) {
        st = np_fail(ctx, NNP_KIND_UNSUPPORTED_VERSION,
                     "%s: the native applier makes a GGUF (extents) target from a GGUF base only; use `nnpatch apply`",
                     pl->name);
        for (size_t k = 0; k < n; k++)
            np_patch_close(&ps[k]);
        return st;
    }
    int join_target = pl->target.format == NP_FMT_EXTENTS; /* else the safetensors file is the target */
    np_st layout0, layout, base;
    memset(&layout0, 0, sizeof layout0);
    memset(&layout, 0, sizeof layout);
    memset(&base, 0, sizeof base);
    ext_table bt, tt, lt;
    memset(&bt, 0, sizeof bt);
    memset(&tt, 0, sizeof tt);
    memset(&lt, 0, sizeof lt);
    uint8_t *layout0_raw = NULL, *layout_raw = NULL, *skel = NULL;
    uint64_t layout_len = 0;
    int fd = -1;
    const uint8_t *map = NULL;
    uint64_t size = 0;
    char *staged = NULL;
    np_chain *c = NULL;
    size_t owned = n; /* patches this function still closes (the chain takes them over) */
    /* everything the patches say is checked before the base is read or anything written */
    if ((st = np_plan_decode_layout(ctx, p0, &layout0, &layout0_raw, &layout_len)) ||
        (st = read_table(ctx, p0, "base", &p0->base.extents, p0->base.tensors, &bt)))
        goto out;
    if (pl != p0 && pl->base.format == NP_FMT_EXTENTS &&
        (st = read_table(ctx, pl, "base", &pl->base.extents, pl->base.tensors, &lt)))
        goto out;
    if (join_target &&
        ((st = np_plan_decode_layout(ctx, pl, &layout, &layout_raw, &layout_len)) ||
         (st = read_table(ctx, pl, "target", &pl->target.extents, pl->target.tensors, &tt)) ||
         (st = check_target(ctx, pl, &tt, &layout)) ||
         (!np_sec_zstd_base(&pl->target.skeleton) && /* a delta: once the base is proven (delta_skeleton) */
          (st = np_section_decode_all(ctx, pl, &pl->target.skeleton, "target.skeleton", &skel)))))
        goto out;
    fd = open(base_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        st = np_fail_errno(ctx, errno, base_path, "cannot open");
        goto out;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        st = np_fail_errno(ctx, errno, base_path, "cannot stat");
        goto out;
    }
    if (!S_ISREG(sb.st_mode)) {
        st = np_fail(ctx, NNP_KIND_WEIGHTS, "%s: not a regular file", base_path);
        goto out;
    }
    size = (uint64_t)sb.st_size;
    if ((st = base_st(ctx, p0, &bt, &layout0, size, base_path, &base)))
        goto out;
    if (size) {
        void *mm = mmap(NULL, (size_t)size, PROT_READ, MAP_SHARED, fd, 0);
        if (mm == MAP_FAILED) {
            st = np_fail_errno(ctx, errno, base_path, "cannot map");
            goto out;
        }
        map = mm;
    }
    if (join_target && !skel && (st = delta_skeleton(ctx, ps, n, &bt, map, size, base_path, &skel)))
        goto out;
    if (join_target) {
        size_t sl = strlen(out_path);
        staged = malloc(sl + 32);
        if (!staged) {
            st = np_fail(ctx, NNP_KIND_IO, "out of memory");
            goto out;
        }
        snprintf(staged, sl + 32, "%s.nnpatch-staged-%ld", out_path, (long)getpid());
        if (np_lexists(staged)) {
            st = np_fail(ctx, NNP_KIND_IO, "%s: exists; remove it (a staging file of an interrupted apply)", staged);
            free(staged);
            staged = NULL;
            goto out;
        }
    }
    owned = 0;
    st = np_chain_open_patches(ctx, ps, n, &base, size, base_path, &c);
    if (!st)
        st = np_engine_build(ctx, c, fd, map, join_target ? staged : out_path);
    if (!st && join_target)
        st = join(ctx, &c->patches[n - 1], &tt, skel, staged, &c->layouts[n - 1], out_path);
out:
    if (staged) {
        unlink(staged);
        free(staged);
    }
    for (size_t k = 0; k < owned; k++)
        np_patch_close(&ps[k]);
    np_chain_free(c);
    if (map)
        munmap((void *)map, (size_t)size);
    if (fd >= 0)
        close(fd);
    np_st_free(&base);
    np_st_free(&layout0);
    np_st_free(&layout);
    free(layout0_raw);
    free(layout_raw);
    free(skel);
    table_free(&bt);
    table_free(&tt);
    table_free(&lt);
    return st;
}

/* The model's skeleton (every byte outside t's extents, from the map m) against skel: equal or not,
 * and its BLAKE3 in d. */
static int same_skeleton(const ext_table *t, const uint8_t *m, const uint8_t *skel, uint8_t d[32])
{
    np_blake3 h;
    np_blake3_init(&h);
    uint64_t at = 0, sk = 0;
    int same = 1;
    for (size_t i = 0; i <= t->n; i++) {
        uint64_t end = i < t->n ? t->e[i].offset : t->file_size;
        if (end > at) {
            same = same && !memcmp(m + at, skel + sk, (size_t)(end - at));
            np_blake3_update(&h, m + at, (size_t)(end - at));
            sk += end - at;
        }
        if (i < t->n)
            at = t->e[i].offset + t->e[i].size;
    }
    np_blake3_final(&h, d);
    return same;
}

nnp_status np_extents_in_place(nnp_ctx *ctx, const np_patch *p, int fd, uint64_t size, const char *model,
                               np_extents_model *out)
{
    memset(out, 0, sizeof *out);
    if (p->base.format != NP_FMT_EXTENTS || p->target.format != NP_FMT_EXTENTS)
        return NNP_OK;
    np_st layout;
    memset(&layout, 0, sizeof layout);
    uint8_t *raw = NULL, *skel = NULL;
    uint64_t len = 0;
    ext_table bt, tt;
    memset(&bt, 0, sizeof bt);
    memset(&tt, 0, sizeof tt);
    const uint8_t *m = NULL;
    nnp_status st = NNP_OK;
    if ((st = np_plan_decode_layout(ctx, p, &layout, &raw, &len)) ||
        (st = read_table(ctx, p, "base", &p->base.extents, p->base.tensors, &bt)) ||
        (st = read_table(ctx, p, "target", &p->target.extents, p->target.tensors, &tt)) ||
        (st = check_target(ctx, p, &tt, &layout)))
        goto out;
    /* the same table (names, offsets, sizes, rows, types, file size), small enough for the journal */
    if (p->base.extents.size != p->target.extents.size || p->base.extents.size > NP_EXTENTS_JOURNAL_MAX ||
        memcmp(bt.raw, tt.raw, (size_t)p->base.extents.size) || bt.file_size != size || size > SIZE_MAX)
        goto out;
    if (size) {
        void *mm = mmap(NULL, (size_t)size, PROT_READ, MAP_SHARED, fd, 0);
        if (mm == MAP_FAILED) {
            st = np_fail_errno(ctx, errno, model, "cannot map");
            goto out;
        }
        m = mm;
    }
    /* a skeleton delta (1.5) is decoded against the model's own skeleton, once it is proven the base */
    if ((st = np_sec_zstd_base(&p->target.skeleton)
                  ? delta_skeleton(ctx, p, 1, &bt, m ? m : (const uint8_t *)"", size, model, &skel)
                  : np_section_decode_all(ctx, p, &p->target.skeleton, "target.skeleton", &skel)))
        goto out;
    if (!same_skeleton(&bt, m ? m : (const uint8_t *)"", skel, out->skeleton_blake3))
        goto out;
    if ((st = base_st(ctx, p, &bt, &layout, size, model, &out->base)))
        goto out;
    out->table = bt.raw;
    out->table_len = (size_t)p->base.extents.size;
    bt.raw = NULL;
    memcpy(out->file_blake3, p->target.output_blake3, 32);
    out->same = 1;
out:
    if (st)
        np_st_free(&out->base);
    if (m)
        munmap((void *)m, (size_t)size);
    np_st_free(&layout);
    free(raw);
    free(skel);
    table_free(&bt);
    table_free(&tt);
    return st;
}

/* --check --base: the skeleton delta against the mapped base (extents.h). */
nnp_status np_extents_check_skeleton(nnp_ctx *ctx, const np_patch *p, const uint8_t *map, uint64_t size,
                                     const char *base_path)
{
    if (p->target.format != NP_FMT_EXTENTS || !np_sec_zstd_base(&p->target.skeleton))
        return NNP_OK;
    ext_table bt;
    memset(&bt, 0, sizeof bt);
    uint8_t *skel = NULL;
    nnp_status st = read_table(ctx, p, "base", &p->base.extents, p->base.tensors, &bt);
    if (!st && bt.file_size != size)
        st = np_fail(ctx, NNP_KIND_BASE_MISMATCH, "%s: wrong base: the patch's base is %llu bytes, this one %llu",
                     base_path, (unsigned long long)bt.file_size, (unsigned long long)size);
    if (!st)
        st = delta_skeleton(ctx, p, 1, &bt, map, size, base_path, &skel);
    free(skel);
    table_free(&bt);
    return st;
}
