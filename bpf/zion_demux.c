/*
 * zion_demux: BPF_PROG_TYPE_SK_REUSEPORT program that picks, for every new
 * connection, which worker's listening socket in zion's SO_REUSEPORT group
 * receives it. Compiled at run time by bcc (zion/demux/).
 *
 * Reads
 *   md->hash        the kernel's flow hash of the connection (4-tuple)
 *   zion_slots[i]   one struct zion_slot per worker i (an mmapable array the
 *                   workers write with plain stores: heartbeat in
 *                   CLOCK_MONOTONIC ns, open connections, requests in
 *                   flight; the master writes the state and samples the
 *                   listener's accept queue; the program counts dispatches)
 *   the sockarray   BPF_MAP_TYPE_REUSEPORT_SOCKARRAY created by userspace,
 *                   slot i = worker i's listener, 256 entries, created once
 *                   per master and shared by every program that replaces
 *                   this one on reload (a socket can be in one sockarray
 *                   only). bcc cannot declare this map type nor pass a table
 *                   to bpf_sk_select_reuseport, so it is referenced as
 *                   bpf_pseudo_fd(1, ZION_SOCKARRAY_FD) (see bpf/README.md).
 *
 * Outcomes
 *   SK_PASS with a socket selected   the connection goes to that worker,
 *                                    and zion_slots[i].dispatches += 1
 *   SK_PASS with nothing selected    no worker is healthy, or the selected
 *                                    slot held no socket: the kernel's own
 *                                    reuseport hash decides, and
 *                                    zion_slots[ZION_WORKERS].dispatches += 1
 *   SK_DROP                          never returned: it refuses the
 *                                    connection, and a demux must not lose one
 *
 * Healthy: state == READY, and for least-loaded and cpu the heartbeat is no
 * older than ZION_STALL_NS. Modes:
 *   ZION_MODE_HASH          slot hash % N if live, else the next live slot
 *   ZION_MODE_LEAST_LOADED  two hashed choices; of the healthy ones, the one
 *                           with less load (open connections + requests in
 *                           flight + the listener's accept queue);
 *                           if neither is healthy, the next healthy slot
 *   ZION_MODE_CPU           the worker pinned to the CPU that handled the SYN
 *                           (slot cpu % N) when healthy, else the hashed
 *                           choice, else the next healthy slot
 *
 * Kernel minimum: 5.5 (bounded loops 5.3, BPF_F_MMAPABLE arrays 5.5; the
 * reuseport sockarray and bpf_sk_select_reuseport 4.19). CAP_BPF (5.8+) or
 * CAP_SYS_ADMIN to load.
 *
 * -D parameters (zion/demux/program.py prepends them as #defines, so the text
 * printed by `zion doctor --ebpf` is exactly what was compiled):
 *   ZION_WORKERS        number of workers (slots), 1..256
 *   ZION_SOCKARRAY_FD   fd of the reuseport sockarray in the loading process
 *   ZION_MODE           ZION_MODE_HASH | ZION_MODE_LEAST_LOADED | ZION_MODE_CPU
 *   ZION_STALL_NS       heartbeat age beyond which a worker is stalled
 */
#include <uapi/linux/bpf.h>

#define ZION_MODE_HASH 0
#define ZION_MODE_LEAST_LOADED 1
#define ZION_MODE_CPU 2

/* struct zion_slot.state, as SlotState in zion/demux/board.py */
#define ZION_SLOT_EMPTY 0
#define ZION_SLOT_STARTING 1
#define ZION_SLOT_READY 2
#define ZION_SLOT_DRAINING 3

#if !defined(ZION_WORKERS) || !defined(ZION_SOCKARRAY_FD) || !defined(ZION_MODE) || \
    !defined(ZION_STALL_NS)
#error "ZION_WORKERS, ZION_SOCKARRAY_FD, ZION_MODE and ZION_STALL_NS must be defined"
#endif

struct zion_slot {
    u64 heartbeat_ns;
    u64 dispatches;
    u32 state;
    u32 conns;
    u32 inflight;
    u32 pid;
    u32 backlog;  /* the listener's accept queue: sampled by the master, +1 per dispatch */
    u32 pad;
};

