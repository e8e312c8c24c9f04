/*
 * The chain plan (plan.c); Python twin: nnpatch/applier/plan.py (plan_forward). What the
 * engine (engine.c) builds from, and the in-place path (inplace.c) with the np_chain_* functions.
 */
#ifndef NNP_PLAN_H
#define NNP_PLAN_H

#include <stddef.h>
#include <stdint.h>

#include "codec.h"
#include "internal.h"
#include "patch.h"
#include "safetensors.h"

typedef struct np_chain np_chain;

/* Open n >= 1 patch files in order (trailer; signature against ctx's key before the header
 * is parsed; header; target layout decoded) and plan the chain against the base whose parsed
 * header is `base` (a file of base_size bytes; base_path for messages): tensor set, dtypes,
 * shapes and chain links checked as plan_forward does (BASE_MISMATCH, 4). Hashes no tensor,
 * writes nothing. `base` must outlive the chain. */
nnp_status np_chain_open(nnp_ctx *ctx, const char *const *patch_paths, size_t n, const np_st *base,
                         uint64_t base_size, const char *base_path, np_chain **out);
/* The same with patches already open (taken over: closed by np_chain_free, also on failure). */
nnp_status np_chain_open_patches(nnp_ctx *ctx, np_patch *patches, size_t n, const np_st *base, uint64_t base_size,
                                 const char *base_path, np_chain **out);
void np_chain_free(np_chain *c);

typedef struct np_chain_info {
    int single_file;       /* the final target is one safetensors file */
    const uint8_t *layout; /* its header bytes (8 + JSON) as carried by the patch */
    uint64_t layout_len;
    uint64_t size;         /* its file size */
    uint8_t base_blake3[32], base_model[32];     /* the first link's base */
    uint8_t target_blake3[32], target_model[32]; /* the last link's target */
    uint8_t patch_trailer[32];                   /* the last link's trailer hash */
    size_t n_items;        /* tensors of the output, in output file order */
} np_chain_info;
void np_chain_get_info(const np_chain *c, np_chain_info *out);

typedef struct np_item {
    const np_tensor *out;  /* where it lies in the output */
    const np_tensor *src;  /* the base tensor it starts from; NULL when filled from a patch */
    int touched;           /* fill or at least one step */
    int has_fill;          /* op add, or whole without delta stage */
    size_t n_steps;        /* relative steps after the fill */
    int first_kind;        /* NP_OP_* of (fill or steps[0]) */
    uint64_t count;        /* that op's count */
    const uint8_t *expect; /* 32 bytes: digest of its final bytes (touched), else NULL */
} np_item;
void np_chain_item(const np_chain *c, size_t i, np_item *out);

/* The digest base tensor base->tensors[k] must have (Plan.input_expect), or NULL. */
const uint8_t *np_chain_input_expect(const np_chain *c, size_t k);

/* Item i's single step's index, decoded and validated, in pieces. */
nnp_status np_chain_indices(nnp_ctx *ctx, np_chain *c, size_t i, np_index_fn fn, void *user);

/* Run item i's fill and steps on dst[0 .. out->nbytes) (holding its src's bytes). */
nnp_status np_chain_apply_item(nnp_ctx *ctx, np_chain *c, size_t i, uint8_t *dst);

/* The plan's own records, read by the engine (engine.c) and the check (check.c): a step is one
 * op's values run on a tensor; an item one output tensor, filled (a patch's values) or started
 * from a base tensor (src), then its steps steps[s0 .. s0+ns) in link order. */
typedef struct np_step {
    const np_patch *p;
    const np_op *op;
    const np_section *s;
    int mode;
} np_step;

typedef struct np_pitem {
    const np_tensor *out;
    const np_tensor *src;
    int has_fill;
    np_step fill;
    size_t s0, ns;
    const uint8_t *expect;
} np_pitem;

struct np_chain {
    np_patch *patches;
    size_t n;
    np_st *layouts;
    uint8_t **layout_raw;
    uint64_t *layout_len;
    const np_st *base;
    uint64_t base_size;
    char *base_path;
    np_pitem *items;
    size_t nitems;
    np_step *steps;
    size_t nsteps;
    const uint8_t **input_expect;
    char *scratch_dir; /* for wide chunk buffers: the output's directory (the base's by default) */
};

/* The scratch directory for wide chunk buffers: out_path's directory from now on. */
void np_chain_set_scratch(np_chain *c, const char *out_path);

/* The rules of one link the plan applies, for the check (check.c) to apply the same ones. */
/* plan.decode_layout: a file target's layout section decoded and parsed (raw: its bytes). */
nnp_status np_plan_decode_layout(nnp_ctx *ctx, const np_patch *p, np_st *st, uint8_t **raw, uint64_t *rawlen);
/* The ops agree with the target layout (tensor set, dtypes, shapes, count). */
nnp_status np_plan_check_ops(nnp_ctx *ctx, const np_patch *p, const np_st *layout);
/* The base's header fits the patch (BASE_MISMATCH, 4), then np_plan_check_ops. */
nnp_status np_plan_check_base(nnp_ctx *ctx, const np_patch *p, const np_st *base, const char *bpath,
                              const np_st *layout);
/* The native applier writes safetensors files only: any other target is refused (3), the message
 * naming the command that handles it (`instead`). */
nnp_status np_plan_refuse_target(nnp_ctx *ctx, const np_patch *p, const char *instead);

#endif
