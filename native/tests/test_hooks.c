/*
 * Test hooks, linked into libnnpatch in test builds only (-DNNPATCH_TEST: `make native-test` and
 * the ASan build; as SQLite's SQLITE_TEST): the shipped library reads no environment. Declared in
 * native/src/inplace.h.
 */
#include <errno.h>
#include <stdlib.h>
#include <time.h>

#include "inplace.h"

/* NNPATCH_TEST_PAUSE_AFTER_JOURNAL milliseconds of sleep, called by nnp_apply_in_place right after
 * its journal's commit point and after its writes, so a crash test can kill it there. */
void np_test_pause(void)
{
    const char *v = getenv("NNPATCH_TEST_PAUSE_AFTER_JOURNAL");
    if (!v || !*v)
        return;
    long ms = strtol(v, NULL, 10);
    if (ms <= 0)
        return;
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}
