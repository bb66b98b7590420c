/* Limit counters shared exactly by the sipguard workers of one host, in shared memory
 * (sipguard/state/shared_memory.py: ShmCounts): the semantics of the Redis store's ADMIT
 * script (sipguard/transport/redis_state.py) without Redis.
 *
 *     create(path, max_keys, max_leases, max_sets)
 *                          a fresh segment, written under a temporary name and renamed over
 *                          path (an old segment is unlinked so; whoever maps it keeps it)
 *     Segment(path, max_keys, max_leases, max_sets)
 *                          map an existing segment; ValueError naming path when it is not one
 *                          of this version and these capacities
 *     seg.admit(lease, checks, take, lease_ms) -> (taken, refused, value, [(check, value)])
 *                          ADMIT in one locked step (checks: sipguard.state.base.Check);
 *                          None: a table is full, and nothing changed
 *     seg.add(lease, keys, lease_ms) -> int | None
 *                          lease taken on keys whatever the counts, or its expiry moved;
 *                          how many keys; None: a table is full, and nothing changed
 *     seg.release(lease, keys) -> int      memberships removed (idempotent)
 *     seg.mark(key, value, ms) -> bool     a cooldown mark (checks of kind b); False: full
 *     seg.forget(key, kind) -> int | None  drop a mark (b) or a measure (n, h) at once; a
 *                          mark's ms left * 16 + value, 0 for a measure, None: there was none
 *     seg.count(key) -> int                live leases on key
 *     seg.sweep(n) -> int                  visit n slots of each table, drop what expired
 *     seg.stats() -> dict                  fills, capacities, events
 *     seg.probe(wait_ms) -> bool           the lock had within wait_ms (0: one try) and
 *                          given back at once (a dead holder's repair done on the way)
 *     seg.holder                           the pid that holds the lock, 0: none (read
 *                          without it: for the log of a lock that could not be had)
 *     seg.close()
 *     SET_CAP                              the most distinct members a window counts (h)
 *     MAX_ITEMS                            checks, and take keys, per call at most
 *     LOCK_WAIT_MS                         how long a call waits for the lock
 *
 * The segment: a header (capacities, a random SipHash key, a process-shared robust mutex,
 * fills, sweep cursors) and three tables.
 *   keys    64 B a slot, max_keys * 4/3 slots (at most 3/4 used). Open addressing, linear
 *           probing, deletion by backward shift (no tombstones); a hash's first slot is the
 *           high bits of hash * slots, so any number of slots works: rounding up to a power
 *           of two would double the memory for the (power-of-two) defaults. A slot is
 *           (name hash, kind) and its expiry (0: none): c: its live memberships; r: the GCRA
 *           cell's TAT (µs); b: the mark; n: calls per bucket, a ring of 5; h: a set block.
 *   leases  24 B a slot, max_leases * 4/3 slots (32 B a lease); the same probing. One per
 *           (lease, key) pair: both hashes and the expiry. Adding one adds one to the key's
 *           c slot (made at need), removing one takes it away (the slot goes at 0): a lease
 *           already on a key counts as room there, as in ADMIT.
 *   sets    1032 B a block, max_sets blocks and a free list: SET_CAP (member, bucket) pairs.
 *           A member seen again moves to the current bucket; a pair older than the window is
 *           reusable; when none is, the oldest is replaced — the count saturates at SET_CAP.
 *
 * Names (counters, lease ids, h members) are never stored: only their SipHash-2-4 under the
 * segment's random key (0 is "empty"). Two live counters of one kind, or two live leases,
 * share a hash with odds n^2 / 2^65 (a million live: 3e-8); h members keep 32 bits, and two
 * members of one window collide with odds ~ 128^2 / 2^33 = 2e-6 (counted once). The key is
 * random per segment, so no caller can aim at a collision.
 *
 * Time is CLOCK_MONOTONIC in µs, read inside each call under the lock: the store's own clock,
 * one for every process of the host, like Redis's TIME (the callers' clocks are not used).
 *
 * Where this differs from Redis: a lease that lapsed (its holder died, or stopped
 * re-scoring) counts until the sweep drops it — every admit sweeps ADMIT_SWEEP slots and
 * ShmCounts sweeps each whole table every ~2 s — where ADMIT drops lapsed members at each
 * check; h counts exactly up to SET_CAP instead of a HyperLogLog's ~1 %; a full table answers
 * None (ShmCounts: fail open / closed, as for an unreachable Redis) after a room check made
 * before anything changes, so such an admit changes nothing — not even its measures.
 *
 * Every call takes the mutex and keeps the GIL (each is a few µs; only create, the repair
 * below and sweep(n) with a large n touch more than a few slots). When the mutex cannot be had
 * within LOCK_WAIT_MS (a process stopped while holding it), the call raises TimeoutError naming
 * the holder's pid, which every locker writes in the header while it holds the mutex
 * (ShmCounts then stops asking for LOCK_WAIT_MS on every call: its breaker, with probe()). A
 * process that died holding it (EOWNERDEAD): the next one makes the mutex consistent and
 * repairs the tables — both rebuilt from their entries (a backward shift cut short leaves a
 * hole or an entry twice), every c count recounted from the memberships, the set pool
 * rebuilt — O(capacity), once. The change the dead process was making may be half done.
 * The segment's pages are reserved at create (posix_fallocate): a full /dev/shm fails create
 * with ENOSPC, never a worker later with SIGBUS. Linux, glibc >= 2.30 (clocklock).
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE /* pthread_mutex_clocklock */
#include <Python.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAGIC 0x314d485344524753ULL /* "SGRDSHM1" */
#define VERSION 2
#define HEADER_SIZE 256
#define SET_CAP 128
#define WINDOW 5         /* measure buckets: 4 and the current one */
#define MAX_ITEMS 64     /* checks, take keys per call */
#define MAX_CAP (1 << 24) /* max_keys, max_leases */
#define MAX_SETS (1 << 20)
#define MAX_MS (1LL << 40) /* lease_ms, mark ms: 35 years */
#define LOCK_WAIT_MS 100
#define ADMIT_SWEEP 8    /* slots of each table an admit visits */
#define FULL_SWEEP 4096  /* ... and more before it answers "full" */
#define NO_SET UINT32_MAX
#define ROTL(x, b) (((x) << (b)) | ((x) >> (64 - (b))))
#define PAIR(lease, key) ((lease) ^ ROTL(key, 32)) /* a membership's hash */

typedef struct {
    uint64_t magic;
    uint32_t version, header_size;
    uint64_t size, max_keys, key_slots, max_leases, lease_slots, max_sets;
    uint8_t sipkey[16];
    pthread_mutex_t mu;
    /* under mu: */
    uint64_t keys, leases, sets; /* in use */
    uint64_t key_cursor, lease_cursor;
    uint64_t full, recovered; /* events: a table full; a holder died */
    uint32_t free_set;
    uint64_t unmeasured; /* events: a distinct count left out, no set free */
    int32_t holder; /* the pid holding mu, 0: none; written under mu, read without it */
} Header;
_Static_assert(sizeof(Header) <= HEADER_SIZE, "header too big");

