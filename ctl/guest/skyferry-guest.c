/*
 * skyferry-guest: the /init (PID 1) of skyferry's QEMU test guest.
 *
 * It dirties a buffer at a steady rate in a chosen pattern and prints a heartbeat every
 * 200 ms of guest time on the console, so a live-migration test can see that the guest
 * keeps running, and keeps its memory, across a migration: the heartbeat counter lives in
 * this program's memory, so the destination continues from the source's value.
 *
 * Parameters come from the environment (the kernel hands unknown key=value boot parameters
 * to init as environment variables):
 *   sf_mem_mib  size of the dirtied buffer in MiB (default 32)
 *   sf_rate     pages dirtied per second (default 2000; 0 = idle)
 *   sf_pattern  hot | scatter | mixed (default hot)
 *   sf_hot_mib  size of the hot set in MiB (default 4)
 *
 * Build: gcc -static -O2 -Wall -Wextra -Werror -o init skyferry-guest.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE 4096u
#define WORDS_PER_PAGE (PAGE_SIZE / sizeof(uint64_t))
#define NS_PER_SEC 1000000000ull
#define TICK_NS 10000000ull       /* 10 ms between pacing steps */
#define HEARTBEAT_NS 200000000ull /* 200 ms of guest time per heartbeat */
/* A longer gap than this (the VM was paused, or migrated) is not paid back in a burst. */
#define MAX_CATCH_UP_NS 100000000ull
#define TEMPLATES 16 /* distinct contents that recur across pages: real memory repeats */

#define DEFAULT_MEM_MIB 32
#define DEFAULT_RATE 2000
#define DEFAULT_HOT_MIB 4
#define MAX_MEM_MIB 65536
#define MAX_RATE 10000000

enum pattern { PATTERN_HOT, PATTERN_SCATTER, PATTERN_MIXED };
static const char *const pattern_names[] = { "hot", "scatter", "mixed" };

