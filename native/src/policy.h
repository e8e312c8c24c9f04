/*
 * What an apply promises: the verify policy, derived once from the context's mode and asked by
 * every writer (the engine, the in-place path). Python twin: nnpatch/applier/policy.py (Verify).
 */
#ifndef NNP_POLICY_H
#define NNP_POLICY_H

#include "internal.h"

typedef struct np_verify {
    /* every base tensor is hashed, and the base and target model digests are checked (default,
     * full); touched: only the tensors the patch names */
    int whole_base;
    /* a result tensor may be hashed from its base's chaining values (not full: there every
     * tensor is hashed again as written, independent of the engine's bookkeeping) */
    int reuse_cvs;
    /* the output file's BLAKE3, from the bytes written, is compared with the patch's target
     * digest: every mode (a single-file target; issue 28 item 5: a header's file digest is never
     * taken on trust) */
    int prove_file;
} np_verify;

np_verify np_verify_policy(const nnp_ctx *ctx);

#endif
