/*
 * Test hooks of the Xen test double (xen_double.c): what a test does to the "host's" domains
 * that no Xen function can, i.e. play the guest (write its memory), punch holes, inject faults
 * and read back what the double saw. Every struct has fixed-width fields in an order without
 * padding: src/double.rs mirrors them with #[repr(C)].
 *
 * Functions returning int return 0 or a negative errno.
 */
#ifndef XEN_DOUBLE_H
#define XEN_DOUBLE_H

#include <stddef.h>
#include <stdint.h>

#define XEN_DOUBLE_PAGE_SIZE 4096
#define XEN_DOUBLE_MAX_CONTEXT 65536 /* bytes of HVM context a domain can hold */
#define XEN_DOUBLE_EVENT_CAP 4096    /* events kept; older ones are overwritten */

/* Fault knobs. A knob is set with an errno and cleared with errno 0 or clear_faults. */
enum xen_double_fault {
    XEN_DOUBLE_FAULT_MAP_FRAME = 0,       /* arg = frame whose foreign mapping fails */
    XEN_DOUBLE_FAULT_LOGDIRTY_ROUND = 1,  /* arg = CLEAN round (1 = first) from which
                                             xc_logdirty_control fails */
    XEN_DOUBLE_FAULT_LOGDIRTY_ENABLE = 2, /* for these, arg = how many calls fail (0 = all) */
    XEN_DOUBLE_FAULT_PAUSE = 3,
    XEN_DOUBLE_FAULT_UNPAUSE = 4,
    XEN_DOUBLE_FAULT_SETCONTEXT = 5,
    XEN_DOUBLE_FAULT_GETCONTEXT = 6,
    XEN_DOUBLE_FAULT_COUNT = 7,
};

enum xen_double_event_kind {
    XEN_DOUBLE_EV_PAUSE = 1,           /* arg0 = pause count after */
    XEN_DOUBLE_EV_UNPAUSE = 2,         /* arg0 = pause count after */
    XEN_DOUBLE_EV_LOGDIRTY_ENABLE = 3,
    XEN_DOUBLE_EV_LOGDIRTY_OFF = 4,    /* arg0 = 1 if log-dirty was on */
    XEN_DOUBLE_EV_CLEAN = 5,           /* arg0 = round, arg1 = dirty count; flag FINAL */
    XEN_DOUBLE_EV_PEEK = 6,            /* arg0 = rounds so far, arg1 = dirty count */
    XEN_DOUBLE_EV_GETCONTEXT = 7,      /* arg0 = bytes; flag SIZE_QUERY if buf was NULL */
    XEN_DOUBLE_EV_SETCONTEXT = 8,      /* arg0 = bytes */
    XEN_DOUBLE_EV_GUEST_WRITES = 9,    /* writes-per-round: arg0 = round, arg1 = pages */
    XEN_DOUBLE_EV_FAILED = 10,         /* arg0 = enum xen_double_fn, arg1 = errno;
                                          flag INJECTED if a fault knob caused it */
};

#define XEN_DOUBLE_EVF_FINAL 1u
#define XEN_DOUBLE_EVF_SIZE_QUERY 2u
#define XEN_DOUBLE_EVF_INJECTED 4u

/* The Xen functions named by XEN_DOUBLE_EV_FAILED (only those that concern one domain). */
enum xen_double_fn {
    XEN_DOUBLE_FN_NR_GPFNS = 1,
    XEN_DOUBLE_FN_PAUSE = 2,
    XEN_DOUBLE_FN_UNPAUSE = 3,
    XEN_DOUBLE_FN_SHADOW_CONTROL = 4,
    XEN_DOUBLE_FN_LOGDIRTY_CONTROL = 5,
    XEN_DOUBLE_FN_HVM_GETCONTEXT = 6,
    XEN_DOUBLE_FN_HVM_SETCONTEXT = 7,
    XEN_DOUBLE_FN_GET_PFN_TYPE_BATCH = 8,
    XEN_DOUBLE_FN_FOREIGNMEMORY_MAP = 9,
};

struct xen_double_event {
    uint64_t seq;     /* 0 for a domain's first event */
    uint32_t kind;    /* enum xen_double_event_kind */
    uint32_t flags;   /* XEN_DOUBLE_EVF_* */
    uint64_t arg0;
    uint64_t arg1;
    uint64_t time_ns; /* CLOCK_MONOTONIC: comparable across processes */
    uint32_t pid;     /* process that made the call */
    uint32_t reserved;
};

struct xen_double_status {
    uint64_t nr_pages;
    uint64_t holes;
    uint32_t pause_count;
    uint32_t logdirty;      /* 1 while log-dirty is enabled */
    uint64_t rounds;        /* CLEANs done */
    uint64_t events;        /* events appended so far (the next event's seq) */
    uint64_t mapped_read;   /* frames foreign-mapped without PROT_WRITE */
    uint64_t mapped_write;  /* frames foreign-mapped with PROT_WRITE */
    uint64_t guest_writes;  /* pages written by writes-per-round */
    uint64_t dirty;         /* frames marked dirty now */
    uint32_t context_len;
    uint32_t writes_per_round;
};

struct xen_double_domain;

/* New or replaced domain (zeroed memory, no holes, not paused, log-dirty off). A replaced
 * domain is a new file: processes that had the old one open keep seeing the old one. */
int xen_double_create(const char *dir, uint32_t domid, uint64_t nr_pages);
int xen_double_destroy(const char *dir, uint32_t domid);

/* NULL with errno set (ESRCH: no such domain). */
struct xen_double_domain *xen_double_open(const char *dir, uint32_t domid);
void xen_double_close(struct xen_double_domain *h);

/* Writes as the guest would: the bytes, then (log-dirty on) the dirty bit. One frame only.
 * -EAGAIN while the domain is paused (a paused guest does not write). */
int xen_double_write(struct xen_double_domain *h, uint64_t gfn, uint32_t offset,
                     const void *data, size_t len);
int xen_double_read(struct xen_double_domain *h, uint64_t gfn, void *out /* 4096 bytes */);
int xen_double_set_hole(struct xen_double_domain *h, uint64_t gfn, int is_hole);
/* Pauses the domain as the toolstack does when it creates one paused (xl create -p): one
 * more on the pause count, logged as a PAUSE event. */
int xen_double_toolstack_pause(struct xen_double_domain *h);

int xen_double_set_context(struct xen_double_domain *h, const void *data, size_t len);
/* The context's length (copies at most cap bytes), or a negative errno. */
int64_t xen_double_get_context(struct xen_double_domain *h, void *buf, size_t cap);

/* After each non-final CLEAN of an unpaused domain, the double writes `pages` pages. */
int xen_double_set_writes_per_round(struct xen_double_domain *h, uint32_t pages,
                                    uint64_t seed);

int xen_double_set_fault(struct xen_double_domain *h, uint32_t which, uint64_t arg,
                         int32_t err);
void xen_double_clear_faults(struct xen_double_domain *h);

void xen_double_status(struct xen_double_domain *h, struct xen_double_status *out);
/* Copies the kept events with seq >= from_seq, oldest first; returns how many. */
size_t xen_double_events(struct xen_double_domain *h, uint64_t from_seq,
                         struct xen_double_event *out, size_t cap);

#endif
