/* nnpatch-update's HTTP client behind libnnpatch's fetch callback: http_curl.c (libcurl), or
 * http_none.c where the build has no libcurl (the static cross build: local manifests only). */
#ifndef NNP_CLI_HTTP_H
#define NNP_CLI_HTTP_H

#include <signal.h>
#include <stddef.h>
#include <stdint.h>

#include "nnpatch.h"

typedef struct http_opts {
    long timeout;        /* seconds: connection set-up, and a stall below 1 KiB/s */
    const char *ca_file; /* NULL: the system's CAs */
    void *headers;       /* --header lines */
} http_opts;

/* Set by the command's SIGINT/SIGTERM handler: a transfer stops at once. */
extern volatile sig_atomic_t g_signal;
/* Whether this build has an HTTP client (0: http_fetch must not be used). */
extern const int http_available;

int http_init(void);
void http_cleanup(http_opts *o);
int http_add_header(http_opts *o, const char *line);
/* nnp_fetch_fn; user: the http_opts. */
int http_fetch(void *user, const char *url, uint64_t offset, uint64_t limit, nnp_sink_fn sink, void *sink_ctx,
               char *err, size_t errlen);

#endif