typedef struct {
    uint64_t hash;      /* 0: empty */
    int64_t expires;    /* µs; 0: never */
    uint32_t kind;      /* 'c' 'r' 'b' 'n' 'h' */
    uint32_t width;     /* n, h: bucket width, ms */
    int64_t value;      /* c: memberships; r: TAT µs; b: the mark; n, h: the latest bucket */
    uint32_t set;       /* h: its block */
    uint32_t n[WINDOW]; /* n: calls per bucket, at bucket % WINDOW */
    uint8_t pad[8];
} Key;
_Static_assert(sizeof(Key) == 64, "a key slot is 64 bytes");

typedef struct {
    uint64_t lease; /* 0: empty */
    uint64_t key;
    int64_t expires; /* µs */
} Member;

typedef struct {
    uint32_t next; /* the free list */
    uint32_t unused;
    uint64_t e[SET_CAP]; /* member hash (low 32 bits; 0: empty) | bucket << 32 */
} Set;

typedef struct {
    PyObject_HEAD
    Header *h; /* NULL once closed */
    Key *keys;
    Member *leases;
    Set *sets;
    size_t size;
    PyObject *path;
} Seg;

typedef struct {
    uint32_t kind;
    int monitor;
    uint64_t key;
    int64_t a, b; /* c: most; r: interval, tolerance µs; n, h: window ms */
    uint32_t member;
} Check;

/* ------------------------------------------------------------------ hashing, time, layout */

#define SIPROUND                                                                             \
    do {                                                                                     \
        v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);                            \
        v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                                               \
        v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                                               \
        v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);                            \
    } while (0)

/* SipHash-2-4 (little-endian hosts) */
static uint64_t
siphash(const uint8_t key[16], const uint8_t *p, size_t n)
{
    uint64_t k0, k1, m;
    memcpy(&k0, key, 8);
    memcpy(&k1, key + 8, 8);
    uint64_t v0 = k0 ^ 0x736f6d6570736575ULL, v1 = k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = k0 ^ 0x6c7967656e657261ULL, v3 = k1 ^ 0x7465646279746573ULL;
    for (const uint8_t *end = p + (n & ~(size_t)7); p != end; p += 8) {
        memcpy(&m, p, 8);
        v3 ^= m;
        SIPROUND;
        SIPROUND;
        v0 ^= m;
    }
    m = 0;
    memcpy(&m, p, n & 7);
    m |= (uint64_t)n << 56;
    v3 ^= m;
    SIPROUND;
    SIPROUND;
    v0 ^= m;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

/* The hash of a str (never 0); 0 with an exception set. */
static uint64_t
name_hash(Seg *s, PyObject *name, const char *what)
{
    if (!PyUnicode_Check(name)) {
        PyErr_Format(PyExc_TypeError, "%s must be a str, not %.50s", what,
                     Py_TYPE(name)->tp_name);
        return 0;
    }
    Py_ssize_t n;
    const char *p = PyUnicode_AsUTF8AndSize(name, &n);
    if (p == NULL)
        return 0;
    uint64_t x = siphash(s->h->sipkey, (const uint8_t *)p, (size_t)n);
    return x ? x : 1;
}

static int64_t
now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000 + t.tv_nsec / 1000;
}

static uint64_t
slots_for(uint64_t n) /* at most 3/4 used */
{
    return n + n / 3 + 1;
}

/* Probing over any number of slots: a hash's first slot (the high bits of hash * slots),
   the next slot, and how far a slot is from another along the probe order. */
static inline uint64_t
home(uint64_t hash, uint64_t slots)
{
    return (uint64_t)(((unsigned __int128)hash * slots) >> 64);
}

static inline uint64_t
next(uint64_t i, uint64_t slots)
{
    return i + 1 == slots ? 0 : i + 1;
}

static inline uint64_t
dist(uint64_t from, uint64_t to, uint64_t slots)
{
    return to >= from ? to - from : to + slots - from;
}

static uint64_t
segment_size(uint64_t max_keys, uint64_t max_leases, uint64_t max_sets)
{
    return HEADER_SIZE + slots_for(max_keys) * sizeof(Key) +
           slots_for(max_leases) * sizeof(Member) + max_sets * sizeof(Set);
}

