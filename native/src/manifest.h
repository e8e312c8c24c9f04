/* The release manifest (spec/MANIFEST.md, "The manifest"): validated with the rules and limits of
 * nnpatch/delivery/manifest.py, and the RFC 3339 times it and the state file use. */
#ifndef NNP_MANIFEST_H
#define NNP_MANIFEST_H

#include <stddef.h>
#include <stdint.h>

#include "internal.h"
#include "json.h"

#define NP_MAX_MANIFEST ((size_t)16 << 20)
/* Nesting and values of every JSON document np_load_object reads (manifest, envelope, state), as Python's
 * load_object: MANIFEST.md, "Limits" */
#define NP_MAX_DOCUMENT_DEPTH 16
#define NP_MAX_DOCUMENT_VALUES ((uint64_t)1 << 19)
#define NP_MAX_CHAIN_LINKS 32
#define NP_MAX_RELEASE (((uint64_t)1 << 53) - 1)

/* One patch file a manifest names: a base's direct patch, or a link of its chain. */
typedef struct np_mlink {
    const char *patch; /* a plain file name (NUL-terminated, in the manifest's document) */
    uint64_t patch_size;
    uint8_t patch_blake3[32], trailer_blake3[32];
    uint8_t base_blake3[32], target_blake3[32]; /* chain links; a direct patch gets them from its entry */
} np_mlink;

typedef struct np_mbase {
    uint8_t base_blake3[32];
    uint64_t base_size;
    const char *name; /* NULL when none */
    np_mlink direct;
    int has_chain;
    uint64_t chain_size;
    size_t nlinks;
    np_mlink links[NP_MAX_CHAIN_LINKS];
} np_mbase;

typedef struct np_manifest {
    npj_doc *doc; /* owns every string below */
    uint8_t target_blake3[32];
    uint64_t target_size;
    const char *target_name;
    int has_release;
    uint64_t release;
    const char *expires; /* NULL when none */
    const char *base_url;
    int has_full;
    const char *full_url;
    size_t nbases;
    np_mbase *bases;
} np_manifest;

/* Validate raw[0..len) as a manifest (PatchFormatError, 3, naming `source`). */
nnp_status np_manifest_parse(nnp_ctx *ctx, const uint8_t *raw, size_t len, const char *source, np_manifest *m);
void np_manifest_free(np_manifest *m);

/* Strict JSON object of at most `limit` bytes: what nnpatch/_json.py load_object accepts, with its
 * messages ("invalid manifest JSON: ..."). PatchFormatError naming `source`. */
nnp_status np_load_object(nnp_ctx *ctx, const uint8_t *raw, size_t len, size_t limit, const char *what,
                          const char *source, npj_doc **out);

/* Seconds since the epoch of exactly "YYYY-MM-DDTHH:MM:SSZ" (a real date): 0 and *t, or -1. */
int np_parse_time(const char *s, size_t len, long long *t);
/* The same spelling of t into out (21 bytes). */
void np_format_time(long long t, char out[21]);
/* A version name: ^[A-Za-z0-9][A-Za-z0-9._-]{0,93}$ (max 94) or a patch name ({0,199}: max 200). */
int np_plain_name(const char *s, size_t len, size_t max);
/* ^https?://[^\s/?#]+(/[^\s?#]*)?$ as manifest.py's BASE_URL (Python's \s: Unicode whitespace too). */
int np_http_url(const char *s, size_t len);
int np_is_url(const char *s);

#endif
