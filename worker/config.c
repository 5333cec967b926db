/* config: argv + environment -> struct config, and Redis URL parsing.
 *
 * DESIGN: every option is one row of options[] (names, type, where the value lands in struct config,
 * environment variable, default, help). The argv loop, the environment fallback, the defaults and --help are
 * all driven by that table, so a new flag is a new row. Values are converted and checked as they are met, so
 * an error names the option as the user spelled it. Runs once, in the main process, before anything starts.
 *
 * Celery facts this follows (celery/bin/worker.py, celery/utils/nodenames.py, kombu/utils/url.py):
 * -c 0 and --prefetch-multiplier 0 fall back to the default (`value or conf.default`); -n without '@' is a
 * host ("foo" -> "celeriac@foo"), then %h %n %d %i %I are expanded against the machine's hostname; an
 * empty environment variable counts as unset (click). */
#include "config.h"

#include "amqp_broker.h"
#include "buf.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#define ERR_PREFIX "celeriac: error: "
#define DEFAULT_PORT 6379

enum opt_type { OPT_BOOL, OPT_INT, OPT_LONG, OPT_DOUBLE, OPT_STRING, OPT_URL, OPT_LIST, OPT_LEVEL, OPT_HELP, OPT_VERSION };

struct option_spec {
    const char *long_name; /* without the leading "--" */
    char short_name;       /* 0 if none */
    enum opt_type type;
    size_t offset;         /* of the target field in struct config; unused by OPT_HELP/OPT_VERSION */
    const char *env;       /* read when the flag is absent, or NULL */
    const char *def;       /* applied as if given on the command line when neither flag nor env is, or NULL */
    const char *metavar;   /* NULL for flags without a value */
    const char *help;      /* NULL hides the row from --help (aliases) */
};

