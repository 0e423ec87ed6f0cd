/* t5lite's block cache: a malloc interposer (LD_PRELOAD) that keeps large blocks for reuse.
 *
 * XLA:CPU allocates its step buffers (activations, gradients: megabytes to gigabytes) with
 * malloc on every step and frees them at its end. glibc serves each from a fresh mmap and gives
 * it back with munmap, so every page is faulted in and zero-filled again on the next step; on
 * a VM whose kernel reports free memory to its host ("Free page reporting enabled") the host
 * takes the pages back too, and each fault costs twice. This library keeps large blocks instead:
 *
 *   - A request of at least T5LITE_BLOCK_MIN_KB (256 KiB) is rounded up to one of 8 size
 *     classes per power of two (at most 12.5 % more address space; pages never touched cost no
 *     memory) and served from the class's free list, or carved from one reserved range of
 *     address space (1 TiB, PROT_NONE until used), so `free` tells its own blocks from glibc's
 *     by address alone, without a lock.
 *   - A freed block goes back on its class's list with its pages still mapped: the next step's
 *     buffer of the same class reuses them without a fault.
 *   - A request finds a kept block of its own class, else of up to 4 classes larger
 *     (T5LITE_BLOCK_LARGER_CLASSES), so fewer distinct blocks are made.
 *   - Freed blocks kept resident are capped at T5LITE_BLOCK_CACHE_MB (default half the
 *     machine's memory); past the cap a freed block's pages are given back (madvise DONTNEED)
 *     and only its address range is kept. (A cap at the most bytes in use at once was tried:
 *     where two programs' steps alternate in one process, the blocks in circulation exceed
 *     that peak and the cap gave pages back every step.)
 *   - Everything smaller, and anything when the range is exhausted or could not be reserved,
 *     goes to glibc (__libc_malloc and friends).
 *
 * Worked example: a step allocates a 6,291,456-byte buffer (8 x 512 x 384 floats). With the
 * 4 KiB header the block needs 6,295,552 bytes; 2^22 <= that < 2^23, classes are 2^19 apart,
 * so it gets a 6,815,744-byte block of class 22 * 8 + 5. The next step asks for the same size,
 * finds that block on the list and reuses its pages.
 *
 * t5lite_block_cache_stats() reports counters (tests read them through ctypes), and
 * T5LITE_BLOCK_CACHE_STATS=1 prints them to stderr when the process exits.
 * Built by t5lite.native.block_cache_library (cc -O2 -shared -fPIC); chosen with
 * T5LITE_MALLOC=blockcache, and by T5LITE_MALLOC=auto on CPU hosts without jemalloc.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);

#define HEADER 4096u                       /* one page before the caller's bytes */
#define RESERVE ((size_t)1 << 40)          /* address space reserved for large blocks */
#define CLASSES_PER_DOUBLING 8
#define MAX_CLASS (64 * CLASSES_PER_DOUBLING + 1)
#define MAGIC 0x7435626c6f636b31ull        /* "t5block1" */
#define HUGE_PAGE ((size_t)2 << 20)

typedef struct block {
    uint64_t magic;
    size_t capacity;       /* bytes the caller may use */
    size_t requested;      /* bytes the caller asked for (realloc copies these) */
    unsigned cls;
    int resident;          /* pages still mapped (cached hot) or given back (cold) */
    int zeroed;            /* the caller's bytes are all zero (new, or given back) */
    int in_use;            /* handed out and not yet freed (a second free aborts) */
    struct block *next;    /* on the free list */
} block_t;

static char *range_start, *range_end, *range_next;
static size_t min_bytes = 256u << 10;
static unsigned larger_classes = 4;        /* T5LITE_BLOCK_LARGER_CLASSES */
static size_t cache_limit;                 /* resident bytes kept in free lists */
static size_t cached_resident;
static size_t live_bytes, peak_live;      /* large blocks in use now, and at most so far (stats) */
static block_t *free_lists[MAX_CLASS];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t once = PTHREAD_ONCE_INIT;
static int ready;
static size_t (*real_usable_size)(void *);
/* counters: new blocks, reuses, frees kept resident, frees given back */
static uint64_t n_new, n_reused, n_kept, n_released;

static void lock_all(void) { pthread_mutex_lock(&lock); }
static void unlock_all(void) { pthread_mutex_unlock(&lock); }

