/*
 * nnpatch-update: follow a signed release feed on a board, with libnnpatch's updater (nnp_update)
 * and libcurl as its HTTP client. The twin of `nnpatch update` (nnpatch/cli/release.py): the same
 * checks, exit codes and messages.
 *
 *   nnpatch-update MODEL --manifest URL|PATH --key PUB.pem [--in-place] [--dry-run] [--json]
 *                  [--prefer direct|smallest|chain] [--timeout S] [--retries N]
 *                  [--header 'Name: value'] [--ca-file PEM]
 *
 * HTTP, bounded: only http:// and https:// (for redirects too: CURLOPT_PROTOCOLS_STR and
 * CURLOPT_REDIR_PROTOCOLS_STR), at most 5 redirects and never one from https:// down to http://
 * (checked on every hop, as fetch.py's redirect_allowed), TLS verified (the system's CAs, or
 * --ca-file), no compressed bodies (a patch is compressed already, and Range counts raw bytes).
 * --timeout S bounds the connection set-up and a stall: a transfer slower than 1 KiB/s for S
 * seconds is cut; each request also has an overall deadline of S seconds plus what the bytes
 * it may bring take at that slowest allowed speed. libnnpatch itself links no HTTP library.
 *
 * Errors: one line "Error: <message>" on stderr (and the error object on stdout with --json).
 * Exit: 0 updated or already current, 2 usage (a private key given as --key too), 3 invalid,
 * 4 refused, 5 I/O or network, 7 no patch leads from this version, 130 SIGINT, 143 SIGTERM.
 */
#include <curl/curl.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nnpatch.h"

#define MAX_REDIRECTS 5
#define SLOWEST 1024L /* bytes per second below which a transfer counts as stalled */

static nnp_ctx *g_ctx; /* for the signal handler only */
static volatile sig_atomic_t g_signal;

static void on_signal(int sig)
{
    g_signal = sig;
    if (g_ctx)
        nnp_cancel(g_ctx);
}

static const char USAGE[] =
    "usage: nnpatch-update MODEL --manifest URL|PATH --key PUB.pem [--in-place] [--dry-run] [--json]\n"
    "                      [--prefer direct|smallest|chain] [--timeout S] [--retries N]\n"
    "                      [--header 'Name: value'] [--ca-file PEM]\n"
    "Exit codes: 0 updated or current, 2 usage, 3 invalid, 4 refused, 5 I/O or network,\n"
    "7 no patch leads from this version, 130/143 interrupted.\n";

typedef struct opts {
    const char *model, *manifest, *key, *ca_file;
    int in_place, dry_run, json, have_key;
    nnp_prefer prefer;
    long timeout;
    unsigned retries;
    struct curl_slist *headers;
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
    printf("  \"in_place\": %s,\n  \"in_place_for_room\": false,\n", r->in_place ? "true" : "false");
    opt_str("key_id", r->key_id, 0);
    printf("  \"mode\": \"%s\",\n  \"ok\": true,\n", r->in_place ? "in-place" : "new-file");
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
        printf("would fetch %s (%s) to bring %s from %s to %s%s\n", names, size, o->model, from, rel, trust);
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
    printf("updated %s to %s with %s (%s%s); BLAKE3 %s%s\n", o->model, rel, names, size, fetched, r->to_blake3, trust);
}

/* ---- HTTP through libcurl ----------------------------------------------------------------- */

typedef struct transfer {
    const opts *o;
    uint64_t offset, limit, got;
    nnp_sink_fn sink;
    void *sink_ctx;
    int started, stopped;
    long status;
    uint64_t at; /* where the body starts in the resource */
    CURL *h;
} transfer;

/* "bytes A-B/N": A, or -1. */
static long long range_start(CURL *h)
{
    struct curl_header *hd;
    if (curl_easy_header(h, "Content-Range", 0, CURLH_HEADER, -1, &hd) != CURLHE_OK)
        return -1;
    unsigned long long a;
    return sscanf(hd->value, "bytes %llu-", &a) == 1 ? (long long)a : -1;
}