#define FIELD(f) offsetof(struct config, f)
static const struct option_spec options[] = {
    {"queues", 'Q', OPT_LIST, FIELD(queues), NULL, "celery", "QUEUE[,QUEUE...]",
     "queues to consume from; comma-separated, repeatable"},
    {"concurrency", 'c', OPT_INT, FIELD(concurrency), NULL, NULL, "N",
     "tasks run in parallel [default: number of cores]"},
    {"hostname", 'n', OPT_STRING, FIELD(node_name), NULL, NULL, "NAME",
     "node name, e.g. 'w1@%h'; expands %h (hostname), %n (name), %d (domain) [default: celeriac@<hostname>]"},
    {"task-events", 'E', OPT_BOOL, FIELD(send_events), NULL, NULL, NULL, "send task events for monitors (or --events)"},
    {"events", 0, OPT_BOOL, FIELD(send_events), NULL, NULL, NULL, NULL},
    {"loglevel", 'l', OPT_LEVEL, FIELD(log_level), NULL, "warning", "LEVEL",
     "debug, info, warning, error or critical"},
    {"prefetch-multiplier", 0, OPT_INT, FIELD(prefetch_multiplier), NULL, "4", "N",
     "messages reserved per pool slot"},
    {"acks-late", 0, OPT_BOOL, FIELD(acks_late), NULL, NULL, NULL,
     "acknowledge a message after its result is stored, not before the task runs"},
    {"track-started", 0, OPT_BOOL, FIELD(track_started), NULL, NULL, NULL, "store a STARTED state when a task begins"},
    {"broker", 'b', OPT_URL, FIELD(broker_url), "CELERY_BROKER_URL", "redis://127.0.0.1:6379/0", "URL",
     "broker: redis://[[user]:password@]host[:port][/db] or redis+socket:///path[?virtual_host=db]"},
    {"result-backend", 0, OPT_URL, FIELD(result_backend), "CELERY_RESULT_BACKEND", NULL, "URL",
     "where results are stored (same URL forms) [default: none, results are not stored]"},
    {"visibility-timeout", 0, OPT_DOUBLE, FIELD(visibility_timeout), NULL, "3600", "SECONDS",
     "seconds before an unacknowledged message is restored to its queue"},
    {"enable-test-tasks", 0, OPT_BOOL, FIELD(enable_test_tasks), NULL, NULL, NULL,
     "register native.crash, which kills its own process (for testing isolation)"},
    {"max-tasks-per-child", 0, OPT_INT, FIELD(max_tasks_per_child), NULL, NULL, "N",
     "replace a pool process after it has run N tasks [default: never]"},
    {"max-memory-per-child", 0, OPT_INT, FIELD(max_memory_per_child), NULL, NULL, "KIB",
     "replace a pool process after a task leaves it above KIB kilobytes resident [default: never]"},
    {"max-message-size", 0, OPT_LONG, FIELD(max_message_size), NULL, "67108864", "BYTES",
     "refuse messages larger than this (FAILURE when their id can be read)"},
    {"time-limit", 0, OPT_DOUBLE, FIELD(time_limit), NULL, NULL, "SECONDS",
     "hard time limit: a task running longer is killed, FAILURE TimeLimitExceeded [default: none]"},
    {"soft-time-limit", 0, OPT_DOUBLE, FIELD(soft_time_limit), NULL, NULL, "SECONDS",
     "soft time limit: the task is told and fails with SoftTimeLimitExceeded [default: none]"},
    {"autoscale", 0, OPT_STRING, FIELD(autoscale), NULL, NULL, "MAX[,MIN]",
     "grow the pool up to MAX processes while tasks wait, shrink it back to MIN once idle (Celery's --autoscale)"},
    {"max-eta-reserved", 0, OPT_LONG, FIELD(max_eta_reserved), NULL, "1000", "N",
     "ETA/countdown tasks held in memory at most; more go back to the queue until there is room (0: no cap)"},
    {"default-queue", 0, OPT_STRING, FIELD(default_queue), NULL, "celery", "QUEUE",
     "where tasks this worker sends on (chains, callbacks) go when they are not native here and name no queue "
     "(Celery's task_default_queue)"},
    {"result-expires", 0, OPT_LONG, FIELD(result_expires), NULL, "86400", "SECONDS",
     "seconds results are kept; 0 keeps them forever"},
    {"database-url", 0, OPT_STRING, FIELD(database_url), "DATABASE_URL", NULL, "URL",
     "PostgreSQL for the native.pg_* tasks: postgresql://user:password@host:port/db or 'host=... dbname=...' "
     "[default: libpq's PG* variables]"},
    {"pg-tables", 0, OPT_STRING, FIELD(pg_tables), "CELERIAC_PG_TABLES", NULL, "TABLE[,TABLE...]",
     "tables (name or schema.name) the native.pg_* tasks may touch [default: none]"},
    {"http-port", 0, OPT_INT, FIELD(http_port), NULL, NULL, "PORT",
     "serve /healthz, /readyz and /metrics (Prometheus) on this port [default: no HTTP server]"},
    {"http-bind", 0, OPT_STRING, FIELD(http_bind), NULL, "0.0.0.0", "ADDR",
     "IPv4 address the HTTP server listens on"},
    {"tasks", 0, OPT_STRING, FIELD(tasks_path), "CELERIAC_TASKS", NULL, "PATH",
     "task modules to load: a .so, a directory of .so files, or a directory of .c files (built first)"},
    {"dev", 0, OPT_BOOL, FIELD(dev), NULL, NULL, NULL,
     "watch the --tasks directory of .c files; rebuild and swap modules in on every change"},
    {"help", 0, OPT_HELP, 0, NULL, NULL, NULL, "show this help and exit"},
    {"version", 0, OPT_VERSION, 0, NULL, NULL, NULL, "show the version and exit"},
};
#define NOPTIONS (sizeof options / sizeof options[0])

static const struct {
    const char *name;
    enum log_level level;
} levels[] = {
    {"debug", LOG_DEBUG}, {"info", LOG_INFO},   {"warning", LOG_WARNING},   {"warn", LOG_WARNING},
    {"error", LOG_ERROR}, {"fatal", LOG_CRITICAL}, {"critical", LOG_CRITICAL},
};

/* Broker schemes known to Celery that celeriac has no transport for. AMQP URLs go to broker/amqp.h's check. */
static const char *const pending_broker_schemes[] = {"sqs", "qpid"};

/* Like every allocation in this program, failure aborts (see buf.h). Caller frees with free(). */
static char *dup_n(const char *s, size_t n)
{
    char *p = strndup(s, n);
    if (!p)
        abort();
    return p;
}

