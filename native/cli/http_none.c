/*
 * nnpatch-update without an HTTP client: the static cross build (native/Makefile, CROSS=...), for
 * which Debian has no static libcurl. The command then takes local manifests and patches only
 * (a feed copied to the board by other means); a URL is refused before anything is read.
 */
#include <stdio.h>

#include "http.h"

const int http_available = 0;

int http_init(void) { return 0; }

void http_cleanup(http_opts *o) { (void)o; }

int http_add_header(http_opts *o, const char *line)
{
    (void)o, (void)line;
    return 0;
}

int http_fetch(void *user, const char *url, uint64_t offset, uint64_t limit, nnp_sink_fn sink, void *sink_ctx,
               char *err, size_t errlen)
{
    (void)user, (void)offset, (void)limit, (void)sink, (void)sink_ctx;
    snprintf(err, errlen, "%s: this nnpatch-update has no HTTP client", url);
    return NNP_FETCH_FAIL;
}
