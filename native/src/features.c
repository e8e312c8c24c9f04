/*
 * A patch header's required_features (spec/FORMAT.md section 5.1): the features this reader has,
 * and what each changes in how the rest of the file is read. Python twin:
 * nnpatch/patchfile/header.py (KNOWN_FEATURES, PatchHeader.packed) and reader.py.
 */
#include <string.h>

#include "json.h"
#include "patch.h"

nnp_status np_patch_features(nnp_ctx *ctx, np_patch *p, const npj_value *feat)
{
    static const char packed[] = "packed-sections";
    int ok = feat->kind == NPJ_ARRAY;
    for (size_t i = 0; ok && i < feat->u.arr.n; i++)
        if (feat->u.arr.items[i].kind != NPJ_STRING)
            ok = 0;
    if (!ok)
        return np_fail(ctx, NNP_KIND_PATCH_FORMAT, "%s: header: required_features: must be a list of strings",
                       p->name);
    for (size_t i = 0; i < feat->u.arr.n; i++) {
        const npj_value *f = &feat->u.arr.items[i];
        if (f->u.str.len == sizeof packed - 1 && !memcmp(f->u.str.s, packed, sizeof packed - 1)) {
            p->packed = 1;
            continue;
        }
        char q[NP_QUOTE_MAX];
        np_quote(q, sizeof q, f->u.str.s, f->u.str.len);
        return np_fail(ctx, NNP_KIND_UNSUPPORTED_VERSION, "%s: requires feature %s, which this nnpatch does not support",
                       p->name, q);
    }
    return NNP_OK;
}