static int
capacities(long long keys, long long leases, long long sets)
{
    if (keys < 1 || keys > MAX_CAP || leases < 1 || leases > MAX_CAP || sets < 0 ||
        sets > MAX_SETS) {
        PyErr_Format(PyExc_ValueError, "capacities: max_keys and max_leases 1..%d, "
                     "max_sets 0..%d", MAX_CAP, MAX_SETS);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ the keys table */

static int64_t
key_at(Seg *s, uint64_t hash, uint32_t kind) /* the slot of (hash, kind), expired or not */
{
    uint64_t n = s->h->key_slots;
    for (uint64_t i = home(hash, n); s->keys[i].hash; i = next(i, n))
        if (s->keys[i].hash == hash && s->keys[i].kind == kind)
            return (int64_t)i;
    return -1;
}

static void
key_drop(Seg *s, uint64_t i)
{
    Header *h = s->h;
    Key *t = s->keys;
    uint64_t n = h->key_slots;
    if (t[i].kind == 'h' && t[i].set < h->max_sets) {
        s->sets[t[i].set].next = h->free_set;
        h->free_set = t[i].set;
        h->sets--;
    }
    /* backward shift: a later slot of the run moves into the hole unless its home lies
       after the hole (then it would be out of its own probe path) */
    for (uint64_t j = next(i, n); t[j].hash; j = next(j, n))
        if (dist(home(t[j].hash, n), j, n) >= dist(i, j, n)) {
            t[i] = t[j];
            i = j;
        }
    memset(&t[i], 0, sizeof t[i]);
    h->keys--;
}

/* The live slot of (hash, kind) or -1; one that expired is dropped (absent). */
static int64_t
key_find(Seg *s, uint64_t hash, uint32_t kind, int64_t now)
{
    int64_t i = key_at(s, hash, kind);
    if (i >= 0 && s->keys[i].expires && s->keys[i].expires <= now) {
        key_drop(s, (uint64_t)i);
        return -1;
    }
    return i;
}

/* Place a copy of k (known absent) in the first empty slot of its run. */
static int64_t
key_put(Seg *s, const Key *k)
{
    uint64_t n = s->h->key_slots, i = home(k->hash, n);
    while (s->keys[i].hash)
        i = next(i, n);
    s->keys[i] = *k;
    s->h->keys++;
    return (int64_t)i;
}

/* A new slot for (hash, kind), known absent (an h slot with an empty set block); -1 when
   max_keys are used or no block is free. */
static int64_t
key_new(Seg *s, uint64_t hash, uint32_t kind)
{
    Header *h = s->h;
    if (h->keys >= h->max_keys)
        return -1;
    if (kind == 'h' && h->free_set == NO_SET)
        return -2; /* no set free: that distinct count is left out, the rest goes on */
    Key k = {.hash = hash, .kind = kind, .set = NO_SET};
    if (kind == 'h') {
        k.set = h->free_set;
        h->free_set = s->sets[k.set].next;
        memset(s->sets[k.set].e, 0, sizeof s->sets[0].e);
        h->sets++;
    }
    return key_put(s, &k);
}

/* ------------------------------------------------------------------ the leases table */

static int64_t
lease_at(Seg *s, uint64_t lease, uint64_t key)
{
    uint64_t n = s->h->lease_slots;
    for (uint64_t i = home(PAIR(lease, key), n); s->leases[i].lease; i = next(i, n))
        if (s->leases[i].lease == lease && s->leases[i].key == key)
            return (int64_t)i;
    return -1;
}

/* Remove membership i: one less on its key's c slot (gone at 0), then the backward shift. */
static void
lease_drop(Seg *s, uint64_t i)
{
    Member *t = s->leases;
    uint64_t n = s->h->lease_slots;
    int64_t k = key_at(s, t[i].key, 'c');
    if (k >= 0 && --s->keys[k].value <= 0)
        key_drop(s, (uint64_t)k);
    for (uint64_t j = next(i, n); t[j].lease; j = next(j, n))
        if (dist(home(PAIR(t[j].lease, t[j].key), n), j, n) >= dist(i, j, n)) {
            t[i] = t[j];
            i = j;
        }
    memset(&t[i], 0, sizeof t[i]);
    s->h->leases--;
}

static int64_t
lease_find(Seg *s, uint64_t lease, uint64_t key, int64_t now)
{
    int64_t i = lease_at(s, lease, key);
    if (i >= 0 && s->leases[i].expires <= now) {
        lease_drop(s, (uint64_t)i);
        return -1;
    }
    return i;
}

static void
lease_put(Seg *s, const Member *m)
{
    uint64_t n = s->h->lease_slots, i = home(PAIR(m->lease, m->key), n);
    while (s->leases[i].lease)
        i = next(i, n);
    s->leases[i] = *m;
    s->h->leases++;
}

/* Take lease on key until expires (a new membership, or its expiry moved); -1: full. */
static int
lease_take(Seg *s, uint64_t lease, uint64_t key, int64_t expires, int64_t now)
{
    int64_t i = lease_find(s, lease, key, now);
    if (i >= 0) {
        s->leases[i].expires = expires;
        return 0;
    }
    if (s->h->leases >= s->h->max_leases)
        return -1;
    int64_t k = key_find(s, key, 'c', now);
    if (k < 0 && (k = key_new(s, key, 'c')) < 0)
        return -1;
    s->keys[k].value++;
    lease_put(s, &(Member){.lease = lease, .key = key, .expires = expires});
    return 0;
}

/* ------------------------------------------------------------------ sweep, room, repair */

static uint64_t
sweep(Seg *s, uint64_t n, int64_t now)
{
    Header *h = s->h;
    uint64_t removed = 0, seen, slots = h->lease_slots;
    h->lease_cursor %= slots;
    for (seen = 0; seen < n && seen < slots;) { /* a removal shifts the next one in: again */
        Member *m = &s->leases[h->lease_cursor];
        if (m->lease && m->expires <= now) {
            lease_drop(s, h->lease_cursor);
            removed++;
            continue;
        }
        h->lease_cursor = next(h->lease_cursor, slots);
        seen++;
    }
    slots = h->key_slots;
    h->key_cursor %= slots;
    for (seen = 0; seen < n && seen < slots;) {
        Key *k = &s->keys[h->key_cursor];
        if (k->hash && k->expires && k->expires <= now) {
            key_drop(s, h->key_cursor);
            removed++;
            continue;
        }
        h->key_cursor = next(h->key_cursor, slots);
        seen++;
    }
    return removed;
}

/* Whether the tables have room for what admit / add may create: a slot for every absent
   r, n, h key of the checks and every absent take key, a block for every absent h key, a
   membership for every take key the lease is not on. Absent things counted once each. */
static int
room(Seg *s, uint64_t lease, const Check *c, int n, const uint64_t *take, int m, int64_t now)
{
    uint64_t keys = 0, sets = 0, leases = 0;
    for (int i = 0; i < n; i++) {
        int again = c[i].kind == 'c' || c[i].kind == 'b';
        for (int j = 0; j < i && !again; j++)
            again = c[j].key == c[i].key && c[j].kind == c[i].kind;
        if (!again && key_find(s, c[i].key, c[i].kind, now) < 0) {
            keys++;
            sets += c[i].kind == 'h';
        }
    }
    for (int i = 0; i < m; i++) {
        int again = 0;
        for (int j = 0; j < i && !again; j++)
            again = take[j] == take[i];
        if (!again && lease_find(s, lease, take[i], now) < 0) {
            leases++;
            keys += key_find(s, take[i], 'c', now) < 0;
        }
    }
    Header *h = s->h;
    (void)sets; /* a set short is one distinct count left out (measure), not a full table */
    return h->keys + keys <= h->max_keys && h->leases + leases <= h->max_leases;
}

static void
forget_all(Seg *s)
{
    Header *h = s->h;
    memset(s->keys, 0, h->key_slots * sizeof(Key));
    memset(s->leases, 0, h->lease_slots * sizeof(Member));
    h->keys = h->leases = h->sets = 0;
    h->free_set = NO_SET;
    for (uint64_t j = h->max_sets; j-- > 0;) {
        s->sets[j].next = h->free_set;
        h->free_set = (uint32_t)j;
    }
}

/* A process died holding the mutex, perhaps in the middle of a change: rebuild the tables
   from their entries, recount the c slots, rebuild the set pool. Without memory for the
   copies, forget everything (consistent, and empty). */
static void
repair(Seg *s)
{
    Header *h = s->h;
    uint64_t nk = 0, nl = 0;
    for (uint64_t i = 0; i < h->key_slots; i++)
        nk += s->keys[i].hash != 0;
    for (uint64_t i = 0; i < h->lease_slots; i++)
        nl += s->leases[i].lease != 0;
    Key *keys = PyMem_RawMalloc(nk * sizeof(Key) + 1);
    Member *leases = PyMem_RawMalloc(nl * sizeof(Member) + 1);
    uint8_t *used = PyMem_RawCalloc(h->max_sets + 1, 1);
    if (keys == NULL || leases == NULL || used == NULL) {
        forget_all(s);
        goto done;
    }
    nk = nl = 0;
    for (uint64_t i = 0; i < h->key_slots; i++)
        if (s->keys[i].hash)
            keys[nk++] = s->keys[i];
    for (uint64_t i = 0; i < h->lease_slots; i++)
        if (s->leases[i].lease)
            leases[nl++] = s->leases[i];
    forget_all(s);
    for (uint64_t i = 0; i < nk; i++) {
        Key *k = &keys[i];
        if (key_at(s, k->hash, k->kind) >= 0)
            continue; /* twice */
        if (k->kind == 'h') {
            if (k->set >= h->max_sets || used[k->set])
                continue;
            used[k->set] = 1;
            h->sets++;
        }
        if (k->kind == 'c')
            k->value = 0;
        key_put(s, k);
    }
    h->free_set = NO_SET;
    for (uint64_t j = h->max_sets; j-- > 0;)
        if (!used[j]) {
            s->sets[j].next = h->free_set;
            h->free_set = (uint32_t)j;
        }
    for (uint64_t i = 0; i < nl; i++) {
        Member *m = &leases[i];
        if (lease_at(s, m->lease, m->key) >= 0)
            continue;
        int64_t k = key_at(s, m->key, 'c');
        if (k < 0) {
            if (h->keys + 1 >= h->key_slots)
                continue;
            k = key_put(s, &(Key){.hash = m->key, .kind = 'c', .set = NO_SET});
        }
        s->keys[k].value++;
        lease_put(s, m);
    }
    for (uint64_t i = 0; i < h->key_slots;) /* c slots left without a membership */
        if (s->keys[i].hash && s->keys[i].kind == 'c' && s->keys[i].value <= 0)
            key_drop(s, i);
        else
            i++;
done:
    PyMem_RawFree(keys);
    PyMem_RawFree(leases);
    PyMem_RawFree(used);
}

/* ------------------------------------------------------------------ the lock */

static int
opened(Seg *s)
{
    if (s->h == NULL) {
        PyErr_SetString(PyExc_ValueError, "the segment is closed");
        return -1;
    }
    return 0;
}

static pid_t self_pid; /* this process's pid (again in a forked child), for the header */

static void
after_fork(void)
{
    self_pid = getpid();
}

/* The mutex within wait_ms (0: one try); 0 when held, else ETIMEDOUT or an error number. The
   holder's pid goes in the header; a dead holder's tables are repaired first. */
static int
lock_within(Seg *s, long wait_ms)
{
    int rc = pthread_mutex_trylock(&s->h->mu);
    if (rc == EBUSY && wait_ms <= 0)
        rc = ETIMEDOUT;
    else if (rc == EBUSY) {
        struct timespec t;
        clock_gettime(CLOCK_MONOTONIC, &t);
        t.tv_sec += wait_ms / 1000;
        t.tv_nsec += wait_ms % 1000 * 1000000L;
        if (t.tv_nsec >= 1000000000L) {
            t.tv_sec++;
            t.tv_nsec -= 1000000000L;
        }
        rc = pthread_mutex_clocklock(&s->h->mu, CLOCK_MONOTONIC, &t);
    }
    if (rc == EOWNERDEAD) {
        pthread_mutex_consistent(&s->h->mu);
        repair(s);
        s->h->recovered++;
        rc = 0;
    }
    if (rc == 0)
        __atomic_store_n(&s->h->holder, (int32_t)self_pid, __ATOMIC_RELAXED);
    return rc;
}

static int
lock(Seg *s)
{
    if (opened(s) < 0)
        return -1;
    int rc = lock_within(s, LOCK_WAIT_MS);
    if (rc == 0)
        return 0;
    if (rc == ETIMEDOUT) {
        int holder = (int)__atomic_load_n(&s->h->holder, __ATOMIC_RELAXED);
        if (holder)
            PyErr_Format(PyExc_TimeoutError, "%R: the lock was held for over %d ms (by pid %d)",
                         s->path, LOCK_WAIT_MS, holder);
        else
            PyErr_Format(PyExc_TimeoutError, "%R: the lock was held for over %d ms", s->path,
                         LOCK_WAIT_MS);
    } else {
        errno = rc;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, s->path);
    }
    return -1;
}

static void
unlock(Seg *s)
{
    __atomic_store_n(&s->h->holder, 0, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&s->h->mu);
}

/* ------------------------------------------------------------------ arguments */

static int
int_arg(PyObject *o, const char *what, long long lo, long long hi, long long *out)
{
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int, not %.50s", what,
                     Py_TYPE(o)->tp_name);
        return -1;
    }
    int overflow;
    *out = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (*out == -1 && PyErr_Occurred())
        return -1;
    if (overflow || *out < lo || *out > hi) {
        PyErr_Format(PyExc_ValueError, "%s must be within %lld..%lld", what, lo, hi);
        return -1;
    }
    return 0;
}

