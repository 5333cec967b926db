/* The Redis transport: see the DESIGN note in broker.h. Runs in the worker's main process only. */
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "broker.h"
#include "rconn.h"
#include "transport.h"

#define SEP "\x06\x16"
#define MAX_FETCH 1000 /* the script unpacks 2 values per message; Lua's stack allows ~8000 */
#define MAX_FETCHES 2

/* One fetch in flight. */
struct fetch {
    struct redis_broker *b;
    int requested;
    unsigned long wake_seq; /* invalidations seen when it was sent */
    size_t nq;              /* queues it asked (the consumed ones when it was sent) */
    int list_queue[];       /* list number (0-based, in the order sent: nq * NPRIO) -> queue index */
};
#define POLL_FALLBACK_S 0.05
#define INBOX_REGISTRY "celeriac.inboxes"
/* From this size on, the unacked record of a message taken by the BLMOVE is written by us rather than by the
 * record script: Redis's Lua hashes every byte of every string it creates, two per message (~0.35 s for a
 * 60 MB one), while sending the record back costs a copy over the socket. */
#define CLIENT_RECORD_MIN (1 << 20)
#define BACKOFF_MIN 0.1
#define BACKOFF_MAX 5.0

enum { NPRIO = 4 }; /* kombu's priority steps: 0, 3, 6, 9 */

size_t broker_priority_key(char *dst, size_t dstlen, const char *queue, int priority)
{
    int p = priority < 0 ? 0 : priority > 9 ? 9 : priority;
    int step = p / 3 * 3;
    int n = step ? snprintf(dst, dstlen, "%s" SEP "%d", queue, step) : snprintf(dst, dstlen, "%s", queue);
    return n < 0 ? 0 : (size_t)n;
}

/* KEYS: unacked_index, unacked, then the queue lists in pop order.
 * ARGV: max, score, prefix for tags of messages that carry none, then one JSON-escaped queue name per list.
 * Returns {tag, message, list number (1-based), ...}. A message that cannot be JSON is recorded as a JSON
 * string so that kombu's restore (which json-loads the record) never chokes on it. */
static const char pop_script[] =
    "local max = tonumber(ARGV[1])\n"
    "local out, z, h, seen = {}, {}, {}, {}\n"
    "local n = 0\n"
    "for i = 3, #KEYS do\n"
    "  local want = max - n\n"
    "  if want <= 0 then break end\n"
    "  local got = redis.call('RPOP', KEYS[i], want)\n"
    "  if got then\n"
    "    local route = ', \"\", \"' .. ARGV[i + 1] .. '\"]'\n"
    "    for j = 1, #got do\n"
    "      local m = got[j]\n"
    "      n = n + 1\n"
    "      local tag\n"
    "      local s, e = string.find(m, '\"delivery_tag\"', 1, true)\n"
    "      if s then tag = string.match(m, '^%s*:%s*\"([%w%-_.]+)\"', e + 1) end\n"
    "      if not tag or #tag > 100 or seen[tag] then tag = ARGV[3] .. n end\n"
    "      seen[tag] = true\n"
    "      local rec\n"
    "      if string.byte(m, 1) == 123 and string.byte(m, -1) == 125 then\n"
    "        rec = '[' .. m .. route\n"
    "      else\n"
    "        rec = '[' .. cjson.encode(m) .. route\n"
    "      end\n"
    "      z[#z + 1] = ARGV[2]; z[#z + 1] = tag\n"
    "      h[#h + 1] = tag; h[#h + 1] = rec\n"
    "      out[#out + 1] = tag; out[#out + 1] = m; out[#out + 1] = i - 2\n"
    "    end\n"
    "  end\n"
    "end\n"
    "if n > 0 then\n"
    "  redis.call('ZADD', KEYS[1], unpack(z))\n"
    "  redis.call('HSET', KEYS[2], unpack(h))\n"
    "end\n"
    "return out\n";

/* KEYS: unacked_index, unacked, destination lists. ARGV: tag, payload, "L" (far end) or "R" (next out).
 * Restores only while the record exists, so two restorers never both push the same message. */
static const char restore_script[] =
    "if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then return 0 end\n"
    "redis.call('ZREM', KEYS[1], ARGV[1])\n"
    "redis.call('HDEL', KEYS[2], ARGV[1])\n"
    "for i = 3, #KEYS do\n"
    "  if ARGV[3] == 'L' then redis.call('LPUSH', KEYS[i], ARGV[2]) else redis.call('RPUSH', KEYS[i], ARGV[2]) end\n"
    "end\n"
    "return 1\n";

/* KEYS: unacked_index, unacked, the inbox. ARGV: score, tag, JSON-escaped queue name. Records the inbox's oldest
 * message exactly as pop_script records what it pops (the caller already has the message: not returned). */
static const char inbox_record_script[] =
    "local m = redis.call('RPOP', KEYS[3])\n"
    "if not m then return 0 end\n"
    "local route = ', \"\", \"' .. ARGV[3] .. '\"]'\n"
    "local rec\n"
    "if string.byte(m, 1) == 123 and string.byte(m, -1) == 125 then\n"
    "  rec = '[' .. m .. route\n"
    "else\n"
    "  rec = '[' .. cjson.encode(m) .. route\n"
    "end\n"
    "redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])\n"
    "redis.call('HSET', KEYS[2], ARGV[2], rec)\n"
    "return 1\n";

/* KEYS: the inbox registry (inbox -> "<lease deadline> <queue>"). ARGV: now, our inbox, "own" or "stale".
 * Puts inboxes back on their queues, oldest message next out, and drops them from the registry: "own" ours
 * (start-up, reconnect, shutdown), "stale" every other one whose lease ran out (its worker died between a
 * blocking move and the record). An entry without a queue is dropped, its list left as is. Returns how many
 * messages went back. */
static const char inbox_sweep_script[] =
    "local reg = redis.call('HGETALL', KEYS[1])\n"
    "local moved = 0\n"
    "for i = 1, #reg, 2 do\n"
    "  local inbox = reg[i]\n"
    "  local deadline, queue = string.match(reg[i + 1], '^(%S+) (.+)$')\n"
    "  local mine = inbox == ARGV[2]\n"
    "  if (ARGV[3] == 'own' and mine) or\n"
    "     (ARGV[3] == 'stale' and not mine and (tonumber(deadline) or 0) < tonumber(ARGV[1])) then\n"
    "    if queue then\n"
    "      local m = redis.call('LPOP', inbox)\n"
    "      while m do\n"
    "        redis.call('RPUSH', queue, m)\n"
    "        moved = moved + 1\n"
    "        m = redis.call('LPOP', inbox)\n"
    "      end\n"
    "    end\n"
    "    redis.call('HDEL', KEYS[1], inbox)\n"
    "  end\n"
    "end\n"
    "return moved\n";

static const char unlock_script[] =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end\n"
    "return 0\n";

/* A set of strings (the tags this worker holds), open addressing with tombstones. */
struct tagset {
    char **slots;
    size_t cap, used, live;
};
#define TOMBSTONE ((char *)1)

static uint64_t hash_str(const char *s)
{
    uint64_t h = 1469598103934665603ULL;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return h;
}

static void tagset_add(struct tagset *t, const char *tag);

static void tagset_grow(struct tagset *t)
{
    struct tagset old = *t;
    /* Sized by the live tags only: a rehash also drops the tombstones, so the table follows how many
     * messages are held now, not how many have passed through. */
    t->cap = 64;
    while (t->cap < old.live * 4)
        t->cap *= 2;
    t->slots = calloc(t->cap, sizeof *t->slots);
    if (!t->slots)
        abort();
    t->used = t->live = 0;
    for (size_t i = 0; i < old.cap; i++) {
        if (old.slots[i] && old.slots[i] != TOMBSTONE) {
            tagset_add(t, old.slots[i]);
            free(old.slots[i]);
        }
    }
    free(old.slots);
}

static void tagset_add(struct tagset *t, const char *tag)
{
    if ((t->used + 1) * 2 > t->cap)
        tagset_grow(t);
    size_t i = hash_str(tag) & (t->cap - 1);
    while (t->slots[i] && (t->slots[i] == TOMBSTONE || strcmp(t->slots[i], tag) != 0))
        i = (i + 1) & (t->cap - 1);
    if (t->slots[i])
        return;
    t->slots[i] = strdup(tag);
    t->used++;
    t->live++;
}

static bool tagset_remove(struct tagset *t, const char *tag)
{
    if (!t->cap)
        return false;
    size_t i = hash_str(tag) & (t->cap - 1);
    for (; t->slots[i]; i = (i + 1) & (t->cap - 1)) {
        if (t->slots[i] != TOMBSTONE && strcmp(t->slots[i], tag) == 0) {
            free(t->slots[i]);
            t->slots[i] = TOMBSTONE;
            t->live--;
            return true;
        }
    }
    return false;
}

static bool tagset_has(const struct tagset *t, const char *tag)
{
    if (!t->cap)
        return false;
    size_t i = hash_str(tag) & (t->cap - 1);
    for (; t->slots[i]; i = (i + 1) & (t->cap - 1))
        if (t->slots[i] != TOMBSTONE && strcmp(t->slots[i], tag) == 0)
            return true;
    return false;
}

