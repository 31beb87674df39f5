/*
 * zion_demux: BPF_PROG_TYPE_SK_REUSEPORT program that picks, for every new
 * connection, which worker's listening socket in zion's SO_REUSEPORT group
 * receives it; and, loaded as BPF_SK_REUSEPORT_SELECT_OR_MIGRATE, where the
 * connections queued on a listener that closes go. Compiled at run time by
 * bcc (zion/demux/).
 *
 * Reads
 *   md->hash        the kernel's flow hash of the connection (4-tuple)
 *   md->migrating_sk  (ZION_MIGRATE) set when the kernel moves a queued or
 *                   half-open connection off a listener being closed
 *   zion_slots[i]   one struct zion_slot per worker i (an mmapable array the
 *                   workers write with plain stores: heartbeat in
 *                   CLOCK_MONOTONIC ns, open connections, requests in
 *                   flight, handshakes, connections accepted; the master writes the
 *                   state; the program counts dispatches)
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
 *   SK_PASS with nothing selected    no worker is live, or the selected
 *                                    slot held no socket: the kernel's own
 *                                    reuseport hash decides (for a migration:
 *                                    among the listeners still open), and
 *                                    zion_slots[workers].dispatches += 1
 *   SK_DROP                          never returned: it refuses the
 *                                    connection (or resets the migrating
 *                                    one), and a demux must not lose one
 *
 * Live: state == READY. Healthy (hash and cpu modes): live, and for cpu the
 * heartbeat is no older than stall_ns. Modes:
 *   ZION_MODE_HASH          slot hash % N if live, else the next live slot
 *   ZION_MODE_LEAST_LOADED  the live slot where a connection waits least
 *                           (zion_load: a turning worker by its load, then
 *                           blocked ones, the one blocked longest first,
 *                           then stalled ones), scanning every slot from
 *                           hash % N on and stopping at the first idle one
 *   ZION_MODE_CPU           the worker pinned to the CPU that handled the SYN
 *                           (slot cpu % N) when healthy, else least-loaded
 * A migrating connection goes where least-loaded would send it, in every mode
 * (the closing listener's slot is no longer READY by then: a dead worker's is
 * EMPTY, a retired one DRAINING, and while the master moves blocked workers'
 * queues it marks every blocked slot DRAINING).
 *
 * Kernel minimum: 5.5 (bounded loops 5.3, BPF_F_MMAPABLE arrays 5.5; the
 * reuseport sockarray and bpf_sk_select_reuseport 4.19); 5.14 for
 * ZION_MIGRATE. CAP_BPF (5.8+) or CAP_SYS_ADMIN to load.
 *
 * Compiled once, loaded anywhere (zion/demux/objects.py): the bytecode reads
 * only sk_reuseport_md (uapi) and its maps, so it does not depend on the
 * running kernel's headers. Whatever a configuration sets at run time is read
 * from zion_config, never compiled in, so one object serves every
 * configuration of a variant:
 *   zion_config[0].workers   number of workers (slots), 1..ZION_MAX_WORKERS
 *   zion_config[0].stall_ns  heartbeat age beyond which a worker is stalled
 *   zion_config[0].busy_ns   heartbeat age beyond which the loop of a worker
 *                            with work in hand is taken to be blocked now
 *                            (two heartbeat intervals)
 *   zion_config[0].idle_ns   the same for a worker without work, which beats
 *                            at its idle pace (four intervals, plus two)
 *
 * -D parameters (zion/demux/program.py prepends them as #defines, so the text
 * printed by `zion doctor --ebpf` is exactly what was compiled); one object
 * per (mode, migrate) variant:
 *   ZION_SOCKARRAY_FD   fd of the reuseport sockarray in the compiling process
 *                       (a BPF_PSEUDO_MAP_FD reference, rewritten at load)
 *   ZION_MODE           ZION_MODE_HASH | ZION_MODE_LEAST_LOADED | ZION_MODE_CPU
 *   ZION_MIGRATE        1: loaded as SELECT_OR_MIGRATE, reads md->migrating_sk
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

#if !defined(ZION_SOCKARRAY_FD) || !defined(ZION_MODE) || !defined(ZION_MIGRATE)
#error "ZION_SOCKARRAY_FD, ZION_MODE, ZION_MIGRATE must be defined"
#endif

/* The sockarray's and the status board's capacity (MAX_WORKERS in
 * zion/demux/program.py); positions fit the 8 bits zion_least_loaded keeps. */
