/*
 * The undo journal of an in-place update (spec/JOURNAL.md is normative): its format in
 * journal.c (Python twin: nnpatch/applier/journal.py), recovery and the lock in recover.c
 * (Python twin: recover and locked in nnpatch/applier/inplace.py).
 *
 * The writer produces, for the same inputs, the same bytes as Python's
 * JournalWriter (header JSON with sorted keys, no spaces, ASCII escapes, the
 * same header-length fixed point). The reader checks Trust rules 1 to 5 in the
 * spec's order before recovery writes a byte.
 */
#ifndef NNP_JOURNAL_H
#define NNP_JOURNAL_H

#include <stddef.h>
#include <stdint.h>

#include "fileio.h"
#include "internal.h"
#include "extents.h"
#include "json.h"

#define NP_JOURNAL_SUFFIX ".nnpatch-journal"
#define NP_JOURNAL_TMP_SUFFIX ".nnpatch-journal.tmp"
#define NP_JOURNAL_PREAMBLE 24
#define NP_JOURNAL_TRAILER 32
#define NP_JOURNAL_MAX_HEADER ((uint64_t)64 << 20)
#define NP_JOURNAL_MAX_DEPTH 8

/* One tensor's old bytes: count units of unit bytes at the indices stored in the journal. */
typedef struct np_jentry {
    const char *name; /* UTF-8 (may contain NUL: name_len) */
    size_t name_len;
    uint64_t offset, nbytes, unit, count;
    uint64_t index_at, data_at; /* journal offsets: filled by the writer's layout, read by the reader */
    uint8_t base_blake3[32], target_blake3[32];
} np_jentry;

/* What identifies the model and the update. */
typedef struct np_jmeta {
    uint64_t model_size, header_len; /* header_len: 8 + the safetensors JSON length */
    uint8_t header_blake3[32];
    /* an extents model (1.1): its table's bytes and skeleton digest name it instead of a header */
    const uint8_t *extents;
    size_t extents_len;
    uint8_t skeleton_blake3[32];
    uint8_t base_blake3[32], base_model[32];
    uint8_t target_blake3[32], target_model[32];
    uint8_t patch[32];
} np_jmeta;

/* ---- writer ---- */

typedef struct np_jwriter {
    char *path; /* MODEL.nnpatch-journal */
    char *tmp;  /* MODEL.nnpatch-journal.tmp */
    int fd;
    uint64_t pos;
    void *hash;   /* np_blake3 */
    uint8_t *buf; /* write buffer */
    size_t buf_len;
} np_jwriter;

/* Lay the entries out (sets index_at/data_at), build the header exactly as Python's
 * encode_header, refuse a header over 64 MiB (USAGE, 2: nothing created), create
 * jpath.tmp (replacing a stale one) and write the preamble and header. */
nnp_status np_jw_open(nnp_ctx *ctx, np_jwriter *w, const char *jpath, const np_jmeta *meta, np_jentry *entries,
                      size_t n);
/* Append bytes of the current part; np_jw_end_part pads it with zeros to a multiple of 64. */
nnp_status np_jw_write(nnp_ctx *ctx, np_jwriter *w, const void *data, size_t len);
nnp_status np_jw_end_part(nnp_ctx *ctx, np_jwriter *w);
/* Trailer, fsync, rename to the final name, fsync the directory (the journal's commit point).
 * On failure the .tmp journal is removed. The writer is closed either way. */
nnp_status np_jw_commit(nnp_ctx *ctx, np_jwriter *w);
/* Close and remove the .tmp journal (safe after a failed open or commit, and twice). */
void np_jw_abort(np_jwriter *w);

/* The header text the writer makes for these entries (sets their index_at/data_at):
 * malloc'd in *out (*out_len bytes, padded). For tests and np_jw_open. */
nnp_status np_journal_encode_header(nnp_ctx *ctx, const np_jmeta *meta, np_jentry *entries, size_t n,
                                    uint8_t **out, size_t *out_len);

/* "MODEL.nnpatch-journal" (suffix = NP_JOURNAL_SUFFIX or NP_JOURNAL_TMP_SUFFIX), malloc'd, or NULL. */
char *np_journal_path(const char *model, const char *suffix);

/* ---- reader (journal.c) ---- */

/* A committed journal, mapped, its header read into entries. */
typedef struct np_journal {
    const char *path;
    const uint8_t *map;
    uint64_t size;
    npj_doc *doc;
    np_jentry *entries;
    size_t n;
    uint64_t model_size, header_len;
    uint8_t header_blake3[32];
    np_ext_table *ext; /* an extents model's table (1.1), else NULL */
    uint8_t skeleton_blake3[32];
} np_journal;

/* Trust steps 1 and 2 for the journal at path beside a model of model_size bytes. *torn = 1
 * (status OK, message in ctx) for a torn journal, to be discarded; any other failure is refused. */
nnp_status np_journal_read(nnp_ctx *ctx, const char *path, uint64_t model_size, np_journal *j, int *torn);
void np_journal_close(np_journal *j);
/* INVALID_JOURNAL (exit 4), the message formatted as printf. */
nnp_status np_journal_invalid(nnp_ctx *ctx, const char *fmt, ...) NP_PRINTF(2, 3);

/* ---- recovery and the lock (recover.c) ---- */

/* Roll back an interrupted in-place update of `model`, whose descriptor fd (O_RDWR, or
 * O_RDONLY for a directory) holds an exclusive flock: spec/JOURNAL.md "Recover" and
 * "Trust". *recovered (may be NULL) = 1 when a journal was rolled back. */
nnp_status np_recover_locked(nnp_ctx *ctx, const char *model, int fd, int *recovered);

/* Open `model` for writing and take an exclusive flock without waiting (IO, 5:
 * "MODEL: locked: another nnpatch is updating this model; ..."); the descriptor in *fd. */
nnp_status np_lock_model(nnp_ctx *ctx, const char *model, int *fd);

/* INTEGRITY (4) when a committed journal lies beside `model` (an applier never writes its
 * input: `nnpatch recover` first), else NNP_OK. */
nnp_status np_journal_refuse_unfinished(nnp_ctx *ctx, const char *model);

#endif
