/*
 * A test double of libxenctrl 4.17 and libxenforeignmemory 1: one shared library that tests
 * load in place of both. It defines exactly the Xen functions skyferry calls, compiled against
 * the real headers so every definition is checked against Xen's own prototype.
 *
 * The fake host's domains are files in $XEN_DOUBLE_DIR, one per domain ("dom<ID>"), mapped
 * shared by every process that touches them (the test, a source and a destination daemon), so
 * all see one guest. A file is laid out as:
 *   struct header (pause count, log-dirty flag, rounds, faults, event ring, HVM context),
 *   the dirty bitmap (u64 words), the hole map (a byte per frame), the guest's memory;
 * each part starts on a page boundary. Fields two processes may touch are only accessed with
 * __atomic builtins; the event ring and the context are guarded by a robust process-shared
 * mutex, so a process killed while holding it does not wedge the others.
 *
 * Semantics follow Xen 4.17 (tools/libs/ctrl, tools/libs/foreignmemory, xen/arch/x86/mm/
 * paging.c, xen/common/domain.c) unless a comment says otherwise.
 */
#define _GNU_SOURCE
#include "skyferry-xen.h"
#include "xen_double.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define MAGIC 0x31304c42444e4558ull /* "XENDBL01" */
#define VERSION 1u
#define PAUSE_MAX 255u     /* Xen caps the controller pause count (EOVERFLOW past it) */
#define PFN_BATCH_MAX 1024 /* XEN_DOMCTL_getpageframeinfo3 refuses more (E2BIG) */

struct fault {
    int32_t err; /* 0: off */
    uint32_t pad;
    uint64_t arg;
    uint64_t left; /* calls that will still fail; UINT64_MAX: all */
};

struct header {
    uint64_t magic;
    uint32_t version;
    uint32_t pause_count;
    uint64_t nr_pages, bitmap_off, holes_off, mem_off, file_size;
    uint32_t logdirty;
    uint32_t writes_per_round;
    uint64_t seed;
    uint64_t rounds; /* CLEANs done */
    uint64_t holes;
    uint64_t mapped_read, mapped_write, guest_writes;
    struct fault faults[XEN_DOUBLE_FAULT_COUNT];
    pthread_mutex_t lock; /* guards next_event, events, context_len, context */
    uint64_t next_event;
    uint32_t context_len;
    uint32_t writers; /* guest writes in flight (xen_double_write): pausing waits for them */
    struct xen_double_event events[XEN_DOUBLE_EVENT_CAP];
    uint8_t context[XEN_DOUBLE_MAX_CONTEXT];
};

/* One domain file, opened and mapped whole (mapping is lazy, so size costs nothing). */
struct dom {
    int fd;
    size_t size;
    struct header *h;
    uint64_t *bitmap;
    uint8_t *holes;
    uint8_t *mem;
};

struct xen_double_domain {
    struct dom d;
};

/* The handles only remember where the host's domains are, as xc_interface remembers its fd. */
struct xc_interface_core {
    char *dir;
};
struct xenforeignmemory_handle {
    char *dir;
};

struct layout {
    uint64_t bitmap_off, holes_off, mem_off, size;
};

static uint64_t page_round(uint64_t x) { return (x + PAGE - 1) / PAGE * PAGE; }

static uint64_t bitmap_words(uint64_t nr_pages) { return (nr_pages + 63) / 64; }

static struct layout layout_of(uint64_t nr_pages)
{
    struct layout l;
    l.bitmap_off = page_round(sizeof(struct header));
    l.holes_off = l.bitmap_off + page_round(bitmap_words(nr_pages) * 8);
    l.mem_off = l.holes_off + page_round(nr_pages);
    l.size = l.mem_off + nr_pages * PAGE;
    return l;
}

static int dom_path(char *buf, const char *dir, uint32_t domid)
{
    int n = snprintf(buf, PATH_MAX, "%s/dom%u", dir, domid);
    return n < 0 || n >= PATH_MAX ? -ENAMETOOLONG : 0;
}

static void dom_close(struct dom *d)
{
    munmap(d->h, d->size);
    close(d->fd);
}

/* 0, or -ESRCH for a missing (or not a domain) file, or another negative errno. */
static int dom_open(const char *dir, uint32_t domid, struct dom *d)
{
    char path[PATH_MAX];
    struct stat st;
    struct layout l;
    int rc = dom_path(path, dir, domid);

    if (rc)
        return rc;
    d->fd = open(path, O_RDWR | O_CLOEXEC);
    if (d->fd < 0)
        return errno == ENOENT ? -ESRCH : -errno;
    if (fstat(d->fd, &st) < 0 || (uint64_t)st.st_size < sizeof(struct header)) {
        close(d->fd);
        return -ESRCH;
    }
    d->size = (size_t)st.st_size;
    d->h = mmap(NULL, d->size, PROT_READ | PROT_WRITE, MAP_SHARED, d->fd, 0);
    if (d->h == MAP_FAILED) {
        rc = -errno;
        close(d->fd);
        return rc;
    }
    l = layout_of(d->h->nr_pages);
    if (d->h->magic != MAGIC || d->h->version != VERSION || d->h->mem_off != l.mem_off ||
        d->h->file_size != l.size || l.size != d->size) {
        dom_close(d);
        return -ESRCH;
    }
    d->bitmap = (uint64_t *)((uint8_t *)d->h + l.bitmap_off);
    d->holes = (uint8_t *)d->h + l.holes_off;
    d->mem = (uint8_t *)d->h + l.mem_off;
    return 0;
}