static void tagset_free(struct tagset *t)
{
    for (size_t i = 0; i < t->cap; i++)
        if (t->slots[i] && t->slots[i] != TOMBSTONE)
            free(t->slots[i]);
    free(t->slots);
    memset(t, 0, sizeof *t);
}

struct redis_broker {
    struct broker base;      /* first: see transport.h */
    const struct broker_endpoint *ep; /* borrowed */
    struct rconn main;       /* scripts, acks, restores */
    double next_reconnect, backoff;
    struct rconn wake;       /* subscribed to key invalidations for the queue lists */
    struct broker_handlers h;
    void *arg;

    char **queues;           /* owned copies; a queue once known keeps its index (deliveries refer to it) */
    bool *active;            /* consumed now: false after cancel_consumer, until add_consumer */
    char **queues_json;      /* the names JSON-escaped, for the unacked record */
    size_t nqueues;
    size_t rotation;         /* round robin: the queue that is asked first */
    char **keys;             /* every list key, queue-major: keys[q * NPRIO + p] */
    double visibility_timeout;

    char pop_sha[41], restore_sha[41], unlock_sha[41], record_sha[41], sweep_sha[41];
    char tag_prefix[48];
    unsigned long long fetch_count;

    int fetch_requested;     /* messages the fetches in flight may still deliver */
    int fetches;             /* fetches in flight: up to MAX_FETCHES, so Redis has the next one queued while
                              * we handle the reply of the previous one */
    bool maybe_ready;        /* the queues may hold messages */
    unsigned long wake_seq;  /* invalidations seen */
    bool tracking;           /* the wake-up channel works; else poll every POLL_FALLBACK_S */
    bool tracking_on;        /* invalidations are switched on right now (only while the queues look empty) */
    bool tracking_narrow;    /* only the priority sub-lists are tracked (see setup_tracking) */
    bool retrack_wide;       /* ... and the BLMOVE just turned out unusable: track the queue itself (redis_tick) */
    char *narrow_prefix;     /* owned: that prefix, the queue's name + SEP */
    const char **tracking_argv; /* the CLIENT TRACKING ON command, kept to switch it back on */
    size_t *tracking_lens;
    int tracking_argc;
    char tracking_id[32];
    double next_poll, next_restore, next_refresh;

    /* The idle wait (DESIGN in broker.h): a BLMOVE from the one consumed queue into our inbox list. */
    struct rconn block;
    char inbox[64];          /* this process's inbox key, unique across hosts and restarts */
    int inbox_queue;         /* the queue the registry names for our inbox; -1: not registered */
    bool block_ok;           /* the blocking move works here; false: invalidations alone (older server, ACL) */
    bool block_armed;        /* the last fetch found the queues empty: the next one waits in BLMOVE */
    bool block_out;          /* a BLMOVE is waiting (counted as one message in fetch_requested) */
    bool lent;               /* the BLMOVE was lent instead (handlers.lend_wait): the same, on another's connection */
    bool lent_recalled;      /* ... and asked back: when it ends, the inbox goes back to the queue */
    /* Commands on the main connection that take a message out of the inbox (pending_resolve), not yet
     * answered. The inbox is read after a lent wait ends (LINDEX of its oldest, on the blocking connection) only
     * once they are done: the borrower may have waited again since, so the oldest must be gone by then. */
    int inbox_ops;
    bool inbox_read_due;
    int block_queue;         /* the queue it waits on */
    /* The message the last BLMOVE took, until it is settled or the pass ends (see on_block_reply). */
    char *pending_tag;       /* owned; NULL: none */
    const char *pending_raw; /* borrowed from its delivery, which the consumer keeps while it is unsettled */
    size_t pending_len;
    unsigned long long block_count;

    struct tagset held;      /* tags delivered and not yet acked or requeued */
    char **acks;             /* tags to ack at the next flush (owned) */
    size_t nacks, cap_acks;
    char errstr[256];
};

static int load_script(struct redis_broker *b, const char *src, char *sha)
{
    redisReply *r = rconn_call(&b->main, "SCRIPT LOAD %s", src);
    int rc = -1;
    if (r && r->type == REDIS_REPLY_STRING && r->len == 40) {
        memcpy(sha, r->str, 41);
        rc = 0;
    } else {
        snprintf(b->errstr, sizeof b->errstr, "SCRIPT LOAD failed: %.200s",
                 r && r->type == REDIS_REPLY_ERROR ? r->str : b->main.errstr);
    }
    if (r)
        freeReplyObject(r);
    return rc;
}

/* The one queue consumed now, or -1 when there are several or none: BLMOVE takes a single list. */
static int single_queue(const struct redis_broker *b)
{
    int q = -1;
    for (size_t i = 0; i < b->nqueues; i++) {
        if (!b->active[i])
            continue;
        if (q >= 0)
            return -1;
        q = (int)i;
    }
    return q;
}

/* The idle wait cannot be a BLMOVE (refused, or no blocking connection): invalidations alone wake us from now
 * on, so they must cover the queue's own list again. */
static void block_unusable(struct redis_broker *b)
{
    b->block_ok = false;
    b->retrack_wide = b->tracking_narrow;
}

/* The index into keys of a consumed queue's list (queue i / NPRIO, priority step i % NPRIO), or -1. */
static int queue_key_index(const struct redis_broker *b, const char *key, size_t len)
{
    for (size_t i = 0; i < b->nqueues * NPRIO; i++)
        if (b->active[i / NPRIO] && strlen(b->keys[i]) == len && memcmp(b->keys[i], key, len) == 0)
            return (int)i;
    return -1;
}

/* Replies on the wake connection: subscription confirmations and invalidation messages
 * ["message", "__redis__:invalidate", [keys...] or nil]. */
static void on_wake_push(struct rconn *c, redisReply *r, void *arg, bool *steal)
{
    (void)c;
    (void)steal;
    struct redis_broker *b = arg;
    if (!r || r->type != REDIS_REPLY_ARRAY || r->elements < 3 || r->element[0]->type != REDIS_REPLY_STRING ||
        strcmp(r->element[0]->str, "message") != 0)
        return;
    redisReply *keys = r->element[2];
    bool relevant = keys->type != REDIS_REPLY_ARRAY; /* nil: the whole keyspace was flushed */
    /* A push to the list a BLMOVE waits on is the BLMOVE's to take (and its reply asks for the rest). */
    const char *waited = b->block_out || b->lent ? b->keys[(size_t)b->block_queue * NPRIO] : NULL;
    size_t others = 0;
    for (size_t i = 0; keys->type == REDIS_REPLY_ARRAY && i < keys->elements; i++) {
        redisReply *k = keys->element[i];
        int q = k->type == REDIS_REPLY_STRING ? queue_key_index(b, k->str, k->len) : -1;
        if (q < 0) {
            others++;
            continue;
        }
        bool taken = waited && strlen(waited) == k->len && memcmp(waited, k->str, k->len) == 0;
        relevant = relevant || !taken;
        rconn_log(&b->main, BROKER_LOG_DEBUG, "Woken by a message in queue %s (priority %d)%s", b->queues[q / NPRIO],
                  q % NPRIO * 3, taken ? ", which the waiting BLMOVE takes" : "");
    }
    if (others) /* keys under a tracked prefix that are no queue of ours: result keys, say */
        rconn_log(&b->main, BROKER_LOG_DEBUG, "Woken by a change to %zu other key(s)", others);
    if (relevant) {
        b->wake_seq++;
        b->maybe_ready = true;
    }
}

/* Queue names that are a prefix of another would make Redis refuse the tracking prefixes as overlapping;
 * the shorter one covers both. */
static bool prefix_covered(const struct redis_broker *b, size_t i)
{
    for (size_t j = 0; j < b->nqueues; j++) {
        if (j == i || !b->active[j])
            continue;
        size_t lj = strlen(b->queues[j]);
        if (strncmp(b->queues[i], b->queues[j], lj) == 0 && (strlen(b->queues[i]) > lj || j < i))
            return true;
    }
    return false;
}

/* Invalidations wake the main process when a queue it consumes gets a message. With one queue whose idle wait
 * is a BLMOVE on its list (block_ok), a push to that list is the BLMOVE's to take: only the priority sub-lists
 * (the queue's name + SEP) are tracked then. Tracking the name itself woke the main process for every task an
 * idle worker ran, twice: the push, and the task's result key, which starts with the queue's name too
 * (celery-task-meta-..., and BCAST prefixes match keys of every db). Those wake-ups compete with the pool
 * process's for the CPUs: at 200 tasks/s, 5 alternating runs, latency p50 0.34-0.43 ms narrow against
 * 0.47-0.54 tracking the name. Should the BLMOVE become unusable, tracking goes back to the name (retrack_wide);
 * until then the once-a-second poll (redis_tick) still finds what came. */