/* All state is in this process's memory, so it migrates with the guest. */
static uint8_t *buf;
static uint64_t pages, hot_pages;
static uint64_t rng = 0x9e3779b97f4a7c15ull;
static uint64_t dirtied;   /* pages dirtied since start (full or partial writes) */
static uint64_t heartbeat; /* never reset: the destination continues from here */

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* write(2) straight to the console: no stdio buffer can hold back a heartbeat. */
static void say(const char *fmt, ...)
{
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    size_t len = (size_t)n < sizeof line ? (size_t)n : sizeof line - 1;
    size_t off = 0;
    while (off < len) {
        ssize_t w = write(STDOUT_FILENO, line + off, len - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return; /* no console: keep running, a test may still read memory */
        off += (size_t)w;
    }
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * NS_PER_SEC + (uint64_t)ts.tv_nsec;
}

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static uint64_t splitmix(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static uint64_t below(uint64_t n) { return xorshift(&rng) % n; }

static uint64_t *page_at(uint64_t pfn) { return (uint64_t *)(buf + pfn * PAGE_SIZE); }

/*
 * Page content shaped like real data: a quarter random words, the rest structured
 * (pointer-like values and small counters derived from `id`). Pages with the same `id` are
 * byte-identical, which is what lets a test guest exercise deduplication.
 */
static void fill_page(uint64_t *w, uint64_t id)
{
    uint64_t s = splitmix(id) | 1;
    for (uint64_t i = 0; i < WORDS_PER_PAGE; i++) {
        if (i % 4 == 0)
            w[i] = xorshift(&s);
        else if (i % 4 == 1)
            w[i] = 0xffff888000000000ull + (id << 12) + i * 8;
        else
            w[i] = (id & 0xffff) * 3 + i;
    }
}

/* Mostly unique content; one write in eight copies one of a few recurring templates. */
static void rewrite_page(uint64_t pfn)
{
    if (below(8) == 0)
        fill_page(page_at(pfn), 0x7e3a11a7e0000000ull + below(TEMPLATES));
    else
        fill_page(page_at(pfn), (pfn << 24) ^ dirtied);
}

static void dirty_one(enum pattern p)
{
    uint64_t pfn;
    unsigned kind = (unsigned)below(100);
    if (p == PATTERN_HOT || (p == PATTERN_MIXED && kind < 80))
        pfn = below(hot_pages);
    else
        pfn = below(pages);

    if (p != PATTERN_MIXED) {
        rewrite_page(pfn);
    } else {
        /* mixed: partial writes (small deltas), full rewrites, and pages zeroed again */
        unsigned what = (unsigned)below(100);
        if (what < 50) {
            uint64_t *w = page_at(pfn);
            unsigned words = 1 + (unsigned)below(4);
            for (unsigned i = 0; i < words; i++)
                w[below(WORDS_PER_PAGE)] = xorshift(&rng);
        } else if (what < 90) {
            rewrite_page(pfn);
        } else {
            memset(page_at(pfn), 0, PAGE_SIZE);
        }
    }
    dirtied++;
}

/* A decimal parameter in [lo, hi]; anything else is reported and the default used. */
static uint64_t param_u64(const char *name, uint64_t def, uint64_t lo, uint64_t hi)
{
    const char *v = getenv(name);
    if (v == NULL)
        return def;
    char *end;
    errno = 0;
    unsigned long long x = strtoull(v, &end, 10);
    if (errno != 0 || end == v || *end != '\0' || v[0] == '-' || x < lo || x > hi) {
        say("skyferry-guest: bad %s=\"%s\" (want an integer from %llu to %llu); using the "
            "default %llu\n",
            name, v, (unsigned long long)lo, (unsigned long long)hi,
            (unsigned long long)def);
        return def;
    }
    return x;
}

static enum pattern param_pattern(void)
{
    const char *v = getenv("sf_pattern");
    if (v == NULL)
        return PATTERN_HOT;
    for (unsigned i = 0; i < sizeof pattern_names / sizeof pattern_names[0]; i++)
        if (strcmp(v, pattern_names[i]) == 0)
            return (enum pattern)i;
    say("skyferry-guest: bad sf_pattern=\"%s\" (want hot, scatter or mixed); using the "
        "default hot\n",
        v);
    return PATTERN_HOT;
}

static void sleep_ns(uint64_t ns)
{
    struct timespec ts = { .tv_sec = (time_t)(ns / NS_PER_SEC),
                           .tv_nsec = (long)(ns % NS_PER_SEC) };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

/* PID 1 must never exit (the kernel would panic): report and wait forever instead. */
static void __attribute__((noreturn)) halt_forever(void)
{
    for (;;)
        sleep_ns(60 * NS_PER_SEC);
}

int main(void)
{
    uint64_t mem_mib = param_u64("sf_mem_mib", DEFAULT_MEM_MIB, 1, MAX_MEM_MIB);
    uint64_t rate = param_u64("sf_rate", DEFAULT_RATE, 0, MAX_RATE);
    enum pattern pattern = param_pattern();
    uint64_t hot_mib = param_u64("sf_hot_mib", DEFAULT_HOT_MIB, 1, MAX_MEM_MIB);
    if (hot_mib > mem_mib) {
        say("skyferry-guest: sf_hot_mib=%llu is larger than sf_mem_mib=%llu; using %llu\n",
            (unsigned long long)hot_mib, (unsigned long long)mem_mib,
            (unsigned long long)mem_mib);
        hot_mib = mem_mib;
    }

    size_t len = (size_t)mem_mib << 20;
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED && mem_mib != DEFAULT_MEM_MIB) {
        say("skyferry-guest: cannot map sf_mem_mib=%llu MiB (%s); using the default %d\n",
            (unsigned long long)mem_mib, strerror(errno), DEFAULT_MEM_MIB);
        mem_mib = DEFAULT_MEM_MIB;
        hot_mib = hot_mib < mem_mib ? hot_mib : mem_mib;
        len = (size_t)mem_mib << 20;
        p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    }
    if (p == MAP_FAILED) {
        say("skyferry-guest: cannot map %llu MiB (%s); halted\n", (unsigned long long)mem_mib,
            strerror(errno));
        halt_forever();
    }
    buf = p;
    pages = len / PAGE_SIZE;
    hot_pages = (hot_mib << 20) / PAGE_SIZE;

    /* Touch every page so it is really allocated. An eighth stays zero (written, so still
     * allocated) and an eighth holds recurring templates: real memory has both. */
    for (uint64_t pfn = 0; pfn < pages; pfn++) {
        switch (pfn % 8) {
        case 0:
            memset(page_at(pfn), 0, PAGE_SIZE);
            break;
        case 1:
            fill_page(page_at(pfn), 0x7e3a11a7e0000000ull + (pfn / 8) % TEMPLATES);
            break;
        default:
            fill_page(page_at(pfn), pfn << 24);
        }
    }

    say("skyferry-guest ready mem_mib=%llu rate=%llu pattern=%s hot_mib=%llu\n",
        (unsigned long long)mem_mib, (unsigned long long)rate, pattern_names[pattern],
        (unsigned long long)hot_mib);

    uint64_t last = now_ns();
    uint64_t next_heartbeat = last + HEARTBEAT_NS;
    uint64_t credit = 0; /* in page-nanoseconds: rate * elapsed ns, spent NS_PER_SEC a page */
    for (;;) {
        uint64_t now = now_ns();
        uint64_t gap = now - last;
        last = now;
        if (gap > MAX_CATCH_UP_NS)
            gap = MAX_CATCH_UP_NS;
        credit += gap * rate; /* at most 1e8 * 1e7: no overflow */
        for (; credit >= NS_PER_SEC; credit -= NS_PER_SEC)
            dirty_one(pattern);

        if (now >= next_heartbeat) {
            heartbeat++;
            say("skyferry-heartbeat %llu dirtied=%llu\n", (unsigned long long)heartbeat,
                (unsigned long long)dirtied);
            next_heartbeat += HEARTBEAT_NS;
            /* After a pause, one heartbeat, not a burst of them. */
            if (next_heartbeat <= now)
                next_heartbeat = now + HEARTBEAT_NS;
        }
        sleep_ns(TICK_NS);
    }
}
