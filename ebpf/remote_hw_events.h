/* remote_hw_events.h: the structures shared by the kvm access probes (kvm_access.bpf.c)
 * and their Python loader (remote_hw/probes/). bcc turns every map's key and value
 * type into a ctypes structure, so the Python side reads these layouts from here; only
 * the constants below are repeated in remote_hw/probes/model.py (a test checks they
 * agree). Every structure is padded explicitly: no hidden holes. */
#ifndef REMOTE_HW_EVENTS_H
#define REMOTE_HW_EVENTS_H

/* Layout version: part of the pinned maps' paths, so a changed layout never opens a
 * map pinned by an older loader. */
#define RHW_LAYOUT_VERSION 2

/* Access kinds. */
#define RHW_KIND_PORT 0
#define RHW_KIND_MMIO 1

/* Directions. */
#define RHW_DIR_READ 0
#define RHW_DIR_WRITE 1

/* Classes of an access. */
#define RHW_CLS_UNMAPPED 0   /* in no range published for that VM or process */
#define RHW_CLS_REMOTE 1     /* in a range the agent forwards to a server */
#define RHW_CLS_LOCAL 2      /* in a range the monitor handles itself (debug exit, ...) */
#define RHW_NCLASSES 3

/* Event flags. */
#define RHW_EV_USERSPACE 1   /* the access went out to the monitor (KVM_EXIT_IO/MMIO) */

/* Stall histogram buckets: 1 us wide below 256 us, then one per power of two:
 * bucket b < 256 holds [b, b+1) us, bucket 256+k holds [2^(8+k), 2^(9+k)) us. */
#define RHW_LINEAR_BUCKETS 256
#define RHW_LOG_BUCKETS 32
#define RHW_NBUCKETS (RHW_LINEAR_BUCKETS + RHW_LOG_BUCKETS)

/* Classification ranges: an LPM trie keyed by (tgid, vm, kind, address). A range
 * [start, end] is stored as the few prefixes that cover it exactly; the address is
 * big-endian so that its high bits come first. tgid 0 holds host-wide ranges that
 * apply to every process with no range of its own at that address; vm 0 holds the
 * ranges of every VM of the process. */
#define RHW_RANGE_FIXED_BITS 96    /* tgid + vm + kind */
#define RHW_RANGE_KEY_BITS 160     /* ... + 64 address bits */

struct rhw_range_key {
    __u32 prefixlen;
    __u32 tgid;
    __u32 vm;
    __u32 kind;
    __u64 addr_be;
};

#define RHW_LABEL_LEN 40

struct rhw_range_val {
    __u64 start;
    __u64 end;          /* inclusive */
    __u64 starttime;    /* the process's start time (clock ticks, /proc/PID/stat field
                           22) when published: a reused pid does not inherit ranges */
    __u32 cls;
    __u32 pad;
    char label[RHW_LABEL_LEN];
};

/* Which VM a vCPU thread (by its thread id) belongs to, published with the ranges. */
struct rhw_vcpu_val {
    __u32 tgid;
    __u32 vm;
};

/* A process that has published ranges or vCPU threads (tgid 0: host-wide ranges).
 * Every publication also writes a new value into the one-slot `generation` array, so
 * vCPU threads look their VM and class caches up again. */
struct rhw_pub {
    __u32 flags;        /* 1 */
    __u32 pad;
};

/* The name of a process seen running a vCPU (the comm of its first vCPU thread seen),
 * so that counters of a process that has ended still carry a name. */
struct rhw_proc {
    char comm[16];
};

/* Access counters, per VM and device range (per address for unmapped accesses: the
 * port itself, or the 4 KiB page of an MMIO address). */
struct rhw_count_key {
    __u64 addr;         /* range start, port, or MMIO page */
    __u32 tgid;
    __u32 vm;
    __u8 kind;
    __u8 cls;
    __u8 dir;
    __u8 pad[5];
};

struct rhw_count_val {
    __u64 accesses;     /* element accesses (a string I/O exit counts its count) */
    __u64 exits;        /* tracepoint hits (a string I/O exit is one) */
};

/* Stall histogram of accesses that went out to the monitor (its total is how many did). */
struct rhw_hist_key {
    __u64 addr;
    __u32 tgid;
    __u32 vm;
    __u8 kind;
    __u8 cls;
    __u16 bucket;
    __u8 pad[4];
};

/* One access, for `remote-hw trace` (sent only while tracing is on). */
struct rhw_access_event {
    __u64 ts_ns;        /* bpf_ktime_get_ns() of the access */
    __u64 addr;         /* port or guest physical address */
    __u64 val;          /* value written, or read (PIO reads: as completed) */
    __u64 stall_ns;     /* exit to re-entry, for accesses that went to the monitor */
    __u64 range_start;  /* key address of the counters (see rhw_count_key) */
    __u32 tgid;
    __u32 tid;
    __u32 vm;
    __u32 count;        /* elements (string I/O) */
    __u8 kind;
    __u8 dir;
    __u8 cls;
    __u8 size;
    __u32 flags;        /* RHW_EV_* */
    char comm[16];      /* the vCPU thread's name */
};

/* Configuration slots (an array of u64). */
#define RHW_CFG_TRACE 0         /* 1: send rhw_access_event records */
#define RHW_CFG_TGID 1          /* trace only this tgid (0: every process) */
#define RHW_NCFG 4

/* Statistics slots (an array of u64; only the rare paths count, off the hot path). */
#define RHW_STAT_LOST_EVENTS 0  /* ring buffer full */
#define RHW_STAT_MAP_FULL 1     /* counter or histogram map full */
#define RHW_NSTATS 2

#endif