static void setup_tracking(struct redis_broker *b, const struct broker_endpoint *ep)
{
    b->tracking = b->tracking_on = false;
    rconn_close(&b->wake);
    free(b->tracking_argv);
    free(b->tracking_lens);
    free(b->narrow_prefix);
    b->tracking_argv = NULL;
    b->tracking_lens = NULL;
    b->narrow_prefix = NULL;
    int single = single_queue(b);
    b->tracking_narrow = single >= 0 && b->block_ok;
    b->retrack_wide = false;
    if (rconn_open(&b->wake, "broker-wake", ep, 5000) < 0)
        goto fallback;
    redisReply *r = rconn_call(&b->wake, "CLIENT ID");
    long long id = r && r->type == REDIS_REPLY_INTEGER ? r->integer : -1;
    if (r)
        freeReplyObject(r);
    if (id < 0)
        goto fallback;
    b->wake.push_cb = on_wake_push;
    b->wake.push_arg = b;
    rconn_send(&b->wake, "SUBSCRIBE __redis__:invalidate");
    if (rconn_flush(&b->wake) < 0)
        goto fallback;

    if (b->nqueues > 63) {
        snprintf(b->errstr, sizeof b->errstr, "more than 63 queues");
        goto fallback;
    }
    const char **argv = calloc(8 + 2 * b->nqueues, sizeof *argv);
    size_t *lens = calloc(8 + 2 * b->nqueues, sizeof *lens);
    if (!argv || !lens)
        abort();
    b->tracking_argv = argv;
    b->tracking_lens = lens;
    int argc = 0;
    snprintf(b->tracking_id, sizeof b->tracking_id, "%lld", id);
    const char *head[] = {"CLIENT", "TRACKING", "ON", "REDIRECT", b->tracking_id, "BCAST", "NOLOOP"};
    for (size_t i = 0; i < 7; i++)
        argv[argc++] = head[i];
    if (b->tracking_narrow) {
        size_t n = strlen(b->queues[single]);
        if (!(b->narrow_prefix = malloc(n + sizeof SEP)))
            abort();
        memcpy(b->narrow_prefix, b->queues[single], n);
        memcpy(b->narrow_prefix + n, SEP, sizeof SEP);
        argv[argc++] = "PREFIX";
        argv[argc++] = b->narrow_prefix;
    }
    for (size_t i = 0; i < b->nqueues && !b->tracking_narrow; i++) {
        if (!b->active[i] || prefix_covered(b, i))
            continue;
        argv[argc++] = "PREFIX";
        argv[argc++] = b->queues[i];
    }
    for (int i = 0; i < argc; i++)
        lens[i] = strlen(argv[i]);
    b->tracking_argc = argc;
    redisReply *tr = rconn_call_argv(&b->main, argc, argv, lens);
    if (!tr || tr->type == REDIS_REPLY_ERROR) {
        snprintf(b->errstr, sizeof b->errstr, "%s", tr ? tr->str : b->main.errstr);
        if (tr)
            freeReplyObject(tr);
        goto fallback;
    }
    freeReplyObject(tr);
    b->tracking = b->tracking_on = true;
    return;
fallback:
    /* Still correct, only slower to notice new messages when idle. */
    rconn_log(&b->main, BROKER_LOG_WARNING, "CLIENT TRACKING unavailable (%s); polling the queues every %.0f ms",
            b->errstr[0] ? b->errstr : b->wake.errstr, POLL_FALLBACK_S * 1000);
    b->errstr[0] = '\0';
    rconn_close(&b->wake);
}

static char *json_escaped(const char *s)
{
    json_t *str = json_string(s);
    char *dumped = json_dumps(str, JSON_ENCODE_ANY);
    json_decref(str);
    /* strip the quotes */
    size_t n = strlen(dumped);
    memmove(dumped, dumped + 1, n - 2);
    dumped[n - 2] = '\0';
    return dumped;
}


/* ---------------------------------------------------------------- the inbox: the idle wait (DESIGN) */

/* How long an inbox outlives its worker's last sign of life before others put it back: refresh_held renews
 * it every period, so four missed periods mean the worker is gone. */
static double inbox_lease(const struct redis_broker *b)
{
    double period = b->visibility_timeout / 4;
    period = period < 0.25 ? 0.25 : period > 30 ? 30 : period;
    return 4 * period + 5;
}

/* Names queue q as where our inbox goes back to, with a fresh lease. wait: before a BLMOVE, so the entry
 * exists before anything can land in the inbox (the two go out on different connections). */
static int inbox_register(struct redis_broker *b, int q, bool wait)
{
    const char *queue = b->queues[q];
    size_t n = strlen(queue) + 40;
    char *value = malloc(n);
    if (!value)
        abort();
    snprintf(value, n, "%.6f %s", rconn_epoch() + inbox_lease(b), queue);
    int rc = 0;
    if (wait) {
        redisReply *r = rconn_call(&b->main, "HSET %s %s %s", INBOX_REGISTRY, b->inbox, value);
        rc = r && r->type == REDIS_REPLY_INTEGER ? 0 : -1;
        if (r)
            freeReplyObject(r);
    } else {
        rconn_command(&b->main, NULL, NULL, "HSET %s %s %s", INBOX_REGISTRY, b->inbox, value);
    }
    free(value);
    b->inbox_queue = rc == 0 ? q : -1;
    return rc;
}

/* Our inbox back on its queue and out of the registry (a BLMOVE whose reply we will never read may have
 * moved a message into it). Redis runs it after every record script sent before it on this connection. */
static void pending_resolve(struct redis_broker *b, bool acked);

static void inbox_return(struct redis_broker *b, bool wait)
{
    pending_resolve(b, false); /* a message we hold is recorded, not put back */
    b->inbox_queue = -1;
    if (!rconn_connected(&b->main) || !b->sweep_sha[0])
        return;
    if (wait) {
        redisReply *r = rconn_call(&b->main, "EVALSHA %s 1 %s %.6f %s own", b->sweep_sha, INBOX_REGISTRY,
                                   rconn_epoch(), b->inbox);
        if (r && r->type == REDIS_REPLY_INTEGER && r->integer > 0)
            rconn_log(&b->main, BROKER_LOG_INFO, "put %lld message(s) from this worker's inbox back on the queue",
                      r->integer);
        if (r)
            freeReplyObject(r);
    } else {
        rconn_command(&b->main, NULL, NULL, "EVALSHA %s 1 %s %.6f %s own", b->sweep_sha, INBOX_REGISTRY,
                      rconn_epoch(), b->inbox);
    }
}

static bool lua_space(char ch)
{
    return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '\v' || ch == '\f';
}

/* The tag pop_script gives a message: the value after its first "delivery_tag" key when it is 1 to 100 of
 * [A-Za-z0-9_.-] (the script's pattern), else false. */
static bool message_tag(const char *m, size_t len, char *out, size_t outlen)
{
    static const char key[] = "\"delivery_tag\"";
    const char *p = memmem(m, len, key, sizeof key - 1);
    if (!p)
        return false;
    const char *end = m + len;
    p += sizeof key - 1;
    while (p < end && lua_space(*p))
        p++;
    if (p >= end || *p++ != ':')
        return false;
    while (p < end && lua_space(*p))
        p++;
    if (p >= end || *p++ != '"')
        return false;
    const char *start = p;
    while (p < end && ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
                       *p == '-' || *p == '_' || *p == '.'))
        p++;
    size_t n = (size_t)(p - start);
    if (p >= end || *p != '"' || n == 0 || n > 100 || n >= outlen)
        return false;
    memcpy(out, start, n);
    out[n] = '\0';
    return true;
}

static void inbox_read(struct redis_broker *b);

static void on_inbox_op(struct rconn *c, redisReply *r, void *arg, bool *steal)
{
    (void)c;
    (void)r;
    (void)steal;
    struct redis_broker *b = arg;
    if (--b->inbox_ops == 0 && b->inbox_read_due)
        inbox_read(b);
}

/* The record of a big message, as the record script would write it, in one MULTI: the record and its index
 * entry, and the message out of the inbox (LTRIM drops the oldest without sending 60 MB back). */
static void record_from_client(struct redis_broker *b, const char *m, size_t len, const char *tag, const char *score)
{
    static const char mid[] = ", \"\", \"";
    const char *queue = b->queues_json[b->block_queue];
    size_t qlen = strlen(queue), rlen = 1 + len + (sizeof mid - 1) + qlen + 2;
    char *rec = malloc(rlen);
    if (!rec)
        abort();
    char *p = rec;
    *p++ = '[';
    memcpy(p, m, len);
    p += len;
    memcpy(p, mid, sizeof mid - 1);
    p += sizeof mid - 1;
    memcpy(p, queue, qlen);
    p += qlen;
    memcpy(p, "\"]", 2);
    rconn_command(&b->main, NULL, NULL, "MULTI");
    const char *argv[] = {"HSET", "unacked", tag, rec};
    size_t lens[] = {4, 7, strlen(tag), rlen};
    rconn_command_resp(&b->main, NULL, NULL, 4, argv, lens);
    rconn_command(&b->main, NULL, NULL, "ZADD unacked_index %s %s", score, tag);
    rconn_command(&b->main, NULL, NULL, "LTRIM %s 0 -2", b->inbox);
    rconn_command(&b->main, on_inbox_op, b, "EXEC");
    free(rec);
}

