/*
 * A test driver for the primitives (tests/native/test_primitives.py):
 *   prim_driver b3 [--updates N,M,...] FILE|-
 *       the BLAKE3 hex digest of the input. With --updates, the input is fed in pieces of
 *       those sizes (cycled; 0 means an empty update) and the digest of the input so far is
 *       printed after each piece (np_blake3_final leaves the hasher as it was), then the
 *       digest of the whole input.
 *   prim_driver b3-impls
 *       the BLAKE3 implementations this build runs on this CPU, one name a line, best first.
 *   prim_driver b3-bench FILE [REPEAT]
 *       hashes the mapped FILE REPEAT times (default 1) with one hasher each; prints the digest,
 *       then "impl NAME bytes N user_s S mb_s R" (user CPU time of the hashing alone).
 * NP_BLAKE3_FORCE=scalar|sse41|avx2|neon (or auto) picks the implementation b3 and b3-bench use
 * (np_blake3_init_impl; the library reads no environment); exit 3 when it does not run here.
 *   prim_driver json [--depth N] [--values N] [--batch] FILE|-
 *       "ok CANONICAL" or "error REASON", exit 0 either way. CANONICAL is ASCII JSON:
 *       null/true/false; an integer as itself; a string with every byte outside printable ASCII
 *       as a \u escape (surrogate pairs above U+FFFF); an array as an array; an object as
 *       {"o": [[key, value], ...]} in document order; a float as {"f": "<16 hex digits of its
 *       IEEE-754 bits>"}; an integer beyond 64 bits as {"b": "-"} or {"b": "+"}.
 * Exit 2 on a usage error, 1 when the input cannot be read.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "blake3.h"
#include "json.h"

static int usage(void)
{
    fprintf(stderr, "usage: prim_driver b3 [--updates N,M,...] FILE|-\n"
                    "       prim_driver b3-impls\n"
                    "       prim_driver b3-bench FILE [REPEAT]\n"
                    "       prim_driver json [--depth N] [--values N] [--batch] FILE|-\n"
                    "       prim_driver shape [--batch] FILE|-\n");
    return 2;
}

static uint8_t *read_all(const char *path, size_t *len)
{
    FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "rb");
    if (f == NULL)
        return NULL;
    size_t cap = 1 << 16, n = 0;
    uint8_t *buf = malloc(cap);
    while (buf != NULL) {
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (n < cap) {
            if (ferror(f)) {
                free(buf);
                buf = NULL;
            }
            break;
        }
        uint8_t *bigger = realloc(buf, cap * 2);
        if (bigger == NULL) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = bigger;
        cap *= 2;
    }
    if (f != stdin)
        fclose(f);
    *len = n;
    return buf;
}

static int parse_u64(const char *s, uint64_t *out)
{
    char *end;
    if (*s < '0' || *s > '9')
        return -1;
    unsigned long long v = strtoull(s, &end, 10);
    if (*end != '\0')
        return -1;
    *out = v;
    return 0;
}

/* The implementation NP_BLAKE3_FORCE names (NP_BLAKE3_IMPL_AUTO when unset), or -1. */
static int forced_impl(void)
{
    const char *want = getenv("NP_BLAKE3_FORCE");
    if (want == NULL || *want == '\0')
        return NP_BLAKE3_IMPL_AUTO;
    for (int impl = 0; np_blake3_impl_name(impl) != NULL; impl++)
        if (strcmp(np_blake3_impl_name(impl), want) == 0)
            return impl;
    return -1;
}

/* np_blake3_init with NP_BLAKE3_FORCE's implementation; -1 (said on stderr) when it is not here. */
static int init_forced(np_blake3 *h)
{
    int impl = forced_impl();
    if (impl < 0 || np_blake3_init_impl(h, impl) != 0) {
        fprintf(stderr, "prim_driver: NP_BLAKE3_FORCE=%s does not run here\n", getenv("NP_BLAKE3_FORCE"));
        return -1;
    }
    return 0;
}

static int cmd_b3_impls(void)
{
    int best = np_blake3_impl_best();
    printf("%s\n", np_blake3_impl_name(best));
    for (int impl = 1; np_blake3_impl_name(impl) != NULL; impl++)
        if (impl != best && np_blake3_impl_available(impl))
            printf("%s\n", np_blake3_impl_name(impl));
    return 0;
}

static double user_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6;
}

