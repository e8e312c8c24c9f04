/*
 * libnnpatch: apply nnpatch patches (spec/FORMAT.md, spec/JOURNAL.md) without Python.
 *
 * Scope: safetensors file targets, format 1.0 to 1.3 (every op, qrows included:
 * its binary32 arithmetic to the bit, which needs the default floating-point
 * environment, round to nearest without flush-to-zero: a thread that changed
 * it gets NNP_KIND_IO rather than wrong bytes; every index format, delta stage, byte
 * planes, zstd sections and zstd headers, Ed25519 signatures),
 * chains of patches in one pass, patches read from a stream, in-place updates
 * behind the undo journal of spec/JOURNAL.md and their recovery, and following a signed
 * release feed (spec/MANIFEST.md: nnp_update, with the app's own HTTP stack behind a fetch
 * callback; the library opens no connection). Other target
 * kinds (directory, PyTorch) are refused with NNP_EFORMAT / NNP_KIND_UNSUPPORTED.
 *
 * Rules every function follows:
 *  - no global state: everything lives in an nnp_ctx; separate contexts may be
 *    used from separate threads at the same time (one context, one thread);
 *  - never exits, aborts or prints: a failure returns a status (equal to the
 *    exit code of the `nnpatch` and `nnpatch-apply` commands) and leaves a
 *    one-line message with the evidence in the context (nnp_message);
 *  - nothing is made visible before it is proven: a new file is written to a
 *    temporary file beside the destination, fsynced and renamed; the base is
 *    never modified; on failure the destination is as it was.
 *
 * Stability (the split zstd makes between zstd.h's stable and static-only API):
 *  - Stable API: everything in this header outside NNP_STATIC_LINKING_ONLY. Within one
 *    major version of the library (the soname libnnpatch.so.0 now; .so.1 for the next),
 *    a program built against an older header keeps working with a newer library:
 *    functions are never removed and keep their signatures and meaning; enums only gain
 *    values at their end (so a switch should have a default); a status code keeps its
 *    number (they are the commands' exit codes); the one-line messages are for people and
 *    may be reworded (match on nnp_error(), not on text).
 *  - Public structs carry their own size as their first member (`size`, set by the
 *    matching NNP_*_INIT macro). A newer library reads an older, shorter struct and treats
 *    the missing members as zero; a struct whose size it does not know is refused with
 *    NNP_EUSAGE, never read past. Always initialize with the macro.
 *  - Static-only API: what sits behind `#define NNP_STATIC_LINKING_ONLY` (before the
 *    include) is experimental: it may change or go in any release, is not exported by
 *    libnnpatch.so (its names start with nnpx_, outside the map's nnp_*), and is for programs
 *    that link libnnpatch.a and are rebuilt with it. It is empty in this release.
 *  - Until 1.0.0 the library is pre-release, but the rules above are already kept; an
 *    incompatible change bumps the soname, never silently.
 *  - Format versions (NNP_FORMAT_*) are independent of the library's version: a library
 *    reads every 1.x file whose features it has (those of 1.0 to NNP_FORMAT_MINOR) and
 *    refuses a file that needs a newer one (a feature, op, codec or model format it does not
 *    know) by that feature's name, NNP_EFORMAT (UnsupportedVersionError).
 */
#ifndef NNPATCH_H
#define NNPATCH_H

#include <stddef.h>
#include <stdint.h>

/* The library is compiled with -fvisibility=hidden: only what this header declares is exported. */
#if defined(__GNUC__) || defined(__clang__)
#pragma GCC visibility push(default)
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* The library's version: one number for the whole project (nnpatch/_version.py says the same).
 * NNP_VERSION_NUMBER is MAJOR*100*100 + MINOR*100 + RELEASE (0.5.0 is 500), as in zstd. */