static void on_recorded(struct rconn *c, redisReply *r, void *arg, bool *steal)
{
    if (r && r->type == REDIS_REPLY_INTEGER && r->integer == 0)
        rconn_log(c, BROKER_LOG_ERROR, "inbox empty when recording a message: another worker swept it (this one "
                                       "stalled past its lease); the message may run twice");
    on_inbox_op(c, r, arg, steal);
}

/* Settles the message the last BLMOVE took. It waits in our inbox, as safe there as in `unacked` (the lease),
 * so nothing is written for it until the consumer decides: acked in the same pass (an early ack when it went
 * straight to a process, or a reject) -> it only leaves the inbox (LTRIM of the oldest, which it is: the
 * inbox holds nothing else); still held when the pass ends, or requeued/deferred -> its unacked record is
 * written (the script, or our own MULTI for a big one), exactly as a fetch records it, before anything else
 * is done with it on this connection. */
static void pending_resolve(struct redis_broker *b, bool acked)
{
    if (!b->pending_tag)
        return;
    b->inbox_ops++; /* answered by on_inbox_op, or on_recorded */
    if (acked) {
        rconn_command(&b->main, on_inbox_op, b, "LTRIM %s 0 -2", b->inbox);
    } else {
        char score[32];
        snprintf(score, sizeof score, "%.6f", rconn_epoch());
        const char *m = b->pending_raw, *tag = b->pending_tag;
        size_t len = b->pending_len;
        if (len >= CLIENT_RECORD_MIN && m[0] == '{' && m[len - 1] == '}') {
            record_from_client(b, m, len, tag, score);
        } else {
            const char *argv[] = {"EVALSHA", b->record_sha, "3", "unacked_index", "unacked", b->inbox,
                                  score,     tag,           b->queues_json[b->block_queue]};
            size_t lens[9];
            for (size_t i = 0; i < 9; i++)
                lens[i] = strlen(argv[i]);
            rconn_command_argv(&b->main, on_recorded, b, 9, argv, lens);
        }
    }
    free(b->pending_tag);
    b->pending_tag = NULL;
    b->pending_raw = NULL;
}

/* Whether tag is the pending one. */
static bool is_pending(const struct redis_broker *b, const char *tag)
{
    return b->pending_tag && strcmp(b->pending_tag, tag) == 0;
}

/* A message now in our inbox (raw owned: taken over; raw_fd: the memfd it lives in, or -1), delivered at once
 * (the round trip of a fetch is what the inbox saves) and settled by pending_resolve. */
static void inbox_delivered(struct redis_broker *b, char *raw, size_t len, int raw_fd)
{
    char tag[128];
    if (!message_tag(raw, len, tag, sizeof tag) || tagset_has(&b->held, tag))
        snprintf(tag, sizeof tag, "%sb%llu", b->tag_prefix, ++b->block_count);
    struct broker_delivery *d = calloc(1, sizeof *d);
    if (!d)
        abort();
    d->raw = raw;
    d->len = len;
    d->raw_fd = raw_fd;
    d->raw_shared = raw_fd >= 0;
    d->tag = strdup(tag);
    d->queue = b->block_queue;
    d->priority = 0;
    tagset_add(&b->held, d->tag);
    pending_resolve(b, false); /* never two: one BLMOVE at a time, and each pass ends with a flush */
    b->pending_tag = strdup(tag);
    b->pending_raw = d->raw;
    b->pending_len = d->len;
    b->maybe_ready = true; /* more may be waiting behind it: the next fetch looks, and re-arms if none */
    b->h.on_deliver(b->arg, d);
}

/* The reply of the BLMOVE, or of the LINDEX that reads the inbox after a lent wait (nil when it is empty). */
static void on_block_reply(struct rconn *c, redisReply *r, void *arg, bool *steal)
{
    (void)c;
    (void)steal;
    struct redis_broker *b = arg;
    b->block_out = false;
    b->fetch_requested--;
    if (!r || r->type == REDIS_REPLY_NIL) {
        b->maybe_ready = true; /* the next fetch looks again, and waits again if the queue is empty */
        return;
    }
    if (r->type != REDIS_REPLY_STRING) {
        rconn_log(&b->main, BROKER_LOG_WARNING, "BLMOVE failed (%s); waiting on invalidations alone",
                  r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply");
        block_unusable(b);
        b->maybe_ready = true;
        return;
    }
    char *raw = r->str; /* taken over from the reply: freeReplyObject frees NULL */
    r->str = NULL;
    int fd = b->block.direct_fd; /* read into a memfd (rconn's direct_memfd): taken with its descriptor */
    b->block.direct_fd = -1;
    inbox_delivered(b, raw, r->len, fd);
}

static bool block_open(struct redis_broker *b);

static void redis_wait_took(struct broker *base, const char *raw, size_t len, int raw_fd, bool lend_over)
{
    struct redis_broker *b = (struct redis_broker *)base;
    if (!b->lent) {
        if (raw_fd >= 0) {
            munmap((void *)raw, len + 2);
            close(raw_fd);
        }
        return;
    }
    if (lend_over) {
        b->lent = false;
        b->fetch_requested--;
    }
    if (!raw) {
        /* Its borrower died running it before saying what it was: the inbox's newest (the borrower's BLMOVEs
         * are the only pushes while the wait is lent; the one before it may not be trimmed yet, its LTRIM is
         * on the main connection, ahead of this one's), read now on the blocking connection (idle while the
         * wait was lent: no other reply can come first). */
        redisReply *r = block_open(b) ? rconn_call(&b->block, "LINDEX %s 0", b->inbox) : NULL;
        if (r && r->type == REDIS_REPLY_STRING) {
            char *m = r->str;
            r->str = NULL;
            inbox_delivered(b, m, r->len, -1);
        }
        if (r)
            freeReplyObject(r);
        return;
    }
    if (raw_fd >= 0) {
        inbox_delivered(b, (char *)raw, len, raw_fd); /* the mapping is only read, and unmapped by its delivery */
        return;
    }
    char *copy = malloc(len + 1);
    if (!copy)
        abort();
    memcpy(copy, raw, len);
    copy[len] = '\0';
    inbox_delivered(b, copy, len, -1);
}

static void inbox_return(struct redis_broker *b, bool wait);

/* A lent wait ended with nothing run: its BLMOVE may still have moved a message into the inbox (its borrower
 * left it there, or lost its connection right after). Recalled: back to the queue. Otherwise read from the
 * inbox on the blocking connection, as a BLMOVE reply (a big one straight into a memfd): LINDEX, since the
 * settling (pending_resolve) takes it out of the inbox. */
static void redis_wait_ended(struct broker *base)
{
    struct redis_broker *b = (struct redis_broker *)base;
    if (!b->lent)
        return;
    b->lent = false;
    b->fetch_requested--;
    b->maybe_ready = true;
    if (b->lent_recalled || !rconn_connected(&b->main) || !rconn_connected(&b->block)) {
        inbox_return(b, false);
        return;
    }
    pending_resolve(b, false); /* never left for the end of the pass: the read waits for it */
    b->inbox_read_due = true;
    b->block_out = true; /* counted from now: nothing else may wait on the blocking connection meanwhile */
    b->fetch_requested++;
    if (b->inbox_ops == 0)
        inbox_read(b);
}

static void inbox_read(struct redis_broker *b)
{
    b->inbox_read_due = false;
    if (!rconn_connected(&b->main) || !rconn_connected(&b->block)) {
        b->block_out = false;
        b->fetch_requested--;
        inbox_return(b, false);
        return;
    }
    rconn_command(&b->block, on_block_reply, b, "LINDEX %s -1", b->inbox);
}

static bool block_open(struct redis_broker *b)
{
    if (rconn_connected(&b->block))
        return true;
    b->block.direct_memfd = true; /* a big message goes to the pool process in the memfd it was read into */
    if (rconn_open(&b->block, "broker-block", b->ep, 2000) == 0)
        return true;
    rconn_log(&b->main, BROKER_LOG_WARNING, "cannot open the blocking connection (%s); waiting on invalidations alone",
              b->block.errstr);
    block_unusable(b);
    return false;
}

/* Called by redis_fetch once the queues were found empty: one BLMOVE, which answers the moment a message
 * comes (the consumer asked for at least one). Without a single queue, a blocking connection or
 * invalidations, nothing is sent and the invalidations alone wake us. */
static void block_wait(struct redis_broker *b)
{
    b->block_armed = false;
    int q = single_queue(b);
    if (q < 0 || !b->block_ok || !b->tracking_on || b->block_out || b->lent || !block_open(b))
        return;
    if (b->inbox_queue != q && inbox_register(b, q, true) < 0) {
        rconn_log(&b->main, BROKER_LOG_WARNING, "cannot register the inbox; waiting on invalidations alone");
        block_unusable(b); /* not tried again on every idle turn */
        return;
    }
    b->block_queue = q;
    if (b->h.lend_wait && b->h.lend_wait(b->arg, b->keys[(size_t)q * NPRIO], b->inbox)) {
        b->lent = true;
        b->lent_recalled = false;
        b->fetch_requested++;
        return;
    }
    rconn_command(&b->block, on_block_reply, b, "BLMOVE %s %s RIGHT LEFT 0", b->keys[(size_t)q * NPRIO], b->inbox);
    b->block_queue = q;
    b->block_out = true;
    b->fetch_requested++;
}

/* Stops a waiting BLMOVE. Closing its connection is the only sure way (CLIENT UNBLOCK may overtake the
 * BLMOVE itself); what it may have moved meanwhile goes back to the queue. */
static void block_cancel(struct redis_broker *b, bool wait)
{
    b->block_armed = false;
    if (b->lent && !b->lent_recalled) { /* its end puts the inbox back */
        b->lent_recalled = true;
        b->h.recall_wait(b->arg);
    }
    if (!b->block_out)
        return;
    rconn_close(&b->block); /* on_block_reply(NULL) settles the count */
    inbox_return(b, wait);
}

static void send_acks(struct redis_broker *b);

/* Opens the connections and makes them ready to consume: scripts loaded (a restarted Redis has forgotten
 * them), wake-up channel set up, acks that never got their reply sent again (acking twice is harmless). */
static int connect_broker(struct redis_broker *b, int timeout_ms)
{
    if (rconn_open(&b->main, "broker", b->ep, timeout_ms) < 0)
        return -1;
    if (load_script(b, pop_script, b->pop_sha) < 0 || load_script(b, restore_script, b->restore_sha) < 0 ||
        load_script(b, unlock_script, b->unlock_sha) < 0 || load_script(b, inbox_record_script, b->record_sha) < 0 ||
        load_script(b, inbox_sweep_script, b->sweep_sha) < 0) {
        snprintf(b->main.errstr, sizeof b->main.errstr, "%s", b->errstr);
        rconn_close(&b->main);
        return -1;
    }
    b->errstr[0] = '\0';
    if (!b->lent) /* else the lent wait's end does it (it may be taking a message right now) */
        inbox_return(b, true); /* a BLMOVE of the lost connection may have moved one */
    setup_tracking(b, b->ep);
    b->maybe_ready = true;
    b->backoff = 0;
    send_acks(b);
    return 0;
}

static void lost(struct redis_broker *b, const char *why)
{
    if (why != b->errstr) /* callers pass b->errstr itself at times: snprintf may not copy onto its source */
        snprintf(b->errstr, sizeof b->errstr, "%s", why);
    rconn_log(&b->main, BROKER_LOG_ERROR,
              "consumer: Connection to broker lost (%s). Trying to re-establish the connection...", why);
    rconn_close(&b->main);
    rconn_close(&b->wake);
    rconn_close(&b->block);
    block_cancel(b, false); /* a lent wait: recalled */
    free(b->pending_tag); /* its record can no longer be written: the inbox goes back to the queue on reconnect */
    b->pending_tag = NULL;
    b->backoff = BACKOFF_MIN;
    b->next_reconnect = rconn_epoch() + b->backoff;
}

static bool redis_connected(const struct broker *base)
{
    const struct redis_broker *b = (const struct redis_broker *)base;
    return rconn_connected(&b->main);
}

static const struct broker_ops redis_ops;
static void redis_close(struct broker *base);
static int redis_restore_visible(struct broker *base, double now);

struct broker *redis_broker_open(const struct broker_endpoint *ep, const struct broker_options *opt,
                                 const struct broker_handlers *h, void *arg, char *err, size_t errlen)
{
    struct redis_broker *b = calloc(1, sizeof *b);
    if (!b)
        abort();
    b->base.ops = &redis_ops;
    b->h = *h;
    b->arg = arg;
    b->ep = ep;
    b->visibility_timeout = opt->visibility_timeout;
    b->main.log = b->wake.log = b->block.log = opt->log;
    b->inbox_queue = -1;
    b->block_ok = true;
    unsigned char rnd[8];
    if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd) {
        unsigned long long mix = (unsigned long long)getpid() * 0x9E3779B97F4A7C15ULL ^ (unsigned long long)time(NULL);
        memcpy(rnd, &mix, sizeof rnd);
    }
    int off = snprintf(b->inbox, sizeof b->inbox, "celeriac.inbox.");
    for (size_t i = 0; i < sizeof rnd; i++)
        off += snprintf(b->inbox + off, sizeof b->inbox - (size_t)off, "%02x", rnd[i]);
    b->nqueues = opt->nqueues;
    b->queues = calloc(opt->nqueues, sizeof *b->queues);
    b->queues_json = calloc(opt->nqueues, sizeof *b->queues_json);
    b->active = calloc(opt->nqueues, sizeof *b->active);
    b->keys = calloc(opt->nqueues * NPRIO, sizeof *b->keys);
    for (size_t q = 0; q < opt->nqueues; q++) {
        b->queues[q] = strdup(opt->queues[q]);
        b->queues_json[q] = json_escaped(opt->queues[q]);
        b->active[q] = true;
        for (size_t p = 0; p < NPRIO; p++) {
            size_t n = strlen(opt->queues[q]) + 4;
            b->keys[q * NPRIO + p] = malloc(n);
            broker_priority_key(b->keys[q * NPRIO + p], n, opt->queues[q], (int)p * 3);
        }
    }
    snprintf(b->tag_prefix, sizeof b->tag_prefix, "celeriac-%lx-%lx-", (unsigned long)getpid(),
             (unsigned long)time(NULL));

    if (connect_broker(b, 5000) < 0) {
        snprintf(err, errlen, "%s", b->main.errstr);
        goto fail;
    }
    double now = rconn_epoch();
    b->next_poll = now + POLL_FALLBACK_S;
    if (redis_restore_visible(&b->base, now) < 0) {
        snprintf(err, errlen, "%s", b->errstr);
        goto fail;
    }
    return &b->base;
fail:
    redis_close(&b->base);
    return NULL;
}