__attribute__((format(printf, 3, 4))) static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    int n = snprintf(err, errlen, ERR_PREFIX);
    va_start(ap, fmt);
    if (n >= 0 && (size_t)n < errlen)
        vsnprintf(err + n, errlen - (size_t)n, fmt, ap);
    va_end(ap);
    return -1;
}

/* Digits only (no sign, no spaces), value <= max. Returns 0, -1 if not a number, -2 if too large. */
static int parse_digits(const char *s, size_t n, long max, long *out)
{
    long v = 0;
    if (!n)
        return -1;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        if (v > (max - (s[i] - '0')) / 10)
            return -2;
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return 0;
}

static int hexval(int ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    ch |= 0x20;
    return ch >= 'a' && ch <= 'f' ? ch - 'a' + 10 : -1;
}

/* s[0..n) percent-decoded into a new string (caller frees with free()), or NULL when empty, as kombu turns
 * '' into None. A malformed escape stays as written, as in Python's unquote. *bad is set when the result
 * would hold a NUL byte, which a C string cannot carry. */
static char *decode(const char *s, size_t n, bool *bad)
{
    struct buf b = {0};
    for (size_t i = 0; i < n; i++) {
        int hi = -1, lo = -1;
        if (s[i] == '%' && i + 2 < n && (hi = hexval(s[i + 1])) >= 0 && (lo = hexval(s[i + 2])) >= 0) {
            char ch = (char)(hi * 16 + lo);
            *bad |= ch == '\0';
            buf_append_char(&b, ch);
            i += 2;
        } else {
            buf_append_char(&b, s[i]);
        }
    }
    if (!b.len) {
        buf_free(&b);
        return NULL;
    }
    return buf_steal(&b);
}

/* s[0..len) equals word, ignoring case (URL schemes are case-insensitive; query keys are lenient too). */
static bool span_is(const char *s, size_t len, const char *word)
{
    return strlen(word) == len && strncasecmp(s, word, len) == 0;
}

/* The database number: kombu drops one '/' from the path, then treats "" and "/" as 0 and drops one more. */
static const char *parse_db_path(const char *p, size_t n, int *db)
{
    long v = 0;
    if (n && *p == '/')
        p++, n--;
    if (n && *p == '/')
        p++, n--;
    if (!n)
        return NULL;
    switch (parse_digits(p, n, INT_MAX, &v)) {
    case -1: return "the database is not a number";
    case -2: return "the database number is too large";
    }
    *db = (int)v;
    return NULL;
}