/* ZION_WORKERS worker slots, then one slot whose dispatches count fallbacks. */
BPF_F_TABLE("array", u32, struct zion_slot, zion_slots, ZION_WORKERS + 1, BPF_F_MMAPABLE);

static __always_inline int zion_healthy(struct zion_slot *s, u64 now)
{
    if (s->state != ZION_SLOT_READY)
        return 0;
#if ZION_MODE != ZION_MODE_HASH
    /* Signed: a heartbeat stored after we read the clock must not wrap. */
    if ((s64)(now - s->heartbeat_ns) > (s64)ZION_STALL_NS)
        return 0;
#endif
    return 1;
}

/* Open connections + requests in flight + the accept queue. The master
 * writes the queue length it reads with TCP_INFO every few milliseconds and
 * we add one per dispatch in between, so a blocked or frozen worker, whose
 * queue only grows, loses the two-choice comparison from the first
 * connection it does not take, long before its heartbeat goes stale. */
static __always_inline u64 zion_load(struct zion_slot *s)
{
    return (u64)s->conns + s->inflight + s->backlog;
}

static __always_inline int zion_select(struct sk_reuseport_md *md, u32 index)
{
    void *socks = (void *)bpf_pseudo_fd(1, ZION_SOCKARRAY_FD);
    u32 key = index;
    struct zion_slot *s;

    if (bpf_sk_select_reuseport(md, socks, &key, 0) != 0)
        return -1;
    s = zion_slots.lookup(&key);
    if (s) {
        __sync_fetch_and_add(&s->dispatches, 1);
        __sync_fetch_and_add(&s->backlog, 1);
    }
    return 0;
}

int zion_demux(struct sk_reuseport_md *md)
{
    u64 now = bpf_ktime_get_ns();
    u32 hash = md->hash;
    u32 a = hash % ZION_WORKERS, b = a;
    struct zion_slot *sa, *sb, *s;
    int ha, hb;
    u32 i, j;

#if ZION_MODE == ZION_MODE_CPU
    a = bpf_get_smp_processor_id() % ZION_WORKERS;
#endif
#if ZION_WORKERS > 1
    /* The second choice: another slot, never a itself, picked by a second
     * mix of the same hash (Knuth's multiplier), so a busy slot always has a
     * different one to lose against. */
    b = (a + 1 + ((hash * 2654435761u) >> 7) % (ZION_WORKERS - 1)) % ZION_WORKERS;
#endif
    sa = zion_slots.lookup(&a);
    sb = zion_slots.lookup(&b);
    ha = sa && zion_healthy(sa, now);
    hb = sb && zion_healthy(sb, now);
#if ZION_MODE == ZION_MODE_HASH
    hb = 0; /* one choice: the hash, and probing only if it is not live */
#elif ZION_MODE == ZION_MODE_CPU
    if (ha && zion_select(md, a) == 0)
        return SK_PASS; /* the CPU's own worker, whatever its load */
    ha = 0;
#endif
    if (ha && hb && sa && sb) {
        if (zion_load(sb) < zion_load(sa))
            a = b;
        if (zion_select(md, a) == 0)
            return SK_PASS;
    } else if (ha) {
        if (zion_select(md, a) == 0)
            return SK_PASS;
    } else if (hb) {
        if (zion_select(md, b) == 0)
            return SK_PASS;
    } else {
        /* Both choices unhealthy: the next healthy slot after a. Exits at the
         * first hit, so the verifier walks it in linear, not exponential, time
         * (path-dependent counters across loops blew its 1M-insn budget). */
        for (j = 1; j < ZION_WORKERS; j++) {
            i = a + j;
            if (i >= ZION_WORKERS)
                i -= ZION_WORKERS;
            s = zion_slots.lookup(&i);
            if (s && zion_healthy(s, now)) {
                if (zion_select(md, i) == 0)
                    return SK_PASS;
                break;
            }
        }
    }

    i = ZION_WORKERS;
    s = zion_slots.lookup(&i);
    if (s)
        __sync_fetch_and_add(&s->dispatches, 1);
    return SK_PASS; /* nothing selected: the kernel's reuseport hash decides */
}
