/* Small C helpers for the native loop: atomics shared with other threads, UTF-8 boundaries. */
#ifndef MULLAMA_SUPPORT_H
#define MULLAMA_SUPPORT_H
#include <stddef.h>

static inline int mullama_atomic_load(const int *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void mullama_atomic_store(int *p, int v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

/* Length of the longest prefix of s[0:n] that does not end inside a multi-byte UTF-8
   character. Bytes that can never become valid are let through (decoded as U+FFFD later). */
static inline size_t mullama_utf8_complete(const char *s, size_t n) {
    size_t back = 0;
    while (back < n && back < 4) {
        unsigned char c = (unsigned char)s[n - 1 - back];
        if ((c & 0xC0) != 0x80) {          /* a lead byte or ASCII */
            size_t need = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
            return back + 1 >= need ? n : n - back - 1;
        }
        back++;
    }
    return n;
}
#endif