#define NNP_VERSION_MAJOR 0
#define NNP_VERSION_MINOR 5
#define NNP_VERSION_RELEASE 0
#define NNP_VERSION_NUMBER (NNP_VERSION_MAJOR * 100 * 100 + NNP_VERSION_MINOR * 100 + NNP_VERSION_RELEASE)
#define NNP_VERSION_QUOTE_(x) #x
#define NNP_VERSION_QUOTE(x) NNP_VERSION_QUOTE_(x)
#define NNP_VERSION_STRING                                                                               \
    NNP_VERSION_QUOTE(NNP_VERSION_MAJOR) "." NNP_VERSION_QUOTE(NNP_VERSION_MINOR) "." NNP_VERSION_QUOTE(NNP_VERSION_RELEASE)
/* The newest format version this library reads (it reads every 1.x file). */
#define NNP_FORMAT_MAJOR 1
#define NNP_FORMAT_MINOR 5

/* Status codes: the exit codes of the command-line tools (README, "Exit codes"). */
typedef enum nnp_status {
    NNP_OK = 0,
    NNP_EMISMATCH = 1,   /* a check ran and found a mismatch (nnp_check with a base that is not it) */
    NNP_EUSAGE = 2,      /* bad arguments */
    NNP_EFORMAT = 3,     /* invalid or corrupt input: patch, model, journal; unsupported version or kind */
    NNP_EINTEGRITY = 4,  /* wrong base, failed digest or signature, journal of another file */
    NNP_EIO = 5,         /* operating-system error: missing file, permission, disk full, locked */
    NNP_ECANCELLED = 130, /* nnp_cancel was called (or the command got SIGINT/SIGTERM) */
    NNP_ENOPATH = 7       /* nnp_update: no patch in the manifest leads from the model's version */
} nnp_status;

/* Which rule failed: the error classes of the Python implementation (nnpatch/errors.py),
 * so the two implementations can be compared error for error. */
typedef enum nnp_error_kind {
    NNP_KIND_NONE = 0,
    NNP_KIND_PATCH_FORMAT,        /* PatchFormatError        (3) */
    NNP_KIND_UNSUPPORTED_VERSION, /* UnsupportedVersionError (3) */
    NNP_KIND_WEIGHTS,             /* WeightsError            (3) */
    NNP_KIND_INVALID_JOURNAL,     /* InvalidJournal          (3 or 4, as spec/JOURNAL.md says) */
    NNP_KIND_BASE_MISMATCH,       /* BaseMismatchError       (4) */
    NNP_KIND_INTEGRITY,           /* IntegrityError          (4) */
    NNP_KIND_IO,                  /* NnpatchIOError          (5) */
    NNP_KIND_USAGE,               /* UsageError              (2) */
    NNP_KIND_CANCELLED,           /* interrupted             (130) */
    NNP_KIND_NO_UPDATE_PATH       /* NoUpdatePathError       (7) */
} nnp_error_kind;

/* spec/FORMAT.md section 9, step 8, and README "--verify". */
typedef enum nnp_verify {
    /* every mode proves the output file's BLAKE3 against target.blake3 (src/policy.c) */
    NNP_VERIFY_DEFAULT = 0, /* hash the whole base and every tensor written; prove the model digest too */
    NNP_VERIFY_FULL = 1,    /* default, every written tensor hashed again in full (no chaining-value reuse) */
    NNP_VERIFY_TOUCHED = 2  /* hash only the base tensors the patch touches */
} nnp_verify;

typedef struct nnp_ctx nnp_ctx;

/* A new context with default settings, or NULL when out of memory. */
nnp_ctx *nnp_ctx_new(void);
void nnp_ctx_free(nnp_ctx *ctx);

/* The last failure's one-line message ("" after success) and its kind. Valid until the next call on ctx. */
const char *nnp_message(const nnp_ctx *ctx);
nnp_error_kind nnp_error(const nnp_ctx *ctx);
/* The Python class name of a kind ("PatchFormatError", ...), for messages and tests. */
const char *nnp_error_name(nnp_error_kind kind);

nnp_status nnp_set_verify(nnp_ctx *ctx, nnp_verify mode);
/* The mode a name stands for ("default", "full" or "touched", as the commands' --verify
 * spells them) into *mode: NNP_OK, or NNP_EUSAGE (and *mode untouched) for any other name
 * or NULL. Parsed here once, for every caller (the commands, JNI, apps). */
