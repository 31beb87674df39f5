/*
 * zion_quic: BPF_PROG_TYPE_SK_REUSEPORT program for zion's UDP (QUIC)
 * reuseport group. The kernel runs it for every datagram that reaches the
 * group (for UDP the choice is per datagram, not per connection), with the
 * skb's data at the UDP header: the QUIC packet starts 8 octets in, and
 * bpf_skb_load_bytes (sk_reuseport_load_bytes for this program type) reads
 * it whether or not it is in the linear part. Compiled at run time by bcc
 * (zion/quic/steering.py), through the same compile helper process and shim
 * as zion_demux.c.
 *
 * Reads
 *   the first octets of the QUIC packet (RFC 9000 17.2 long header: form
 *   bit, version, DCID length, DCID; 17.3 short header: the DCID right after
 *   the first octet, with no length: server CIDs have ZION_CID_LEN octets)
 *   the generation map  [0] = the generation new connections go to (the
 *                      master writes it when a reload commits)
 *   zion_slots         the TCP demux's status board (when ZION_SLOTS_FD >= 0):
 *                      state, heartbeat and load of each worker slot
 *   the sockarray      REUSEPORT_SOCKARRAY created by userspace,
 *                      index = (generation % ZION_QUIC_RING) * 256 + slot
 *
 * Server CID layout (zion/quic/cid.py): octet 0 top 3 bits ZION_CID_CONFIG,
 * octet 1 generation % 256, octet 2 slot, the rest random.
 *
 * Outcomes
 *   a DCID that is a server CID (short header, or long header with a DCID of
 *   ZION_CID_LEN octets and our config bits) -> that generation's slot socket
 *   a v1/v2 long header with a client-chosen DCID (Initial, 0-RTT) -> the
 *   socket the first Initial with that DCID went to (zion_quic_initials, an
 *   LRU map keyed by the DCID), so every Initial of one handshake (a
 *   post-quantum ClientHello spans two) and its 0-RTT reach one worker; on
 *   first sight of an Initial the least-loaded healthy worker of the current
 *   generation, recorded in the map
 *   anything else (unparseable, too short, other versions, a server CID whose
 *   socket is gone, no healthy worker) -> SK_PASS with nothing selected: the
 *   kernel's reuseport hash decides. Never SK_DROP: it would drop the
 *   datagram and the kernel may answer with an ICMP error.
 *   the stats map counts each outcome (ZION_QUIC_STAT_*).
 *
 * No socket in the group may be connected: one connected UDP socket makes
 * the kernel score sockets instead of asking this program (reuse->has_conns).
 *
 * Kernel minimum: 5.5 (bounded loops 5.3, BPF_F_MMAPABLE board 5.5,
 * sockarray and bpf_sk_select_reuseport 4.19, LRU hash 4.10). CAP_BPF or
 * CAP_SYS_ADMIN to load.
 *
 * -D parameters (zion/quic/steering.py prepends them as #defines):
 *   ZION_QUIC_WORKERS       workers of the current generation, 1..256
 *   ZION_SOCKARRAY_FD       fd of the sockarray in the loading process
 *   ZION_SLOTS_FD           fd of the TCP demux's zion_slots map, or -1
 *   ZION_GEN_FD, ZION_STATS_FD   fds of the generation (u32[1]) and stats
 *                           (u64[ZION_QUIC_STATS]) arrays, created by userspace
 *                           like the sockarray, so the master reads and writes
 *                           them by descriptor
 *   ZION_STALL_NS           heartbeat age beyond which a worker is stalled
 *   ZION_CID_LEN, ZION_CID_CONFIG, ZION_QUIC_RING   as zion/quic/cid.py
 *   ZION_QUIC_INITIALS      entries of the Initial DCID map
 */
#include <uapi/linux/bpf.h>

#if !defined(ZION_QUIC_WORKERS) || !defined(ZION_SOCKARRAY_FD) || !defined(ZION_SLOTS_FD) || \
    !defined(ZION_STALL_NS) || !defined(ZION_CID_LEN) || !defined(ZION_CID_CONFIG) || \
    !defined(ZION_QUIC_RING) || !defined(ZION_QUIC_INITIALS) || !defined(ZION_GEN_FD) || \
    !defined(ZION_STATS_FD)
#error "ZION_QUIC_WORKERS, ZION_SOCKARRAY_FD, ZION_SLOTS_FD, ZION_STALL_NS, ZION_CID_LEN, ZION_CID_CONFIG, ZION_QUIC_RING, ZION_QUIC_INITIALS, ZION_GEN_FD, ZION_STATS_FD must be defined"
#endif