/* what: "Redis", "broker", "result backend", for the message. Same ownership as redis_url_parse. */
static int parse_url_as(const char *what, const char *url, struct redis_url *out, char *err, size_t errlen)
{
    const char *why = NULL;
    bool bad = false, socket = false;
    memset(out, 0, sizeof *out);
    out->port = DEFAULT_PORT;

    const char *sep = strstr(url, "://");
    size_t slen = sep ? (size_t)(sep - url) : 0;
    if (!sep)
        why = "not a URL (expected redis://host:port/db)";
    else if (span_is(url, slen, "redis+socket") || span_is(url, slen, "unix"))
        socket = true;
    else if (span_is(url, slen, "rediss"))
        why = "rediss:// (Redis over TLS) is not supported yet";
    else if (!span_is(url, slen, "redis"))
        why = "unsupported scheme (expected redis://, redis+socket:// or unix://)";
    if (why)
        goto out;

    /* Split as Python's urlparse does: the authority ends at the first '/', '?' or '#'. */
    const char *auth = sep + 3;
    size_t alen = strcspn(auth, "/?#");
    const char *path = auth + alen;
    size_t plen = strcspn(path, "?#");
    const char *query = path[plen] == '?' ? path + plen + 1 : "";
    size_t qlen = strcspn(query, "#");

    const char *host = auth, *port = NULL;
    size_t hlen = alen, portlen = 0;
    const char *at = memrchr(auth, '@', alen);
    if (at) {
        const char *colon = memchr(auth, ':', (size_t)(at - auth));
        out->username = decode(auth, (size_t)((colon ? colon : at) - auth), &bad);
        if (colon)
            out->password = decode(colon + 1, (size_t)(at - colon - 1), &bad);
        host = at + 1;
        hlen = alen - (size_t)(host - auth);
    }
    if (hlen && host[0] == '[') {
        const char *close = memchr(host, ']', hlen);
        size_t rest = close ? hlen - (size_t)(close + 1 - host) : 0;
        if (!close || (rest && close[1] != ':')) {
            why = close ? "unexpected text after ']' in the host" : "'[' without ']' in the host";
            goto out;
        }
        if (rest)
            port = close + 2, portlen = rest - 1;
        host++;
        hlen = (size_t)(close - host);
    } else if ((port = memchr(host, ':', hlen))) {
        port++;
        portlen = hlen - (size_t)(port - host);
        hlen = (size_t)(port - 1 - host);
    }
    if (portlen) {
        long v = 0;
        if (parse_digits(port, portlen, 65535, &v) == -1)
            why = "the port is not a number";
        else if (v < 1 || v > 65535)
            why = "the port is out of range (1-65535)";
        else
            out->port = (int)v;
    }
    if (why)
        goto out;

    if (socket) {
        if (hlen || port)
            why = "a socket URL takes no host or port (redis+socket:///path/to.sock)";
        else if (plen <= 1)
            why = "the socket path is missing";
        else
            out->socket = decode(path, plen, &bad);
    } else {
        /* kombu's _connparams: no hostname means 127.0.0.1 */
        out->host = hlen ? decode(host, hlen, &bad) : dup_n("127.0.0.1", 9);
        why = parse_db_path(path, plen, &out->db);
    }
    if (bad)
        why = "it contains %00";
    for (size_t i = 0; !why && i < qlen;) {
        size_t n = strcspn(query + i, "&");
        n = n < qlen - i ? n : qlen - i;
        const char *item = query + i, *eq = memchr(item, '=', n);
        size_t klen = eq ? (size_t)(eq - item) : n;
        long v = 0;
        i += n + 1;
        if (!n)
            continue;
        if (!span_is(item, klen, "virtual_host") && !span_is(item, klen, "db"))
            why = "unsupported query parameter (only virtual_host or db, on socket URLs)";
        else if (!socket)
            why = "the database goes in the path (redis://host:port/db), not in the query";
        else if (!eq || parse_digits(eq + 1, n - klen - 1, INT_MAX, &v) < 0)
            why = "the database is not a number";
        else
            out->db = (int)v;
    }
out:
    if (!why)
        return 0;
    char *safe = redis_url_redact(url);
    snprintf(err, errlen, "invalid %s URL '%s': %s", what, safe, why);
    free(safe);
    redis_url_clear(out);
    return -1;
}

int redis_url_parse(const char *url, struct redis_url *out, char *err, size_t errlen)
{
    return parse_url_as("Redis", url, out, err, errlen);
}

void redis_url_clear(struct redis_url *u)
{
    free(u->host);
    free(u->socket);
    free(u->username);
    free(u->password);
    memset(u, 0, sizeof *u);
}

char *redis_url_redact(const char *url)
{
    const char *sep = strstr(url, "://");
    const char *start = sep ? sep + 3 : url;
    const char *at = strrchr(start, '@');
    const char *colon = at ? memchr(start, ':', (size_t)(at - start)) : NULL;
    struct buf b = {0};
    if (!colon || colon + 1 == at)
        return dup_n(url, strlen(url));
    buf_append(&b, url, (size_t)(colon + 1 - url));
    buf_append_str(&b, "**");
    buf_append_str(&b, at);
    return buf_steal(&b);
}

static void print_help(FILE *f)
{
    fprintf(f, "usage: celeriac worker [options]\n"
               "       celeriac new-task NAME [--dir DIR]     write DIR/NAME.c, a commented example task\n"
               "       celeriac build DIR                     compile DIR/*.c into task modules (DIR/*.so)\n"
               "       celeriac stubs [--tasks PATH] [-o FILE]  write Python stubs for every registered task\n"
               "       celeriac --help | --version\n\n"
               "Runs Celery tasks natively: a worker that stock Celery clients reach through Redis.\n\n"
               "worker options:\n");
    for (size_t i = 0; i < NOPTIONS; i++) {
        const struct option_spec *o = &options[i];
        char left[64];
        if (!o->help)
            continue;
        snprintf(left, sizeof left, "%c%c%s--%s%s%s", o->short_name ? '-' : ' ', o->short_name ? o->short_name : ' ',
                 o->short_name ? ", " : "  ", o->long_name, o->metavar ? " " : "", o->metavar ? o->metavar : "");
        fprintf(f, "  %-32s%s%s", left, strlen(left) > 31 ? "\n                                  " : "", o->help);
        if (o->def)
            fprintf(f, " [default: %s]", o->def);
        if (o->env)
            fprintf(f, " [env: %s]", o->env);
        fputc('\n', f);
    }
}