/* A sequence of at most MAX_ITEMS str, hashed into out; how many, -1 on error. */
static int
parse_keys(Seg *s, PyObject *seq, uint64_t *out, const char *what)
{
    PyObject *fast = PySequence_Fast(seq, "keys must be a sequence of str");
    if (fast == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > MAX_ITEMS) {
        PyErr_Format(PyExc_ValueError, "at most %d %s", MAX_ITEMS, what);
        n = -1;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if ((out[i] = name_hash(s, PySequence_Fast_GET_ITEM(fast, i), "a key")) == 0)
            n = -1;
    Py_DECREF(fast);
    return (int)n;
}

static int
parse_check(Seg *s, PyObject *t, Py_ssize_t i, Check *c)
{
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 6) {
        PyErr_Format(PyExc_TypeError, "check %zd: a tuple (kind, counter, a, b, monitor, "
                     "member) expected", i);
        return -1;
    }
    PyObject *kind = PyTuple_GET_ITEM(t, 0);
    Py_UCS4 k = PyUnicode_Check(kind) && PyUnicode_GET_LENGTH(kind) == 1
                    ? PyUnicode_READ_CHAR(kind, 0) : 0;
    if (k == 0 || strchr("crbnh", (int)k) == NULL) {
        PyErr_Format(PyExc_ValueError, "check %zd: kind %R is none of c r b n h", i, kind);
        return -1;
    }
    c->kind = (uint32_t)k;
    PyObject *counter = PyTuple_GET_ITEM(t, 1), *member = PyTuple_GET_ITEM(t, 5);
    PyObject *a_o = PyTuple_GET_ITEM(t, 2), *b_o = PyTuple_GET_ITEM(t, 3);
    if (!PyUnicode_Check(counter) || !PyUnicode_Check(member) ||
        !(PyLong_Check(a_o) || PyFloat_Check(a_o)) || !(PyLong_Check(b_o) || PyFloat_Check(b_o))) {
        PyErr_Format(PyExc_TypeError, "check %zd: counter and member must be str, a and b "
                     "numbers", i);
        return -1;
    }
    if ((c->key = name_hash(s, counter, "a counter")) == 0)
        return -1;
    double a = PyFloat_AsDouble(a_o), b = PyFloat_AsDouble(b_o);
    if ((a == -1.0 || b == -1.0) && PyErr_Occurred())
        return -1;
    /* c: most; r: seconds (35 years at most); n, h: window ms (49 days) */
    long long top = k == 'r' ? 1000000000LL : k == 'c' ? 1LL << 50 : UINT32_MAX;
    if (!(a >= 0 && a <= (double)top && b >= 0 && b <= (double)top)) {
        PyErr_Format(PyExc_ValueError, "check %zd: a and b must be within 0..%lld", i, top);
        return -1;
    }
    c->a = k == 'r' ? (int64_t)nearbyint(a * 1e6) : (int64_t)a; /* as round() / int() */
    c->b = k == 'r' ? (int64_t)nearbyint(b * 1e6) : 0;
    if ((c->monitor = PyObject_IsTrue(PyTuple_GET_ITEM(t, 4))) < 0)
        return -1;
    if (k != 'h') /* a member only counts for h */
        return 0;
    uint64_t x = name_hash(s, member, "a member");
    c->member = (uint32_t)(x >> 32) ? (uint32_t)(x >> 32) : 1;
    return x ? 0 : -1;
}