#define ZION_UDP_HLEN 8
#define ZION_MAX_CID_LEN 20 /* RFC 9000 17.2: v1 DCIDs are at most 20 octets */
#define ZION_MIN_ODCID_LEN 8 /* RFC 9000 7.2: a client's first DCID has at least 8 */
#define ZION_QUIC_V1 0x00000001
#define ZION_QUIC_V2 0x6b3343cf /* RFC 9369 */

#define ZION_SLOT_READY 2 /* SlotState.READY in zion/demux/board.py */

#define ZION_QUIC_STAT_BY_CID 0       /* a server CID's socket */
#define ZION_QUIC_STAT_INITIAL_NEW 1  /* first sight of an Initial DCID */
#define ZION_QUIC_STAT_INITIAL_SEEN 2 /* a DCID the map already had */
#define ZION_QUIC_STAT_PASS 3         /* not ours to route: the kernel hash */
#define ZION_QUIC_STAT_NO_SOCKET 4    /* chosen socket absent: the kernel hash */
#define ZION_QUIC_STAT_NO_WORKER 5    /* no healthy worker for an Initial */
#define ZION_QUIC_STATS 6

/* As struct zion_slot in bpf/zion_demux.c and Slot in zion/demux/board.py. */
struct zion_slot {
    u64 heartbeat_ns;
    u64 dispatches;
    u64 accepted;
    u64 dropped;
    u32 state;
    u32 conns;
    u32 inflight;
    u32 pid;
    u32 backlog;
    u32 handshakes;
};

struct zion_odcid {
    u8 len;
    u8 pad[3];
    u8 cid[ZION_MAX_CID_LEN];
};

BPF_TABLE("lru_hash", struct zion_odcid, u32, zion_quic_initials, ZION_QUIC_INITIALS);
BPF_PERCPU_ARRAY(zion_quic_scratch, u64, 1);

static __always_inline void zion_count(u32 which)
{
    u64 *n = bpf_map_lookup_elem((void *)bpf_pseudo_fd(1, ZION_STATS_FD), &which);

    if (n)
        __sync_fetch_and_add(n, 1);
}

static __always_inline int zion_select(struct sk_reuseport_md *md, u32 index)
{
    void *socks = (void *)bpf_pseudo_fd(1, ZION_SOCKARRAY_FD);
    u32 key = index;

    return bpf_sk_select_reuseport(md, socks, &key, 0);
}

/* The healthy slot with the fewest connections and requests, scanning from
 * `start` (the datagram's 4-tuple hash breaks ties) and stopping at an idle
 * one; ZION_QUIC_WORKERS when none is healthy. As in zion_demux.c, the best
 * candidate is one scalar (load << 8 | position) that starts and ends as a
 * value read from a per-CPU scratch map, so the verifier's states after each
 * slot are equal and pruned (linear in ZION_QUIC_WORKERS). */
static __always_inline u32 zion_least_loaded(u32 start)
{
#if ZION_SLOTS_FD >= 0
    void *slots = (void *)bpf_pseudo_fd(1, ZION_SLOTS_FD);
    u64 now = bpf_ktime_get_ns();
    u64 best, cand, *scratch;
    struct zion_slot *s;
    u32 i, j, zero = 0;

    scratch = zion_quic_scratch.lookup(&zero);
    if (!scratch)
        return ZION_QUIC_WORKERS;
    *scratch = ~0ULL;
    best = *(volatile u64 *)scratch;
    for (j = 0; j < ZION_QUIC_WORKERS; j++) {
        i = (start + j) % ZION_QUIC_WORKERS;
        s = bpf_map_lookup_elem(slots, &i);
        if (!s || s->state != ZION_SLOT_READY)
            continue;
        /* Signed: a heartbeat stored after we read the clock must not wrap.
         * A stalled worker gets no new QUIC connection at all. */
        if ((s64)(now - s->heartbeat_ns) > (s64)ZION_STALL_NS)
            continue;
        cand = (u64)s->conns + s->inflight;
        if (cand == 0) {
            best = j;
            break;
        }
        cand = (cand << 8) | j;
        if (cand < best)
            best = cand;
    }
    *scratch = best;
    best = *(volatile u64 *)scratch;
    if (best == ~0ULL)
        return ZION_QUIC_WORKERS;
    return (start + (u32)(best & 0xff)) % ZION_QUIC_WORKERS;
#else
    /* No status board (the TCP demux is not attached): the hash. */
    return start % ZION_QUIC_WORKERS;
#endif
}

/* 0 when the datagram went to the socket of the slot and generation its
 * server CID names; else the caller decides (the generation or worker that
 * owned it is gone: the worker the hash picks cannot decrypt the packet and
 * answers with a stateless reset). */