nnp_status nnp_verify_from_name(const char *name, nnp_verify *mode);

/* Require every patch to be signed by this Ed25519 public key (32 raw bytes).
 * An unsigned patch, or one signed by another key, is then refused (NNP_EINTEGRITY)
 * before its header is parsed. */
nnp_status nnp_set_trusted_key(nnp_ctx *ctx, const uint8_t public_key[32]);
/* The same from a PEM file as `nnpatch keygen` writes (SubjectPublicKeyInfo, "PUBLIC KEY").
 * A private key file is refused with a message saying the public one is meant. */
nnp_status nnp_set_trusted_key_file(nnp_ctx *ctx, const char *pem_path);
/* The same from PEM text in memory (len bytes, no NUL needed), for an app that ships its key as a
 * resource or a string rather than a file. Refused as the file is: a private key NNP_EUSAGE, anything
 * but one Ed25519 "PUBLIC KEY" NNP_EFORMAT. Since 0.5.0. */
nnp_status nnp_set_trusted_key_pem(nnp_ctx *ctx, const char *pem, size_t len);

/* Progress: called now and then with the bytes done and the bytes expected in all
 * (total may grow while a stream arrives), on the thread that made the call; during
 * nnp_update's pauses between tries too (every 50 ms, no new bytes). Return non-zero to cancel. */
typedef int (*nnp_progress_fn)(void *user, uint64_t done, uint64_t total);
void nnp_set_progress(nnp_ctx *ctx, nnp_progress_fn fn, void *user);

/* Ask a running call on ctx to stop at the next safe point (returns NNP_ECANCELLED,
 * everything rolled back). Safe to call from another thread or a signal handler. */
void nnp_cancel(nnp_ctx *ctx);

/* A patch read from a stream (a download, a pipe): read up to len bytes into buf and
 * return how many (0 at the end), or -1 on an error (the stream's, reported as NNP_EIO). */
typedef long long (*nnp_read_fn)(void *user, uint8_t *buf, size_t len);
typedef struct nnp_source {
    size_t size; /* sizeof(nnp_source) when the caller was built: set by NNP_SOURCE_INIT */
    nnp_read_fn read;
    void *user;
    const char *name; /* for messages ("-" for standard input); may be NULL */
} nnp_source;
/* nnp_source s = NNP_SOURCE_INIT(my_read, my_state, "update.nnpatch"); */
#define NNP_SOURCE_INIT(read, user, name) {sizeof(nnp_source), (read), (user), (name)}

/* Apply a chain of n >= 1 patches (files) to the model at old_path, writing the result to
 * out_path (temporary file beside it, fsync, rename). Link k's target is link k+1's base. */
nnp_status nnp_apply(nnp_ctx *ctx, const char *old_path, const char *const *patch_paths, size_t n,
                     const char *out_path);

/* The same with patches read from streams, in order; each is read exactly once (every
 * patches[k].size must be set, NNP_SOURCE_INIT; NNP_EUSAGE otherwise). A stream is
 * hashed as it arrives (without a trusted key its header is also checked early, so a wrong
 * patch fails before the download ends), spooled to an unlinked file beside out_path, and
 * applied once its trailer (and, with a key, its signature) has checked out: nothing appears
 * under out_path before. */
nnp_status nnp_apply_streams(nnp_ctx *ctx, const char *old_path, const nnp_source *patches, size_t n,
                             const char *out_path);

/* Update model_path in place behind the undo journal (spec/JOURNAL.md): an exclusive lock,
 * recover first if a journal is there, journal the old bytes, write the new ones, prove,
 * delete the journal. A patch that changes the layout falls back to a new file renamed
 * over the model. */
nnp_status nnp_apply_in_place(nnp_ctx *ctx, const char *model_path, const char *const *patch_paths,
                              size_t n);

/* Roll model_path back to its old version from a journal beside it (spec/JOURNAL.md,
 * "Recover"). *recovered (may be NULL) is set to 1 when a journal was rolled back,
 * 0 when there was none (or only an uncommitted .tmp one, which is deleted). */
nnp_status nnp_recover(nnp_ctx *ctx, const char *model_path, int *recovered);

