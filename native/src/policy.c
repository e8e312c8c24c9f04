/*
 * The verify policy (policy.h); Python twin: nnpatch/applier/policy.py (Verify). It answers
 * "what does this apply prove before the output counts as written?".
 */
#include "policy.h"

np_verify np_verify_policy(const nnp_ctx *ctx)
{
    np_verify v;
    v.whole_base = ctx->verify != NNP_VERIFY_TOUCHED;
    v.reuse_cvs = ctx->verify != NNP_VERIFY_FULL;
    v.prove_file = 1;
    return v;
}
