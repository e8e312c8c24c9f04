/*
 * The apply engine: the plan of a chain (nnpatch/applier/plan.py plan_forward) and the
 * one pass that builds the output (engine.py), with the verify policies of policy.py.
 * Also what the in-place path (inplace.c) builds on: the np_chain_* functions.
 */
#ifndef NNP_APPLY_H
#define NNP_APPLY_H

#include <stddef.h>
#include <stdint.h>

#include "codec.h"
#include "internal.h"
#include "patch.h"
#include "safetensors.h"

#define NP_CHAIN_API 1

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

#endif