static void lock(struct header *h)
{
    if (pthread_mutex_lock(&h->lock) == EOWNERDEAD)
        pthread_mutex_consistent(&h->lock);
}

static void unlock(struct header *h) { pthread_mutex_unlock(&h->lock); }

static void log_event(struct dom *d, uint32_t kind, uint32_t flags, uint64_t arg0,
                      uint64_t arg1)
{
    struct timespec ts;
    struct header *h = d->h;

    lock(h);
    /* Read the clock under the lock, so sequence order is also time order. */
    clock_gettime(CLOCK_MONOTONIC, &ts);
    h->events[h->next_event % XEN_DOUBLE_EVENT_CAP] = (struct xen_double_event){
        .seq = h->next_event,
        .kind = kind,
        .flags = flags,
        .arg0 = arg0,
        .arg1 = arg1,
        .time_ns = (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec,
        .pid = (uint32_t)getpid(),
    };
    /* Atomic too: xen_double_status reads it without the lock. */
    __atomic_store_n(&h->next_event, h->next_event + 1, __ATOMIC_RELEASE);
    unlock(h);
}

/* Fails a call on an open domain as libxenctrl does (-1, errno) and logs it; closes d. */
static int fail(struct dom *d, uint32_t fn, int err, int injected)
{
    log_event(d, XEN_DOUBLE_EV_FAILED, injected ? XEN_DOUBLE_EVF_INJECTED : 0, fn,
              (uint64_t)err);
    dom_close(d);
    errno = err;
    return -1;
}

/* For the counted fault knobs: the errno this call must fail with, or 0. */
static int fault_hit(struct header *h, unsigned int which)
{
    struct fault *f = &h->faults[which];
    int err = __atomic_load_n(&f->err, __ATOMIC_SEQ_CST);
    uint64_t left = __atomic_load_n(&f->left, __ATOMIC_SEQ_CST);

    if (!err)
        return 0;
    do {
        if (left == 0)
            return 0;
        if (left == UINT64_MAX)
            return err;
    } while (!__atomic_compare_exchange_n(&f->left, &left, left - 1, 0, __ATOMIC_SEQ_CST,
                                          __ATOMIC_SEQ_CST));
    return err;
}

static int is_hole(struct dom *d, uint64_t gfn)
{
    return __atomic_load_n(&d->holes[gfn], __ATOMIC_RELAXED) != 0;
}

/* Data first, then the dirty bit (release), so a CLEAN that sees the bit sees the data, and a
 * write that lands after a CLEAN's exchange is reported in the next round. */
static void guest_write(struct dom *d, uint64_t gfn, size_t offset, const void *data,
                        size_t len)
{
    memcpy(d->mem + gfn * PAGE + offset, data, len);
    if (__atomic_load_n(&d->h->logdirty, __ATOMIC_ACQUIRE))
        __atomic_fetch_or(&d->bitmap[gfn / 64], 1ull << (gfn % 64), __ATOMIC_RELEASE);
}

static void clear_bitmap(struct dom *d)
{
    for (uint64_t w = 0; w < bitmap_words(d->h->nr_pages); w++)
        __atomic_store_n(&d->bitmap[w], 0, __ATOMIC_RELAXED);
}

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/*
 * The guest runs on between rounds: after CLEAN round `round` it writes writes_per_round
 * pages, chosen from the seed and round only. Each written page starts with the round and the
 * frame number (u64 words 0 and 1), so every write changes the page and a test can find them.
 * A paused guest writes nothing.
 */
static void inject_writes(struct dom *d, uint64_t round)
{
    uint32_t n = __atomic_load_n(&d->h->writes_per_round, __ATOMIC_RELAXED);
    uint64_t seed = __atomic_load_n(&d->h->seed, __ATOMIC_RELAXED);
    uint64_t nr = d->h->nr_pages, written = 0;
    uint64_t page[PAGE / 8];

    if (n == 0 || __atomic_load_n(&d->h->pause_count, __ATOMIC_SEQ_CST) > 0)
        return;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t gfn = splitmix64(seed ^ splitmix64((round << 32) | i)) % nr;
        if (is_hole(d, gfn))
            continue;
        page[0] = round;
        page[1] = gfn;
        for (unsigned int k = 2; k < PAGE / 8; k++)
            page[k] = splitmix64(seed ^ (round << 40) ^ (gfn << 12) ^ k);
        guest_write(d, gfn, 0, page, PAGE);
        written++;
    }
    __atomic_fetch_add(&d->h->guest_writes, written, __ATOMIC_RELAXED);
    log_event(d, XEN_DOUBLE_EV_GUEST_WRITES, 0, round, written);
}