static __always_inline int zion_by_cid(struct sk_reuseport_md *md, u8 *cid)
{
    u32 index = (u32)(cid[1] % ZION_QUIC_RING) * 256 + cid[2];

    if (zion_select(md, index) != 0)
        return -1;
    zion_count(ZION_QUIC_STAT_BY_CID);
    return 0;
}

/* A long header whose DCID the client chose: Initials and 0-RTT go where the
 * first Initial with that DCID went. */
static __always_inline int zion_by_odcid(struct sk_reuseport_md *md, u8 first, u32 version,
                                         u32 dcid_len)
{
    struct zion_odcid key;
    u32 *pinned, index, slot, zero = 0, *gen;
    u32 type = (first >> 4) & 3;
    int initial;

    __builtin_memset(&key, 0, sizeof(key));
    if (dcid_len < ZION_MIN_ODCID_LEN || dcid_len > ZION_MAX_CID_LEN)
        goto pass;
    key.len = dcid_len;
    if (bpf_skb_load_bytes(md, ZION_UDP_HLEN + 6, key.cid, dcid_len) != 0)
        goto pass;
    pinned = zion_quic_initials.lookup(&key);
    if (pinned) {
        if (zion_select(md, *pinned) == 0) {
            zion_count(ZION_QUIC_STAT_INITIAL_SEEN);
            return SK_PASS;
        }
        zion_count(ZION_QUIC_STAT_NO_SOCKET);
        return SK_PASS;
    }
    /* Long packet types: v1 Initial 0, 0-RTT 1; v2 (RFC 9369) Initial 1, 0-RTT 2.
     * Only an Initial starts a connection; a 0-RTT packet seen first
     * (reordered) goes by the hash rather than pin a choice of its own. */
    initial = version == ZION_QUIC_V1 ? type == 0 : type == 1;
    if (!initial)
        goto pass;
    slot = zion_least_loaded(md->hash);
    if (slot >= ZION_QUIC_WORKERS) {
        zion_count(ZION_QUIC_STAT_NO_WORKER);
        return SK_PASS;
    }
    gen = bpf_map_lookup_elem((void *)bpf_pseudo_fd(1, ZION_GEN_FD), &zero);
    if (!gen)
        goto pass;
    index = (*gen % ZION_QUIC_RING) * 256 + slot;
    if (zion_select(md, index) != 0) {
        zion_count(ZION_QUIC_STAT_NO_SOCKET);
        return SK_PASS;
    }
    zion_quic_initials.update(&key, &index);
    zion_count(ZION_QUIC_STAT_INITIAL_NEW);
    return SK_PASS;
pass:
    zion_count(ZION_QUIC_STAT_PASS);
    return SK_PASS;
}

int zion_quic(struct sk_reuseport_md *md)
{
    u8 head[6];
    u8 cid[ZION_CID_LEN];
    u32 version, dcid_len;

    if (bpf_skb_load_bytes(md, ZION_UDP_HLEN, head, 1) != 0)
        goto pass;
    if (!(head[0] & 0x80)) {
        /* Short header (RFC 9000 17.3): the DCID follows the first octet. */
        if (bpf_skb_load_bytes(md, ZION_UDP_HLEN + 1, cid, ZION_CID_LEN) != 0)
            goto pass;
        if (cid[0] >> 5 != ZION_CID_CONFIG)
            goto pass;
        if (zion_by_cid(md, cid) == 0)
            return SK_PASS;
        zion_count(ZION_QUIC_STAT_NO_SOCKET);
        return SK_PASS;
    }
    if (bpf_skb_load_bytes(md, ZION_UDP_HLEN, head, 6) != 0)
        goto pass;
    version = ((u32)head[1] << 24) | ((u32)head[2] << 16) | ((u32)head[3] << 8) | head[4];
    if (version != ZION_QUIC_V1 && version != ZION_QUIC_V2)
        goto pass; /* version negotiation (0) or unknown: the hash */
    dcid_len = head[5];
    if (dcid_len == ZION_CID_LEN) {
        if (bpf_skb_load_bytes(md, ZION_UDP_HLEN + 6, cid, ZION_CID_LEN) != 0)
            goto pass;
        /* A client may choose an Initial DCID that looks like ours; if
         * its socket does not exist it is treated as the client's. */
        if (cid[0] >> 5 == ZION_CID_CONFIG && zion_by_cid(md, cid) == 0)
            return SK_PASS;
    }
    return zion_by_odcid(md, head[0], version, dcid_len);
pass:
    zion_count(ZION_QUIC_STAT_PASS);
    return SK_PASS;
}