static void redis_close(struct broker *base)
{
    struct redis_broker *b = (struct redis_broker *)base;
    if (!b)
        return;
    /* A message still pending was neither acked nor held past a pass (its delivery may be freed by now): it
     * goes back to the queue with the inbox. First the BLMOVE, then whatever it moved back to the queue (after
     * every command already queued on this connection). */
    free(b->pending_tag);
    b->pending_tag = NULL;
    rconn_close(&b->block);
    inbox_return(b, true);
    b->ep = NULL; /* closing for good: batches still in flight are freed, not queued again */
    rconn_close(&b->main);
    rconn_close(&b->wake);
    free(b->main.q);
    free(b->wake.q);
    free(b->block.q);
    for (size_t q = 0; q < b->nqueues; q++) {
        free(b->queues[q]);
        free(b->queues_json[q]);
        for (size_t p = 0; p < NPRIO; p++)
            free(b->keys[q * NPRIO + p]);
    }
    free(b->queues);
    free(b->active);
    free(b->queues_json);
    free(b->keys);
    free(b->tracking_argv);
    free(b->tracking_lens);
    free(b->narrow_prefix);
    for (size_t i = 0; i < b->nacks; i++)
        free(b->acks[i]);
    free(b->acks);
    tagset_free(&b->held);
    free(b);
}

void broker_delivery_free(struct broker_delivery *d)
{
    if (!d)
        return;
    free(d->tag);
    if (d->raw_shared) {
        munmap(d->raw, d->len + 2);
        close(d->raw_fd);
    } else {
        free(d->raw);
    }
    free(d->msg_id);
    free(d);
}

const char *broker_delivery_identity(const struct broker_delivery *d)
{
    return d->msg_id ? d->msg_id : d->tag;
}

static const char *redis_errstr(const struct broker *base)
{
    const struct redis_broker *b = (const struct redis_broker *)base;
    return b->errstr[0] ? b->errstr : b->main.errstr;
}

static int redis_pollfds(struct broker *base, struct pollfd *fds, int max)
{
    struct redis_broker *b = (struct redis_broker *)base;
    int n = 0;
    if (n < max && rconn_connected(&b->main))
        fds[n++] = (struct pollfd){rconn_fd(&b->main), POLLIN | (rconn_wants_write(&b->main) ? POLLOUT : 0), 0};
    if (n < max && rconn_connected(&b->wake))
        fds[n++] = (struct pollfd){rconn_fd(&b->wake), POLLIN | (rconn_wants_write(&b->wake) ? POLLOUT : 0), 0};
    if (n < max && rconn_connected(&b->block))
        fds[n++] = (struct pollfd){rconn_fd(&b->block), POLLIN | (rconn_wants_write(&b->block) ? POLLOUT : 0), 0};
    return n;
}

static int process_conn(struct redis_broker *b, struct rconn *c, const struct pollfd *fds, int n)
{
    for (int i = 0; i < n; i++) {
        if (fds[i].fd != rconn_fd(c) || !fds[i].revents)
            continue;
        if ((fds[i].revents & POLLOUT) && rconn_flush(c) < 0)
            goto broken;
        if ((fds[i].revents & (POLLIN | POLLHUP | POLLERR)) && rconn_read(c) < 0)
            goto broken;
    }
    return 0;
broken:
    snprintf(b->errstr, sizeof b->errstr, "%s", c->errstr);
    rconn_close(c);
    return -1;
}

