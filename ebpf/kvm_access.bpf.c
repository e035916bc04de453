/* kvm_access.bpf.c: every port and MMIO access of every KVM guest on this host,
 * counted per VM (monitor process, and VM within it) and per device range, classed as
 * remote / local / unmapped from the ranges published in the `ranges` map, with the
 * time each access that went out to the monitor kept its vCPU stalled.
 *
 * Compiled by bcc (remote_hw/probes/loader.py); docs/ebpf.md explains the design.
 *
 * Attribution: kvm tracepoints fire in the vCPU thread, so the upper half of
 * bpf_get_current_pid_tgid() is the monitor process (tgid), the lower half the vCPU
 * thread. The VM within a process comes from the thread id (`vcpu_vm`, published with
 * the ranges); 0 when nobody published it.
 *
 * Stall: kvm_exit / kvm_entry do not fire on every KVM backend (never on kvm_pvm), and
 * fire for every exit of every guest where they do. The stall is measured instead from
 * the kvm_userspace_exit that hands an I/O or MMIO exit to the monitor, to the
 * kvm_fpu(load) with which that vCPU thread's next KVM_RUN starts (before KVM
 * completes the access): the time the monitor, and for a remote range the network
 * and the server, held the vCPU. Where kvm_fpu does not exist the loader defines
 * RHW_RUN_FROM_SYSCALL and the KVM_RUN ioctl's syscall tracepoint marks the entry.
 *
 * Which access an exit belongs to: port writes and MMIO accesses fire their kvm_pio /
 * kvm_mmio before the exit, so they wait in the thread's state (`pending`) for the
 * re-entry; a port read the monitor answers fires kvm_pio only when KVM completes it
 * after the re-entry, so the measured stall waits in `stall_ns` for it. An MMIO read
 * fires kvm_mmio twice (unsatisfied-read before the exit, read at the completion): the
 * completion is not counted again, it only brings the value.
 */
#include <uapi/linux/ptrace.h>
#include "remote_hw_events.h"

/* A tracepoint program: bcc lays out `struct tracepoint__CAT__EVENT` from tracefs; the
 * loader attaches rhw__CAT__EVENT to CAT:EVENT itself, in the order of
 * loader.TRACEPOINTS (entry and exit first, so that when the probes are attached while
 * guests run, the VM of a vCPU thread is known by the first access seen of it). */
#define RHW_TRACEPOINT(cat, event) \
    int rhw__##cat##__##event(struct tracepoint__##cat##__##event *args)

#define KVM_RUN_IOCTL 0xAE80
#define KVM_EXIT_IO 2
#define KVM_EXIT_MMIO 6
#define KVM_TRACE_MMIO_READ_UNSATISFIED 0
#define KVM_TRACE_MMIO_READ 1
#define KVM_TRACE_MMIO_WRITE 2

/* What publishers write (ranges, vCPU threads, who published): pinned, so the agent
 * that publishes and every `remote-hw trace` / `top` see the same. */
