/*
 * Entry points only nnpatch's own commands use (cli/nnpatch_apply.c), which link libnnpatch.a
 * statically: not in nnpatch.h and not exported by libnnpatch.so (libnnpatch.map exports nnp_*
 * only). Declared once here, for the definitions (apply.c, check.c) and the command alike.
 */
#ifndef NNPATCH_COMMAND_H
#define NNPATCH_COMMAND_H

#include <stddef.h>

#include "nnpatch.h"

/* nnp_apply with mixed inputs: paths[k], or srcs[k] (a stream) where paths[k] is NULL. */
nnp_status np_apply_mixed(nnp_ctx *ctx, const char *old_path, const char *const *paths, const nnp_source *srcs,
                          size_t n, const char *out_path);

/* nnp_check of a patch read from a stream (spooled in tmp_dir, named src->name or "<stdin>"). */
nnp_status np_check_stream(nnp_ctx *ctx, const nnp_source *src, const char *tmp_dir, const char *base_path);

#endif