/* No Xen without $XEN_DOUBLE_DIR: fail as open("/dev/xen/privcmd") does on a plain host. */
static char *host_dir(void)
{
    const char *dir = getenv("XEN_DOUBLE_DIR");
    struct stat st;

    if (!dir || stat(dir, &st) < 0 || !S_ISDIR(st.st_mode)) {
        errno = ENOENT;
        return NULL;
    }
    return strdup(dir);
}

/* ---- libxenctrl ---- */

xc_interface *xc_interface_open(xentoollog_logger *logger, xentoollog_logger *dombuild_logger,
                                unsigned open_flags)
{
    xc_interface *xch;
    char *dir = host_dir();

    (void)logger, (void)dombuild_logger, (void)open_flags;
    if (!dir)
        return NULL;
    xch = malloc(sizeof(*xch));
    if (!xch) {
        free(dir);
        errno = ENOMEM;
        return NULL;
    }
    xch->dir = dir;
    return xch;
}

int xc_interface_close(xc_interface *xch)
{
    if (xch) {
        free(xch->dir);
        free(xch);
    }
    return 0;
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

int xc_domain_getinfolist(xc_interface *xch, uint32_t first_domain, unsigned int max_domains,
                          xc_domaininfo_t *info)
{
    DIR *dirp;
    struct dirent *e;
    uint32_t *ids = NULL;
    size_t n = 0, cap = 0;
    int count = 0;

    if (max_domains > 0 && !info) {
        errno = EFAULT;
        return -1;
    }
    dirp = opendir(xch->dir);
    if (!dirp)
        return -1;
    while ((e = readdir(dirp))) {
        char *end;
        unsigned long id;

        if (strncmp(e->d_name, "dom", 3) || e->d_name[3] < '0' || e->d_name[3] > '9')
            continue;
        id = strtoul(e->d_name + 3, &end, 10);
        if (*end || id < first_domain || id >= DOMID_FIRST_RESERVED)
            continue;
        if (n == cap) {
            uint32_t *grown = realloc(ids, (cap = cap ? 2 * cap : 16) * sizeof(*ids));
            if (!grown) {
                free(ids);
                closedir(dirp);
                errno = ENOMEM;
                return -1;
            }
            ids = grown;
        }
        ids[n++] = (uint32_t)id;
    }
    closedir(dirp);
    if (n)
        qsort(ids, n, sizeof(*ids), cmp_u32);
    for (size_t i = 0; i < n && (unsigned int)count < max_domains; i++) {
        struct dom d;
        xc_domaininfo_t *di = &info[count];

        if (dom_open(xch->dir, ids[i], &d))
            continue; /* destroyed meanwhile */
        memset(di, 0, sizeof(*di));
        di->domain = (domid_t)ids[i];
        di->flags = XEN_DOMINF_hvm_guest |
                    (__atomic_load_n(&d.h->pause_count, __ATOMIC_SEQ_CST) ? XEN_DOMINF_paused
                                                                          : XEN_DOMINF_running);
        di->tot_pages = d.h->nr_pages - __atomic_load_n(&d.h->holes, __ATOMIC_RELAXED);
        di->max_pages = d.h->nr_pages;
        di->nr_online_vcpus = 1;
        di->max_vcpu_id = 0;
        dom_close(&d);
        count++;
    }
    free(ids);
    return count;
}

int xc_domain_nr_gpfns(xc_interface *xch, uint32_t domid, xen_pfn_t *gpfns)
{
    struct dom d;
    int rc = dom_open(xch->dir, domid, &d);

    if (rc) {
        errno = -rc;
        return -1;
    }
    *gpfns = d.h->nr_pages;
    dom_close(&d);
    return 0;
}

/* Xen's controller pause count: nests up to PAUSE_MAX, and unpausing at 0 is EINVAL. */
static int pause_op(xc_interface *xch, uint32_t domid, int pause)
{
    uint32_t fn = pause ? XEN_DOUBLE_FN_PAUSE : XEN_DOUBLE_FN_UNPAUSE;
    struct dom d;
    uint32_t old;
    int err = dom_open(xch->dir, domid, &d);

    if (err) {
        errno = -err;
        return -1;
    }
    err = fault_hit(d.h, pause ? XEN_DOUBLE_FAULT_PAUSE : XEN_DOUBLE_FAULT_UNPAUSE);
    if (err)
        return fail(&d, fn, err, 1);
    old = __atomic_load_n(&d.h->pause_count, __ATOMIC_SEQ_CST);
    do {
        if (pause && old >= PAUSE_MAX)
            return fail(&d, fn, EOVERFLOW, 0);
        if (!pause && old == 0)
            return fail(&d, fn, EINVAL, 0);
    } while (!__atomic_compare_exchange_n(&d.h->pause_count, &old, pause ? old + 1 : old - 1,
                                          0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    while (pause && __atomic_load_n(&d.h->writers, __ATOMIC_SEQ_CST))
        sched_yield(); /* see xen_double_write */
    log_event(&d, pause ? XEN_DOUBLE_EV_PAUSE : XEN_DOUBLE_EV_UNPAUSE, 0,
              pause ? old + 1 : old - 1, 0);
    dom_close(&d);
    return 0;
}

int xc_domain_pause(xc_interface *xch, uint32_t domid) { return pause_op(xch, domid, 1); }

int xc_domain_unpause(xc_interface *xch, uint32_t domid) { return pause_op(xch, domid, 0); }

/* Only what live migration uses: log-dirty on (EINVAL if already on, as Xen) and off. */
int xc_shadow_control(xc_interface *xch, uint32_t domid, unsigned int sop, unsigned int *mb,
                      unsigned int mode)
{
    struct dom d;
    uint32_t off = 0;
    int err = dom_open(xch->dir, domid, &d);

    (void)mb, (void)mode; /* Xen leaves *mb alone for these ops */
    if (err) {
        errno = -err;
        return -1;
    }
    switch (sop) {
    case XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY:
        if ((err = fault_hit(d.h, XEN_DOUBLE_FAULT_LOGDIRTY_ENABLE)))
            return fail(&d, XEN_DOUBLE_FN_SHADOW_CONTROL, err, 1);
        if (!__atomic_compare_exchange_n(&d.h->logdirty, &off, 1, 0, __ATOMIC_SEQ_CST,
                                         __ATOMIC_SEQ_CST))
            return fail(&d, XEN_DOUBLE_FN_SHADOW_CONTROL, EINVAL, 0);
        /* Xen starts from a fresh bitmap; drop bits a write racing the last OFF left. */
        clear_bitmap(&d);
        log_event(&d, XEN_DOUBLE_EV_LOGDIRTY_ENABLE, 0, 0, 0);
        break;
    case XEN_DOMCTL_SHADOW_OP_OFF:
        off = __atomic_exchange_n(&d.h->logdirty, 0, __ATOMIC_SEQ_CST);
        clear_bitmap(&d);
        log_event(&d, XEN_DOUBLE_EV_LOGDIRTY_OFF, 0, off, 0);
        break;
    default:
        return fail(&d, XEN_DOUBLE_FN_SHADOW_CONTROL, EINVAL, 0);
    }
    dom_close(&d);
    return 0;
}

/*
 * CLEAN / PEEK. Like Xen it returns the number of bits covered (`pages`, not 0) and writes
 * ceil(pages / 8) bytes; frames past the domain's end read as clean; a NULL dirty_bitmap only
 * cleans. Stricter than Xen, so misuse shows: EINVAL while log-dirty is off (Xen returns an
 * all-clean bitmap) and EFAULT for a buffer without memory, e.g. freed (Xen would clean
 * without copying, or copy to wherever the stale pointer points).
 */
long long xc_logdirty_control(xc_interface *xch, uint32_t domid, unsigned int sop,
                              xc_hypercall_buffer_t *dirty_bitmap, unsigned long pages,
                              unsigned int mode, xc_shadow_op_stats_t *stats)
{
    struct dom d;
    uint8_t *out = dirty_bitmap ? dirty_bitmap->hbuf : NULL;
    int clean = sop == XEN_DOMCTL_SHADOW_OP_CLEAN, err = dom_open(xch->dir, domid, &d);
    uint64_t round, count = 0, nwords, fault_round;

    if (err) {
        errno = -err;
        return -1;
    }
    if ((!clean && sop != XEN_DOMCTL_SHADOW_OP_PEEK) ||
        (mode & ~XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL) ||
        !__atomic_load_n(&d.h->logdirty, __ATOMIC_SEQ_CST))
        return fail(&d, XEN_DOUBLE_FN_LOGDIRTY_CONTROL, EINVAL, 0);
    if (dirty_bitmap && !out)
        return fail(&d, XEN_DOUBLE_FN_LOGDIRTY_CONTROL, EFAULT, 0);
    round = __atomic_load_n(&d.h->rounds, __ATOMIC_SEQ_CST) + 1;
    err = __atomic_load_n(&d.h->faults[XEN_DOUBLE_FAULT_LOGDIRTY_ROUND].err, __ATOMIC_SEQ_CST);
    fault_round = __atomic_load_n(&d.h->faults[XEN_DOUBLE_FAULT_LOGDIRTY_ROUND].arg,
                                  __ATOMIC_SEQ_CST);
    if (err && round >= fault_round)
        return fail(&d, XEN_DOUBLE_FN_LOGDIRTY_CONTROL, err, 1);

    nwords = bitmap_words(d.h->nr_pages);
    for (uint64_t bit = 0; bit < pages; bit += 64) {
        uint64_t left = pages - bit, w = bit / 64, got = 0;
        uint64_t want = left < 64 ? (1ull << left) - 1 : ~0ull;

        /* Exchange per word: a concurrent guest write is either harvested now or kept. */
        if (w < nwords && clean)
            got = want == ~0ull ? __atomic_exchange_n(&d.bitmap[w], 0, __ATOMIC_ACQ_REL)
                                : __atomic_fetch_and(&d.bitmap[w], ~want, __ATOMIC_ACQ_REL);
        else if (w < nwords)
            got = __atomic_load_n(&d.bitmap[w], __ATOMIC_ACQUIRE);
        got &= want;
        count += (uint64_t)__builtin_popcountll(got);
        if (out) /* the bitmap is little-endian, as Xen's unsigned longs on x86 */
            memcpy(out + bit / 8, &got, left < 64 ? (left + 7) / 8 : 8);
    }
    if (stats) {
        stats->fault_count = 0;
        stats->dirty_count = count > UINT32_MAX ? UINT32_MAX : (uint32_t)count;
    }
    if (clean) {
        round = __atomic_add_fetch(&d.h->rounds, 1, __ATOMIC_SEQ_CST);
        log_event(&d, XEN_DOUBLE_EV_CLEAN,
                  mode & XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL ? XEN_DOUBLE_EVF_FINAL : 0, round,
                  count);
        if (!(mode & XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL))
            inject_writes(&d, round);
    } else {
        log_event(&d, XEN_DOUBLE_EV_PEEK,
                  mode & XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL ? XEN_DOUBLE_EVF_FINAL : 0,
                  round - 1, count);
    }
    dom_close(&d);
    return (long long)pages;
}

void *xc__hypercall_buffer_alloc_pages(xc_interface *xch, xc_hypercall_buffer_t *b,
                                       int nr_pages)
{
    void *p;

    (void)xch;
    if (nr_pages <= 0) {
        errno = EINVAL;
        return NULL;
    }
    p = mmap(NULL, (size_t)nr_pages * PAGE, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    b->hbuf = p;
    return p;
}

/* Also clears hbuf (the real one leaves it dangling), so xc_logdirty_control can refuse a
 * freed buffer. */
void xc__hypercall_buffer_free_pages(xc_interface *xch, xc_hypercall_buffer_t *b, int nr_pages)
{
    (void)xch;
    if (b->hbuf && nr_pages > 0)
        munmap(b->hbuf, (size_t)nr_pages * PAGE);
    b->hbuf = NULL;
}

int xc_domain_hvm_getcontext(xc_interface *xch, uint32_t domid, uint8_t *ctxt_buf,
                             uint32_t size)
{
    struct dom d;
    uint32_t len;
    int err = dom_open(xch->dir, domid, &d);

    if (err) {
        errno = -err;
        return -1;
    }
    if ((err = fault_hit(d.h, XEN_DOUBLE_FAULT_GETCONTEXT)))
        return fail(&d, XEN_DOUBLE_FN_HVM_GETCONTEXT, err, 1);
    lock(d.h);
    len = d.h->context_len;
    if (ctxt_buf && size < len) {
        unlock(d.h);
        return fail(&d, XEN_DOUBLE_FN_HVM_GETCONTEXT, ENOSPC, 0);
    }
    if (ctxt_buf)
        memcpy(ctxt_buf, d.h->context, len);
    unlock(d.h);
    log_event(&d, XEN_DOUBLE_EV_GETCONTEXT, ctxt_buf ? 0 : XEN_DOUBLE_EVF_SIZE_QUERY, len, 0);
    dom_close(&d);
    return (int)len;
}

int xc_domain_hvm_setcontext(xc_interface *xch, uint32_t domid, uint8_t *hvm_ctxt,
                             uint32_t size)
{
    struct dom d;
    int err = dom_open(xch->dir, domid, &d);

    if (err) {
        errno = -err;
        return -1;
    }
    if ((err = fault_hit(d.h, XEN_DOUBLE_FAULT_SETCONTEXT)))
        return fail(&d, XEN_DOUBLE_FN_HVM_SETCONTEXT, err, 1);
    if (size > XEN_DOUBLE_MAX_CONTEXT)
        return fail(&d, XEN_DOUBLE_FN_HVM_SETCONTEXT, EINVAL, 0);
    if (size && !hvm_ctxt)
        return fail(&d, XEN_DOUBLE_FN_HVM_SETCONTEXT, EFAULT, 0);
    lock(d.h);
    if (size)
        memcpy(d.h->context, hvm_ctxt, size);
    __atomic_store_n(&d.h->context_len, size, __ATOMIC_SEQ_CST); /* status reads it unlocked */
    unlock(d.h);
    log_event(&d, XEN_DOUBLE_EV_SETCONTEXT, 0, size, 0);
    dom_close(&d);
    return 0;
}

int xc_get_pfn_type_batch(xc_interface *xch, uint32_t dom, unsigned int num, xen_pfn_t *arr)
{
    struct dom d;
    int err = dom_open(xch->dir, dom, &d);

    if (err) {
        errno = -err;
        return -1;
    }
    if (num > PFN_BATCH_MAX)
        return fail(&d, XEN_DOUBLE_FN_GET_PFN_TYPE_BATCH, E2BIG, 0);
    if (num && !arr)
        return fail(&d, XEN_DOUBLE_FN_GET_PFN_TYPE_BATCH, EFAULT, 0);
    for (unsigned int i = 0; i < num; i++)
        arr[i] = arr[i] >= d.h->nr_pages || is_hole(&d, arr[i]) ? XEN_DOMCTL_PFINFO_XTAB
                                                                 : XEN_DOMCTL_PFINFO_NOTAB;
    dom_close(&d);
    return 0;
}

/* ---- libxenforeignmemory ---- */

xenforeignmemory_handle *xenforeignmemory_open(struct xentoollog_logger *logger,
                                               unsigned open_flags)
{
    xenforeignmemory_handle *fmem;
    char *dir = host_dir();

    (void)logger, (void)open_flags;
    if (!dir)
        return NULL;
    fmem = malloc(sizeof(*fmem));
    if (!fmem) {
        free(dir);
        errno = ENOMEM;
        return NULL;
    }
    fmem->dir = dir;
    return fmem;
}

int xenforeignmemory_close(xenforeignmemory_handle *fmem)
{
    if (fmem) {
        free(fmem->dir);
        free(fmem);
    }
    return 0;
}

/*
 * Each frame is an mmap of the domain file's page, so loads and stores reach guest memory
 * directly and, as with real foreign mappings, mark nothing dirty. Failed slots stay PROT_NONE.
 */
void *xenforeignmemory_map(xenforeignmemory_handle *fmem, uint32_t dom, int prot, size_t pages,
                           const xen_pfn_t arr[/*pages*/], int err[/*pages*/])
{
    struct dom d;
    uint8_t *base;
    uint64_t mapped = 0, fault_frame;
    int fault_err, rc = dom_open(fmem->dir, dom, &d);

    if (rc) {
        errno = -rc;
        return NULL;
    }
    if (pages == 0 || pages > SIZE_MAX / PAGE || !arr) {
        fail(&d, XEN_DOUBLE_FN_FOREIGNMEMORY_MAP, pages && !arr ? EFAULT : EINVAL, 0);
        return NULL;
    }
    base = mmap(NULL, pages * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                -1, 0);
    if (base == MAP_FAILED) {
        fail(&d, XEN_DOUBLE_FN_FOREIGNMEMORY_MAP, errno, 0);
        return NULL;
    }
    fault_err = __atomic_load_n(&d.h->faults[XEN_DOUBLE_FAULT_MAP_FRAME].err, __ATOMIC_SEQ_CST);
    fault_frame =
        __atomic_load_n(&d.h->faults[XEN_DOUBLE_FAULT_MAP_FRAME].arg, __ATOMIC_SEQ_CST);
    for (size_t i = 0; i < pages; i++) {
        int e = 0, injected = 0;

        if (arr[i] >= d.h->nr_pages || is_hole(&d, arr[i]))
            e = -EINVAL;
        else if (fault_err && arr[i] == fault_frame)
            e = -fault_err, injected = 1;
        else if (mmap(base + i * PAGE, PAGE, prot, MAP_SHARED | MAP_FIXED, d.fd,
                      (off_t)(d.h->mem_off + arr[i] * PAGE)) == MAP_FAILED)
            e = -errno;
        else
            mapped++;
        if (err) {
            err[i] = e;
        } else if (e) {
            /* As xenforeignmemory_map2 without an err array: all or nothing. */
            munmap(base, pages * PAGE);
            fail(&d, XEN_DOUBLE_FN_FOREIGNMEMORY_MAP, -e, injected);
            return NULL;
        }
    }
    __atomic_fetch_add(prot & PROT_WRITE ? &d.h->mapped_write : &d.h->mapped_read, mapped,
                       __ATOMIC_RELAXED);
    dom_close(&d);
    return base;
}

int xenforeignmemory_unmap(xenforeignmemory_handle *fmem, void *addr, size_t pages)
{
    (void)fmem;
    return munmap(addr, pages * PAGE);
}

/* ---- test hooks (xen_double.h) ---- */

int xen_double_create(const char *dir, uint32_t domid, uint64_t nr_pages)
{
    static unsigned int tmp_seq;
    char path[PATH_MAX], tmp[PATH_MAX];
    struct layout l = layout_of(nr_pages);
    pthread_mutexattr_t attr;
    struct header *h;
    int fd, n, rc = dom_path(path, dir, domid);

    if (rc)
        return rc;
    if (domid >= DOMID_FIRST_RESERVED || nr_pages == 0 || nr_pages > (1ull << 36))
        return -EINVAL;
    /* Built under a temporary name and renamed, so no process ever sees half a domain. */
    n = snprintf(tmp, sizeof(tmp), "%s/.dom%u.%d.%u.tmp", dir, domid, (int)getpid(),
                 __atomic_fetch_add(&tmp_seq, 1, __ATOMIC_RELAXED));
    if (n < 0 || n >= (int)sizeof(tmp))
        return -ENAMETOOLONG;
    fd = open(tmp, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        return -errno;
    if (ftruncate(fd, (off_t)l.size) < 0)
        goto fail;
    h = mmap(NULL, sizeof(*h), PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (h == MAP_FAILED)
        goto fail;
    h->version = VERSION;
    h->nr_pages = nr_pages;
    h->bitmap_off = l.bitmap_off;
    h->holes_off = l.holes_off;
    h->mem_off = l.mem_off;
    h->file_size = l.size;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    pthread_mutex_init(&h->lock, &attr);
    pthread_mutexattr_destroy(&attr);
    h->magic = MAGIC;
    munmap(h, sizeof(*h));
    close(fd);
    if (rename(tmp, path) < 0) {
        rc = -errno;
        unlink(tmp);
        return rc;
    }
    return 0;
fail:
    rc = -errno;
    close(fd);
    unlink(tmp);
    return rc;
}

int xen_double_destroy(const char *dir, uint32_t domid)
{
    char path[PATH_MAX];
    int rc = dom_path(path, dir, domid);

    if (rc)
        return rc;
    if (unlink(path) < 0)
        return errno == ENOENT ? -ESRCH : -errno;
    return 0;
}

struct xen_double_domain *xen_double_open(const char *dir, uint32_t domid)
{
    struct xen_double_domain *h = malloc(sizeof(*h));
    int rc;

    if (!h) {
        errno = ENOMEM;
        return NULL;
    }
    rc = dom_open(dir, domid, &h->d);
    if (rc) {
        free(h);
        errno = -rc;
        return NULL;
    }
    return h;
}

void xen_double_close(struct xen_double_domain *h)
{
    if (h) {
        dom_close(&h->d);
        free(h);
    }
}

int xen_double_write(struct xen_double_domain *h, uint64_t gfn, uint32_t offset,
                     const void *data, size_t len)
{
    struct header *hd = h->d.h;

    if (gfn >= hd->nr_pages || offset > PAGE || len > PAGE - offset || (len && !data) ||
        is_hole(&h->d, gfn))
        return -EINVAL;
    /* A paused guest does not write, and pausing returns only once no write is in flight
     * (as Xen's pause waits for the vCPUs to stop). Both sides announce themselves first and
     * then look at the other (sequentially consistent), so at least one of them sees it.
     * The first look keeps a guest that writes in a loop from starving a pause in progress. */
    if (__atomic_load_n(&hd->pause_count, __ATOMIC_SEQ_CST))
        return -EAGAIN;
    __atomic_add_fetch(&hd->writers, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&hd->pause_count, __ATOMIC_SEQ_CST)) {
        __atomic_sub_fetch(&hd->writers, 1, __ATOMIC_SEQ_CST);
        return -EAGAIN;
    }
    guest_write(&h->d, gfn, offset, data, len);
    __atomic_sub_fetch(&hd->writers, 1, __ATOMIC_SEQ_CST);
    return 0;
}

int xen_double_read(struct xen_double_domain *h, uint64_t gfn, void *out)
{
    if (gfn >= h->d.h->nr_pages)
        return -EINVAL;
    if (is_hole(&h->d, gfn))
        memset(out, 0, PAGE);
    else
        memcpy(out, h->d.mem + gfn * PAGE, PAGE);
    return 0;
}

/* A hole is a frame with no memory behind it (ballooned out); repopulated, it reads zeros. */
int xen_double_set_hole(struct xen_double_domain *h, uint64_t gfn, int hole)
{
    struct dom *d = &h->d;

    if (gfn >= d->h->nr_pages)
        return -EINVAL;
    if (hole && !__atomic_exchange_n(&d->holes[gfn], 1, __ATOMIC_SEQ_CST)) {
        memset(d->mem + gfn * PAGE, 0, PAGE);
        __atomic_fetch_add(&d->h->holes, 1, __ATOMIC_SEQ_CST);
    } else if (!hole && __atomic_exchange_n(&d->holes[gfn], 0, __ATOMIC_SEQ_CST)) {
        __atomic_fetch_sub(&d->h->holes, 1, __ATOMIC_SEQ_CST);
    }
    return 0;
}

int xen_double_toolstack_pause(struct xen_double_domain *h)
{
    struct dom *d = &h->d;
    uint32_t now = __atomic_add_fetch(&d->h->pause_count, 1, __ATOMIC_SEQ_CST);

    while (__atomic_load_n(&d->h->writers, __ATOMIC_SEQ_CST))
        sched_yield(); /* see xen_double_write */
    log_event(d, XEN_DOUBLE_EV_PAUSE, 0, now, 0);
    return 0;
}

int xen_double_set_context(struct xen_double_domain *h, const void *data, size_t len)
{
    if (len > XEN_DOUBLE_MAX_CONTEXT || (len && !data))
        return -EINVAL;
    lock(h->d.h);
    if (len)
        memcpy(h->d.h->context, data, len);
    __atomic_store_n(&h->d.h->context_len, (uint32_t)len, __ATOMIC_SEQ_CST);
    unlock(h->d.h);
    return 0;
}

int64_t xen_double_get_context(struct xen_double_domain *h, void *buf, size_t cap)
{
    uint32_t len;

    lock(h->d.h);
    len = h->d.h->context_len;
    if (buf)
        memcpy(buf, h->d.h->context, len < cap ? len : cap);
    unlock(h->d.h);
    return len;
}

int xen_double_set_writes_per_round(struct xen_double_domain *h, uint32_t pages, uint64_t seed)
{
    __atomic_store_n(&h->d.h->seed, seed, __ATOMIC_SEQ_CST);
    __atomic_store_n(&h->d.h->writes_per_round, pages, __ATOMIC_SEQ_CST);
    return 0;
}

int xen_double_set_fault(struct xen_double_domain *h, uint32_t which, uint64_t arg,
                         int32_t err)
{
    struct fault *f;
    int counted = which >= XEN_DOUBLE_FAULT_LOGDIRTY_ENABLE;

    if (which >= XEN_DOUBLE_FAULT_COUNT || err < 0)
        return -EINVAL;
    f = &h->d.h->faults[which];
    /* Off while the arguments change, so no call sees a half-set knob. */
    __atomic_store_n(&f->err, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&f->arg, arg, __ATOMIC_SEQ_CST);
    __atomic_store_n(&f->left, counted && arg ? arg : UINT64_MAX, __ATOMIC_SEQ_CST);
    __atomic_store_n(&f->err, err, __ATOMIC_SEQ_CST);
    return 0;
}

void xen_double_clear_faults(struct xen_double_domain *h)
{
    for (unsigned int i = 0; i < XEN_DOUBLE_FAULT_COUNT; i++)
        __atomic_store_n(&h->d.h->faults[i].err, 0, __ATOMIC_SEQ_CST);
}

void xen_double_status(struct xen_double_domain *h, struct xen_double_status *out)
{
    struct header *hd = h->d.h;
    uint64_t dirty = 0;

    for (uint64_t w = 0; w < bitmap_words(hd->nr_pages); w++)
        dirty += (uint64_t)__builtin_popcountll(__atomic_load_n(&h->d.bitmap[w],
                                                                __ATOMIC_RELAXED));
    *out = (struct xen_double_status){
        .nr_pages = hd->nr_pages,
        .holes = __atomic_load_n(&hd->holes, __ATOMIC_SEQ_CST),
        .pause_count = __atomic_load_n(&hd->pause_count, __ATOMIC_SEQ_CST),
        .logdirty = __atomic_load_n(&hd->logdirty, __ATOMIC_SEQ_CST),
        .rounds = __atomic_load_n(&hd->rounds, __ATOMIC_SEQ_CST),
        .events = __atomic_load_n(&hd->next_event, __ATOMIC_SEQ_CST),
        .mapped_read = __atomic_load_n(&hd->mapped_read, __ATOMIC_SEQ_CST),
        .mapped_write = __atomic_load_n(&hd->mapped_write, __ATOMIC_SEQ_CST),
        .guest_writes = __atomic_load_n(&hd->guest_writes, __ATOMIC_SEQ_CST),
        .dirty = dirty,
        .context_len = __atomic_load_n(&hd->context_len, __ATOMIC_SEQ_CST),
        .writes_per_round = __atomic_load_n(&hd->writes_per_round, __ATOMIC_SEQ_CST),
    };
}

size_t xen_double_events(struct xen_double_domain *h, uint64_t from_seq,
                         struct xen_double_event *out, size_t cap)
{
    struct header *hd = h->d.h;
    size_t n = 0;
    uint64_t seq;

    lock(hd);
    seq = hd->next_event > XEN_DOUBLE_EVENT_CAP ? hd->next_event - XEN_DOUBLE_EVENT_CAP : 0;
    for (seq = seq > from_seq ? seq : from_seq; seq < hd->next_event && n < cap; seq++)
        out[n++] = hd->events[seq % XEN_DOUBLE_EVENT_CAP];
    unlock(hd);
    return n;
}