#ifdef RHW_PIN_DIR
BPF_TABLE_PINNED("lpm_trie", struct rhw_range_key, struct rhw_range_val, ranges, 4096,
                 RHW_PIN_DIR "/ranges", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", u32, struct rhw_vcpu_val, vcpu_vm, 4096, RHW_PIN_DIR "/vcpu_vm");
BPF_TABLE_PINNED("hash", u32, struct rhw_pub, pubs, 4096, RHW_PIN_DIR "/pubs");
BPF_TABLE_PINNED("array", u32, u64, generation, 1, RHW_PIN_DIR "/generation");
#else
BPF_F_TABLE("lpm_trie", struct rhw_range_key, struct rhw_range_val, ranges, 4096,
            BPF_F_NO_PREALLOC);
BPF_HASH(vcpu_vm, u32, struct rhw_vcpu_val, 4096);
BPF_HASH(pubs, u32, struct rhw_pub, 4096);
BPF_ARRAY(generation, u64, 1);
#endif

/* Per CPU: no atomic operations on the hot path; the loader adds the CPUs up. */
BPF_PERCPU_HASH(counts, struct rhw_count_key, struct rhw_count_val, 16384);
BPF_PERCPU_HASH(stall_hist, struct rhw_hist_key, u64, 32768);
BPF_HASH(procs, u32, struct rhw_proc, 4096);
BPF_ARRAY(config, u64, RHW_NCFG);
BPF_ARRAY(stats, u64, RHW_NSTATS);
BPF_RINGBUF_OUTPUT(events, 64);

/* Per vCPU thread. */
struct vcpu_state {
    u64 exit_ts;        /* I/O or MMIO exit to the monitor not yet re-entered */
    u64 stall_ns;       /* measured stall waiting for its port read completion */
    u64 unsat_gpa;      /* MMIO read sent to the monitor: its completion is not counted */
    u64 gen;            /* `generation` when what follows was looked up */
    u64 last_addr;      /* the last access's address and class (most accesses repeat) */
    u64 last_start;
    u32 vm;
    u8 last_kind;
    u8 last_cls;
    u8 last_valid;
    u8 looked_up;       /* vm, published, host_ranges are valid for `gen` */
    u8 published;       /* the process has published ranges or vCPU threads */
    u8 host_ranges;     /* host-wide ranges exist */
    u8 has_pending;
    u8 unsat;
    u8 pad[4];
    struct rhw_access_event pending;   /* waits for the re-entry (writes, MMIO) */
};
BPF_TABLE("lru_hash", u32, struct vcpu_state, vcpus, 8192);

static __always_inline void stat_add(u32 slot, u64 n)
{
    u64 *v = stats.lookup(&slot);
    if (v)
        __sync_fetch_and_add(v, n);
}

static __always_inline u64 cfg(u32 slot)
{
    u64 *v = config.lookup(&slot);
    return v ? *v : 0;
}

/* The thread's state, created (with the process's name noted) at first sight. */
static __always_inline struct vcpu_state *state_of(u32 tgid, u32 tid)
{
    struct vcpu_state *st = vcpus.lookup(&tid);
    if (st)
        return st;
    struct vcpu_state zero = {};
    vcpus.update(&tid, &zero);
    if (!procs.lookup(&tgid)) {
        struct rhw_proc p = {};
        bpf_get_current_comm(&p.comm, sizeof(p.comm));
        procs.update(&tgid, &p);
    }
    return vcpus.lookup(&tid);
}

/* Look the thread's VM (and whether its process and the host published ranges) up
 * again when a publication changed anything since the last look-up. */
static __always_inline void refresh(struct vcpu_state *st, u32 tgid, u32 tid)
{
    u32 zero = 0;
    u64 *g = generation.lookup(&zero);
    u64 gen = g ? *g : 0;
    if (st->looked_up && st->gen == gen)
        return;
    st->gen = gen;
    st->looked_up = 1;
    st->last_valid = 0;
    st->published = pubs.lookup(&tgid) ? 1 : 0;
    st->host_ranges = pubs.lookup(&zero) ? 1 : 0;
    struct rhw_vcpu_val *v = st->published ? vcpu_vm.lookup(&tid) : 0;
    st->vm = (v && v->tgid == tgid) ? v->vm : 0;
}

static __always_inline u32 log2_floor(u64 v)
{
    u32 r = 0;
    if (v >> 32) { v >>= 32; r += 32; }
    if (v >> 16) { v >>= 16; r += 16; }
    if (v >> 8) { v >>= 8; r += 8; }
    if (v >> 4) { v >>= 4; r += 4; }
    if (v >> 2) { v >>= 2; r += 2; }
    if (v >> 1) { r += 1; }
    return r;
}

static __always_inline u16 bucket_of(u64 ns)
{
    u64 us = ns / 1000;
    if (us < RHW_LINEAR_BUCKETS)
        return (u16)us;
    u32 b = RHW_LINEAR_BUCKETS + log2_floor(us) - 8;
    if (b >= RHW_NBUCKETS)
        b = RHW_NBUCKETS - 1;
    return (u16)b;
}

static __always_inline struct rhw_range_val *find_range(u32 tgid, u32 vm, u32 kind,
                                                        u64 addr)
{
    struct rhw_range_key k = {};
    k.prefixlen = RHW_RANGE_KEY_BITS;
    k.tgid = tgid;
    k.vm = vm;
    k.kind = kind;
    k.addr_be = __builtin_bswap64(addr);
    return ranges.lookup(&k);
}

/* Class of an access; *key_addr is what the counters are keyed by. Lookup order: the
 * VM's ranges, its process's (vm 0), the host-wide ones (tgid 0). */
static __always_inline u32 classify(struct vcpu_state *st, u32 tgid, u32 kind, u64 addr,
                                    u64 *key_addr)
{
    if (st->last_valid && st->last_addr == addr && st->last_kind == kind) {
        *key_addr = st->last_start;
        return st->last_cls;
    }
    struct rhw_range_val *v = 0;
    if (st->published) {
        v = find_range(tgid, st->vm, kind, addr);
        if (!v && st->vm)
            v = find_range(tgid, 0, kind, addr);
    }
    if (!v && st->host_ranges)
        v = find_range(0, 0, kind, addr);
    u32 cls = RHW_CLS_UNMAPPED;
    if (v) {
        *key_addr = v->start;
        cls = v->cls;
    } else {
        *key_addr = kind == RHW_KIND_MMIO ? (addr & ~0xfffULL) : addr;
    }
    st->last_addr = addr;
    st->last_kind = kind;
    st->last_start = *key_addr;
    st->last_cls = cls;
    st->last_valid = 1;
    return cls;
}

/* The access is complete: its stall (if it went to the monitor) into the histogram,
 * the event to `trace` while tracing. */
static __always_inline void finish(struct rhw_access_event *ev)
{
    if (ev->flags & RHW_EV_USERSPACE) {
        struct rhw_hist_key hk = {};
        hk.addr = ev->range_start;
        hk.tgid = ev->tgid;
        hk.vm = ev->vm;
        hk.kind = ev->kind;
        hk.cls = ev->cls;
        hk.bucket = bucket_of(ev->stall_ns);
        u64 zero = 0;
        u64 *h = stall_hist.lookup_or_try_init(&hk, &zero);
        if (h)
            *h += 1;
        else
            stat_add(RHW_STAT_MAP_FULL, 1);
    }
    if (cfg(RHW_CFG_TRACE)) {
        u64 only = cfg(RHW_CFG_TGID);
        if (only == 0 || only == ev->tgid) {
            bpf_get_current_comm(&ev->comm, sizeof(ev->comm));
            if (events.ringbuf_output(ev, sizeof(*ev), 0) != 0)
                stat_add(RHW_STAT_LOST_EVENTS, 1);
        }
    }
}

/* KVM_RUN starts: the end of the stall of the exit before it. */
static __always_inline void on_run_entry(void)
{
    u64 now = bpf_ktime_get_ns();
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    struct vcpu_state *st = state_of(tgid, tid);
    if (!st)
        return;
    refresh(st, tgid, tid);
    if (!st->exit_ts)
        return;
    u64 stall = now - st->exit_ts;
    st->exit_ts = 0;
    if (st->has_pending) {
        st->pending.stall_ns = stall;
        st->pending.flags |= RHW_EV_USERSPACE;
        if (!st->unsat) {       /* an MMIO read waits for its completion (its value) */
            st->has_pending = 0;
            finish(&st->pending);
        }
    } else {
        st->stall_ns = stall ? stall : 1;    /* for the port read completing next */
    }
}

RHW_TRACEPOINT(kvm, kvm_userspace_exit)
{
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct vcpu_state *st = vcpus.lookup(&tid);
    if (!st)
        return 0;
    st->stall_ns = 0;
    if (args->errno >= 0 && (args->reason == KVM_EXIT_IO || args->reason == KVM_EXIT_MMIO)) {
        st->exit_ts = bpf_ktime_get_ns();
        return 0;
    }
    st->exit_ts = 0;
    st->unsat = 0;
    if (st->has_pending) {      /* handled in the kernel; some other exit followed */
        st->has_pending = 0;
        finish(&st->pending);
    }
    return 0;
}

#ifdef RHW_RUN_FROM_SYSCALL
RHW_TRACEPOINT(syscalls, sys_enter_ioctl)
{
    if ((u32)args->cmd == KVM_RUN_IOCTL)
        on_run_entry();
    return 0;
}
#else
RHW_TRACEPOINT(kvm, kvm_fpu)
{
    if (args->load)
        on_run_entry();
    return 0;
}
#endif

static __always_inline int on_access(u32 kind, u32 dir, u64 addr, u32 size, u32 count,
                                     u64 val, int mmio_type)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    struct vcpu_state *st = state_of(tgid, tid);
    if (!st)
        return 0;

    /* The completion of an MMIO read already counted at its unsatisfied-read: it
     * brings the value, and completes the pending event. */
    if (mmio_type == KVM_TRACE_MMIO_READ && st->unsat && st->unsat_gpa == addr) {
        st->unsat = 0;
        st->stall_ns = 0;
        if (st->has_pending) {
            st->has_pending = 0;
            st->pending.val = val;
            finish(&st->pending);
        }
        return 0;
    }
    st->unsat = 0;
    /* A write still pending was handled inside the kernel (no exit came between). */
    if (st->has_pending) {
        st->has_pending = 0;
        finish(&st->pending);
    }

    refresh(st, tgid, tid);
    struct rhw_access_event ev = {};
    ev.ts_ns = bpf_ktime_get_ns();
    ev.addr = addr;
    ev.val = val;
    ev.tgid = tgid;
    ev.tid = tid;
    ev.vm = st->vm;
    ev.count = count;
    ev.kind = kind;
    ev.dir = dir;
    ev.size = size;
    ev.cls = classify(st, tgid, kind, addr, &ev.range_start);

    struct rhw_count_key ck = {};
    ck.addr = ev.range_start;
    ck.tgid = tgid;
    ck.vm = st->vm;
    ck.kind = kind;
    ck.cls = ev.cls;
    ck.dir = dir;
    struct rhw_count_val zero = {};
    struct rhw_count_val *c = counts.lookup_or_try_init(&ck, &zero);
    if (c) {
        c->accesses += count;
        c->exits += 1;
    } else {
        stat_add(RHW_STAT_MAP_FULL, 1);
    }

    if (kind == RHW_KIND_PORT && dir == RHW_DIR_READ && st->stall_ns) {
        /* The completion of a port read the monitor answered. */
        ev.stall_ns = st->stall_ns;
        ev.flags = RHW_EV_USERSPACE;
        st->stall_ns = 0;
        finish(&ev);
        return 0;
    }
    st->stall_ns = 0;
    if (dir == RHW_DIR_WRITE || mmio_type == KVM_TRACE_MMIO_READ_UNSATISFIED) {
        if (mmio_type == KVM_TRACE_MMIO_READ_UNSATISFIED) {
            st->unsat = 1;
            st->unsat_gpa = addr;
        }
        __builtin_memcpy(&st->pending, &ev, sizeof(ev));
        st->has_pending = 1;
        return 0;
    }
    finish(&ev);        /* a read KVM answered itself */
    return 0;
}

RHW_TRACEPOINT(kvm, kvm_pio)
{
    return on_access(RHW_KIND_PORT, args->rw ? RHW_DIR_WRITE : RHW_DIR_READ, args->port,
                     args->size, args->count ? args->count : 1, args->val, -1);
}

RHW_TRACEPOINT(kvm, kvm_mmio)
{
    u32 type = args->type;
    return on_access(RHW_KIND_MMIO,
                     type == KVM_TRACE_MMIO_WRITE ? RHW_DIR_WRITE : RHW_DIR_READ,
                     args->gpa, args->len, 1, args->val, (int)type);
}

#ifdef RHW_HAVE_FAST_MMIO
RHW_TRACEPOINT(kvm, kvm_fast_mmio)
{
    /* An MMIO write KVM completed on its ioeventfd fast path (no kvm_mmio). */
    return on_access(RHW_KIND_MMIO, RHW_DIR_WRITE, args->gpa, 0, 1, 0,
                     KVM_TRACE_MMIO_WRITE);
}
#endif