static bool has_queue(const struct config *c, const char *name, size_t n)
{
    for (size_t i = 0; i < c->nqueues; i++)
        if (strlen(c->queues[i]) == n && memcmp(c->queues[i], name, n) == 0)
            return true;
    return false;
}

static int add_queues(struct config *c, const char *v, const char *src, char *err, size_t errlen)
{
    for (const char *p = v;; p++) {
        size_t n = strcspn(p, ",");
        if (!n)
            return fail(err, errlen, "%s: empty queue name in '%s'", src, v);
        if (!has_queue(c, p, n)) {
            char **q = realloc(c->queues, (c->nqueues + 2) * sizeof *q);
            if (!q)
                abort();
            c->queues = q;
            q[c->nqueues++] = dup_n(p, n);
            q[c->nqueues] = NULL;
        }
        p += n;
        if (!*p)
            return 0;
    }
}

static int check_url(const struct option_spec *o, const char *v, const char *src, char *err, size_t errlen)
{
    bool broker = o->offset == FIELD(broker_url);
    const char *sep = strstr(v, "://");
    size_t slen = sep ? (size_t)(sep - v) : 0;
    struct redis_url u;
    char why[512];
    for (size_t i = 0; broker && i < sizeof pending_broker_schemes / sizeof *pending_broker_schemes; i++)
        if (span_is(v, slen, pending_broker_schemes[i]))
            return fail(err, errlen, "%s: %s:// brokers are not supported yet; use redis:// or redis+socket://", src,
                        pending_broker_schemes[i]);
    if (broker && amqp_url_is(v)) {
        struct amqp_url a;
        int rc = amqp_url_parse(v, &a, why, sizeof why);
        amqp_url_clear(&a);
        return rc < 0 ? fail(err, errlen, "%s: %s", src, why) : 0;
    }
    if (parse_url_as(broker ? "broker" : "result backend", v, &u, why, sizeof why) < 0)
        return fail(err, errlen, "%s: %s", src, why);
    redis_url_clear(&u);
    return 0;
}

/* Converts v (borrowed) into o's field. src names where v came from ("option -c", "CELERY_BROKER_URL"). */
static int set_value(const struct option_spec *o, struct config *c, const char *v, const char *src, char *err,
                     size_t errlen)
{
    void *field = (char *)c + o->offset;
    long n = 0;
    switch (o->type) {
    case OPT_BOOL: *(bool *)field = true; return 0;
    case OPT_INT:
    case OPT_LONG:
        switch (parse_digits(v, strlen(v), o->type == OPT_INT ? INT_MAX : LONG_MAX, &n)) {
        case -1: return fail(err, errlen, "%s expects a non-negative integer, got '%s'", src, v);
        case -2: return fail(err, errlen, "%s: '%s' is too large", src, v);
        }
        if (o->type == OPT_INT)
            *(int *)field = (int)n;
        else
            *(long *)field = n;
        return 0;
    case OPT_DOUBLE: {
        char *end = NULL;
        double d = strtod(v, &end);
        if (!*v || *end || !isfinite(d) || d <= 0)
            return fail(err, errlen, "%s expects a positive number of seconds, got '%s'", src, v);
        *(double *)field = d;
        return 0;
    }
    case OPT_URL:
    case OPT_STRING:
        if (!*v)
            return fail(err, errlen, "%s expects a value, got ''", src);
        if (o->type == OPT_URL && check_url(o, v, src, err, errlen) < 0)
            return -1;
        free(*(char **)field);
        *(char **)field = dup_n(v, strlen(v));
        return 0;
    case OPT_LIST: return add_queues(c, v, src, err, errlen);
    case OPT_LEVEL:
        for (size_t i = 0; i < sizeof levels / sizeof levels[0]; i++)
            if (strcasecmp(v, levels[i].name) == 0) {
                *(enum log_level *)field = levels[i].level;
                return 0;
            }
        return fail(err, errlen, "%s expects one of debug, info, warning, error, critical, got '%s'", src, v);
    case OPT_HELP:
    case OPT_VERSION: break;
    }
    return 0;
}