static int cmd_b3_bench(int argc, char **argv)
{
    if (argc < 1 || argc > 2)
        return usage();
    uint64_t repeat = 1;
    if (argc == 2 && (parse_u64(argv[1], &repeat) != 0 || repeat == 0))
        return usage();
    int fd = open(argv[0], O_RDONLY);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0 || st.st_size <= 0) {
        fprintf(stderr, "prim_driver: cannot read %s (or it is empty)\n", argv[0]);
        return 1;
    }
    size_t len = (size_t)st.st_size;
    const uint8_t *m = mmap(NULL, len, PROT_READ, MAP_PRIVATE | MAP_POPULATE, fd, 0);
    close(fd);
    if (m == MAP_FAILED) {
        fprintf(stderr, "prim_driver: cannot map %s\n", argv[0]);
        return 1;
    }
    uint8_t out[NP_BLAKE3_OUT_LEN];
    char hex[2 * NP_BLAKE3_OUT_LEN + 1];
    np_blake3 h;
    double t0 = user_seconds();
    for (uint64_t r = 0; r < repeat; r++) {
        if (init_forced(&h) != 0)
            return 3;
        np_blake3_update(&h, m, len);
        np_blake3_final(&h, out);
    }
    double t = user_seconds() - t0;
    np_hex(out, sizeof out, hex);
    printf("%s\nimpl %s bytes %zu user_s %.3f mb_s %.0f\n", hex, np_blake3_impl_name(h.impl),
           (size_t)(len * repeat), t, t > 0 ? (double)len * (double)repeat / t / 1e6 : 0.0);
    munmap((void *)m, len);
    return 0;
}

static int cmd_b3(int argc, char **argv)
{
    const char *updates = NULL, *path = NULL;
    for (int i = 0; i < argc; i++) {
        if (strcmp(argv[i], "--updates") == 0 && i + 1 < argc)
            updates = argv[++i];
        else if (path == NULL)
            path = argv[i];
        else
            return usage();
    }
    if (path == NULL)
        return usage();
    size_t len;
    uint8_t *data = read_all(path, &len);
    if (data == NULL) {
        fprintf(stderr, "prim_driver: cannot read %s\n", path);
        return 1;
    }
    uint8_t out[NP_BLAKE3_OUT_LEN];
    char hex[2 * NP_BLAKE3_OUT_LEN + 1];
    np_blake3 h;
    if (init_forced(&h) != 0) {
        free(data);
        return 3;
    }
    if (updates != NULL) {
        size_t sizes[256], nsizes = 0;
        const char *s = updates;
        while (*s != '\0' && nsizes < 256) {
            char *end;
            sizes[nsizes++] = (size_t)strtoull(s, &end, 10);
            if (end == s)
                return usage();
            s = *end == ',' ? end + 1 : end;
        }
        if (nsizes == 0)
            return usage();
        size_t at = 0, k = 0;
        while (at < len) {
            size_t n = sizes[k++ % nsizes];
            if (n > len - at)
                n = len - at;
            np_blake3_update(&h, data + at, n);
            at += n;
            np_blake3_final(&h, out);
            np_hex(out, sizeof out, hex);
            printf("%zu %s\n", at, hex);
            if (k > len + nsizes + 1) /* all zero sizes */
                break;
        }
        np_blake3_update(&h, data + at, len - at);
    } else {
        np_blake3_update(&h, data, len);
    }
    np_blake3_final(&h, out);
    np_hex(out, sizeof out, hex);
    printf("%s\n", hex);
    free(data);
    return 0;
}

/* --- canonical JSON output ---------------------------------------------------------------- */

static void put_string(const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    putchar('"');
    size_t i = 0;
    while (i < n) {
        unsigned c = u[i];
        unsigned cp;
        size_t k;
        if (c < 0x80) {
            cp = c;
            k = 1;
        } else if (c < 0xE0) {
            cp = (c & 0x1F) << 6 | (u[i + 1] & 0x3F);
            k = 2;
        } else if (c < 0xF0) {
            cp = (c & 0x0F) << 12 | (unsigned)(u[i + 1] & 0x3F) << 6 | (u[i + 2] & 0x3F);
            k = 3;
        } else {
            cp = (c & 0x07) << 18 | (unsigned)(u[i + 1] & 0x3F) << 12 | (unsigned)(u[i + 2] & 0x3F) << 6 |
                 (u[i + 3] & 0x3F);
            k = 4;
        }
        if (i + k > n) { /* the parser never gives this: say so loudly */
            printf("<TRUNCATED UTF-8>");
            break;
        }
        i += k;
        if (cp == '"' || cp == '\\')
            printf("\\%c", (char)cp);
        else if (cp >= 0x20 && cp < 0x7F)
            putchar((int)cp);
        else if (cp < 0x10000)
            printf("\\u%04x", cp);
        else {
            cp -= 0x10000;
            printf("\\u%04x\\u%04x", 0xD800 + (cp >> 10), 0xDC00 + (cp & 0x3FF));
        }
    }
    putchar('"');
}