static int
parse_checks(Seg *s, PyObject *seq, Check *out)
{
    PyObject *fast = PySequence_Fast(seq, "checks must be a sequence of tuples");
    if (fast == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > MAX_ITEMS) {
        PyErr_Format(PyExc_ValueError, "at most %d checks", MAX_ITEMS);
        n = -1;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (parse_check(s, PySequence_Fast_GET_ITEM(fast, i), i, &out[i]) < 0)
            n = -1;
    Py_DECREF(fast);
    return (int)n;
}

/* ------------------------------------------------------------------ admit */

/* Record a measure (n: one call; h: its member) and count over the window; -1: full. */
static int64_t
measure(Seg *s, const Check *c, int64_t now)
{
    int64_t width = c->a / 4 > 1 ? c->a / 4 : 1, bucket = now / 1000 / width;
    int64_t i = key_find(s, c->key, c->kind, now);
    if (i < 0 && (i = key_new(s, c->key, c->kind)) < 0)
        return i; /* -1: keys full; -2: no set free */
    Key *k = &s->keys[i];
    if (k->width != (uint32_t)width) { /* new, or the window changed: start over */
        k->width = (uint32_t)width;
        k->value = bucket;
        memset(k->n, 0, sizeof k->n);
        if (c->kind == 'h')
            memset(s->sets[k->set].e, 0, sizeof s->sets[0].e);
    }
    k->expires = now + (c->a + 2 * width) * 1000;
    int64_t count = 0;
    if (c->kind == 'n') {
        for (int64_t b = k->value + 1; b <= bucket && b <= k->value + WINDOW; b++)
            k->n[b % WINDOW] = 0;
        if (bucket > k->value)
            k->value = bucket;
        uint32_t *cur = &k->n[k->value % WINDOW];
        *cur += *cur < UINT32_MAX;
        for (int j = 0; j < WINDOW; j++)
            count += k->n[j];
        return count;
    }
    uint64_t *e = s->sets[k->set].e;
    uint32_t now_b = (uint32_t)bucket, oldest_age = 0;
    int found = -1, free = -1, oldest = -1;
    for (int j = 0; j < SET_CAP; j++) {
        uint32_t m = (uint32_t)e[j], age = now_b - (uint32_t)(e[j] >> 32);
        if (m && age >= WINDOW) /* out of the window: reusable */
            e[j] = m = 0;
        if (m == 0) {
            if (free < 0)
                free = j;
        } else if (m == c->member)
            found = j;
        else {
            count++;
            if (oldest < 0 || age > oldest_age) {
                oldest = j;
                oldest_age = age;
            }
        }
    }
    int at = found >= 0 ? found : free >= 0 ? free : oldest;
    count -= at == oldest; /* full: the oldest member makes room */
    e[at] = c->member | (uint64_t)now_b << 32;
    return count + 1;
}

typedef struct {
    uint64_t key;
    int64_t tat;
} Cell;

static PyObject *
seg_admit(Seg *s, PyObject *const *args, Py_ssize_t nargs)
{
    Check c[MAX_ITEMS];
    uint64_t take[MAX_ITEMS], lease;
    long long lease_ms;
    int n, m;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "admit(lease, checks, take, lease_ms)");
        return NULL;
    }
    if (opened(s) < 0 || (lease = name_hash(s, args[0], "lease")) == 0 ||
        (n = parse_checks(s, args[1], c)) < 0 || (m = parse_keys(s, args[2], take, "take")) < 0 ||
        int_arg(args[3], "lease_ms", 1, MAX_MS, &lease_ms) < 0 || lock(s) < 0)
        return NULL;
    int64_t now = now_us(), value = 0, out[2 * MAX_ITEMS]; /* (check, value) pairs */
    Cell cells[MAX_ITEMS]; /* rate cells to advance once nothing refused */
    int refused = -1, nout = 0, ncells = 0, full = 0;
    sweep(s, ADMIT_SWEEP, now);
    if (!room(s, lease, c, n, take, m, now)) {
        sweep(s, FULL_SWEEP, now);
        full = !room(s, lease, c, n, take, m, now);
    }
    for (int i = 0; i < n && !full; i++) {
        int64_t k, v = 0;
        int failed = 0;
        if (c[i].kind == 'c') {
            if (lease_find(s, lease, c[i].key, now) < 0) {
                k = key_find(s, c[i].key, 'c', now);
                v = k < 0 ? 0 : s->keys[k].value;
                failed = v >= c[i].a;
            }
        } else if (c[i].kind == 'r') {
            k = key_find(s, c[i].key, 'r', now);
            int64_t tat = k < 0 || s->keys[k].value < now ? now : s->keys[k].value;
            v = tat - now - c[i].b; /* how far ahead */
            failed = v > 0;
            if (!failed)
                cells[ncells++] = (Cell){c[i].key, tat + c[i].a};
        } else if (c[i].kind == 'b') {
            k = key_find(s, c[i].key, 'b', now);
            failed = k >= 0;
            if (failed)
                v = (s->keys[k].expires - now + 999) / 1000 * 16 + s->keys[k].value;
        } else {
            int64_t count = measure(s, &c[i], now);
            if (count == -2) { /* every set in use: this distinct count is left out, the
                                  limits and the other measures go on (never "full") */
                s->h->unmeasured++;
                continue;
            }
            full = count < 0; /* not after room() */
            out[nout++] = i;
            out[nout++] = count;
        }
        if (failed && !c[i].monitor) {
            refused = i;
            value = v;
            break;
        }
        if (failed) {
            out[nout++] = i;
            out[nout++] = v;
        }
    }
    for (int i = 0; i < ncells && refused < 0 && !full; i++) {
        int64_t k = key_find(s, cells[i].key, 'r', now);
        if (k < 0 && (k = key_new(s, cells[i].key, 'r')) < 0) {
            full = 1;
            break;
        }
        s->keys[k].value = cells[i].tat;
        int64_t px = (cells[i].tat - now + 999) / 1000; /* as SET ... PX max(1, ceil(ms)) */
        s->keys[k].expires = now + (px > 1 ? px : 1) * 1000;
    }
    for (int i = 0; i < m && refused < 0 && !full; i++)
        full = lease_take(s, lease, take[i], now + lease_ms * 1000, now) < 0;
    s->h->full += full;
    unlock(s);
    if (full)
        Py_RETURN_NONE;
    if (refused >= 0)
        return Py_BuildValue("(OiL[])", Py_False, refused, (long long)value);
    PyObject *list = PyList_New(nout / 2);
    if (list == NULL)
        return NULL;
    for (int i = 0; i < nout / 2; i++) {
        PyObject *pair = Py_BuildValue("(LL)", (long long)out[2 * i], (long long)out[2 * i + 1]);
        if (pair == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, pair);
    }
    return Py_BuildValue("(OiiN)", Py_True, -1, 0, list);
}

