/* The device's update state MODEL.nnpatch-state (SECURITY.md "Release feeds"; spec/MANIFEST.md "The
 * device's state file"), read and written byte for byte as nnpatch/delivery/state.py does. */
#ifndef NNP_STATE_H
#define NNP_STATE_H

#include <stdint.h>

#include "internal.h"

#define NP_STATE_SUFFIX ".nnpatch-state"
#define NP_MAX_STATE ((size_t)64 << 10)

typedef struct np_state {
    uint64_t release;
    char target_blake3[65];
    char key_id[17];
    char manifest_blake3[65];
    char accepted[21];
    char expires[21]; /* "" for null or absent */
} np_state;

/* The state beside model into *st and *present (0: there is none). A state file that is not one is
 * PatchFormatError (3): ignoring it would undo the rollback defence. */
nnp_status np_state_read(nnp_ctx *ctx, const char *model, np_state *st, int *present);
/* Write it atomically (temporary file, fsync, rename, fsync of the folder). */
nnp_status np_state_write(nnp_ctx *ctx, const char *model, const np_state *st);
/* MODEL.nnpatch-state, malloc'd. */
char *np_state_path(const char *model);

#endif