static void put_value(const npj_value *v)
{
    switch (v->kind) {
    case NPJ_NULL: printf("null"); break;
    case NPJ_FALSE: printf("false"); break;
    case NPJ_TRUE: printf("true"); break;
    case NPJ_INT: printf("%s%" PRIu64, v->u.i.negative ? "-" : "", v->u.i.magnitude); break;
    case NPJ_BIGINT: printf("{\"b\":\"%c\"}", v->u.i.negative ? '-' : '+'); break;
    case NPJ_FLOAT: {
        uint64_t bits;
        memcpy(&bits, &v->u.f, sizeof bits);
        printf("{\"f\":\"%016" PRIx64 "\"}", bits);
        break;
    }
    case NPJ_STRING: put_string(v->u.str.s, v->u.str.len); break;
    case NPJ_ARRAY:
        putchar('[');
        for (size_t i = 0; i < v->u.arr.n; i++) {
            if (i)
                putchar(',');
            put_value(&v->u.arr.items[i]);
        }
        putchar(']');
        break;
    case NPJ_OBJECT:
        printf("{\"o\":[");
        for (size_t i = 0; i < v->u.obj.n; i++) {
            const npj_member *m = &v->u.obj.members[i];
            if (i)
                putchar(',');
            putchar('[');
            put_string(m->key, m->key_len);
            putchar(',');
            put_value(&m->value);
            putchar(']');
        }
        printf("]}");
        break;
    }
}

static void json_one(const uint8_t *text, size_t len, const npj_limits *limits)
{
    npj_doc *doc = NULL;
    char err[256];
    if (npj_parse(text, len, limits, &doc, err, sizeof err) != 0) {
        if (doc != NULL)
            printf("error (and a document was returned)\n");
        else if (strchr(err, '\n') != NULL || err[0] == '\0')
            printf("error (a reason that is empty or holds a newline)\n");
        else
            printf("error %s\n", err);
    } else {
        printf("ok ");
        put_value(npj_root(doc));
        putchar('\n');
        npj_free(doc);
    }
}

static void shape_one(const uint8_t *text, size_t len, const npj_limits *limits)
{
    (void)limits;
    unsigned depth;
    uint64_t values;
    npj_shape(text, len, &depth, &values);
    printf("%u %" PRIu64 "\n", depth, values);
}

/* Runs one() on the whole input, or on each record of a --batch input. */
static int each_input(int argc, char **argv, int with_limits,
                      void (*one)(const uint8_t *, size_t, const npj_limits *))
{
    npj_limits limits = {16, 4194304, NPJ_MAX_STRING};
    const char *path = NULL;
    int batch = 0;
    for (int i = 0; i < argc; i++) {
        uint64_t n;
        if (with_limits && strcmp(argv[i], "--depth") == 0 && i + 1 < argc) {
            if (parse_u64(argv[++i], &n) != 0 || n > 0xFFFFFFFFu)
                return usage();
            limits.max_depth = (unsigned)n;
        } else if (with_limits && strcmp(argv[i], "--values") == 0 && i + 1 < argc) {
            if (parse_u64(argv[++i], &n) != 0)
                return usage();
            limits.max_values = n;
        } else if (strcmp(argv[i], "--batch") == 0)
            batch = 1;
        else if (path == NULL)
            path = argv[i];
        else
            return usage();
    }
    if (path == NULL)
        return usage();
    size_t len;
    uint8_t *text = read_all(path, &len);
    if (text == NULL) {
        fprintf(stderr, "prim_driver: cannot read %s\n", path);
        return 1;
    }
    if (!batch) {
        one(text, len, &limits);
        free(text);
        return 0;
    }
    size_t at = 0;
    while (at < len) {
        size_t n = 0, k = at;
        while (k < len && text[k] >= '0' && text[k] <= '9' && n < ((size_t)1 << 40))
            n = n * 10 + (size_t)(text[k++] - '0');
        if (k == at || k >= len || text[k] != '\n' || n > len - k - 1) {
            fprintf(stderr, "prim_driver: bad batch record at byte %zu\n", at);
            free(text);
            return 2;
        }
        /* each record in its own allocation, so ASan sees a read past its end */
        uint8_t *rec = malloc(n ? n : 1);
        if (rec == NULL) {
            free(text);
            return 1;
        }
        memcpy(rec, text + k + 1, n);
        one(rec, n, &limits);
        free(rec);
        at = k + 1 + n;
    }
    free(text);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return usage();
    if (strcmp(argv[1], "b3") == 0)
        return cmd_b3(argc - 2, argv + 2);
    if (strcmp(argv[1], "b3-impls") == 0)
        return argc == 2 ? cmd_b3_impls() : usage();
    if (strcmp(argv[1], "b3-bench") == 0)
        return cmd_b3_bench(argc - 2, argv + 2);
    if (strcmp(argv[1], "json") == 0)
        return each_input(argc - 2, argv + 2, 1, json_one);
    if (strcmp(argv[1], "shape") == 0)
        return each_input(argc - 2, argv + 2, 0, shape_one);
    return usage();
}