/* One option met on the command line; returns 0, -1 (err set) or 1 when --help/--version was printed. */
static int take(const struct option_spec *o, bool as_short, const char *v, struct config *c, bool *seen, char *err,
                size_t errlen)
{
    char src[48];
    if (o->type == OPT_HELP)
        print_help(stdout);
    else if (o->type == OPT_VERSION)
        printf("celeriac %s\n", CELERIAC_VERSION);
    if (o->type == OPT_HELP || o->type == OPT_VERSION)
        return 1;
    if (as_short)
        snprintf(src, sizeof src, "option -%c", o->short_name);
    else
        snprintf(src, sizeof src, "option --%s", o->long_name);
    seen[o - options] = true;
    return set_value(o, c, v, src, err, errlen);
}

static const struct option_spec *find_option(const char *long_name, size_t n, char short_name)
{
    for (size_t i = 0; i < NOPTIONS; i++)
        if (long_name ? strlen(options[i].long_name) == n && memcmp(options[i].long_name, long_name, n) == 0
                      : options[i].short_name == short_name)
            return &options[i];
    return NULL;
}

/* Celery's host_format: %h is the hostname, %n its first label, %d the rest; %i and %I are the pool process
 * index, which is "0" and "" in the main process. Other %<letter> is an error, as in Celery. */
static int expand_node_name(struct config *c, const char *given, char *err, size_t errlen)
{
    char host[256];
    if (gethostname(host, sizeof host) != 0)
        strcpy(host, "localhost");
    host[sizeof host - 1] = '\0'; /* POSIX leaves a truncated name unterminated */
    const char *dot = strchr(host, '.');
    size_t hname_len = dot ? (size_t)(dot - host) : strlen(host);

    /* default_nodename: "name@host" with an empty name -> "celeriac", an empty host -> this machine */
    struct buf raw = {0}, out = {0};
    const char *at = strchr(given, '@');
    if (at && at != given)
        buf_append(&raw, given, (size_t)(at - given));
    else
        buf_append_str(&raw, "celeriac");
    buf_append_char(&raw, '@');
    buf_append_str(&raw, at ? (at[1] ? at + 1 : host) : (*given ? given : host));

    for (const char *p = raw.data; *p; p++) {
        char k = p[1];
        bool word = (k >= 'a' && k <= 'z') || (k >= 'A' && k <= 'Z') || (k >= '0' && k <= '9') || k == '_';
        if (*p != '%' || !word) {
            buf_append_char(&out, *p);
            continue;
        }
        p++;
        if (k == 'h')
            buf_append_str(&out, host);
        else if (k == 'n')
            buf_append(&out, host, hname_len);
        else if (k == 'd')
            buf_append_str(&out, dot ? dot + 1 : "");
        else if (k == 'i')
            buf_append_char(&out, '0');
        else if (k != 'I') {
            fail(err, errlen, "option -n: unknown '%%%c' in '%s' (known: %%h %%n %%d %%i %%I)", k, given);
            buf_free(&raw);
            buf_free(&out);
            return -1;
        }
    }
    buf_free(&raw);
    free(c->node_name);
    c->node_name = buf_steal(&out);
    return 0;
}

