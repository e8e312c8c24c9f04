/*
 * A patch read from a stream (stream.c); Python twin: nnpatch/patchfile/stream.py.
 */
#ifndef NNP_STREAM_H
#define NNP_STREAM_H

#include "internal.h"
#include "patch.h"

/* Spool the stream src beside out_path (an unlinked temporary file), checking it as it arrives
 * (magic, header, trailer hash); opens it as *p. */
nnp_status np_spool(nnp_ctx *ctx, const nnp_source *src, const char *out_path, np_patch *p);

#endif