#define ZION_MAX_WORKERS 256

/* What a configuration sets, written by zion before the program is attached
 * (ProgramConfig in zion/demux/objects.py). */
struct zion_config {
    u32 workers;
    u32 pad;
    u64 stall_ns;
    u64 busy_ns;
    u64 idle_ns;
};

struct zion_slot {
    u64 heartbeat_ns; /* worker: CLOCK_MONOTONIC, as bpf_ktime_get_ns() */
    u64 dispatches;   /* this program: connections sent to this slot's listener */
    u64 accepted;     /* worker: connections it took from that listener */
    u64 dropped;      /* master: dispatches that will never be accepted (see zion_pending) */
    u32 state;        /* master: ZION_SLOT_* */
    u32 conns;        /* worker: open connections, TLS handshakes in progress included */
    u32 inflight;     /* worker: requests being handled */
    u32 pid;
    u32 backlog;      /* master: the listener's accept queue as last sampled (status only) */
    u32 handshakes;   /* worker: TLS handshakes in progress (also in conns) */
};

/* `workers` worker slots, then one slot whose dispatches count fallbacks. */
BPF_F_TABLE("array", u32, struct zion_slot, zion_slots, ZION_MAX_WORKERS + 1, BPF_F_MMAPABLE);
BPF_ARRAY(zion_config, struct zion_config, 1);
/* One u64 per CPU: see zion_least_loaded. */
BPF_PERCPU_ARRAY(zion_scratch, u64, 1);

static __always_inline int zion_healthy(struct zion_slot *s, u64 now,
                                        struct zion_config *cfg)
{
    if (s->state != ZION_SLOT_READY)
        return 0;
#if ZION_MODE != ZION_MODE_HASH
    /* Signed: a heartbeat stored after we read the clock must not wrap. */
    if ((s64)(now - s->heartbeat_ns) > (s64)cfg->stall_ns)
        return 0;
#endif
    return 1;
}

/* Connections sent to the slot that its worker has not accepted yet: they
 * sit in the listener's SYN or accept queue. Exact from the first dispatch,
 * with no sampling delay: a worker whose loop is blocked stops accepting, so
 * this grows with every connection we send it and it loses the comparison
 * at once. Signed: `dropped` (the master's correction for connections that
 * died before accept) may briefly overshoot. */
static __always_inline u64 zion_pending(struct zion_slot *s)
{
    s64 n = (s64)(s->dispatches - s->accepted - s->dropped);
    s64 sign = n >> 63;

    /* max(n, 0) without a branch (the empty asm keeps clang from turning the
     * mask back into one): a branch would tell the verifier n >= 1 on one
     * side, make the idle test decidable there, and cost its pruning. */
    asm volatile("" : "+r"(sign));
    return (u64)(n & ~sign);
}

/* 1 when `x` is not 0, without a branch (clang folds the arithmetic into a
 * compare and a jump unless the empty asm hides it; see zion_pending). */
static __always_inline u64 zion_nonzero(u64 x)
{
    u64 nz = (u64)(-(s64)x | (s64)x) >> 63;

    asm volatile("" : "+r"(nz));
    return nz;
}

/* 1 when `age` exceeds `limit`, without a branch (see zion_pending). */
static __always_inline u64 zion_older(s64 age, s64 limit)
{
    u64 over = (u64)(limit - age) >> 63;

    asm volatile("" : "+r"(over));
    return over;
}

