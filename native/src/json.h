/*
 * Strict JSON (RFC 8259) for untrusted headers: patch headers, safetensors headers,
 * journals. The rules are the spec's (FORMAT.md section 5, JOURNAL.md "Trust"), and the
 * verdicts match nnpatch/_json.py (loads_strict, json_shape):
 *   - UTF-8 only (overlongs, surrogates encoded in UTF-8, > U+10FFFF refused);
 *   - one value, surrounded only by JSON whitespace;
 *   - duplicate keys in any object refused (compared after unescaping);
 *   - lone surrogates in \u escapes refused; a valid pair decodes to one code point;
 *   - NaN, Infinity, -Infinity, leading zeros, "+", trailing commas, comments refused;
 *   - no string (key or value) longer than 1 MiB decoded (NPJ_MAX_STRING);
 *   - depth (brackets) and value count (opening brackets + commas outside strings)
 *     measured BEFORE building anything, so a hostile text costs bounded memory.
 * Parsed values live in one arena owned by the npj_doc.
 */
#ifndef NNP_JSON_H
#define NNP_JSON_H

#include <stddef.h>
#include <stdint.h>

typedef enum npj_kind {
    NPJ_NULL, NPJ_FALSE, NPJ_TRUE,
    NPJ_INT,    /* an integer literal (no '.', no exponent) that fits in int64 (or uint64 when positive) */
    NPJ_BIGINT, /* an integer literal too large for 64 bits: a type error wherever a caller wants a number
                 * (only u.i.negative is set; literals of more than 4300 digits are refused, as
                 * CPython's int() refuses them, so both readers accept the same texts) */
    NPJ_FLOAT,  /* a number with '.' or an exponent (16.0 is a FLOAT, never an INT) */
    NPJ_STRING, NPJ_ARRAY, NPJ_OBJECT
} npj_kind;

typedef struct npj_value npj_value;
typedef struct npj_member npj_member;

struct npj_value {
    npj_kind kind;
    union {
        struct { int negative; uint64_t magnitude; } i; /* NPJ_INT: value = negative ? -magnitude : magnitude */
        double f;                                        /* NPJ_FLOAT */
        struct { const char *s; size_t len; } str;       /* NPJ_STRING: unescaped UTF-8, NUL-terminated, may contain NUL */
        struct { npj_value *items; size_t n; } arr;      /* NPJ_ARRAY */
        struct { npj_member *members; size_t n; } obj;   /* NPJ_OBJECT: in document order */
    } u;
};

struct npj_member {
    const char *key; /* unescaped UTF-8, NUL-terminated */
    size_t key_len;
    npj_value value;
};

/* The longest string (key or value) a text may hold, in decoded UTF-8 bytes: FORMAT.md section 12,
 * JOURNAL.md "Limits", and nnpatch/_json.py alike. Nothing the formats define comes near it (names
 * and paths are short); the cap keeps what a hostile header costs in memory near its own size. */
#define NPJ_MAX_STRING ((uint64_t)1 << 20)

typedef struct npj_limits {
    unsigned max_depth;  /* FORMAT.md: 16; JOURNAL.md: 8 */
    uint64_t max_values; /* FORMAT.md: 4,194,304 */
    uint64_t max_string; /* decoded bytes of one string; 0: NPJ_MAX_STRING (1 MiB) */
} npj_limits;

typedef struct npj_doc npj_doc;

/* Parse text[0..len) under limits (NULL: FORMAT.md's, 16 levels and 4,194,304 values). On
 * success returns 0 and sets *out (free with npj_free). On failure returns -1 and writes a
 * one-line reason into err (e.g. "duplicate key \"a\"", "nesting deeper than 16 levels",
 * "invalid UTF-8 at byte 12", "a string holds a lone surrogate"); *out is NULL. Never reads
 * outside text[0..len). */
int npj_parse(const uint8_t *text, size_t len, const npj_limits *limits, npj_doc **out,
              char *err, size_t errlen);
void npj_free(npj_doc *doc);
const npj_value *npj_root(const npj_doc *doc);

/* Depth and value count as nnpatch/_json.py json_shape measures them (strings skipped). */
void npj_shape(const uint8_t *text, size_t len, unsigned *depth, uint64_t *values);
/* The same with the value count in its parts: opening brackets and commas (jsonscan.c). */
void npj_shape_counts(const uint8_t *text, size_t len, unsigned *depth, uint64_t *opens, uint64_t *commas);
/* Offset of the first byte that is not valid UTF-8 (as Python's strict "utf-8" codec reports it),
 * or len (jsonscan.c). */
size_t npj_utf8_invalid_at(const uint8_t *text, size_t len);

/* Object lookup by key (NULL if absent or obj is not an object). Linear; headers are small per object. */
const npj_value *npj_get(const npj_value *obj, const char *key);
/* Helpers that return 0 and set *out only when the value has exactly that type and range. */
int npj_as_u64(const npj_value *v, uint64_t max, uint64_t *out); /* NPJ_INT, 0 <= v <= max */
int npj_as_string(const npj_value *v, const char **s, size_t *len);
/* A digest: a string of exactly 64 lowercase hex digits (FORMAT.md and JOURNAL.md spell digests
 * so), its 32 bytes into out (may be NULL: checked only). */
int npj_as_digest(const npj_value *v, uint8_t out[32]);
/* The name of the Python type json.loads gives this value ("NoneType", "bool", "int", "float",
 * "str", "list", "dict"), for messages that match the Python reader's word for word. */
const char *npj_type_name(const npj_value *v);

#endif
