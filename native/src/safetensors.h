/*
 * safetensors headers (the 8-byte length and the JSON), parsed strictly as
 * nnpatch/weights/safetensors_file.py does: known dtypes, rank <= 64 and every
 * dimension < 2^62 and byte size < 2^62 checked before any arithmetic on the
 * shape, offsets that cover the data exactly (no holes, no overlaps), the file
 * size equal to header plus data when known.
 */
#ifndef NNP_SAFETENSORS_H
#define NNP_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "internal.h"

#define NP_ST_MAX_HEADER 100000000ULL

typedef struct np_tensor {
    const char *name; /* UTF-8, NUL-terminated (may contain NUL: use name_len) */
    size_t name_len;
    int dtype;        /* index into np_dtypes */
    unsigned rank;
    const uint64_t *shape; /* rank dimensions */
    uint64_t numel;
    uint64_t nbytes;
    uint64_t begin, end; /* absolute offsets in the file (8 + header length + data_offsets) */
} np_tensor;

typedef struct np_st {
    uint64_t header_len; /* the JSON's length (the u64 at byte 0) */
    uint64_t data_start; /* 8 + header_len: where the data begins */
    uint64_t data_end;   /* end of the last tensor (== file size when checked) */
    size_t n;            /* tensors (without __metadata__) */
    np_tensor *tensors;  /* in file order (by begin, then end) */
    size_t *by_name;     /* indices into tensors, sorted by name bytes */
    int has_metadata;
    void *arena_;        /* owned storage (names, shapes) */
} np_st;

/* Parse raw[0..len) = the 8-byte length and at least that many JSON bytes.
 * file_size: UINT64_MAX when unknown, else the data must end exactly there.
 * what: the name messages give ("base.safetensors", "patch: target layout").
 * Failures are reported with `kind` (NNP_KIND_WEIGHTS for a model file,
 * NNP_KIND_PATCH_FORMAT for a layout carried by a patch). out is zeroed first;
 * np_st_free is safe on it after a failure. */
nnp_status np_st_parse(nnp_ctx *ctx, const uint8_t *raw, size_t len, uint64_t file_size, const char *what,
                       nnp_error_kind kind, np_st *out);

/* Read and parse the header of the open file fd (pread; at most 8 + 100 MB),
 * checking it against the file's size. Errors: WEIGHTS (3) or IO (5). */
nnp_status np_st_read_fd(nnp_ctx *ctx, int fd, const char *path, np_st *out);

void np_st_free(np_st *st);

/* The tensor named name[0..len), or NULL. Binary search on by_name. */
const np_tensor *np_st_find(const np_st *st, const char *name, size_t len);

/* Bytes of the header region (8 + header_len): what a layout carries. */
static inline uint64_t np_st_header_bytes(const np_st *st) { return st->data_start; }

/* The model digest (FORMAT.md section 8) over tensors t[i] for i in order[0..n)
 * (order sorted by name), with tensor digests dig[i] (32 bytes each, indexed as t). */
void np_model_digest(const np_tensor *t, const size_t *order, size_t n, const uint8_t (*dig)[32],
                     uint8_t out[32]);

#endif
