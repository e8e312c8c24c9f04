/*
 * nnpatch-update: follow a signed release feed on a board, with libnnpatch's updater (nnp_update)
 * and libcurl as its HTTP client. The twin of `nnpatch update` (nnpatch/cli/release.py): the same
 * checks, exit codes and messages.
 *
 *   nnpatch-update MODEL --manifest URL|PATH --key PUB.pem [--in-place] [--dry-run] [--json]
 *                  [--prefer direct|smallest|chain] [--fallback none|full] [--timeout S] [--retries N]
 *                  [--header 'Name: value'] [--ca-file PEM]
 *
 * HTTP: http_curl.c (libcurl), or http_none.c in a cross build (local manifests only).
 *
 * Errors: one line "Error: <message>" on stderr (and the error object on stdout with --json).
 * Exit: 0 updated or already current, 2 usage (a private key given as --key too), 3 invalid,
 * 4 refused, 5 I/O or network, 7 no patch leads from this version, 130 SIGINT, 143 SIGTERM.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http.h"
#include "nnpatch.h"

static nnp_ctx *g_ctx; /* for the signal handler only */
volatile sig_atomic_t g_signal; /* http_*.c stops a transfer on it */

static void on_signal(int sig)
{
    g_signal = sig;
    if (g_ctx)
        nnp_cancel(g_ctx);
}

static const char USAGE[] =
    "usage: nnpatch-update MODEL --manifest URL|PATH --key PUB.pem [--in-place] [--dry-run] [--json]\n"
    "                      [--prefer direct|smallest|chain] [--fallback none|full] [--timeout S]\n"
    "                      [--retries N]\n"
    "                      [--header 'Name: value'] [--ca-file PEM]\n"
    "Exit codes: 0 updated or current, 2 usage, 3 invalid, 4 refused, 5 I/O or network,\n"
    "7 no patch leads from this version, 130/143 interrupted.\n";

typedef struct opts {
    const char *model, *manifest, *key;
    int in_place, dry_run, json, have_key, fallback_full;
    nnp_prefer prefer;
    unsigned retries;
    http_opts http;
} opts;

static int json_wanted;

/* ---- output ------------------------------------------------------------------------------- */

static void json_string(FILE *f, const char *s)
{
    fputc('"', f);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\')
            fprintf(f, "\\%c", *p);
        else if (*p < 0x20 || *p >= 0x7f)
            fprintf(f, "\\u%04x", *p); /* messages are ASCII (np_fail quotes the rest) */
        else
            fputc(*p, f);
    }
    fputc('"', f);
}

static const char *kind_word(nnp_status st)
{
    switch (st) {
    case NNP_EUSAGE: return "UsageError";
    case NNP_EFORMAT: return "PatchFormatError";
    case NNP_EINTEGRITY: return "IntegrityError";
    case NNP_ENOPATH: return "NoUpdatePathError";
    case NNP_ECANCELLED: return "Interrupted";
    default: return "NnpatchIOError";
    }
}

/* The error class the library names (nnpatch/errors.py's), else the status's usual one. */
static const char *kind_of(const nnp_ctx *ctx, nnp_status st)
{
    nnp_error_kind k = nnp_error(ctx);
    return k == NNP_KIND_NONE ? kind_word(st) : nnp_error_name(k);
}

static int fail_with(int code, const char *kind, const char *message)
{
    fprintf(stderr, "Error: %s\n", message);
    if (json_wanted) {
        printf("{\n  \"error\": {\n    \"code\": %d,\n    \"kind\": ", code);
        json_string(stdout, kind);
        printf(",\n    \"message\": ");
        json_string(stdout, message);
        printf("\n  },\n  \"ok\": false\n}\n");
    }
    return code;
}

static int usage_error(const char *what)
{
    char m[512];
    snprintf(m, sizeof m, "%s (see nnpatch-update --help)", what);
    return fail_with(2, "UsageError", m);
}

static void opt_str(const char *key, const char *v, int last)
{
    printf("  \"%s\": ", key);
    if (v && *v)
        json_string(stdout, v);
    else
        fputs("null", stdout);
    fputs(last ? "\n" : ",\n", stdout);
}

