/*
 * The arena an np_patch keeps its strings and arrays in (patch.h): blocks of at least 64 KiB, freed
 * together with the patch. Split from header.c, its one writer. No Python twin: Python's objects are
 * freed by the garbage collector.
 */
#include <stdlib.h>

#include "patch.h"

struct np_arena_blk {
    np_arena_blk *next;
    size_t used, cap;
    uint64_t data[];
};

void *np_arena_alloc(np_arena_blk **arena, size_t n)
{
    n = (n + 15) & ~(size_t)15;
    np_arena_blk *b = *arena;
    if (!b || b->cap - b->used < n) {
        size_t cap = n > 65536 ? n : 65536;
        b = malloc(sizeof *b + cap);
        if (!b)
            return NULL;
        b->next = *arena;
        b->used = 0;
        b->cap = cap;
        *arena = b;
    }
    void *p = (char *)b->data + b->used;
    b->used += n;
    return p;
}

void np_arena_free(np_arena_blk **arena)
{
    np_arena_blk *b = *arena;
    while (b) {
        np_arena_blk *n = b->next;
        free(b);
        b = n;
    }
    *arena = NULL;
}

