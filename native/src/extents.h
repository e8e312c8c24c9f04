/*
 * Extents models (format 1.4, spec/FORMAT.md section 5.8): extents.c. Python twin:
 * nnpatch/weights/extents.py and nnpatch/applier/targets.py (_build_extents).
 */
#ifndef NNP_EXTENTS_H
#define NNP_EXTENTS_H

#include <stddef.h>

#include "internal.h"
#include "patch.h"
#include "safetensors.h"

/* An extent table (spec 5.8): the bytes, and each extent in file order pointing into them. */
typedef struct np_ext {
    uint64_t offset, size, row;
    const char *name; /* into the table's bytes */
    size_t name_len;
} np_ext;

typedef struct np_ext_table {
    uint8_t *raw; /* malloc'd: the table's bytes */
    uint64_t file_size;
    size_t n;
    np_ext *e;     /* in file order */
    size_t *order; /* e's indices by name */
} np_ext_table;

/* Every rule of 5.8 on t->raw (len bytes; t otherwise zeroed), failing with `kind` and messages
 * prefixed by `where`. The journal reads the table it carries (1.1) with it too. */
nnp_status np_ext_parse(nnp_ctx *ctx, np_ext_table *t, uint64_t len, nnp_error_kind kind, const char *where);
void np_ext_table_free(np_ext_table *t);
/* The extent named name (len bytes), or NULL. */
const np_ext *np_ext_find(const np_ext_table *t, const char *name, size_t len);

/* Apply the open patches ps[0..n) (taken over: closed, also on failure) to the extents base at
 * base_path, writing the target file at out_path: one patch, extents base and target. */
nnp_status np_extents_apply(nnp_ctx *ctx, const char *base_path, np_patch *ps, size_t n, const char *out_path);

/* What apply checks of an extents patch before it reads the base (--check): the tables (spec 5.8)
 * and the target's against its layout, output and skeleton sizes. */
nnp_status np_extents_check(nnp_ctx *ctx, const np_patch *p);

/* The base's tensors (an extents base of base_size bytes) as an np_st: each at its extent, with
 * the dtype and shape the patch gives it; owns its names and shapes. */
nnp_status np_extents_base_st(nnp_ctx *ctx, const np_patch *p, uint64_t base_size, const char *base_path,
                              np_st *out);

/* The journal carries the table as hex in a JSON string (JOURNAL.md 1.1): at most 1 MiB of it. */
#define NP_EXTENTS_JOURNAL_MAX ((uint64_t)1 << 19)

/* An extents model an update leaves in place: same table, same skeleton (spec 5.8). */
typedef struct np_extents_model {
    int same;             /* 0: a new file is written and renamed over the model */
    np_st base;           /* its tensors at their extents, typed as the patch says */
    uint8_t *table;       /* malloc'd: the extent table's bytes (the journal's model.extents) */
    size_t table_len;
    uint8_t skeleton_blake3[32];
    uint8_t file_blake3[32]; /* the target file's digest (outputs[0]) */
} np_extents_model;

/* Whether the patch p (extents base and target) leaves the model (open as fd, size bytes) in place:
 * its base table and target table are byte for byte the same, of a file of this size, and the
 * model's bytes outside the extents are the target's skeleton. Nothing is written. */
nnp_status np_extents_in_place(nnp_ctx *ctx, const np_patch *p, int fd, uint64_t size, const char *model,
                               np_extents_model *out);

/* --check --base: a 'zstd-base' skeleton (1.5) decoded against the base file mapped at map (proven
 * by its digest first, as apply does); NNP_OK for any other patch. */
nnp_status np_extents_check_skeleton(nnp_ctx *ctx, const np_patch *p, const uint8_t *map, uint64_t size,
                                     const char *base_path);

/* Whether any of the patches has an extents base or target (that apply routes to np_extents_apply). */
static inline int np_extents_any(const np_patch *ps, size_t n)
{
    for (size_t k = 0; k < n; k++)
        if (ps[k].base.format == NP_FMT_EXTENTS || ps[k].target.format == NP_FMT_EXTENTS)
            return 1;
    return 0;
}

#endif