static size_t on_body(char *buf, size_t one, size_t n, void *user)
{
    transfer *t = user;
    size_t len = one * n;
    if (g_signal)
        return CURL_WRITEFUNC_ERROR;
    if (!t->started) {
        curl_easy_getinfo(t->h, CURLINFO_RESPONSE_CODE, &t->status);
        if (t->status != 200 && t->status != 206)
            return len; /* an error page or a redirect's body is not the file: dropped */
        t->started = 1;
        if (t->status == 206) {
            long long a = range_start(t->h);
            if (a < 0)
                return CURL_WRITEFUNC_ERROR;
            t->at = (uint64_t)a;
        } else {
            t->at = 0; /* the whole file: a server that ignored the range; the library skips what it has */
        }
    }
    if (t->sink(t->sink_ctx, t->at + t->got, (const uint8_t *)buf, len)) {
        t->stopped = 1;
        return CURL_WRITEFUNC_ERROR;
    }
    t->got += len;
    return len;
}

static int on_progress(void *user, curl_off_t a, curl_off_t b, curl_off_t c, curl_off_t d)
{
    (void)user, (void)a, (void)b, (void)c, (void)d;
    return g_signal != 0; /* stop a transfer at once on SIGINT/SIGTERM */
}

static int transient(long status)
{
    return status == 408 || status == 425 || status == 429 || status == 500 || status == 502 || status == 503 ||
           status == 504;
}

/* A URL without credentials or query, for messages (fetch.py's _shown). */
static void shown(const char *url, char *out, size_t cap)
{
    const char *s = strstr(url, "://");
    const char *host = s ? s + 3 : url;
    const char *at = strchr(host, '@'), *slash = strchr(host, '/');
    if (at && (!slash || at < slash))
        host = at + 1;
    size_t keep = strcspn(host, "?#");
    snprintf(out, cap, "%.*s%.*s", s ? (int)(s + 3 - url) : 0, url, (int)keep, host);
}