/* Where a new connection would wait least, as one number (lower wins):
 *
 * - a worker whose loop turns (heartbeat younger than busy_ns, two
 *   heartbeat intervals), or that has nothing in hand (no request in
 *   flight, handshake or connection owed): its open connections
 *   (handshakes included) + requests in flight + connections sent and not
 *   accepted yet; 0 is idle;
 * - one with work whose loop has not turned for that long is inside a long
 *   synchronous call now, and a connection sent to it waits for the call to
 *   end: it comes after every turning worker, and among such workers the
 *   one blocked longest first (a bounded call that started earliest ends
 *   earliest: with every worker busy this approaches a shared queue, where
 *   the first worker free takes the next connection), less
 *   ZION_PENDING_COST_MS per connection already waiting for it;
 * - a stalled one (older than stall_ns) comes last of all, so a frozen
 *   worker gets nothing while any other is alive, and only the stalled
 *   share what arrives when all are.
 * Ages are in units of 2^20 ns (about a millisecond). */
#define ZION_PENDING_COST_MS 4
#define ZION_TIER_BUSY (1ULL << 40)
#define ZION_TIER_STALLED (1ULL << 50)
#define ZION_AGE_BASE (1ULL << 30)

static __always_inline u64 zion_load(struct zion_slot *s, u64 now, struct zion_config *cfg)
{
    s64 age = (s64)(now - s->heartbeat_ns);
    u64 pending = zion_pending(s);
    u64 stalled = zion_older(age, (s64)cfg->stall_ns);
    u64 turning = (u64)s->conns + s->inflight + pending;
    /* Work in hand: requests in flight, handshakes. Idle keep-alive
     * connections are none, and neither are connections owed: the count is
     * exact only once the master has corrected drift (a reload's old worker
     * may accept what the new program sent), and a phantom one must not make
     * an idle worker look blocked. A worker without work beats at its idle
     * pace (zion/worker.py), so its heartbeat means "blocked" only once it
     * is older than that pace allows (idle_ns). */
    u64 has_work = zion_nonzero((u64)s->inflight + s->handshakes);
    u64 busy = (zion_older(age, (s64)cfg->busy_ns) & has_work) |
               zion_older(age, (s64)cfg->idle_ns) | stalled;
    /* Clamped so a heartbeat of days ago cannot wrap past the base. */
    u64 age_ms = ((u64)age >> 20) & (ZION_AGE_BASE - 1);
    u64 blocked = ZION_TIER_BUSY + ZION_AGE_BASE + pending * ZION_PENDING_COST_MS - age_ms;

    return (1 - busy) * turning + busy * blocked + stalled * ZION_TIER_STALLED;
}

static __always_inline int zion_select(struct sk_reuseport_md *md, u32 index)
{
    void *socks = (void *)bpf_pseudo_fd(1, ZION_SOCKARRAY_FD);
    u32 key = index;
    struct zion_slot *s;

    if (bpf_sk_select_reuseport(md, socks, &key, 0) != 0)
        return -1;
    s = zion_slots.lookup(&key);
    if (s)
        __sync_fetch_and_add(&s->dispatches, 1);
    return 0;
}

/* The least-loaded healthy slot of `n`, scanning every slot from `start` (so
 * equal loads are broken by the connection hash) and stopping at the first
 * idle one. Returns `n` when no slot is healthy.
 *
 * Every slot, not two hashed choices: with two of four workers blocked, one
 * connection in six drew both blocked ones and waited behind one of them
 * while two workers were idle (measured: 8-9 % of light requests over
 * 100 ms in the mixed-load bench, all of them queued on a blocked worker).
 *
 * Verifier: the best candidate is kept as one scalar, load << 8 | position,
 * never as a known index, so the states after each iteration are equal and
 * pruned: linear in the slots (a path-dependent index made it explode). */
static __always_inline u32 zion_least_loaded(u32 start, u64 now, u32 n,
                                             struct zion_config *cfg)
{
    u64 best, cand, *scratch;
    struct zion_slot *s;
    u32 i, j, zero = 0;

