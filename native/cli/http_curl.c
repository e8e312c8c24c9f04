/*
 * nnpatch-update's HTTP client: libcurl behind libnnpatch's fetch callback (nnp_fetch_fn). The
 * transport of nnpatch/delivery/fetch.py (urllib3 there), with the same bounds:
 *
 * Bounded: only http:// and https:// (for redirects too: CURLOPT_PROTOCOLS_STR and
 * CURLOPT_REDIR_PROTOCOLS_STR), at most 5 redirects and never one from https:// down to http://
 * (checked on every hop, as fetch.py's redirect_allowed), TLS verified (the system's CAs, or
 * --ca-file), no compressed bodies (a patch is compressed already, and Range counts raw bytes).
 * --timeout S bounds the connection set-up and a stall: a transfer slower than 1 KiB/s for S
 * seconds is cut; each request also has an overall deadline of S seconds plus what the bytes
 * it may bring take at that slowest allowed speed. libnnpatch itself links no HTTP library.
 */
#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "http.h"

#define MAX_REDIRECTS 5
#define SLOWEST 1024L /* bytes per second below which a transfer counts as stalled */

const int http_available = 1;

int http_init(void) { return curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK ? 0 : -1; }

void http_cleanup(http_opts *o)
{
    curl_slist_free_all((struct curl_slist *)o->headers);
    o->headers = NULL;
    curl_global_cleanup();
}

int http_add_header(http_opts *o, const char *line)
{
    struct curl_slist *n = curl_slist_append((struct curl_slist *)o->headers, line);
    if (!n)
        return -1;
    o->headers = n;
    return 0;
}

typedef struct transfer {
    const http_opts *o;
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

int http_fetch(void *user, const char *url, uint64_t offset, uint64_t limit, nnp_sink_fn sink,
                              void *sink_ctx, char *err, size_t errlen)
{
    const http_opts *o = user;
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
        curl_easy_setopt(h, CURLOPT_HTTPHEADER, (struct curl_slist *)o->headers);
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