static int redis_process(struct broker *base, const struct pollfd *fds, int n)
{
    struct redis_broker *b = (struct redis_broker *)base;
    if (rconn_connected(&b->main) && process_conn(b, &b->main, fds, n) < 0) {
        lost(b, b->errstr);
        return 0;
    }
    if (rconn_connected(&b->wake) && process_conn(b, &b->wake, fds, n) < 0) {
        /* Losing the wake-up channel only costs latency: fall back to polling. */
        rconn_log(&b->main, BROKER_LOG_WARNING, "%s; polling the queues instead", b->errstr);
        b->errstr[0] = '\0';
        b->tracking = false;
    }
    if (rconn_connected(&b->block) && process_conn(b, &b->block, fds, n) < 0) {
        /* Only the fast idle wait is lost: reopened at the next one. */
        rconn_log(&b->main, BROKER_LOG_WARNING, "blocking connection lost (%s)", b->errstr);
        b->errstr[0] = '\0';
        inbox_return(b, false);
    }
    return 0;
}

struct ack_batch {
    struct redis_broker *b;
    char **tags; /* owned */
    size_t n;
};

static void push_ack(struct redis_broker *b, char *tag)
{
    if (b->nacks == b->cap_acks) {
        b->cap_acks = b->cap_acks ? b->cap_acks * 2 : 256;
        b->acks = realloc(b->acks, b->cap_acks * sizeof *b->acks);
        if (!b->acks)
            abort();
    }
    b->acks[b->nacks++] = tag;
}

/* The HDEL's reply settles the batch; without one (connection lost) the tags are acked again later. */
static void on_acked(struct rconn *c, redisReply *r, void *arg, bool *steal)
{
    (void)c;
    (void)steal;
    struct ack_batch *batch = arg;
    if (rconn_transient_error(r))
        r = NULL; /* not done: ack these again later, like after a lost connection */
    for (size_t i = 0; i < batch->n; i++) {
        if (r || !batch->b->ep)
            free(batch->tags[i]);
        else
            push_ack(batch->b, batch->tags[i]);
    }
    free(batch->tags);
    free(batch);
}

static void send_acks(struct redis_broker *b)
{
    if (!b->nacks || !rconn_connected(&b->main))
        return;
    size_t argc = b->nacks + 2;
    const char **argv = malloc(argc * sizeof *argv);
    size_t *lens = malloc(argc * sizeof *lens);
    struct ack_batch *batch = malloc(sizeof *batch);
    if (!argv || !lens || !batch)
        abort();
    for (size_t i = 0; i < b->nacks; i++) {
        argv[i + 2] = b->acks[i];
        lens[i + 2] = strlen(b->acks[i]);
    }
    argv[0] = "ZREM", lens[0] = 4, argv[1] = "unacked_index", lens[1] = 13;
    rconn_command_argv(&b->main, NULL, NULL, (int)argc, argv, lens);
    argv[0] = "HDEL", lens[0] = 4, argv[1] = "unacked", lens[1] = 7;
    *batch = (struct ack_batch){b, b->acks, b->nacks};
    b->acks = NULL;
    b->nacks = b->cap_acks = 0;
    rconn_command_argv(&b->main, on_acked, batch, (int)argc, argv, lens);
    free(argv);
    free(lens);
}

static int redis_flush(struct broker *base)
{
    struct redis_broker *b = (struct redis_broker *)base;
    pending_resolve(b, false); /* still held at the end of the pass: recorded as unacked */
    send_acks(b);
    if (rconn_connected(&b->main) && rconn_flush(&b->main) < 0)
        lost(b, b->main.errstr);
    if (rconn_connected(&b->block) && rconn_flush(&b->block) < 0) {
        rconn_close(&b->block);
        inbox_return(b, false);
    }
    return 0;
}

/* Messages this worker still holds (reserved, or running with late ack) get a fresh unacked_index score
 * well within every visibility timeout, so no kombu consumer restores them while we are alive and a long
 * task is not run twice (celery #2599, kombu #337). Once we die the scores age and they become restorable
 * as usual. ZADD XX: a record acked meanwhile is not brought back. */
static void refresh_held(struct redis_broker *b, double now)
{
    double period = b->visibility_timeout / 4;
    b->next_refresh = now + (period < 0.25 ? 0.25 : period > 30 ? 30 : period);
    if (b->inbox_queue >= 0)
        inbox_register(b, b->inbox_queue, false);
    if (!b->held.live)
        return;
    size_t argc = 3 + 2 * b->held.live, a = 0;
    const char **argv = malloc(argc * sizeof *argv);
    size_t *lens = malloc(argc * sizeof *lens);
    if (!argv || !lens)
        abort();
    char score[32];
    snprintf(score, sizeof score, "%.6f", now);
    argv[a++] = "ZADD";
    argv[a++] = "unacked_index";
    argv[a++] = "XX";
    for (size_t i = 0; i < b->held.cap && a + 2 <= argc; i++) {
        if (!b->held.slots[i] || b->held.slots[i] == TOMBSTONE)
            continue;
        argv[a++] = score;
        argv[a++] = b->held.slots[i];
    }
    for (size_t i = 0; i < a; i++)
        lens[i] = strlen(argv[i]);
    rconn_command_argv(&b->main, NULL, NULL, (int)a, argv, lens);
    free(argv);
    free(lens);
}

static void retrack(struct redis_broker *b);

static void redis_tick(struct broker *base, double now)
{
    struct redis_broker *b = (struct redis_broker *)base;
    if (!rconn_connected(&b->main)) {
        if (now < b->next_reconnect)
            return;
        if (connect_broker(b, 1000) == 0) {
            rconn_log(&b->main, BROKER_LOG_WARNING, "consumer: Reconnected to %s; consuming again", b->ep->display);
            redis_restore_visible(&b->base, now);
            return;
        }
        b->backoff = b->backoff < BACKOFF_MIN ? BACKOFF_MIN : b->backoff * 2;
        if (b->backoff > BACKOFF_MAX)
            b->backoff = BACKOFF_MAX;
        rconn_log(&b->main, BROKER_LOG_ERROR, "consumer: Cannot connect to %s: %s. Trying again in %.2f seconds...",
                  b->ep->display, b->main.errstr, b->backoff);
        b->next_reconnect = now + b->backoff;
        return;
    }
    if (b->retrack_wide)
        retrack(b); /* here rather than where the BLMOVE failed: it makes blocking calls on the main connection */
    if (now >= b->next_poll) {
        /* With tracking this is only a safety net against a lost invalidation; without it, the poll. */
        b->maybe_ready = true;
        b->next_poll = now + (b->tracking ? 1.0 : POLL_FALLBACK_S);
    }
    if (now >= b->next_refresh)
        refresh_held(b, now);
    if (now >= b->next_restore)
        redis_restore_visible(&b->base, now);
}

static int redis_next_tick_ms(const struct broker *base, double now)
{
    const struct redis_broker *b = (const struct redis_broker *)base;
    double next = b->next_poll < b->next_restore ? b->next_poll : b->next_restore;
    if (b->next_refresh < next)
        next = b->next_refresh;
    if (!rconn_connected(&b->main))
        next = b->next_reconnect;
    double ms = (next - now) * 1000.0;
    return ms < 0 ? 0 : ms > 1000 ? 1000 : (int)ms + 1;
}

static bool redis_should_fetch(const struct broker *base)
{
    const struct redis_broker *b = (const struct redis_broker *)base;
    return rconn_connected(&b->main) &&
           ((b->fetches < MAX_FETCHES && b->maybe_ready) || (b->block_armed && !b->block_out && !b->lent));
}

static int redis_fetch_in_flight(const struct broker *base)
{
    const struct redis_broker *b = (const struct redis_broker *)base;
    return b->fetch_requested;
}

static int redis_fetch_blocked(const struct broker *base)
{
    const struct redis_broker *b = (const struct redis_broker *)base;
    return b->block_out || b->lent ? 1 : 0;
}

static size_t redis_pending(const struct broker *base)
{
    const struct redis_broker *b = (const struct redis_broker *)base;
    return rconn_connected(&b->main) ? rconn_pending(&b->main) + b->nacks : 0;
}

