/* Small C helpers for the native loop: atomics shared with other threads, UTF-8 boundaries. */
#ifndef MULLAMA_SUPPORT_H
#define MULLAMA_SUPPORT_H
#include <stddef.h>
#include <math.h>
#include <sys/stat.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <sched.h>
#include <unistd.h>
#include <sys/resource.h>
#include <sys/syscall.h>

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

/* Set by mullama's abort callback in the thread whose llama_decode it aborts (ggml runs the
   callback in the calling thread), cleared when that llama_decode returns: the errors
   llama.cpp logs on the way out are the expected result of a cancel, not failures. */
static __thread int mullama_decode_aborted_flag = 0;
static inline int mullama_decode_aborted(void) { return mullama_decode_aborted_flag; }
static inline void mullama_set_decode_aborted(int v) { mullama_decode_aborted_flag = v; }

/* A logits row mullama has sampled from is stamped (so are all rows of a new context); a decode
   that computes logits overwrites the stamp. A stamp still there after a decode means the model
   computed none (an encoder-only embedding model), and sampling would read stale memory. The
   stamp is a signalling NaN, which no arithmetic yields (its NaNs are quiet): a row the model
   computed as NaN still reads as fresh, and the sampler reports it as NaN. */
static const uint32_t MULLAMA_USED_ROW = 0x7FA5A5A5u;
static inline int mullama_logits_fresh(const float *row) {
    uint32_t bits;
    if (row == NULL) return 0;
    memcpy(&bits, row, sizeof bits);
    return bits != MULLAMA_USED_ROW;
}
static inline void mullama_logits_used(float *row) { if (row != NULL) memcpy(row, &MULLAMA_USED_ROW, sizeof MULLAMA_USED_ROW); }

/* The file behind a memory-mapped model, as it was when loaded. If the file is truncated or
   rewritten in place, touching the mapping kills the process (SIGBUS) or reads other bytes;
   every decode checks first, so a change between decodes becomes an exception instead. */
typedef struct {
    int fd;                 /* -1: not mapped, nothing to check */
    long long size;
    long long mtime_ns;
} mullama_file_guard;

static inline int mullama_file_changed(const mullama_file_guard *g) {
    struct stat st;
    if (g == NULL || g->fd < 0 || fstat(g->fd, &st) != 0)
        return 0;
    return (long long)st.st_size != g->size
        || (long long)st.st_mtim.tv_sec * 1000000000LL + st.st_mtim.tv_nsec != g->mtime_ns;
}
/* Give the calling thread, and the compute threads it goes on to start (they inherit it), a long
   time slice, keeping its policy and nice value. Linux's EEVDF scheduler (6.12+) lets a waking
   thread preempt a running one at once only when the runner's slice is the longer: with it, an
   event loop's thread gets a core the moment it wakes instead of at the next tick, while the
   share of CPU each thread gets, and so the speed under load, stays what the nice values say.
   Older kernels ignore the slice. Returns 0 when set. */
static inline int mullama_set_thread_slice(uint64_t ns) {
#if defined(__linux__) && defined(SYS_sched_setattr)
    struct {
        uint32_t size, policy;
        uint64_t flags;
        int32_t nice;
        uint32_t priority;
        uint64_t runtime, deadline, period;
    } a;
    int policy = sched_getscheduler(0), nice;
    if (policy != SCHED_OTHER && policy != SCHED_BATCH)
        return -1;
    errno = 0;
    nice = getpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid));
    if (errno != 0)
        return -1;
    memset(&a, 0, sizeof a);
    a.size = sizeof a;
    a.policy = (uint32_t)policy;
    a.nice = nice;
    a.runtime = ns;
    return (int)syscall(SYS_sched_setattr, 0, &a, 0);
#else
    (void)ns;
    return -1;
#endif
}
#endif
