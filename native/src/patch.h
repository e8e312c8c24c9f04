/*
 * The patch container and header (spec/FORMAT.md sections 4-6, 12): open a patch
 * file (memory-mapped, read-only), check its preamble, trailer, signature (with a
 * trusted key, before the header is parsed), header and the placement of every
 * section, as nnpatch/patchfile/reader.py does, with the same error classes.
 */
#ifndef NNP_PATCH_H
#define NNP_PATCH_H

#include <stddef.h>
#include <stdint.h>

#include "internal.h"

#define NP_PREAMBLE 24
#define NP_TRAILER 32
#define NP_SIGBLOCK 96
#define NP_FLAG_SIGNED 0x1u
#define NP_FLAG_HEADER_ZSTD 0x2u
#define NP_RESERVED_FLAGS 0xFFFCu
#define NP_MAX_HEADER ((uint64_t)64 << 20)
#define NP_MAX_OPS ((size_t)1 << 18)
#define NP_MAX_JSON_VALUES ((uint64_t)1 << 22)
#define NP_MAX_JSON_DEPTH 16
#define NP_MAX_NAME ((size_t)1 << 16)
/* op names and file and output paths of one header, together (spec/FORMAT.md section 12) */
#define NP_MAX_NAMES ((uint64_t)1 << 24)
#define NP_MAX_FILES ((size_t)1 << 16)
#define NP_MAX_PATH 4096
#define NP_ZSTD_EXPANSION 32768ULL

/* Stage codes of a section's codec (value stages and index formats). 0: unknown. */
enum {
    NP_S_UNKNOWN = 0,
    NP_S_XOR, NP_S_ADD, NP_S_ZADD, NP_S_ESORT, NP_S_PLANES, NP_S_ZSTD,
    NP_S_U32, NP_S_U64, NP_S_VARINT, NP_S_BITMAP,
    NP_S_ZSTD_BASE /* an extents target's skeleton only (1.5): zstd against the base's skeleton (skeldelta.c) */
};

typedef struct np_section {
    int present;
    uint64_t offset, length, size;
    uint8_t nst;
    uint8_t st[8];
} np_section;

static inline int np_sec_zstd(const np_section *s)
{
    return s->nst && (s->st[s->nst - 1] == NP_S_ZSTD || s->st[s->nst - 1] == NP_S_ZSTD_BASE);
}
static inline int np_sec_zstd_base(const np_section *s) { return s->nst == 1 && s->st[0] == NP_S_ZSTD_BASE; }
/* The delta stage (NP_S_XOR/ADD/ZADD) or 0. */
static inline int np_sec_delta(const np_section *s)
{
    return s->nst && s->st[0] >= NP_S_XOR && s->st[0] <= NP_S_ZADD ? s->st[0] : 0;
}
static inline int np_sec_has(const np_section *s, int stage)
{
    for (unsigned i = 0; i < s->nst; i++)
        if (s->st[i] == stage)
            return 1;
    return 0;
}

typedef struct np_tref {
    int present;
    int dtype;
    unsigned rank;
    const uint64_t *shape;
    uint64_t numel, nbytes;
    uint8_t blake3[32];
} np_tref;

enum { NP_OP_ROWS = 1, NP_OP_ELEMENTS, NP_OP_WHOLE, NP_OP_ADD, NP_OP_REMOVE, NP_OP_QROWS };

/* Bytes of one row's codes in a qrows op: ceil(n * bits / 8), without overflow. */
static inline uint64_t np_qrows_row_bytes(uint64_t n, unsigned bits) { return bits == 8 ? n : n / 2 + (n & 1); }

typedef struct np_op {
    const char *name;
    size_t name_len;
    int kind;
    np_tref base, target;
    uint64_t count;
    unsigned bits;        /* qrows (1.3): 8 or 4 */
    np_section index, values, base_values;
    np_section scales;    /* qrows: binary32 scales, one per changed row or one */
} np_op;

enum { NP_FMT_SAFETENSORS = 1, NP_FMT_DIR, NP_FMT_PYTORCH, NP_FMT_ONNX, NP_FMT_EXTENTS };
enum { NP_FILE_SAFETENSORS = 1, NP_FILE_BLOB, NP_FILE_COPY };

typedef struct np_tfile {
    const char *path;
    size_t path_len;
    int kind;
    uint64_t size;
    uint8_t blake3[32];
    np_section layout, content;
    const char *from;
    size_t from_len;
} np_tfile;

typedef struct np_model {
    int format;
    uint64_t size;
    uint8_t blake3[32], model_blake3[32];
    uint64_t tensors;
    np_section layout;   /* file target; reversible base */
    np_section skeleton; /* ONNX or extents target */
    np_section extents;  /* extents model (1.4): the extent table (spec 5.8; extents.c) */
    size_t nfiles;       /* directory target */
    np_tfile *files;
    size_t noutputs;     /* ONNX target; extents target: 1 */
    uint64_t output_size;       /* extents target: outputs[0] */
    uint8_t output_blake3[32];
} np_model;

typedef struct np_arena_blk np_arena_blk;

typedef struct np_patch {
    char *name;          /* for messages: the path, or "<stdin>" */
    int fd;              /* -1 when closed */
    const uint8_t *map;  /* the whole file (NULL when empty) */
    uint64_t file_size;
    uint16_t major, minor;
    uint32_t flags;
    uint64_t header_len;
    int packed;          /* the packed-sections feature (1.5): no padding between sections */
    uint64_t end;        /* file_size less the signature block: the trailer ends here */
    uint8_t trailer[32];
    np_model base, target;
    size_t nops;
    np_op *ops;
    np_arena_blk *arena;
} np_patch;

/* Open and validate the patch at path (display name: `name`, or path when NULL). */
nnp_status np_patch_open(nnp_ctx *ctx, const char *path, const char *name, np_patch *out);
/* The same from an open descriptor (taken over: closed by np_patch_close, also on failure).
 * trailer_checked: the caller already checked the trailer hash (a spooled stream). */
nnp_status np_patch_open_fd(nnp_ctx *ctx, int fd, const char *name, int trailer_checked, np_patch *out);
void np_patch_close(np_patch *p);

/* Parse and validate a header on its own (what a stream reader checks as soon as the header
 * has arrived): raw = the Header_Length bytes after the preamble. Fills base/target/ops of out
 * (out->name must be set); the caller closes out. */
nnp_status np_parse_header(nnp_ctx *ctx, const uint8_t *raw, size_t len, uint32_t flags, np_patch *out);

/* The header's required_features (FORMAT.md 5.1; features.c): a list of strings, each one this
 * reader knows ("packed-sections", 1.5, sets p->packed); anything else is refused by its name. */
struct npj_value;
nnp_status np_patch_features(nnp_ctx *ctx, np_patch *p, const struct npj_value *features);

/* The stored bytes of a section (a view into the map). */
static inline const uint8_t *np_sec_ptr(const np_patch *p, const np_section *s) { return p->map + s->offset; }

/* Bump allocator owned by a patch. */
void *np_arena_alloc(np_arena_blk **arena, size_t n);
void np_arena_free(np_arena_blk **arena);

#endif
