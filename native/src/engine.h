/*
 * The build (engine.c); Python twin: nnpatch/applier/engine.py (build_file).
 */
#ifndef NNP_ENGINE_H
#define NNP_ENGINE_H

#include <stdint.h>

#include "internal.h"
#include "plan.h"

/* Build the chain's output at out_path (a temporary file beside it, renamed when every check of
 * ctx's verify policy passed): base_fd/base_map is the base the chain was planned against. */
nnp_status np_engine_build(nnp_ctx *ctx, np_chain *c, int base_fd, const uint8_t *base_map, const char *out_path);

#endif
