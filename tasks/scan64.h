/* scan64: the 64-bytes-at-a-time primitives of the structural JSON scans (tasks/rawarg.c locating a raw
 * argument, db/rows.c counting bulk rows). Header-only: both hot loops inline them. SSE2 only; without it
 * SCAN64 is not defined and callers keep to their byte loops. */
#ifndef CELERIAC_SCAN64_H
#define CELERIAC_SCAN64_H

#ifdef __SSE2__
#define SCAN64 1
#include <emmintrin.h>
#include <stdbool.h>
#include <stdint.h>

struct scan64 {
    __m128i v[4];
};

static inline void scan64_load(struct scan64 *b, const char *p)
{
    for (int i = 0; i < 4; i++)
        b->v[i] = _mm_loadu_si128((const __m128i *)(const void *)(p + 16 * i));
}

/* One bit per byte: which equal c (with fold: c with bit 5 set or clear, so '{' also finds '['). */
static inline uint64_t scan64_equal(const struct scan64 *b, char c, bool fold)
{
    uint64_t m = 0;
    for (int i = 0; i < 4; i++) {
        __m128i x = fold ? _mm_or_si128(b->v[i], _mm_set1_epi8(0x20)) : b->v[i];
        m |= (uint64_t)(unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(x, _mm_set1_epi8(c))) << (16 * i);
    }
    return m;
}

/* The bytes inside strings (a block without backslashes, so every quote opens or closes one): bit i set when
 * an odd number of quotes precede byte i, counting *in_string from the previous block, which is updated. */
static inline uint64_t scan64_in_strings(const struct scan64 *b, bool *in_string)
{
    uint64_t inside = scan64_equal(b, '"', false);
    for (int k = 1; k < 64; k *= 2)
        inside ^= inside << k;
    if (*in_string)
        inside = ~inside;
    *in_string = inside >> 63;
    return inside;
}
#endif

#endif