static void on_fetch_reply(struct rconn *c, redisReply *r, void *arg, bool *steal)
{
    (void)c;
    (void)steal;
    struct fetch *f = arg;
    struct redis_broker *b = f->b;
    int requested = f->requested;
    b->fetch_requested -= requested;
    b->fetches--;
    if (!r || r->type != REDIS_REPLY_ARRAY) {
        if (r && r->type == REDIS_REPLY_ERROR) {
            rconn_log(&b->main, BROKER_LOG_WARNING, "fetch script failed: %s", r->str);
            b->maybe_ready = false; /* retried by the next poll tick instead of spinning */
        }
        free(f);
        return;
    }
    int got = (int)(r->elements / 3);
    int last_queue = -1;
    for (size_t i = 0; i + 2 < r->elements; i += 3) {
        redisReply *tag = r->element[i], *msg = r->element[i + 1], *idx = r->element[i + 2];
        if (tag->type != REDIS_REPLY_STRING || msg->type != REDIS_REPLY_STRING || idx->type != REDIS_REPLY_INTEGER)
            continue;
        struct broker_delivery *d = calloc(1, sizeof *d);
        if (!d)
            abort();
        /* Take the message buffer over from the reply instead of copying it: freeReplyObject frees NULL. */
        d->raw = msg->str;
        d->len = msg->len;
        msg->str = NULL;
        d->tag = strdup(tag->str);
        long long list = idx->integer - 1;
        bool known = list >= 0 && (size_t)list < f->nq * NPRIO;
        d->queue = known ? f->list_queue[list] : 0;
        d->priority = known ? (int)((size_t)list / f->nq) * 3 : 0;
        last_queue = d->queue;
        tagset_add(&b->held, d->tag);
        b->h.on_deliver(b->arg, d);
    }
    if (last_queue >= 0 && b->nqueues > 1) /* kombu moves the queue that delivered to the end */
        b->rotation = ((size_t)last_queue + 1) % b->nqueues;
    if (!b->tracking) {
        b->maybe_ready = got == requested; /* polling mode: the tick sets it again */
    } else if (got == requested) {
        /* Busy: invalidations would only wake us for nothing (every result key written under the queue's
         * prefix sends one), so switch them off until the queues look empty again. */
        if (b->tracking_on)
            rconn_command(&b->main, NULL, NULL, "CLIENT TRACKING OFF");
        b->tracking_on = false;
        b->maybe_ready = true;
        b->block_armed = false;
    } else if (!b->tracking_on) {
        /* Empty again: switch invalidations on and look once more, since a message pushed between that
         * fetch and this command sent no invalidation. Redis runs both in order on this connection. */
        rconn_command_argv(&b->main, NULL, NULL, b->tracking_argc, b->tracking_argv, b->tracking_lens);
        b->tracking_on = true;
        b->maybe_ready = true;
    } else {
        b->maybe_ready = b->wake_seq != f->wake_seq;
        /* Empty, and nothing announced since it ran: the next fetch waits in BLMOVE. */
        b->block_armed = !b->maybe_ready && b->block_ok;
    }
    free(f);
}

static void redis_fetch(struct broker *base, int max)
{
    struct redis_broker *b = (struct redis_broker *)base;
    if (max <= 0)
        return;
    if (!b->maybe_ready) {
        if (b->block_armed)
            block_wait(b);
        return;
    }
    if (b->fetches >= MAX_FETCHES)
        return;
    if (max > MAX_FETCH)
        max = MAX_FETCH;
    size_t nq = 0;
    for (size_t q = 0; q < b->nqueues; q++)
        nq += b->active[q];
    if (!nq)
        return; /* every queue cancelled: nothing to ask */
    size_t nkeys = nq * NPRIO;
    size_t argc = 3 + 2 + nkeys + 3 + nkeys;
    struct fetch *f = malloc(sizeof *f + nkeys * sizeof *f->list_queue);
    if (!f)
        abort();
    f->b = b;
    f->nq = nq;
    f->requested = max;
    f->wake_seq = b->wake_seq;
    const char **argv = malloc(argc * sizeof *argv);
    size_t *lens = malloc(argc * sizeof *lens);
    if (!argv || !lens)
        abort();
    char nk[16], maxs[16], score[32], prefix[80];
    snprintf(nk, sizeof nk, "%zu", nkeys + 2);
    snprintf(maxs, sizeof maxs, "%d", max);
    snprintf(score, sizeof score, "%.6f", rconn_epoch());
    snprintf(prefix, sizeof prefix, "%s%llu-", b->tag_prefix, ++b->fetch_count);
    size_t a = 0;
    argv[a++] = "EVALSHA";
    argv[a++] = b->pop_sha;
    argv[a++] = nk;
    argv[a++] = "unacked_index";
    argv[a++] = "unacked";
    /* Priority-major across the consumed queues (kombu's BRPOP key order), starting at the round-robin
     * position. */
    size_t first_key = a;
    for (size_t p = 0; p < NPRIO; p++) {
        for (size_t i = 0; i < b->nqueues; i++) {
            size_t q = (b->rotation + i) % b->nqueues;
            if (!b->active[q])
                continue;
            f->list_queue[a - first_key] = (int)q;
            argv[a++] = b->keys[q * NPRIO + p];
        }
    }
    argv[a++] = maxs;
    argv[a++] = score;
    argv[a++] = prefix;
    for (size_t i = 0; i < nkeys; i++)
        argv[a++] = b->queues_json[f->list_queue[i]];
    for (size_t i = 0; i < a; i++)
        lens[i] = strlen(argv[i]);
    b->fetch_requested += max;
    b->fetches++;
    rconn_command_argv(&b->main, on_fetch_reply, f, (int)a, argv, lens);
    free(argv);
    free(lens);
}

static void redis_ack(struct broker *base, const char *tag)
{
    struct redis_broker *b = (struct redis_broker *)base;
    if (!tagset_remove(&b->held, tag))
        return; /* requeued or acked already: acking twice would be harmless, but it is a bug upstream */
    if (is_pending(b, tag)) {
        pending_resolve(b, true); /* never recorded: it only leaves the inbox */
        return;
    }
    push_ack(b, strdup(tag));
}

/* The message with headers.redelivered and properties.delivery_info.redelivered set, as kombu restores it.
 * A message that is not a JSON object goes back unchanged: it is rejected again, with a log line, when it is
 * next consumed, which is better than dropping it here. Caller frees with free(). */
static char *mark_redelivered(const char *raw, size_t len)
{
    json_error_t jerr;
    json_t *msg = json_loadb(raw, len, JSON_ALLOW_NUL, &jerr);
    char *out = NULL;
    if (msg && json_is_object(msg)) {
        json_t *headers = json_object_get(msg, "headers");
        if (json_is_object(headers))
            json_object_set_new(headers, "redelivered", json_true());
        json_t *props = json_object_get(msg, "properties");
        json_t *info = json_is_object(props) ? json_object_get(props, "delivery_info") : NULL;
        if (json_is_object(info))
            json_object_set_new(info, "redelivered", json_true());
        out = json_dumps(msg, JSON_REAL_PRECISION(17));
    }
    json_decref(msg);
    if (!out) {
        out = malloc(len + 1);
        if (!out)
            abort();
        memcpy(out, raw, len);
        out[len] = '\0';
    }
    return out;
}

static void restore_to(struct redis_broker *b, const char *tag, const char *payload, size_t payload_len,
                       const char *const *queues, size_t nqueues, const char *end, bool wait)
{
    size_t argc = 3 + 2 + nqueues + 3;
    const char **argv = malloc(argc * sizeof *argv);
    size_t *lens = malloc(argc * sizeof *lens);
    if (!argv || !lens)
        abort();
    char nk[16];
    snprintf(nk, sizeof nk, "%zu", nqueues + 2);
    size_t a = 0;
    argv[a++] = "EVALSHA";
    argv[a++] = b->restore_sha;
    argv[a++] = nk;
    argv[a++] = "unacked_index";
    argv[a++] = "unacked";
    for (size_t i = 0; i < nqueues; i++)
        argv[a++] = queues[i];
    argv[a++] = tag;
    argv[a++] = payload;
    argv[a++] = end;
    for (size_t i = 0; i < a; i++)
        lens[i] = argv[i] == payload ? payload_len : strlen(argv[i]);
    if (wait) {
        redisReply *r = rconn_call_argv(&b->main, (int)a, argv, lens);
        if (r)
            freeReplyObject(r);
    } else {
        rconn_command_argv(&b->main, NULL, NULL, (int)a, argv, lens);
    }
    free(argv);
    free(lens);
}

static void redis_requeue(struct broker *base, const struct broker_delivery *d)
{
    struct redis_broker *b = (struct redis_broker *)base;
    if (is_pending(b, d->tag))
        pending_resolve(b, false); /* recorded first: the restore below needs the record */
    if (!tagset_remove(&b->held, d->tag))
        return;
    char *payload = mark_redelivered(d->raw, d->len);
    const char *queue = b->queues[d->queue];
    restore_to(b, d->tag, payload, strlen(payload), &queue, 1, "R", false);
    free(payload);
}

static void redis_defer(struct broker *base, const struct broker_delivery *d, double expires)
{
    (void)expires; /* kombu's Redis transport has no per-message time to live */
    struct redis_broker *b = (struct redis_broker *)base;
    if (is_pending(b, d->tag))
        pending_resolve(b, false);
    if (!tagset_remove(&b->held, d->tag))
        return;
    /* Back where a publisher would have put it: its own priority list, at the far end, unchanged (not
     * marked redelivered: it was never handed to a task). */
    int list = d->priority < 0 ? 0 : d->priority > 9 ? NPRIO - 1 : d->priority / 3; /* 0..3 */
    const char *dest = b->keys[(size_t)d->queue * NPRIO + (size_t)list];
    restore_to(b, d->tag, d->raw, d->len, &dest, 1, "L", false);
}

/* The queues a kombu record [message, exchange, routing_key] goes back to: the routing key itself for the
 * default exchange, else the queues bound to the exchange with that routing key. Caller frees each and the
 * array. */