/* The object `nnpatch update --json` prints (UpdateResult.to_json, keys sorted). */
static void print_json(const opts *o, const nnp_update_result *r)
{
    static const char *const STATUS[] = {"updated", "current", "would-update"};
    printf("{\n  \"downloaded_bytes\": %llu,\n  \"dry_run\": %s,\n", (unsigned long long)r->downloaded_bytes,
           o->dry_run ? "true" : "false");
    opt_str("expires", r->expires, 0);
    opt_str("from_blake3", r->from_blake3, 0);
    opt_str("from_name", r->from_name, 0);
    printf("  \"in_place\": %s,\n  \"in_place_for_room\": %s,\n", r->in_place ? "true" : "false",
           r->in_place_for_room ? "true" : "false");
    opt_str("key_id", r->key_id, 0);
    printf("  \"mode\": \"%s\",\n  \"ok\": true,\n", r->full ? "full" : r->in_place ? "in-place" : "new-file");
    opt_str("path", o->model, 0);
    printf("  \"patch_bytes\": %llu,\n  \"patches\": [", (unsigned long long)r->patch_bytes);
    for (size_t i = 0; i < r->npatches; i++) {
        fputs(i ? ",\n    " : "\n    ", stdout);
        json_string(stdout, r->patches[i]);
    }
    fputs(r->npatches ? "\n  ],\n" : "],\n", stdout);
    printf("  \"recovered\": %s,\n", r->recovered ? "true" : "false");
    if (r->has_release)
        printf("  \"release\": %llu,\n", (unsigned long long)r->release);
    else
        printf("  \"release\": null,\n");
    printf("  \"resumed_bytes\": %llu,\n  \"signed\": %s,\n  \"status\": \"%s\",\n",
           (unsigned long long)r->resumed_bytes, r->is_signed ? "true" : "false", STATUS[r->status]);
    opt_str("to_blake3", r->to_blake3, 0);
    opt_str("to_name", r->to_name, 0);
    printf("  \"updated\": %s\n}\n", r->status == NNP_UPDATE_UPDATED ? "true" : "false");
}

static void human(double n, char *out, size_t cap)
{
    const char *u[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int i = 0;
    while (n >= 1024 && i < 4) {
        n /= 1024;
        i++;
    }
    if (i)
        snprintf(out, cap, "%.1f %s", n, u[i]);
    else
        snprintf(out, cap, "%.0f B", n);
}

/* The line `nnpatch update` says (nnpatch/cli/release.py). */
static void print_line(const opts *o, const nnp_update_result *r)
{
    char rel[160], trust[64], size[32];
    if (r->has_release)
        snprintf(rel, sizeof rel, "release %llu (%s)", (unsigned long long)r->release, r->to_name[0] ? r->to_name : "None");
    else
        snprintf(rel, sizeof rel, "version %s", r->to_name[0] ? r->to_name : "None");
    if (!r->is_signed)
        snprintf(trust, sizeof trust, ", unsigned feed");
    else if (!r->key_id[0])
        snprintf(trust, sizeof trust, ", signature not checked (no --key)");
    else
        snprintf(trust, sizeof trust, ", signed by %s", r->key_id);
    human((double)r->patch_bytes, size, sizeof size);
    const char *how = r->in_place_for_room ? " in place (no room beside the model for a second copy)"
                      : r->full ? " by downloading the full model (no patch leads from this version)" : "";
    if (r->status == NNP_UPDATE_CURRENT) {
        printf("%s is already %s: nothing to do%s\n", o->model, rel, trust);
        return;
    }
    char names[NNP_UPDATE_MAX_LINKS * 203] = "";
    for (size_t i = 0; i < r->npatches; i++) {
        if (i)
            strcat(names, ", ");
        strcat(names, r->patches[i]);
    }
    if (r->status == NNP_UPDATE_WOULD_UPDATE) {
        char from[128];
        snprintf(from, sizeof from, "%s", r->from_name[0] ? r->from_name : r->from_blake3);
        if (!r->from_name[0])
            from[16] = 0;
        printf("would fetch %s (%s) to bring %s from %s to %s%s%s\n", names, size, o->model, from, rel, how, trust);
        return;
    }
    char fetched[128] = "";
    if (r->downloaded_bytes || r->resumed_bytes) {
        char d[32], s[32];
        human((double)r->downloaded_bytes, d, sizeof d);
        int n = snprintf(fetched, sizeof fetched, ", %s downloaded", d);
        if (r->resumed_bytes) {
            human((double)r->resumed_bytes, s, sizeof s);
            snprintf(fetched + n, sizeof fetched - (size_t)n, " (resumed after %s)", s);
        }
    }
    printf("updated %s to %s%s with %s (%s%s); BLAKE3 %s%s\n", o->model, rel, how, names, size, fetched, r->to_blake3,
           trust);
}

/* ---- the command ---------------------------------------------------------------------------- */

static int parse_args(int argc, char **argv, opts *o)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEEDS_VALUE                                                                                            \
    do {                                                                                                       \
        if (!v) {                                                                                              \
            char m[128];                                                                                       \
            snprintf(m, sizeof m, "option %s needs a value", a);                                               \
            return usage_error(m);                                                                             \
        }                                                                                                      \
        i++;                                                                                                   \
    } while (0)
        if (!strcmp(a, "--manifest")) {
            NEEDS_VALUE;
            o->manifest = v;
        } else if (!strcmp(a, "--key")) {
            NEEDS_VALUE;
            o->key = v;
        } else if (!strcmp(a, "--ca-file")) {
            NEEDS_VALUE;
            o->http.ca_file = v;
        } else if (!strcmp(a, "--header")) {
            NEEDS_VALUE;
            const char *colon = strchr(v, ':');
            if (!colon || colon == v || strpbrk(v, "\r\n"))
                return usage_error("--header takes 'Name: value'");
            if (http_add_header(&o->http, v) != 0)
                return fail_with(5, "NnpatchIOError", "out of memory");
        } else if (!strcmp(a, "--prefer")) {
            NEEDS_VALUE;
            if (!strcmp(v, "direct")) o->prefer = NNP_PREFER_DIRECT;
            else if (!strcmp(v, "smallest")) o->prefer = NNP_PREFER_SMALLEST;
            else if (!strcmp(v, "chain")) o->prefer = NNP_PREFER_CHAIN;
            else return usage_error("--prefer takes direct, smallest or chain");
        } else if (!strcmp(a, "--fallback")) {
            NEEDS_VALUE;
            if (!strcmp(v, "none")) o->fallback_full = 0;
            else if (!strcmp(v, "full")) o->fallback_full = 1;
            else return usage_error("--fallback takes none or full");
        } else if (!strcmp(a, "--timeout") || !strcmp(a, "--retries")) {
            NEEDS_VALUE;
            char *end;
            errno = 0;
            unsigned long n = strtoul(v, &end, 10);
            int t = !strcmp(a, "--timeout");
            if (!*v || *end || errno || v[0] == '-' || (t && (n < 1 || n > 86400)) || (!t && n > 100))
                return usage_error(t ? "--timeout takes whole seconds from 1 to 86400"
                                     : "--retries takes a number from 0 to 100");
            if (t)
                o->http.timeout = (long)n;
            else
                o->retries = (unsigned)n;
        } else if (!strcmp(a, "--in-place")) {
            o->in_place = 1;
        } else if (!strcmp(a, "--dry-run")) {
            o->dry_run = 1;
        } else if (!strcmp(a, "--json")) {
            o->json = 1;
        } else if (a[0] == '-' && a[1]) {
            char m[256];
            snprintf(m, sizeof m, "no such option: %.200s", a);
            return usage_error(m);
        } else if (o->model) {
            char m[256];
            snprintf(m, sizeof m, "unexpected argument %.200s (one MODEL)", a);
            return usage_error(m);
        } else {
            o->model = a;
        }
    }
    if (!o->model)
        return usage_error("missing argument MODEL");
    if (!o->manifest)
        return usage_error("missing option --manifest");
    return -1;
}

