/*
 * In-place updates behind the undo journal (spec/JOURNAL.md, "Protocol"); the Python
 * twin is nnpatch/applier/inplace.py. The public entry points are nnp_apply_in_place
 * and nnp_recover (nnpatch.h).
 *
 * Test builds only (-DNNPATCH_TEST, as SQLite's SQLITE_TEST: `make native-test`, and the
 * ASan build): when the environment variable NNPATCH_TEST_PAUSE_AFTER_JOURNAL holds a
 * number of milliseconds, nnp_apply_in_place sleeps that long right after the
 * journal's commit point and again after the new bytes are written and fsynced (before
 * they are verified), so a crash test can SIGKILL it where a journal is committed. It
 * changes nothing else. The shipped library is built without it and reads no environment.
 */
#ifndef NNP_INPLACE_H
#define NNP_INPLACE_H

#include "internal.h"

/* The pause (native/tests/test_hooks.c, linked into test builds only); nothing elsewhere. */
#ifdef NNPATCH_TEST
void np_test_pause(void);
#else
static inline void np_test_pause(void) {}
#endif

#endif
