/*
 * The scans the JSON reader makes before it builds anything (json.c's passes 1 and 2): where
 * a text stops being UTF-8, and its depth and value count. Python twin: nnpatch/_json.py
 * (json_shape, and the strict UTF-8 decode of loads_strict).
 */
#include <stdint.h>

#include "json.h"

/* --- pass 1: UTF-8 ------------------------------------------------------------------------ */

/* Offset of the first byte that is not valid UTF-8 (as Python's strict "utf-8" codec reports
 * it), or len. Overlongs, surrogates (U+D800-DFFF) and code points above U+10FFFF are invalid. */
size_t npj_utf8_invalid_at(const uint8_t *t, size_t len)
{
    size_t i = 0;
    while (i < len) {
        uint8_t c = t[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t n;
        uint8_t lo = 0x80, hi = 0xBF;
        if (c >= 0xC2 && c <= 0xDF)
            n = 1;
        else if (c >= 0xE0 && c <= 0xEF) {
            n = 2;
            if (c == 0xE0)
                lo = 0xA0;
            else if (c == 0xED)
                hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            n = 3;
            if (c == 0xF0)
                lo = 0x90;
            else if (c == 0xF4)
                hi = 0x8F;
        } else
            return i;
        if (len - i <= n)
            return i; /* truncated: Python reports the lead byte too */
        if (t[i + 1] < lo || t[i + 1] > hi)
            return i;
        for (size_t k = 2; k <= n; k++)
            if ((t[i + k] & 0xC0) != 0x80)
                return i;
        i += n + 1;
    }
    return len;
}

/* --- pass 2: shape -------------------------------------------------------------------------- */

void npj_shape_counts(const uint8_t *t, size_t len, unsigned *depth_out, uint64_t *opens_out, uint64_t *commas_out)
{
    int64_t level = 0, deepest = 0;
    uint64_t opens = 0, commas = 0;
    int strings = 1; /* cleared once a '"' has no closing quote: then no later one has either */
    size_t i = 0;
    while (i < len) {
        uint8_t c = t[i];
        if (c == '"' && strings) {
            /* the pattern "(?:[^"\\]|\\.)*" of json_shape */
            size_t j = i + 1;
            while (j < len && t[j] != '"')
                j += t[j] == '\\' ? 2 : 1;
            if (j < len) {
                i = j + 1;
                continue;
            }
            strings = 0;
            i++;
            continue;
        }
        if (c == '[' || c == '{') {
            opens++;
            if (++level > deepest)
                deepest = level;
        } else if (c == ']' || c == '}')
            level--;
        else if (c == ',')
            commas++;
        i++;
    }
    *depth_out = deepest > (int64_t)~0u ? ~0u : (unsigned)deepest;
    *opens_out = opens;
    *commas_out = commas;
}

void npj_shape(const uint8_t *text, size_t len, unsigned *depth, uint64_t *values)
{
    uint64_t opens, commas;
    unsigned d;
    npj_shape_counts(text, len, &d, &opens, &commas);
    if (depth)
        *depth = d;
    if (values)
        *values = opens + commas;
}