static size_t route_record(struct redis_broker *b, const char *exchange, const char *routing_key, char ***out)
{
    *out = NULL;
    if (!exchange[0]) {
        *out = malloc(sizeof **out);
        (*out)[0] = strdup(routing_key);
        return 1;
    }
    redisReply *r = rconn_call(&b->main, "SMEMBERS _kombu.binding.%s", exchange);
    size_t n = 0;
    if (r && r->type == REDIS_REPLY_ARRAY) {
        *out = calloc(r->elements + 1, sizeof **out);
        for (size_t i = 0; i < r->elements; i++) {
            /* routing_key SEP pattern SEP queue */
            const char *m = r->element[i]->str;
            const char *s1 = m ? strstr(m, SEP) : NULL;
            const char *s2 = s1 ? strstr(s1 + 2, SEP) : NULL;
            if (!s2 || (size_t)(s1 - m) != strlen(routing_key) || strncmp(m, routing_key, (size_t)(s1 - m)) != 0)
                continue;
            (*out)[n++] = strdup(s2 + 2);
        }
    }
    if (r)
        freeReplyObject(r);
    return n;
}

static int restore_one(struct redis_broker *b, const char *tag)
{
    redisReply *r = rconn_call(&b->main, "HGET unacked %s", tag);
    if (!r)
        return -1;
    int restored = 0;
    json_t *rec = r->type == REDIS_REPLY_STRING ? json_loadb(r->str, r->len, 0, NULL) : NULL;
    json_t *m = json_array_get(rec, 0);
    const char *ex = json_string_value(json_array_get(rec, 1));
    const char *rk = json_string_value(json_array_get(rec, 2));
    if (!m || !ex || !rk) {
        if (r->type == REDIS_REPLY_STRING)
            rconn_log(&b->main, BROKER_LOG_WARNING, "unacked record %s is not [message, exchange, routing_key]; left as is", tag);
        else /* gone: someone else restored or acked it meanwhile; drop its index entry if left */
            rconn_command(&b->main, NULL, NULL, "ZREM unacked_index %s", tag);
        goto out;
    }
    char *payload;
    if (json_is_string(m)) { /* recorded as a string by the fetch script because it was not JSON */
        payload = strdup(json_string_value(m));
    } else {
        char *dumped = json_dumps(m, JSON_REAL_PRECISION(17));
        payload = mark_redelivered(dumped, strlen(dumped));
        free(dumped);
    }
    char **queues;
    size_t nq = route_record(b, ex, rk, &queues);
    if (nq) {
        restore_to(b, tag, payload, strlen(payload), (const char *const *)queues, nq, "R", true);
        restored = 1;
    } else {
        rconn_log(&b->main, BROKER_LOG_WARNING, "no queue bound for unacked record %s (exchange '%s', key '%s'); left as is",
                tag, ex, rk);
    }
    for (size_t i = 0; i < nq; i++)
        free(queues[i]);
    free(queues);
    free(payload);
out:
    json_decref(rec);
    freeReplyObject(r);
    return restored;
}

static int redis_restore_visible(struct broker *base, double now)
{
    struct redis_broker *b = (struct redis_broker *)base;
    double period = b->visibility_timeout < 60 ? b->visibility_timeout : 60;
    b->next_restore = now + (period < 1 ? 1 : period);
    if (!rconn_connected(&b->main))
        return 0;
    if (!rconn_connected(&b->main))
        return -1;
    char token[64];
    snprintf(token, sizeof token, "%s%.6f", b->tag_prefix, now);
    redisReply *lock = rconn_call(&b->main, "SET unacked_mutex %s PX 300000 NX", token);
    if (!lock)
        return -1;
    bool held = lock->type == REDIS_REPLY_STATUS;
    freeReplyObject(lock);
    if (!held)
        return 0; /* another consumer is restoring right now */
    int restored = 0;
    char ceiling[32];
    snprintf(ceiling, sizeof ceiling, "%.6f", now - b->visibility_timeout);
    redisReply *r = rconn_call(&b->main, "ZREVRANGEBYSCORE unacked_index %s 0 WITHSCORES", ceiling);
    for (size_t i = 0; r && r->type == REDIS_REPLY_ARRAY && i + 1 < r->elements; i += 2) {
        const char *tag = r->element[i]->str;
        if (!tag || tagset_has(&b->held, tag))
            continue; /* ours and still being worked on */
        int rc = restore_one(b, tag);
        if (rc < 0)
            break;
        restored += rc;
    }
    if (r)
        freeReplyObject(r);
    redisReply *sw = rconn_call(&b->main, "EVALSHA %s 1 %s %.6f %s stale", b->sweep_sha, INBOX_REGISTRY, now, b->inbox);
    if (sw && sw->type == REDIS_REPLY_INTEGER && sw->integer > 0) {
        rconn_log(&b->main, BROKER_LOG_WARNING, "put %lld message(s) left in the inboxes of workers gone back on "
                  "their queues", sw->integer);
        restored += (int)sw->integer;
    }
    if (sw)
        freeReplyObject(sw);
    redisReply *u = rconn_call(&b->main, "EVALSHA %s 1 unacked_mutex %s", b->unlock_sha, token);
    if (u)
        freeReplyObject(u);
    if (restored)
        rconn_log(&b->main, BROKER_LOG_WARNING, "restored %d unacked message(s) older than the visibility timeout", restored);
    return restored;
}

/* The tracking prefixes follow the consumed queues: switched off, then set up again from scratch (Redis refuses
 * prefixes that overlap ones already registered). Blocking for a round trip or two: control commands only. */
static void retrack(struct redis_broker *b)
{
    block_cancel(b, true); /* it waits on one queue of the old set */
    b->maybe_ready = true; /* a queue just added may hold messages */
    if (!rconn_connected(&b->main))
        return; /* connect_broker sets tracking up when it reconnects */
    redisReply *r = rconn_call(&b->main, "CLIENT TRACKING OFF");
    if (r)
        freeReplyObject(r);
    if (rconn_connected(&b->main))
        setup_tracking(b, b->ep);
}

static int redis_add_queue(struct broker *base, const char *queue)
{
    struct redis_broker *b = (struct redis_broker *)base;
    for (size_t q = 0; q < b->nqueues; q++) {
        if (strcmp(b->queues[q], queue) == 0) {
            if (!b->active[q]) {
                b->active[q] = true;
                retrack(b);
            }
            return 0;
        }
    }
    if (b->nqueues >= 63) {
        snprintf(b->errstr, sizeof b->errstr, "more than 63 queues");
        return -1;
    }
    size_t q = b->nqueues;
    b->queues = realloc(b->queues, (q + 1) * sizeof *b->queues);
    b->queues_json = realloc(b->queues_json, (q + 1) * sizeof *b->queues_json);
    b->active = realloc(b->active, (q + 1) * sizeof *b->active);
    b->keys = realloc(b->keys, (q + 1) * NPRIO * sizeof *b->keys);
    if (!b->queues || !b->queues_json || !b->active || !b->keys)
        abort();
    b->queues[q] = strdup(queue);
    b->queues_json[q] = json_escaped(queue);
    if (!b->queues[q] || !b->queues_json[q])
        abort();
    b->active[q] = true;
    for (size_t p = 0; p < NPRIO; p++) {
        size_t n = strlen(queue) + 4;
        b->keys[q * NPRIO + p] = malloc(n);
        if (!b->keys[q * NPRIO + p])
            abort();
        broker_priority_key(b->keys[q * NPRIO + p], n, queue, (int)p * 3);
    }
    b->nqueues++;
    retrack(b);
    return 0;
}

static int redis_cancel_queue(struct broker *base, const char *queue)
{
    struct redis_broker *b = (struct redis_broker *)base;
    for (size_t q = 0; q < b->nqueues; q++) {
        if (strcmp(b->queues[q], queue) == 0 && b->active[q]) {
            b->active[q] = false;
            retrack(b);
            return 0;
        }
    }
    return -1;
}

static size_t redis_queue_count(const struct broker *base)
{
    const struct redis_broker *b = (const struct redis_broker *)base;
    return b->nqueues;
}

static const char *redis_queue_name(const struct broker *base, size_t i, bool *consumed)
{
    const struct redis_broker *b = (const struct redis_broker *)base;
    *consumed = b->active[i];
    return b->queues[i];
}

/* Fetches are pulled (broker_fetch): only a waiting BLMOVE has to be stopped. */
static void redis_pause(struct broker *base)
{
    block_cancel((struct redis_broker *)base, true);
}

/* An unacked record outlives connections: nothing is taken back behind the worker's back. */
static bool redis_delivery_lost(const struct broker *base, const struct broker_delivery *d)
{
    (void)base, (void)d;
    return false;
}

static const struct broker_ops redis_ops = {
    redis_close, redis_pollfds, redis_process, redis_flush, redis_connected, redis_tick, redis_next_tick_ms,
    redis_should_fetch, redis_fetch, redis_pause, redis_fetch_in_flight, redis_pending, redis_ack, redis_requeue,
    redis_defer, redis_restore_visible, redis_errstr, redis_add_queue, redis_cancel_queue, redis_queue_count,
    redis_queue_name, redis_delivery_lost,
    redis_ack, /* reject: kombu's Redis transport drops a rejected message as an ack does */
    redis_fetch_blocked, redis_wait_took, redis_wait_ended,
};