/* What the command line left unset: environment, then defaults, then the derived values. */
static int finish(struct config *c, const bool *seen, char *err, size_t errlen)
{
    for (size_t i = 0; i < NOPTIONS; i++) {
        const struct option_spec *o = &options[i];
        const char *env = o->env ? getenv(o->env) : NULL;
        if (o->type == OPT_HELP || o->type == OPT_VERSION)
            continue;
        if (!seen[i] && env && *env) {
            if (set_value(o, c, env, o->env, err, errlen) < 0)
                return -1;
        } else if (!seen[i] && o->def && set_value(o, c, o->def, "default", err, errlen) < 0) {
            return -1;
        }
        /* `celery worker` reads -c and --prefetch-multiplier as `value or default`: 0 means the default. */
        if (o->type == OPT_INT && o->def && *(int *)((char *)c + o->offset) == 0)
            set_value(o, c, o->def, "default", err, errlen);
    }
    if (c->concurrency == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        c->concurrency = n > 0 && n < INT_MAX ? (int)n : 1;
    }
    if (c->autoscale) {
        /* Celery's reading: "max" or "max,min", min defaulting to 0; here at least one process stays. */
        char *end = NULL;
        long mx = strtol(c->autoscale, &end, 10), mn = 0;
        if (end != c->autoscale && *end == ',')
            mn = strtol(end + 1, &end, 10);
        if (end == c->autoscale || *end || mx < 1 || mx > 256 || mn < 0 || mn > mx)
            return fail(err, errlen, "--autoscale expects MAX[,MIN] with 1 <= MAX <= 256 and 0 <= MIN <= MAX, got '%s'",
                        c->autoscale);
        c->autoscale_max = (int)mx;
        c->autoscale_min = mn < 1 ? 1 : (int)mn;
    }
    if (c->dev && !c->tasks_path)
        return fail(err, errlen, "--dev needs --tasks DIR (a directory of task .c files)");
    char *given = c->node_name;
    c->node_name = NULL;
    int rc = expand_node_name(c, given ? given : "", err, errlen);
    free(given);
    return rc;
}

int config_parse(int argc, char **argv, struct config *out, char *err, size_t errlen)
{
    bool seen[NOPTIONS] = {0}, options_done = false;
    const char *command = NULL;
    int rc = 0;
    memset(out, 0, sizeof *out);
    if (errlen)
        err[0] = '\0';
    for (int i = 1; i < argc && rc == 0; i++) {
        const char *a = argv[i];
        if (options_done || a[0] != '-' || a[1] == '\0') {
            if (command)
                rc = fail(err, errlen, "unexpected argument '%s'", a);
            else if (strcmp(a, "worker") != 0)
                rc = fail(err, errlen, "unknown command '%s' (commands: worker, new-task, build, stubs)", a);
            command = a;
        } else if (strcmp(a, "--") == 0) {
            options_done = true;
        } else if (a[1] == '-') {
            const char *name = a + 2, *v = NULL;
            size_t n = strcspn(name, "=");
            const struct option_spec *o = find_option(name, n, 0);
            if (!o)
                rc = fail(err, errlen, "unknown option '--%.*s' (see --help)", (int)n, name);
            else if (!o->metavar && name[n])
                rc = fail(err, errlen, "option --%s takes no value", o->long_name);
            else if (o->metavar && !name[n] && i + 1 >= argc)
                rc = fail(err, errlen, "option --%s expects a value", o->long_name);
            else {
                if (o->metavar)
                    v = name[n] ? name + n + 1 : argv[++i];
                rc = take(o, false, v, out, seen, err, errlen);
            }
        } else {
            /* Bundled short flags as click allows: -Ec2 is -E -c 2; a value ends the bundle. */
            for (const char *p = a + 1; *p && rc == 0; p++) {
                const struct option_spec *o = find_option(NULL, 0, *p);
                const char *v = NULL;
                if (!o)
                    rc = fail(err, errlen, "unknown option '-%c' (see --help)", *p);
                else if (o->metavar && !p[1] && i + 1 >= argc)
                    rc = fail(err, errlen, "option -%c expects a value", *p);
                else {
                    if (o->metavar)
                        v = p[1] ? p + 1 : argv[++i];
                    rc = take(o, true, v, out, seen, err, errlen);
                    if (o->metavar)
                        break;
                }
            }
        }
    }
    if (rc == 0 && !command)
        rc = fail(err, errlen, "missing command: try 'celeriac worker' or 'celeriac --help'");
    if (rc == 0)
        rc = finish(out, seen, err, errlen);
    if (rc != 0)
        config_clear(out);
    return rc < 0 ? CONFIG_ERROR : rc > 0 ? CONFIG_EXIT : CONFIG_RUN;
}

void config_clear(struct config *c)
{
    for (size_t i = 0; i < c->nqueues; i++)
        free(c->queues[i]);
    free(c->queues);
    free(c->node_name);
    free(c->broker_url);
    free(c->result_backend);
    free(c->database_url);
    free(c->pg_tables);
    free(c->default_queue);
    free(c->http_bind);
    free(c->tasks_path);
    free(c->autoscale);
    memset(c, 0, sizeof *c);
}