static int run(int argc, char **argv, opts *o)
{
    for (int i = 1; i < argc; i++)
        json_wanted |= !strcmp(argv[i], "--json");
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            fputs(USAGE, stdout);
            return 0;
        }
        if (!strcmp(argv[i], "--version")) {
            printf("nnpatch-update %s\n", nnp_version());
            return 0;
        }
    }
    int rc = parse_args(argc, argv, o);
    if (rc >= 0)
        return rc;
    nnp_ctx *ctx = nnp_ctx_new();
    if (!ctx)
        return fail_with(5, "NnpatchIOError", "out of memory");
    g_ctx = ctx;
    if (o->key) {
        nnp_status st = nnp_set_trusted_key_file(ctx, o->key);
        if (st)
            return fail_with(st, kind_of(ctx, st), nnp_message(ctx));
    }
    if (!http_available && (!strncmp(o->manifest, "http://", 7) || !strncmp(o->manifest, "https://", 8)))
        return usage_error("this nnpatch-update has no HTTP client (a cross build): give the manifest as a local "
                           "path");
    nnp_update_options opt = NNP_UPDATE_OPTIONS_INIT(o->manifest, http_available ? http_fetch : NULL, &o->http);
    opt.in_place = o->in_place;
    opt.dry_run = o->dry_run;
    opt.prefer = o->prefer;
    opt.fallback_full = o->fallback_full;
    opt.retries = o->retries;
    nnp_update_result res = NNP_UPDATE_RESULT_INIT;
    nnp_status st = nnp_update(ctx, o->model, &opt, &res);
    if (g_signal)
        /* the words and kinds of `nnpatch update`'s error object (cli/__init__.py) */
        return g_signal == SIGTERM ? fail_with(143, "Terminated", "terminated (SIGTERM)")
                                   : fail_with(130, "KeyboardInterrupt", "interrupted");
    if (st)
        return fail_with(st, kind_of(ctx, st), nnp_message(ctx));
    if (o->json)
        print_json(o, &res);
    else
        print_line(o, &res);
    return 0;
}

int main(int argc, char **argv)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    if (http_init() != 0)
        return fail_with(5, "NnpatchIOError", "cannot start the HTTP client");
    opts o;
    memset(&o, 0, sizeof o);
    o.http.timeout = 30;
    o.retries = 5;
    int rc = run(argc, argv, &o);
    nnp_ctx *ctx = g_ctx;
    g_ctx = NULL; /* before the free: a signal now must not reach a freed context */
    nnp_ctx_free(ctx);
    http_cleanup(&o.http);
    return rc;
}