    /* `best` starts and ends as a value read from memory: the verifier
     * tracks nothing about it, so the states after each slot are equal and
     * pruned (linear in the slots). A constant start would let it decide
     * the first comparison, and a map key derived from it must be precise:
     * either demand travels back into the loop and every path differs. */
    /* clang knows n <= ZION_MAX_WORKERS (zion_demux checked it) and would
     * drop the constant bound below, leaving `j < n`; the verifier, which
     * does not carry that range through, would then walk the loop without a
     * bound ("sequence of jumps is too complex"). Hide what clang knows. */
    asm volatile("" : "+r"(n));
    scratch = zion_scratch.lookup(&zero);
    if (!scratch)
        return n;
    *scratch = ~0ULL;
    best = *(volatile u64 *)scratch;
    for (j = 0; j < ZION_MAX_WORKERS; j++) {
        if (j >= n)
            break;
        /* A modulo, not a conditional subtraction: a branch on `start` would
         * split its range in two at every slot, and the states with it. */
        i = (start + j) % n;
        s = zion_slots.lookup(&i);
        if (!s || s->state != ZION_SLOT_READY)
            continue;
        cand = zion_load(s, now, cfg);
        if (cand == 0) {
            best = j; /* idle: nothing can beat it */
            break;
        }
        /* Tested before it is compared with `best`, whose range would
         * otherwise make the test decidable, which also costs the pruning. */
        cand = (cand << 8) | j;
        if (cand < best)
            best = cand;
    }
    *scratch = best;
    best = *(volatile u64 *)scratch;
    if (best == ~0ULL)
        return n;
    return (start + (u32)(best & 0xff)) % n;
}

int zion_demux(struct sk_reuseport_md *md)
{
    u64 now = bpf_ktime_get_ns();
    struct zion_config *cfg;
    struct zion_slot *s;
    u32 i, n, start, zero = 0;

    cfg = zion_config.lookup(&zero);
    if (!cfg)
        return SK_PASS;
    n = cfg->workers;
    if (n == 0 || n > ZION_MAX_WORKERS)
        return SK_PASS; /* not configured yet: the kernel's hash */
    start = md->hash % n;

#if ZION_MIGRATE
    if (md->migrating_sk) {
        /* A listener is closing (a shrink, a dead worker's socket): its
         * queued and half-open connections need a healthy home. The CPU
         * that runs this is the closer's, not the client's, and the hash is
         * no reason to pick a busy worker: least-loaded in every mode. */
        i = zion_least_loaded(start, now, n, cfg);
        if (i < n && zion_select(md, i) == 0)
            return SK_PASS;
        goto fallback;
    }
#endif
#if ZION_MODE == ZION_MODE_HASH
    /* The hash, and probing only if its slot is not live (the asm: see
     * zion_least_loaded). */
    asm volatile("" : "+r"(n));
    for (i = 0; i < ZION_MAX_WORKERS; i++) {
        u32 k = start + i;
        if (i >= n)
            break;
        if (k >= n)
            k -= n;
        s = zion_slots.lookup(&k);
        if (s && zion_healthy(s, now, cfg)) {
            if (zion_select(md, k) == 0)
                return SK_PASS;
            break;
        }
    }
#else
#if ZION_MODE == ZION_MODE_CPU
    i = bpf_get_smp_processor_id() % n;
    s = zion_slots.lookup(&i);
    if (s && zion_healthy(s, now, cfg) && zion_select(md, i) == 0)
        return SK_PASS; /* the CPU's own worker, whatever its load */
#endif
    i = zion_least_loaded(start, now, n, cfg);
    if (i < n && zion_select(md, i) == 0)
        return SK_PASS;
#endif
    goto fallback;
fallback:
    i = n;
    s = zion_slots.lookup(&i);
    if (s)
        __sync_fetch_and_add(&s->dispatches, 1);
    return SK_PASS; /* nothing selected: the kernel's reuseport hash decides */
}