static size_t env_size(const char *name, size_t fallback, size_t unit) {
    const char *text = getenv(name);
    if (!text || !*text) return fallback;
    char *end;
    unsigned long long value = strtoull(text, &end, 10);
    return *end ? fallback : (size_t)value * unit;
}

static void init(void) {
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    size_t half = (pages > 0 && page > 0) ? (size_t)pages * (size_t)page / 2 : (size_t)8 << 30;
    cache_limit = env_size("T5LITE_BLOCK_CACHE_MB", half, (size_t)1 << 20);
    min_bytes = env_size("T5LITE_BLOCK_MIN_KB", min_bytes >> 10, 1024);
    if (min_bytes < HEADER) min_bytes = HEADER;
    larger_classes = (unsigned)env_size("T5LITE_BLOCK_LARGER_CLASSES", larger_classes, 1);
    if (larger_classes > 2 * CLASSES_PER_DOUBLING) larger_classes = 2 * CLASSES_PER_DOUBLING;
    void *range = mmap(NULL, RESERVE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
    if (range == MAP_FAILED) return;      /* everything goes to glibc */
    range_start = range_next = (char *)range;
    range_end = range_start + RESERVE;
    pthread_atfork(lock_all, unlock_all, unlock_all);
    __atomic_store_n(&ready, 1, __ATOMIC_RELEASE);
}

__attribute__((constructor)) static void resolve(void) {
    real_usable_size = (size_t (*)(void *))dlsym(RTLD_NEXT, "malloc_usable_size");
}

static int is_ours(const void *p) {
    return (const char *)p >= range_start && (const char *)p < range_end;
}

/* Size class of a block of `bytes` (header included), and the class's block size. */
static unsigned class_of(size_t bytes, size_t *class_bytes) {
    unsigned k = 63u - (unsigned)__builtin_clzll((unsigned long long)bytes);
    size_t base = (size_t)1 << k, step = base / CLASSES_PER_DOUBLING;
    if (step < 4096) step = 4096;
    size_t j = (bytes - base + step - 1) / step;
    *class_bytes = base + j * step;
    /* j < 8 except j == 8 for sizes just under 2^(k+1), whose class is then (k + 1, 0): the
       same block size under the same index */
    return k * CLASSES_PER_DOUBLING + (unsigned)j;
}

static void *take_block(size_t size) {
    size_t class_bytes;
    if (size > RESERVE / 2) return NULL;
    unsigned cls = class_of(size + HEADER, &class_bytes);
    block_t *b = NULL;
    pthread_mutex_lock(&lock);
    /* its own class first, else a kept block up to LARGER_CLASSES classes larger (its pages
       past the request stay as they are), so fewer distinct blocks are ever made */
    for (unsigned c = cls; c <= cls + larger_classes && c < MAX_CLASS; c++) {
        if (free_lists[c]) { b = free_lists[c]; cls = c; break; }
    }
    if (b) {
        class_bytes = b->capacity + HEADER;
        free_lists[cls] = b->next;
        if (b->resident) cached_resident -= class_bytes;
        b->zeroed = !b->resident;
        n_reused++;
    } else {
        /* blocks of 2 MiB and more start on a huge-page boundary */
        char *start = range_next;
        if (class_bytes >= HUGE_PAGE)
            start = (char *)(((uintptr_t)start + HUGE_PAGE - 1) & ~(uintptr_t)(HUGE_PAGE - 1));
        if (start + class_bytes > range_end ||
            mprotect(start, class_bytes, PROT_READ | PROT_WRITE) != 0) {
            pthread_mutex_unlock(&lock);
            return NULL;
        }
        if (class_bytes >= HUGE_PAGE) madvise(start, class_bytes, MADV_HUGEPAGE);
        range_next = start + class_bytes;
        b = (block_t *)start;
        b->magic = MAGIC;
        b->cls = cls;
        b->capacity = class_bytes - HEADER;
        b->resident = 0;
        b->zeroed = 1;
        n_new++;
    }
    b->in_use = 1;
    live_bytes += class_bytes;
    if (live_bytes > peak_live) peak_live = live_bytes;
    pthread_mutex_unlock(&lock);
    b->requested = size;
    b->next = NULL;
    return (char *)b + HEADER;
}

static block_t *block_of(void *p) {
    block_t *b = (block_t *)((char *)p - HEADER);
    if (((uintptr_t)p & (HEADER - 1)) || b->magic != MAGIC) abort();  /* not a pointer we gave */
    return b;
}

static void give_block(void *p) {
    block_t *b = block_of(p);
    size_t class_bytes = b->capacity + HEADER;
    int keep;
    pthread_mutex_lock(&lock);
    if (!b->in_use) abort();  /* freed twice */
    b->in_use = 0;
    live_bytes -= class_bytes;
    keep = cached_resident + class_bytes <= cache_limit;
    if (keep) { cached_resident += class_bytes; n_kept++; } else n_released++;
    pthread_mutex_unlock(&lock);
    /* outside the lock: giving pages back can take a while */
    if (!keep) madvise((char *)b + HEADER, class_bytes - HEADER, MADV_DONTNEED);
    pthread_mutex_lock(&lock);
    b->resident = keep;
    b->next = free_lists[b->cls];
    free_lists[b->cls] = b;
    pthread_mutex_unlock(&lock);
}

static int large(size_t size) {
    if (size < min_bytes) return 0;
    pthread_once(&once, init);
    return __atomic_load_n(&ready, __ATOMIC_ACQUIRE);
}

void *malloc(size_t size) {
    if (large(size)) {
        void *p = take_block(size);
        if (p) return p;
    }
    return __libc_malloc(size);
}

void free(void *p) {
    if (p && is_ours(p)) give_block(p);
    else __libc_free(p);
}

void *calloc(size_t count, size_t size) {
    size_t total;
    if (__builtin_mul_overflow(count, size, &total)) { errno = ENOMEM; return NULL; }
    if (large(total)) {
        void *p = take_block(total);
        if (p) {
            /* a new block's pages are zero, and so are a given-back one's */
            if (!block_of(p)->zeroed) memset(p, 0, total);
            return p;
        }
    }
    return __libc_calloc(count, size);
}

void *realloc(void *p, size_t size) {
    if (!p) return malloc(size);
    if (!is_ours(p)) return __libc_realloc(p, size);
    if (size == 0) { free(p); return NULL; }
    block_t *b = block_of(p);
    if (size <= b->capacity) { b->requested = size; return p; }
    void *q = malloc(size);
    if (!q) return NULL;
    memcpy(q, p, b->requested);
    free(p);
    return q;
}

static void *aligned(size_t alignment, size_t size) {
    if (alignment <= HEADER && large(size)) {
        void *p = take_block(size);
        if (p) return p;
    }
    return __libc_memalign(alignment, size);
}

int posix_memalign(void **out, size_t alignment, size_t size) {
    if (alignment < sizeof(void *) || (alignment & (alignment - 1))) return EINVAL;
    void *p = aligned(alignment, size);
    if (!p) return ENOMEM;
    *out = p;
    return 0;
}

void *aligned_alloc(size_t alignment, size_t size) { return aligned(alignment, size); }
void *memalign(size_t alignment, size_t size) { return aligned(alignment, size); }

size_t malloc_usable_size(void *p) {
    if (!p) return 0;
    if (is_ours(p)) return block_of(p)->capacity;
    return real_usable_size ? real_usable_size(p) : 0;
}

__attribute__((destructor)) static void report(void) {
    const char *text = getenv("T5LITE_BLOCK_CACHE_STATS");
    if (!text || strcmp(text, "1") != 0) return;
    char line[256];
    int n = snprintf(line, sizeof line, "t5lite block cache: %llu new, %llu reused, %llu kept, "
                     "%llu given back; peak in use %llu MiB, cached %llu MiB\n",
                     (unsigned long long)n_new, (unsigned long long)n_reused,
                     (unsigned long long)n_kept, (unsigned long long)n_released,
                     (unsigned long long)(peak_live >> 20),
                     (unsigned long long)(cached_resident >> 20));
    if (n > 0 && write(2, line, (size_t)n) < 0) return;
}

/* new blocks, reuses, frees kept resident, frees given back, resident bytes cached now */
void t5lite_block_cache_stats(uint64_t out[5]) {
    pthread_mutex_lock(&lock);
    out[0] = n_new; out[1] = n_reused; out[2] = n_kept; out[3] = n_released;
    out[4] = cached_resident;
    pthread_mutex_unlock(&lock);
}