/* ------------------------------------------------------------------ the other calls */

static PyObject *
seg_add(Seg *s, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t keys[MAX_ITEMS], lease;
    long long lease_ms;
    int m, full = 0;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "add(lease, keys, lease_ms)");
        return NULL;
    }
    if (opened(s) < 0 || (lease = name_hash(s, args[0], "lease")) == 0 ||
        (m = parse_keys(s, args[1], keys, "keys")) < 0 ||
        int_arg(args[2], "lease_ms", 1, MAX_MS, &lease_ms) < 0 || lock(s) < 0)
        return NULL;
    int64_t now = now_us();
    if (!room(s, lease, NULL, 0, keys, m, now)) {
        sweep(s, FULL_SWEEP, now);
        full = !room(s, lease, NULL, 0, keys, m, now);
    }
    for (int i = 0; i < m && !full; i++)
        full = lease_take(s, lease, keys[i], now + lease_ms * 1000, now) < 0;
    s->h->full += full;
    unlock(s);
    if (full)
        Py_RETURN_NONE;
    return PyLong_FromLong(m);
}

static PyObject *
seg_release(Seg *s, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t keys[MAX_ITEMS], lease;
    int m, removed = 0;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "release(lease, keys)");
        return NULL;
    }
    if (opened(s) < 0 || (lease = name_hash(s, args[0], "lease")) == 0 ||
        (m = parse_keys(s, args[1], keys, "keys")) < 0 || lock(s) < 0)
        return NULL;
    int64_t now = now_us();
    for (int i = 0; i < m; i++) {
        int64_t j = lease_find(s, lease, keys[i], now);
        if (j >= 0) {
            lease_drop(s, (uint64_t)j);
            removed++;
        }
    }
    unlock(s);
    return PyLong_FromLong(removed);
}

static PyObject *
seg_mark(Seg *s, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t key;
    long long value, ms;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "mark(key, value, ms)");
        return NULL;
    }
    if (opened(s) < 0 || (key = name_hash(s, args[0], "key")) == 0 ||
        int_arg(args[1], "value", -MAX_MS, MAX_MS, &value) < 0 ||
        int_arg(args[2], "ms", 1, MAX_MS, &ms) < 0 || lock(s) < 0)
        return NULL;
    int64_t now = now_us(), k = key_find(s, key, 'b', now);
    if (k < 0 && (k = key_new(s, key, 'b')) < 0) {
        sweep(s, FULL_SWEEP, now);
        k = key_new(s, key, 'b');
    }
    if (k >= 0) {
        s->keys[k].value = value;
        s->keys[k].expires = now + ms * 1000;
    }
    s->h->full += k < 0;
    unlock(s);
    return PyBool_FromLong(k >= 0);
}

/* Drop the slot of (key, kind) — a cooldown mark, a measure's window — at once. */
static PyObject *
seg_forget(Seg *s, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t key;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "forget(key, kind)");
        return NULL;
    }
    PyObject *kind = args[1];
    Py_UCS4 k = PyUnicode_Check(kind) && PyUnicode_GET_LENGTH(kind) == 1
                    ? PyUnicode_READ_CHAR(kind, 0) : 0;
    if (k != 'b' && k != 'n' && k != 'h') {
        PyErr_Format(PyExc_ValueError, "kind %R is none of b n h", kind);
        return NULL;
    }
    if (opened(s) < 0 || (key = name_hash(s, args[0], "key")) == 0 || lock(s) < 0)
        return NULL;
    int64_t now = now_us(), i = key_find(s, key, (uint32_t)k, now), value = -1;
    if (i >= 0) {
        /* a mark: what a check of kind b reports (ms left * 16 + its value) */
        value = k == 'b' ? (s->keys[i].expires - now + 999) / 1000 * 16 + s->keys[i].value : 0;
        key_drop(s, (uint64_t)i);
    }
    unlock(s);
    if (value < 0)
        Py_RETURN_NONE;
    return PyLong_FromLongLong((long long)value);
}

static PyObject *
seg_count(Seg *s, PyObject *key_o)
{
    uint64_t key;
    if (opened(s) < 0 || (key = name_hash(s, key_o, "key")) == 0 || lock(s) < 0)
        return NULL;
    int64_t k = key_find(s, key, 'c', now_us());
    long long count = k < 0 ? 0 : s->keys[k].value;
    unlock(s);
    return PyLong_FromLongLong(count);
}

static PyObject *
seg_sweep(Seg *s, PyObject *n_o)
{
    long long n;
    if (int_arg(n_o, "n", 0, 1LL << 40, &n) < 0 || lock(s) < 0)
        return NULL;
    uint64_t removed = sweep(s, (uint64_t)n, now_us());
    unlock(s);
    return PyLong_FromUnsignedLongLong(removed);
}