/* Validate a patch (trailer, signature if a key is set, header, sections, every section
 * decoded) and, with base_path, that it applies to that base. NNP_OK when it does. */
nnp_status nnp_check(nnp_ctx *ctx, const char *patch_path, const char *base_path);

/* ---- Hashes an integrator needs (MANIFEST.md, "What an updater checks", step 9) ---------------- */

/* The BLAKE3 of a whole file (what a manifest's patch_blake3, base_blake3 and target.blake3 name). */
nnp_status nnp_hash_file(nnp_ctx *ctx, const char *path, uint8_t out[32]);

/* What a patch's header and trailer say, after the patch is validated as nnp_check's first steps
 * validate it (trailer, signature when a trusted key is set, header). */
typedef struct nnp_patch_digests {
    size_t size;               /* sizeof(nnp_patch_digests): NNP_PATCH_DIGESTS_INIT */
    uint8_t base_blake3[32];   /* the file the patch is made for */
    uint64_t base_size;
    uint8_t target_blake3[32]; /* the file it makes */
    uint64_t target_size;
    uint8_t trailer_blake3[32]; /* its own trailer hash: a manifest's patch_trailer_blake3 */
    int is_signed;
} nnp_patch_digests;
#define NNP_PATCH_DIGESTS_INIT {sizeof(nnp_patch_digests), {0}, 0, {0}, 0, {0}, 0}
nnp_status nnp_patch_digests_of(nnp_ctx *ctx, const char *patch_path, nnp_patch_digests *out);

/* ---- Following a release feed (spec/MANIFEST.md; SECURITY.md "Release feeds") -------------------- */

/* The library never opens a connection: an app fetches with its own HTTP stack through this
 * callback. Deliver the resource at url from byte `offset` on (Range: bytes=offset-; offset 0: the
 * whole of it), calling sink for each piece with `at`, the piece's position in the resource (a
 * server that ignored the range sends from 0: pass at = 0, the library skips what it has). Stop
 * when sink returns non-zero. `limit`: the library never takes more than this many bytes from
 * `offset` (a body may be cut there). Return NNP_FETCH_OK when the body ended (complete or not:
 * the library counts), NNP_FETCH_RETRY for a failure worth another try (cut, stall, timeout, HTTP
 * 408/425/429/5xx), NNP_FETCH_FAIL for one that is not (HTTP 404, a refused redirect), with a
 * one-line reason in err in both cases; NNP_FETCH_RESTART when what was asked for does not fit what
 * the server has now (HTTP 416, another total length): the library drops what it holds and tries
 * again from byte 0. Called from the thread that called nnp_update. */
typedef enum nnp_fetch_result {
    NNP_FETCH_OK = 0, NNP_FETCH_RETRY = 1, NNP_FETCH_FAIL = 2, NNP_FETCH_RESTART = 3
} nnp_fetch_result;
typedef int (*nnp_sink_fn)(void *sink_ctx, uint64_t at, const uint8_t *buf, size_t len);
/* returns an nnp_fetch_result */
typedef int (*nnp_fetch_fn)(void *user, const char *url, uint64_t offset, uint64_t limit, nnp_sink_fn sink,
                            void *sink_ctx, char *err, size_t errlen);

typedef enum nnp_prefer { NNP_PREFER_DIRECT = 0, NNP_PREFER_SMALLEST = 1, NNP_PREFER_CHAIN = 2 } nnp_prefer;