static int fetch(void *user, const char *url, uint64_t offset, uint64_t limit, nnp_sink_fn sink,
                              void *sink_ctx, char *err, size_t errlen)
{
    const opts *o = user;
    char show[1024];
    shown(url, show, sizeof show);
    CURL *h = curl_easy_init();
    if (!h) {
        snprintf(err, errlen, "%s: cannot start a transfer", show);
        return NNP_FETCH_FAIL;
    }
    transfer t = {o, offset, limit, 0, sink, sink_ctx, 0, 0, 0, 0, h};
    char range[64];
    char *where = strdup(url);
    int r = NNP_FETCH_FAIL;
    long deadline = o->timeout + (long)(limit / (uint64_t)SLOWEST) + 1;
    for (int hop = 0; where; hop++) {
        curl_easy_reset(h);
        curl_easy_setopt(h, CURLOPT_URL, where);
        curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
        curl_easy_setopt(h, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
        curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L); /* redirects are followed below, one checked hop each */
        curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
        curl_easy_setopt(h, CURLOPT_USERAGENT, "nnpatch-update/" NNP_VERSION_STRING);
        curl_easy_setopt(h, CURLOPT_HTTPHEADER, o->headers);
        curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT, o->timeout);
        curl_easy_setopt(h, CURLOPT_LOW_SPEED_LIMIT, SLOWEST);
        curl_easy_setopt(h, CURLOPT_LOW_SPEED_TIME, o->timeout);
        curl_easy_setopt(h, CURLOPT_TIMEOUT, deadline);
        curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
        curl_easy_setopt(h, CURLOPT_WRITEDATA, &t);
        curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, on_progress);
        curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
        curl_easy_setopt(h, CURLOPT_FAILONERROR, 0L);
        if (o->ca_file)
            curl_easy_setopt(h, CURLOPT_CAINFO, o->ca_file);
        if (offset) {
            snprintf(range, sizeof range, "%llu-", (unsigned long long)offset);
            curl_easy_setopt(h, CURLOPT_RANGE, range);
        }
        t.started = t.stopped = 0;
        t.got = 0;
        t.status = 0;
        CURLcode c = curl_easy_perform(h);
        long status = 0;
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
        char *next = NULL;
        if (status >= 300 && status < 400 && status != 304 && curl_easy_getinfo(h, CURLINFO_REDIRECT_URL, &next) ==
            CURLE_OK && next) {
            char to[1024];
            shown(next, to, sizeof to);
            int https_from = !strncmp(where, "https://", 8);
            if (hop >= MAX_REDIRECTS) {
                snprintf(err, errlen, "%s: more than %d redirects", show, MAX_REDIRECTS);
                break;
            }
            if (strncmp(next, "https://", 8) && (https_from || strncmp(next, "http://", 7))) {
                snprintf(err, errlen, "%s: redirected to %s, refused (a download may only be redirected to "
                         "https://, or from http:// to http://)", show, to);
                break;
            }
            free(where);
            where = strdup(next);
            continue;
        }
        if (t.stopped) { /* the library had what it wanted, or stopped it */
            r = NNP_FETCH_OK;
        } else if (g_signal) {
            snprintf(err, errlen, "interrupted");
            r = NNP_FETCH_FAIL;
        } else if (c == CURLE_OK && (status == 200 || status == 206)) {
            r = NNP_FETCH_OK; /* the library counts the bytes */
        } else if (c != CURLE_OK) {
            /* cut, stalled, refused connection, DNS, an unreadable Content-Range: worth another try;
             * a certificate that does not verify is not */
            snprintf(err, errlen, "%s: %s after %llu bytes", show, curl_easy_strerror(c),
                     (unsigned long long)t.got);
            r = NNP_FETCH_RETRY;
            if (c == CURLE_SSL_CACERT_BADFILE || c == CURLE_PEER_FAILED_VERIFICATION || c == CURLE_UNSUPPORTED_PROTOCOL)
                r = NNP_FETCH_FAIL;
        } else if (transient(status)) {
            snprintf(err, errlen, "%s: HTTP %ld", show, status);
            r = NNP_FETCH_RETRY;
        } else if (status == 416) { /* the partial file does not fit what the server has now */
            snprintf(err, errlen, "%s: HTTP 416 for a resumed download", show);
            r = NNP_FETCH_RESTART;
        } else {
            snprintf(err, errlen, "%s: HTTP %ld", show, status);
            r = NNP_FETCH_FAIL;
        }
        break;
    }
    free(where);
    curl_easy_cleanup(h);
    return r;
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
            o->ca_file = v;
        } else if (!strcmp(a, "--header")) {
            NEEDS_VALUE;
            const char *colon = strchr(v, ':');
            if (!colon || colon == v || strpbrk(v, "\r\n"))
                return usage_error("--header takes 'Name: value'");
            struct curl_slist *n = curl_slist_append(o->headers, v);
            if (!n)
                return fail_with(5, "NnpatchIOError", "out of memory");
            o->headers = n;
        } else if (!strcmp(a, "--prefer")) {
            NEEDS_VALUE;
            if (!strcmp(v, "direct")) o->prefer = NNP_PREFER_DIRECT;
            else if (!strcmp(v, "smallest")) o->prefer = NNP_PREFER_SMALLEST;
            else if (!strcmp(v, "chain")) o->prefer = NNP_PREFER_CHAIN;
            else return usage_error("--prefer takes direct, smallest or chain");
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
                o->timeout = (long)n;
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
    nnp_update_options opt = NNP_UPDATE_OPTIONS_INIT(o->manifest, fetch, o);
    opt.in_place = o->in_place;
    opt.dry_run = o->dry_run;
    opt.prefer = o->prefer;
    opt.retries = o->retries;
    nnp_update_result res = NNP_UPDATE_RESULT_INIT;
    nnp_status st = nnp_update(ctx, o->model, &opt, &res);
    if (g_signal)
        return fail_with(g_signal == SIGTERM ? 143 : 130, "Interrupted", "interrupted");
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
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
        return fail_with(5, "NnpatchIOError", "cannot start libcurl");
    opts o;
    memset(&o, 0, sizeof o);
    o.timeout = 30;
    o.retries = 5;
    int rc = run(argc, argv, &o);
    nnp_ctx *ctx = g_ctx;
    g_ctx = NULL; /* before the free: a signal now must not reach a freed context */
    nnp_ctx_free(ctx);
    curl_slist_free_all(o.headers);
    curl_global_cleanup();
    return rc;
}