static PyObject *
seg_stats(Seg *s, PyObject *Py_UNUSED(ignored))
{
    if (lock(s) < 0)
        return NULL;
    Header h = *s->h;
    unlock(s);
    typedef unsigned long long u;
    return Py_BuildValue(
        "{sKsKsKsKsKsKsKsKsKsKsKsK}", "keys", (u)h.keys, "max_keys", (u)h.max_keys,
        "key_slots", (u)h.key_slots, "leases", (u)h.leases, "max_leases", (u)h.max_leases,
        "lease_slots", (u)h.lease_slots, "sets", (u)h.sets, "max_sets", (u)h.max_sets, "full",
        (u)h.full, "recovered", (u)h.recovered, "unmeasured", (u)h.unmeasured, "bytes",
        (u)h.size);
}

/* For tests: the invariants, "" when they hold, else what does not. */
static PyObject *
seg_verify(Seg *s, PyObject *Py_UNUSED(ignored))
{
    if (lock(s) < 0)
        return NULL;
    Header *h = s->h;
    const char *bad = NULL;
    int64_t *count = PyMem_RawCalloc(h->key_slots, sizeof(int64_t));
    uint8_t *used = PyMem_RawCalloc(h->max_sets + 1, 1);
    uint64_t nk = 0, nl = 0, ns = 0, nfree = 0;
    if (count == NULL || used == NULL)
        bad = "no memory";
    for (uint64_t i = 0; i < h->key_slots && !bad; i++) {
        Key *k = &s->keys[i];
        if (k->hash == 0)
            continue;
        nk++;
        if (key_at(s, k->hash, k->kind) != (int64_t)i)
            bad = "a key slot out of its run, or twice";
        else if (k->kind == 'h' && (k->set >= h->max_sets || used[k->set]++))
            bad = "a set block lost, or used twice";
        ns += k->kind == 'h';
    }
    for (uint64_t i = 0; i < h->lease_slots && !bad; i++) {
        Member *m = &s->leases[i];
        if (m->lease == 0)
            continue;
        nl++;
        int64_t k = key_at(s, m->key, 'c');
        if (lease_at(s, m->lease, m->key) != (int64_t)i)
            bad = "a membership out of its run, or twice";
        else if (k < 0)
            bad = "a membership without its key";
        else
            count[k]++;
    }
    for (uint64_t i = 0; i < h->key_slots && !bad; i++)
        if (s->keys[i].hash && s->keys[i].kind == 'c' && s->keys[i].value != count[i])
            bad = "a count that is not its memberships";
    for (uint32_t j = h->free_set; j != NO_SET && !bad && nfree <= h->max_sets; j = s->sets[j].next)
        if (j >= h->max_sets || used[j]++)
            bad = "the free list";
        else
            nfree++;
    if (!bad && (nk != h->keys || nl != h->leases || ns != h->sets || ns + nfree != h->max_sets))
        bad = "a fill count";
    unlock(s);
    PyMem_RawFree(count);
    PyMem_RawFree(used);
    return PyUnicode_FromString(bad ? bad : "");
}

/* Whether the mutex can be had within wait_ms (0: one try, no wait): taken and given back at
   once (a dead holder's tables repaired on the way). The breaker's probe (ShmCounts). */
static PyObject *
seg_probe(Seg *s, PyObject *wait_o)
{
    long long wait_ms;
    if (opened(s) < 0 || int_arg(wait_o, "wait_ms", 0, LOCK_WAIT_MS, &wait_ms) < 0)
        return NULL;
    int rc = lock_within(s, (long)wait_ms);
    if (rc == 0) {
        unlock(s);
        Py_RETURN_TRUE;
    }
    if (rc == ETIMEDOUT)
        Py_RETURN_FALSE;
    errno = rc;
    return PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, s->path);
}

/* For tests: take the mutex and keep it (the process is to stop or die holding it). */
static PyObject *
seg_hold(Seg *s, PyObject *Py_UNUSED(ignored))
{
    if (lock(s) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* For tests: give back the mutex _hold took. */
static PyObject *
seg_unhold(Seg *s, PyObject *Py_UNUSED(ignored))
{
    if (opened(s) < 0)
        return NULL;
    if (__atomic_load_n(&s->h->holder, __ATOMIC_RELAXED) != (int32_t)self_pid) {
        PyErr_SetString(PyExc_ValueError, "this process does not hold the lock");
        return NULL;
    }
    unlock(s);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ create, open, close */

static PyObject *
shm_create(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *path;
    long long keys, leases, sets;
    if (!PyArg_ParseTuple(args, "O&LLL:create", PyUnicode_FSConverter, &path, &keys, &leases,
                          &sets))
        return NULL;
    if (capacities(keys, leases, sets) < 0) {
        Py_DECREF(path);
        return NULL;
    }
    PyObject *tmp = PyBytes_FromFormat("%s.%d.tmp", PyBytes_AS_STRING(path), (int)getpid());
    if (tmp == NULL) {
        Py_DECREF(path);
        return NULL;
    }
    const char *name = PyBytes_AS_STRING(tmp);
    uint64_t size = segment_size((uint64_t)keys, (uint64_t)leases, (uint64_t)sets);
    Header *h = MAP_FAILED;
    PyObject *failed = tmp; /* the name in the error */
    unlink(name);
    int fd = open(name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0)
        goto error;
    int rc = posix_fallocate(fd, 0, (off_t)size);
    if (rc != 0) {
        errno = rc;
        goto error;
    }
    h = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (h == MAP_FAILED)
        goto error;
    memset(h, 0, size);
    Seg s = {.h = h, .keys = (Key *)((char *)h + HEADER_SIZE)};
    h->version = VERSION;
    h->header_size = HEADER_SIZE;
    h->size = size;
    h->max_keys = (uint64_t)keys;
    h->key_slots = slots_for(h->max_keys);
    h->max_leases = (uint64_t)leases;
    h->lease_slots = slots_for(h->max_leases);
    h->max_sets = (uint64_t)sets;
    s.leases = (Member *)(s.keys + h->key_slots);
    s.sets = (Set *)(s.leases + h->lease_slots);
    forget_all(&s);
    for (size_t got = 0; got < sizeof h->sipkey;) {
        ssize_t r = getrandom(h->sipkey + got, sizeof h->sipkey - got, 0);
        if (r < 0 && errno != EINTR)
            goto error;
        got += r > 0 ? (size_t)r : 0;
    }
    pthread_mutexattr_t attr;
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    rc = pthread_mutex_init(&h->mu, &attr);
    pthread_mutexattr_destroy(&attr);
    if (rc != 0) {
        errno = rc;
        goto error;
    }
    h->magic = MAGIC; /* last: a segment is whole or not one */
    failed = path;
    if (rename(name, PyBytes_AS_STRING(path)) < 0)
        goto error;
    munmap(h, size);
    close(fd);
    Py_DECREF(tmp);
    Py_DECREF(path);
    Py_RETURN_NONE;
error:
    PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, failed);
    if (h != MAP_FAILED)
        munmap(h, size);
    if (fd >= 0) {
        close(fd);
        unlink(name);
    }
    Py_DECREF(tmp);
    Py_DECREF(path);
    return NULL;
}

static int
seg_init(Seg *s, PyObject *args, PyObject *kwds)
{
    PyObject *path;
    long long keys, leases, sets;
    if (kwds != NULL && PyDict_GET_SIZE(kwds)) {
        PyErr_SetString(PyExc_TypeError, "Segment(path, max_keys, max_leases, max_sets)");
        return -1;
    }
    if (s->h != NULL) {
        PyErr_SetString(PyExc_ValueError, "the segment is open already");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "O&LLL:Segment", PyUnicode_FSConverter, &path, &keys, &leases,
                          &sets))
        return -1;
    Py_XSETREF(s->path, PyUnicode_DecodeFSDefault(PyBytes_AS_STRING(path)));
    Py_DECREF(path);
    if (s->path == NULL || capacities(keys, leases, sets) < 0)
        return -1;
    uint64_t size = segment_size((uint64_t)keys, (uint64_t)leases, (uint64_t)sets);
    PyObject *bytes = PyUnicode_EncodeFSDefault(s->path);
    if (bytes == NULL)
        return -1;
    int fd = open(PyBytes_AS_STRING(bytes), O_RDWR | O_CLOEXEC);
    Py_DECREF(bytes);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, s->path);
        if (fd >= 0)
            close(fd);
        return -1;
    }
    if ((uint64_t)st.st_size != size) {
        close(fd);
        PyErr_Format(PyExc_ValueError, "%R is no sipguard segment of these capacities "
                     "(%lld bytes, expected %llu)", s->path, (long long)st.st_size,
                     (unsigned long long)size);
        return -1;
    }
    Header *h = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (h == MAP_FAILED) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, s->path);
        return -1;
    }
    if (h->magic != MAGIC || h->version != VERSION || h->header_size != HEADER_SIZE ||
        h->size != size || h->max_keys != (uint64_t)keys || h->max_leases != (uint64_t)leases
        || h->max_sets != (uint64_t)sets || h->key_slots != slots_for(h->max_keys) ||
        h->lease_slots != slots_for(h->max_leases)) {
        munmap(h, size);
        PyErr_Format(PyExc_ValueError, "%R is no sipguard segment of version %d and these "
                     "capacities", s->path, VERSION);
        return -1;
    }
    s->h = h;
    s->size = size;
    s->keys = (Key *)((char *)h + HEADER_SIZE);
    s->leases = (Member *)(s->keys + h->key_slots);
    s->sets = (Set *)(s->leases + h->lease_slots);
    return 0;
}