typedef struct nnp_update_options {
    size_t size;           /* sizeof(nnp_update_options): NNP_UPDATE_OPTIONS_INIT */
    const char *manifest;  /* an http:// or https:// URL (needs fetch), or a local path */
    nnp_fetch_fn fetch;    /* NULL: URLs are refused (NNP_EUSAGE) */
    void *fetch_user;
    int in_place;          /* 1: apply behind the undo journal; 0: build the new version beside the model when
                            * the file system has room for it (downloads and new version), else in place
                            * (result.in_place_for_room), as `nnpatch update` without --in-place; -1: never
                            * in place (NNP_EIO when there is no room) */
    int dry_run;           /* decide and report; fetch nothing but the manifest, write nothing */
    nnp_prefer prefer;
    unsigned retries;      /* further tries of one file after a transient failure (Python's default: 5) */
    unsigned backoff_ms;   /* the first pause between tries, doubled after each (500) */
    long long now;         /* seconds since the epoch to judge expiry by; 0: the clock */
    int fallback_full;     /* 1: when no patch leads from the model's version and the manifest lists the
                            * whole target (`full`), download that (resumed, size and BLAKE3 checked) and
                            * rename it over the model, as `nnpatch update --fallback full` (result.full) */
} nnp_update_options;
#define NNP_UPDATE_OPTIONS_INIT(manifest, fetch, user) \
    {sizeof(nnp_update_options), (manifest), (fetch), (user), 0, 0, NNP_PREFER_DIRECT, 5, 500, 0, 0}

typedef enum nnp_update_status {
    NNP_UPDATE_UPDATED = 0,
    NNP_UPDATE_CURRENT = 1,     /* the model already is the release's target */
    NNP_UPDATE_WOULD_UPDATE = 2 /* a dry run */
} nnp_update_status;

#define NNP_UPDATE_MAX_LINKS 32
typedef struct nnp_update_result {
    size_t size;                /* sizeof(nnp_update_result): NNP_UPDATE_RESULT_INIT */
    nnp_update_status status;
    char from_blake3[65], to_blake3[65];
    char from_name[96], to_name[96]; /* "" when the manifest names none */
    int has_release;
    uint64_t release;
    char expires[24];           /* "" when none */
    int is_signed;              /* the manifest was an envelope */
    char key_id[17];            /* "" unless a signature was checked against the trusted key */
    size_t npatches;
    char patches[NNP_UPDATE_MAX_LINKS][201];
    uint64_t patch_bytes, downloaded_bytes, resumed_bytes;
    int in_place;
    int recovered;              /* an interrupted in-place update was rolled back first */
    int in_place_for_room;      /* in place although not asked for: only that fits the free space */
    int full;                   /* the whole target was (or would be) downloaded: options.fallback_full;
                                 * patches[0] then names its file and patch_bytes is its size */
} nnp_update_result;
#define NNP_UPDATE_RESULT_INIT \
    {sizeof(nnp_update_result), NNP_UPDATE_UPDATED, "", "", "", "", 0, 0, "", 0, "", 0, {""}, 0, 0, 0, 0, 0, 0, 0}

/* Bring model_path to the release's target, with the rules of `nnpatch update` (spec/MANIFEST.md,
 * "What an updater checks"): with a trusted key (nnp_set_trusted_key) the manifest must be a DSSE
 * envelope signed by it, unexpired, and no older than the release recorded in MODEL.nnpatch-state,
 * which is then updated (atomically, before any patch is fetched); every patch must be signed by it.
 * Without a key a state file beside the model is refused (NNP_EINTEGRITY). An interrupted in-place
 * update (MODEL.nnpatch-journal) is rolled back first. Patches at URLs are downloaded to
 * MODEL.<digest>.nnpatch-part under an exclusive lock, resumed, and checked by size and BLAKE3
 * before anything is applied; with fallback_full the manifest's whole target is fetched the same
 * way when no patch leads from the model's version. Statuses as `nnpatch update`: NNP_OK (updated
 * or current), 2, 3, 4, 5, NNP_ENOPATH (7), NNP_ECANCELLED. result (may be NULL) is filled on NNP_OK. */
nnp_status nnp_update(nnp_ctx *ctx, const char *model_path, const nnp_update_options *options,
                      nnp_update_result *result);

/* The library's version at run time, which may differ from the header's a program was built
 * with: "0.5.0" and 500 (NNP_VERSION_STRING and NNP_VERSION_NUMBER of the library). */
const char *nnp_version(void);
unsigned nnp_version_number(void);

#ifdef NNP_STATIC_LINKING_ONLY
/* Experimental API (see "Stability" above): none in this release. */
#endif

#ifdef __cplusplus
}
#endif

#if defined(__GNUC__) || defined(__clang__)
#pragma GCC visibility pop
#endif
#endif
