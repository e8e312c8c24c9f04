/*
 * In-place updates behind the undo journal (spec/JOURNAL.md, "Protocol"); the Python
 * twin is nnpatch/applier/inplace.py. The public entry points are nnp_apply_in_place
 * and nnp_recover (nnpatch.h).
 *
 * Test-only: when the environment variable NNPATCH_TEST_PAUSE_AFTER_JOURNAL holds a
 * number of milliseconds, nnp_apply_in_place sleeps that long right after the
 * journal's commit point and again after the new bytes are written and fsynced (before
 * they are verified), so a crash test can SIGKILL it where a journal is committed. It
 * changes nothing else; never set it outside tests.
 */
#ifndef NNP_INPLACE_H
#define NNP_INPLACE_H

#include "internal.h"

#define NP_TEST_PAUSE_ENV "NNPATCH_TEST_PAUSE_AFTER_JOURNAL"

#endif