static PyObject *
seg_close(Seg *s, PyObject *Py_UNUSED(ignored))
{
    if (s->h != NULL)
        munmap(s->h, s->size);
    s->h = NULL;
    Py_RETURN_NONE;
}

static void
seg_dealloc(Seg *s)
{
    if (s->h != NULL)
        munmap(s->h, s->size);
    Py_XDECREF(s->path);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyObject *
get_path(Seg *s, void *Py_UNUSED(closure))
{
    return Py_NewRef(s->path ? s->path : Py_None);
}

static PyObject *
get_holder(Seg *s, void *Py_UNUSED(closure))
{
    if (opened(s) < 0)
        return NULL;
    return PyLong_FromLong(__atomic_load_n(&s->h->holder, __ATOMIC_RELAXED));
}

static PyMethodDef seg_methods[] = {
    {"admit", (PyCFunction)(void (*)(void))seg_admit, METH_FASTCALL,
     "admit(lease, checks, take, lease_ms) -> (taken, refused, value, monitored) | None"},
    {"add", (PyCFunction)(void (*)(void))seg_add, METH_FASTCALL,
     "add(lease, keys, lease_ms) -> int | None: take lease on keys whatever the counts."},
    {"release", (PyCFunction)(void (*)(void))seg_release, METH_FASTCALL,
     "release(lease, keys) -> int: memberships removed."},
    {"mark", (PyCFunction)(void (*)(void))seg_mark, METH_FASTCALL,
     "mark(key, value, ms) -> bool: a cooldown mark; False: the table is full."},
    {"forget", (PyCFunction)(void (*)(void))seg_forget, METH_FASTCALL,
     "forget(key, kind) -> int | None: drop a mark (b) or a measure (n, h); a mark's ms "
     "left * 16 + value (0 for a measure), None when there was none."},
    {"count", (PyCFunction)seg_count, METH_O, "count(key) -> int: live leases on key."},
    {"sweep", (PyCFunction)seg_sweep, METH_O,
     "sweep(n) -> int: visit n slots of each table, drop what expired."},
    {"stats", (PyCFunction)seg_stats, METH_NOARGS, "Fills, capacities and events."},
    {"probe", (PyCFunction)seg_probe, METH_O,
     "probe(wait_ms) -> bool: the lock had within wait_ms (0: one try) and given back."},
    {"close", (PyCFunction)seg_close, METH_NOARGS, "Unmap the segment."},
    {"_verify", (PyCFunction)seg_verify, METH_NOARGS, "For tests: broken invariants."},
    {"_hold", (PyCFunction)seg_hold, METH_NOARGS, "For tests: take the lock and keep it."},
    {"_unhold", (PyCFunction)seg_unhold, METH_NOARGS, "For tests: give back _hold's lock."},
    {NULL},
};

static PyGetSetDef seg_getset[] = {
    {"path", (getter)get_path, NULL, "The segment's file.", NULL},
    {"holder", (getter)get_holder, NULL, "The pid that holds the lock; 0: none.", NULL},
    {NULL},
};

static PyTypeObject SegType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sipguard.state._shm.Segment",
    .tp_basicsize = sizeof(Seg),
    .tp_dealloc = (destructor)seg_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Segment(path, max_keys, max_leases, max_sets): a mapped segment.",
    .tp_methods = seg_methods,
    .tp_getset = seg_getset,
    .tp_init = (initproc)seg_init,
    .tp_new = PyType_GenericNew,
};

static PyMethodDef shm_functions[] = {
    {"create", shm_create, METH_VARARGS,
     "create(path, max_keys, max_leases, max_sets): a fresh segment at path."},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sipguard.state._shm",
    "Limit counters shared by the workers of one host, in shared memory.", -1, shm_functions,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__shm(void)
{
    if (PyType_Ready(&SegType) < 0)
        return NULL;
    self_pid = getpid();
    if (pthread_atfork(NULL, NULL, after_fork) != 0) {
        PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Segment", (PyObject *)&SegType) < 0 ||
        PyModule_AddIntConstant(m, "SET_CAP", SET_CAP) < 0 ||
        PyModule_AddIntConstant(m, "MAX_ITEMS", MAX_ITEMS) < 0 ||
        PyModule_AddIntConstant(m, "LOCK_WAIT_MS", LOCK_WAIT_MS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
