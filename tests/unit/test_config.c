/* Unit tests for worker/config.c: command line, environment, node names, Redis URLs and redaction. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"

#define MAXARGS 32

static char err[512];

/* Runs config_parse on "celeriac" followed by the NULL-terminated arguments. */
static int parse_args(struct config *c, const char *const *args)
{
    char *argv[MAXARGS + 1] = {"celeriac"};
    int argc = 1;
    for (; args[argc - 1]; argc++) {
        assert_true(argc < MAXARGS);
        argv[argc] = (char *)args[argc - 1];
    }
    return config_parse(argc, argv, c, err, sizeof err);
}
#define PARSE(c, ...) parse_args((c), (const char *const[]){__VA_ARGS__, NULL})

static int clear_env(void **state)
{
    (void)state;
    unsetenv("CELERY_BROKER_URL");
    unsetenv("CELERY_RESULT_BACKEND");
    return 0;
}

static char *hostname(void)
{
    static char host[256];
    assert_int_equal(gethostname(host, sizeof host), 0);
    return host;
}

static void test_defaults(void **state)
{
    (void)state;
    struct config c;
    char want[300];
    assert_int_equal(PARSE(&c, "worker"), CONFIG_RUN);
    assert_int_equal(c.nqueues, 1);
    assert_string_equal(c.queues[0], "celery");
    assert_null(c.queues[1]);
    assert_int_equal(c.concurrency, (int)sysconf(_SC_NPROCESSORS_ONLN));
    snprintf(want, sizeof want, "celeriac@%s", hostname());
    assert_string_equal(c.node_name, want);
    assert_false(c.send_events);
    assert_int_equal(c.log_level, LOG_WARNING);
    assert_int_equal(c.prefetch_multiplier, 4);
    assert_false(c.acks_late);
    assert_false(c.track_started);
    assert_string_equal(c.broker_url, "redis://127.0.0.1:6379/0");
    assert_null(c.result_backend);
    assert_true(c.visibility_timeout == 3600.0);
    assert_int_equal(c.result_expires, 86400);
    assert_true(c.time_limit == 0 && c.soft_time_limit == 0);
    assert_false(c.enable_test_tasks);
    config_clear(&c);
    config_clear(&c); /* twice is safe */
}

static void test_every_flag_long(void **state)
{
    (void)state;
    struct config c;
    assert_int_equal(PARSE(&c, "worker", "--queues", "a,b", "--concurrency", "3", "--hostname", "w1@box", "--task-events",
                           "--loglevel", "INFO", "--prefetch-multiplier", "8", "--acks-late", "--track-started",
                           "--broker", "redis://h:1/2", "--result-backend", "redis://h:1/3", "--visibility-timeout",
                           "12.5", "--result-expires", "0"),
                     CONFIG_RUN);
    assert_int_equal(c.nqueues, 2);
    assert_string_equal(c.queues[0], "a");
    assert_string_equal(c.queues[1], "b");
    assert_int_equal(c.concurrency, 3);
    assert_string_equal(c.node_name, "w1@box");
    assert_true(c.send_events);
    assert_int_equal(c.log_level, LOG_INFO);
    assert_int_equal(c.prefetch_multiplier, 8);
    assert_true(c.acks_late);
    assert_true(c.track_started);
    assert_string_equal(c.broker_url, "redis://h:1/2");
    assert_string_equal(c.result_backend, "redis://h:1/3");
    assert_true(c.visibility_timeout == 12.5);
    assert_int_equal(c.result_expires, 0);
    config_clear(&c);
}

static void test_time_limits_and_test_tasks(void **state)
{
    (void)state;
    struct config c;
    assert_int_equal(PARSE(&c, "worker", "--time-limit", "30", "--soft-time-limit=2.5", "--enable-test-tasks"),
                     CONFIG_RUN);
    assert_true(c.time_limit == 30.0);
    assert_true(c.soft_time_limit == 2.5);
    assert_true(c.enable_test_tasks);
    config_clear(&c);
    assert_int_equal(PARSE(&c, "worker", "--time-limit", "-1"), CONFIG_ERROR);
    assert_non_null(strstr(err, "--time-limit"));
    config_clear(&c);
}

static void test_short_and_equals_forms(void **state)
{
    (void)state;
    struct config c;
    assert_int_equal(PARSE(&c, "worker", "-Q", "x", "-c", "2", "-n", "a@b", "-E", "-l", "debug", "-b", "redis://h"),
                     CONFIG_RUN);
    assert_string_equal(c.queues[0], "x");
    assert_int_equal(c.concurrency, 2);
    assert_string_equal(c.node_name, "a@b");
    assert_true(c.send_events);
    assert_int_equal(c.log_level, LOG_DEBUG);
    assert_string_equal(c.broker_url, "redis://h");
    config_clear(&c);

    /* glued short values, bundled flags, --opt=value, options before the command, "--" */
    assert_int_equal(PARSE(&c, "-bredis://g", "--result-backend=redis://r", "-c7", "-Ql2", "-El", "error",
                           "--concurrency=5", "--loglevel=Critical", "--events", "--", "worker"),
                     CONFIG_RUN);
    assert_string_equal(c.broker_url, "redis://g");
    assert_string_equal(c.result_backend, "redis://r");
    assert_int_equal(c.concurrency, 5); /* the last one wins */
    assert_string_equal(c.queues[0], "l2");
    assert_true(c.send_events);
    assert_int_equal(c.log_level, LOG_CRITICAL);
    config_clear(&c);
}

static void test_log_levels(void **state)
{
    (void)state;
    static const struct {
        const char *arg;
        enum log_level level;
    } cases[] = {{"debug", LOG_DEBUG}, {"INFO", LOG_INFO},   {"Warning", LOG_WARNING}, {"warn", LOG_WARNING},
                 {"ERROR", LOG_ERROR}, {"critical", LOG_CRITICAL}, {"FATAL", LOG_CRITICAL}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct config c;
        assert_int_equal(PARSE(&c, "worker", "-l", cases[i].arg), CONFIG_RUN);
        assert_int_equal(c.log_level, cases[i].level);
        config_clear(&c);
    }
}

static void test_zero_means_default(void **state)
{
    (void)state;
    struct config c;
    assert_int_equal(PARSE(&c, "worker", "-c", "0", "--prefetch-multiplier", "0"), CONFIG_RUN);
    assert_int_equal(c.concurrency, (int)sysconf(_SC_NPROCESSORS_ONLN));
    assert_int_equal(c.prefetch_multiplier, 4);
    config_clear(&c);
}

static void test_queues(void **state)
{
    (void)state;
    struct config c;
    assert_int_equal(PARSE(&c, "worker", "-Q", "b,a", "-Q", "a,c,b", "--queues=d,c"), CONFIG_RUN);
    assert_int_equal(c.nqueues, 4);
    assert_string_equal(c.queues[0], "b");
    assert_string_equal(c.queues[1], "a");
    assert_string_equal(c.queues[2], "c");
    assert_string_equal(c.queues[3], "d");
    assert_null(c.queues[4]);
    config_clear(&c);
}

static void test_node_names(void **state)
{
    (void)state;
    const char *host = hostname(), *dot = strchr(host, '.');
    char short_host[256], want[600];
    snprintf(short_host, sizeof short_host, "%.*s", dot ? (int)(dot - host) : (int)strlen(host), host);
    const struct {
        const char *arg;
        const char *fmt; /* %1$s hostname, %2$s its first label, %3$s the domain */
    } cases[] = {
        {"w1@%h", "w1@%1$s"},         {"foo", "celeriac@foo"},      {"@foo", "celeriac@foo"},
        {"w1@", "w1@%1$s"},           {"%n", "celeriac@%2$s"},      {"x@%n.%d", "x@%2$s.%3$s"},
        {"x@%%h", "x@%%%1$s"},        {"x@a%i%I", "x@a0"},          {"a@b@c", "a@b@c"},
        {"x@100%", "x@100%%"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct config c;
        assert_int_equal(PARSE(&c, "worker", "-n", cases[i].arg), CONFIG_RUN);
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
        snprintf(want, sizeof want, cases[i].fmt, host, short_host, dot ? dot + 1 : "");
#pragma GCC diagnostic pop
        assert_string_equal(c.node_name, want);
        config_clear(&c);
    }
}

static void test_env_and_flag_precedence(void **state)
{
    (void)state;
    struct config c;
    setenv("CELERY_BROKER_URL", "redis://envbroker:1/1", 1);
    setenv("CELERY_RESULT_BACKEND", "redis://envbackend:2/2", 1);
    assert_int_equal(PARSE(&c, "worker"), CONFIG_RUN);
    assert_string_equal(c.broker_url, "redis://envbroker:1/1");
    assert_string_equal(c.result_backend, "redis://envbackend:2/2");
    config_clear(&c);

    assert_int_equal(PARSE(&c, "worker", "-b", "redis://flag/3", "--result-backend", "redis://flag/4"), CONFIG_RUN);
    assert_string_equal(c.broker_url, "redis://flag/3");
    assert_string_equal(c.result_backend, "redis://flag/4");
    config_clear(&c);

    /* A bad environment value is reported under its variable's name, unless a flag overrides it. */
    setenv("CELERY_BROKER_URL", "redis://h:x", 1);
    assert_int_equal(PARSE(&c, "worker"), CONFIG_ERROR);
    assert_string_equal(err, "celeriac: error: CELERY_BROKER_URL: invalid broker URL 'redis://h:x': the port is not "
                             "a number");
    assert_int_equal(PARSE(&c, "worker", "-b", "redis://ok"), CONFIG_RUN);
    config_clear(&c);

    /* empty means unset, as click reads it */
    setenv("CELERY_BROKER_URL", "", 1);
    setenv("CELERY_RESULT_BACKEND", "", 1);
    assert_int_equal(PARSE(&c, "worker"), CONFIG_RUN);
    assert_string_equal(c.broker_url, "redis://127.0.0.1:6379/0");
    assert_null(c.result_backend);
    config_clear(&c);
}

static void test_errors(void **state)
{
    (void)state;
    static const struct {
        const char *args[6];
        const char *want; /* the whole message after "celeriac: error: " starts with this */
    } cases[] = {
        {{NULL}, "missing command"},
        {{"work"}, "unknown command 'work'"},
        {{"-c", "2"}, "missing command"},
        {{"worker", "extra"}, "unexpected argument 'extra'"},
        {{"worker", "--", "-c"}, "unexpected argument '-c'"},
        {{"worker", "--bogus=1"}, "unknown option '--bogus'"},
        {{"worker", "-x"}, "unknown option '-x'"},
        {{"worker", "-Ex"}, "unknown option '-x'"},
        {{"worker", "-c", "x"}, "option -c expects a non-negative integer, got 'x'"},
        {{"worker", "--concurrency=-1"}, "option --concurrency expects a non-negative integer, got '-1'"},
        {{"worker", "-c", "2x"}, "option -c expects a non-negative integer, got '2x'"},
        {{"worker", "-c", ""}, "option -c expects a non-negative integer, got ''"},
        {{"worker", "-c", "99999999999"}, "option -c: '99999999999' is too large"},
        {{"worker", "-c"}, "option -c expects a value"},
        {{"worker", "--concurrency"}, "option --concurrency expects a value"},
        {{"worker", "--acks-late=yes"}, "option --acks-late takes no value"},
        {{"worker", "--prefetch-multiplier", "-2"}, "option --prefetch-multiplier expects a non-negative integer"},
        {{"worker", "-l", "verbose"}, "option -l expects one of debug, info, warning, error, critical, got 'verbose'"},
        {{"worker", "-Q", "a,,b"}, "option -Q: empty queue name in 'a,,b'"},
        {{"worker", "-Q", ""}, "option -Q: empty queue name"},
        {{"worker", "--queues", "a,"}, "option --queues: empty queue name in 'a,'"},
        {{"worker", "-n", "w@%x"}, "option -n: unknown '%x' in 'w@%x'"},
        {{"worker", "-n", ""}, "option -n expects a value"},
        {{"worker", "--visibility-timeout", "0"}, "option --visibility-timeout expects a positive number of seconds"},
        {{"worker", "--visibility-timeout", "nan"}, "option --visibility-timeout expects a positive number"},
        {{"worker", "--visibility-timeout", "1s"}, "option --visibility-timeout expects a positive number"},
        {{"worker", "--result-expires", "1.5"}, "option --result-expires expects a non-negative integer, got '1.5'"},
        {{"worker", "-b", "amqp://guest:secret@localhost:x//"},
         "option -b: invalid AMQP URL 'amqp://guest:**@localhost:x//': port is not a number from 1 to 65535"},
        {{"worker", "-b", "pyamqp://h/?hearbeat=1"},
         "option -b: invalid AMQP URL 'pyamqp://h/?hearbeat=1': unknown query"},
        {{"worker", "-b", "sqs://h"}, "option -b: sqs:// brokers are not supported yet"},
        {{"worker", "-b", "redis://:secret@h:x/0"},
         "option -b: invalid broker URL 'redis://:**@h:x/0': the port is not a number"},
        {{"worker", "-b", "rediss://h"}, "option -b: invalid broker URL 'rediss://h': rediss:// (Redis over TLS)"},
        {{"worker", "--result-backend", "amqp://h"}, "option --result-backend: invalid result backend URL 'amqp://h'"},
        {{"worker", "--result-backend=redis://h/x"}, "option --result-backend: invalid result backend URL"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct config c;
        char want[300];
        err[0] = '\0';
        assert_int_equal(parse_args(&c, cases[i].args), CONFIG_ERROR);
        snprintf(want, sizeof want, "celeriac: error: %s", cases[i].want);
        if (strncmp(err, want, strlen(want)) != 0)
            fail_msg("case %zu: got \"%s\", want a line starting \"%s\"", i, err, want);
        assert_null(strchr(err, '\n'));
        assert_null(strstr(err, "secret"));
        assert_null(c.queues); /* left empty */
        assert_null(c.broker_url);
        config_clear(&c);
    }
}

/* Runs config_parse with stdout sent to a temporary file and returns what it printed (caller frees). */
static char *capture_stdout(const char *arg1, const char *arg2, int *rc)
{
    struct config c;
    char *argv[] = {"celeriac", (char *)arg1, (char *)arg2, NULL};
    FILE *tmp = tmpfile();
    assert_non_null(tmp);
    fflush(stdout);
    int saved = dup(1);
    assert_true(saved >= 0);
    assert_true(dup2(fileno(tmp), 1) >= 0);
    *rc = config_parse(arg2 ? 3 : 2, argv, &c, err, sizeof err);
    fflush(stdout);
    assert_true(dup2(saved, 1) >= 0);
    close(saved);
    long n = ftell(tmp);
    char *out = calloc(1, (size_t)n + 1);
    rewind(tmp);
    assert_int_equal(fread(out, 1, (size_t)n, tmp), (size_t)n);
    fclose(tmp);
    assert_null(c.node_name);
    return out;
}

static void test_help_and_version(void **state)
{
    (void)state;
    int rc = 0;
    char *out = capture_stdout("--version", NULL, &rc);
    assert_int_equal(rc, CONFIG_EXIT);
    assert_string_equal(out, "celeriac " CELERIAC_VERSION "\n");
    free(out);

    static const char *const words[] = {
        "usage: celeriac worker",  "-Q, --queues QUEUE",       "-c, --concurrency N",  "-n, --hostname NAME",
        "-E, --task-events",       "-l, --loglevel LEVEL",     "--prefetch-multiplier N", "--acks-late",
        "--track-started",         "-b, --broker URL",         "CELERY_BROKER_URL",    "--result-backend URL",
        "CELERY_RESULT_BACKEND",   "--visibility-timeout SECONDS", "--result-expires SECONDS", "--version",
    };
    for (int form = 0; form < 2; form++) {
        out = form ? capture_stdout("worker", "--help", &rc) : capture_stdout("--help", NULL, &rc);
        assert_int_equal(rc, CONFIG_EXIT);
        for (size_t i = 0; i < sizeof words / sizeof words[0]; i++)
            if (!strstr(out, words[i]))
                fail_msg("--help lacks \"%s\":\n%s", words[i], out);
        free(out);
    }
}

static void test_url_good(void **state)
{
    (void)state;
    static const struct {
        const char *url;
        const char *host, *socket, *username, *password;
        int port, db;
    } cases[] = {
        {"redis://", "127.0.0.1", NULL, NULL, NULL, 6379, 0},
        {"redis://localhost", "localhost", NULL, NULL, NULL, 6379, 0},
        {"redis://h:6380/2", "h", NULL, NULL, NULL, 6380, 2},
        {"REDIS://H:1/", "H", NULL, NULL, NULL, 1, 0},
        {"redis://h:/1", "h", NULL, NULL, NULL, 6379, 1},
        {"redis://h//5", "h", NULL, NULL, NULL, 6379, 5},
        {"redis://h/0#frag", "h", NULL, NULL, NULL, 6379, 0},
        {"redis://:p%40ss@h/1", "h", NULL, NULL, "p@ss", 6379, 1},
        {"redis://us%3Ar:pw@h:1/3", "h", NULL, "us:r", "pw", 1, 3},
        {"redis://user@h", "h", NULL, "user", NULL, 6379, 0},
        {"redis://user:@h", "h", NULL, "user", NULL, 6379, 0},
        {"redis://a:b:c@h", "h", NULL, "a", "b:c", 6379, 0},
        {"redis://:p@ss@h/0", "h", NULL, NULL, "p@ss", 6379, 0},
        {"redis://:bad%zz@h", "h", NULL, NULL, "bad%zz", 6379, 0},
        {"redis://[::1]:7000/4", "::1", NULL, NULL, NULL, 7000, 4},
        {"redis://:pw@[fe80::1]", "fe80::1", NULL, NULL, "pw", 6379, 0},
        {"redis+socket:///tmp/r.sock", NULL, "/tmp/r.sock", NULL, NULL, 6379, 0},
        {"redis+socket:///tmp/r.sock?virtual_host=3", NULL, "/tmp/r.sock", NULL, NULL, 6379, 3},
        {"redis+socket://:pw@/tmp/r%20s.sock?&db=2", NULL, "/tmp/r s.sock", NULL, "pw", 6379, 2},
        {"unix:///var/run/redis.sock?db=7", NULL, "/var/run/redis.sock", NULL, NULL, 6379, 7},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct redis_url u;
        if (redis_url_parse(cases[i].url, &u, err, sizeof err) != 0)
            fail_msg("%s: %s", cases[i].url, err);
#define CHECK_STR(field)                                                                                        \
    do {                                                                                                        \
        if (cases[i].field ? !u.field || strcmp(u.field, cases[i].field) : u.field != NULL)                     \
            fail_msg("%s: " #field " is \"%s\", want \"%s\"", cases[i].url, u.field ? u.field : "(null)",       \
                     cases[i].field ? cases[i].field : "(null)");                                                \
    } while (0)
        CHECK_STR(host);
        CHECK_STR(socket);
        CHECK_STR(username);
        CHECK_STR(password);
        assert_int_equal(u.port, cases[i].port);
        assert_int_equal(u.db, cases[i].db);
        redis_url_clear(&u);
        assert_null(u.host);
    }
}

static void test_url_bad(void **state)
{
    (void)state;
    static const struct {
        const char *url, *why;
    } cases[] = {
        {"localhost:6379", "not a URL"},
        {"http://:secret@h", "unsupported scheme"},
        {"rediss://h", "rediss:// (Redis over TLS) is not supported yet"},
        {"redis://:secret@h:abc", "the port is not a number"},
        {"redis://h:70000", "the port is out of range (1-65535)"},
        {"redis://h:0", "the port is out of range"},
        {"redis://h:-1", "the port is not a number"},
        {"redis://h/x", "the database is not a number"},
        {"redis://h/3/", "the database is not a number"},
        {"redis://h/-1", "the database is not a number"},
        {"redis://h/99999999999", "the database number is too large"},
        {"redis://[::1", "'[' without ']' in the host"},
        {"redis://[::1]x", "unexpected text after ']'"},
        {"redis://h?virtual_host=3", "the database goes in the path"},
        {"redis://h/0?socket_timeout=3", "unsupported query parameter"},
        {"redis+socket://", "the socket path is missing"},
        {"redis+socket:///", "the socket path is missing"},
        {"redis+socket://host/tmp/s", "a socket URL takes no host or port"},
        {"unix://:1/tmp/s", "a socket URL takes no host or port"},
        {"redis+socket:///tmp/s?virtual_host=x", "the database is not a number"},
        {"redis+socket:///tmp/s?db", "the database is not a number"},
        {"redis://u%00:secret@h", "it contains %00"},
        {"redis://:se/cret@h/0", "the port is not a number"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct redis_url u;
        err[0] = '\0';
        if (redis_url_parse(cases[i].url, &u, err, sizeof err) != -1)
            fail_msg("%s: accepted", cases[i].url);
        if (strncmp(err, "invalid Redis URL '", 19) != 0 || !strstr(err, cases[i].why))
            fail_msg("%s: got \"%s\", want \"%s\"", cases[i].url, err, cases[i].why);
        if (strstr(err, "secret") || strstr(err, "cret"))
            fail_msg("%s: password echoed in \"%s\"", cases[i].url, err);
        assert_null(u.host);
        assert_null(u.password);
        redis_url_clear(&u);
    }
}

static void test_redact(void **state)
{
    (void)state;
    static const char *const cases[][2] = {
        {"redis://:secret@h:6379/0", "redis://:**@h:6379/0"},
        {"redis://user:secret@h/0", "redis://user:**@h/0"},
        {"redis://user@h/0", "redis://user@h/0"},
        {"redis://user:@h/0", "redis://user:@h/0"},
        {"redis://h:6379/0", "redis://h:6379/0"},
        {"redis+socket://:secret@/tmp/s", "redis+socket://:**@/tmp/s"},
        {"redis://:se/cr#et@h/0", "redis://:**@h/0"},
        {"redis://:p@ss@h/0", "redis://:**@h/0"},
        {"amqp://guest:guest@localhost//", "amqp://guest:**@localhost//"},
        {"h:secret@x", "h:**@x"},
        {"", ""},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *r = redis_url_redact(cases[i][0]);
        assert_string_equal(r, cases[i][1]);
        free(r);
    }
}

/* --database-url / DATABASE_URL and --pg-tables / CELERIAC_PG_TABLES: kept as given (db_configure checks
 * them), the flag winning over the variable. */
static void test_database_options(void **state)
{
    (void)state;
    struct config c;
    unsetenv("DATABASE_URL");
    unsetenv("CELERIAC_PG_TABLES");
    assert_int_equal(PARSE(&c, "worker"), CONFIG_RUN);
    assert_null(c.database_url);
    assert_null(c.pg_tables);
    config_clear(&c);

    setenv("DATABASE_URL", "postgresql://u:pw@envhost/db", 1);
    setenv("CELERIAC_PG_TABLES", "items,public.events", 1);
    assert_int_equal(PARSE(&c, "worker"), CONFIG_RUN);
    assert_string_equal(c.database_url, "postgresql://u:pw@envhost/db");
    assert_string_equal(c.pg_tables, "items,public.events");
    config_clear(&c);

    assert_int_equal(PARSE(&c, "worker", "--database-url", "host=flag dbname=d", "--pg-tables=orders"), CONFIG_RUN);
    assert_string_equal(c.database_url, "host=flag dbname=d");
    assert_string_equal(c.pg_tables, "orders");
    config_clear(&c);

    assert_int_equal(PARSE(&c, "worker", "--pg-tables", ""), CONFIG_ERROR);
    assert_string_equal(err, "celeriac: error: option --pg-tables expects a value, got ''");
    unsetenv("DATABASE_URL");
    unsetenv("CELERIAC_PG_TABLES");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_defaults, clear_env),
        cmocka_unit_test_setup(test_every_flag_long, clear_env),
        cmocka_unit_test_setup(test_time_limits_and_test_tasks, clear_env),
        cmocka_unit_test_setup(test_short_and_equals_forms, clear_env),
        cmocka_unit_test_setup(test_log_levels, clear_env),
        cmocka_unit_test_setup(test_zero_means_default, clear_env),
        cmocka_unit_test_setup(test_queues, clear_env),
        cmocka_unit_test_setup(test_node_names, clear_env),
        cmocka_unit_test_setup_teardown(test_env_and_flag_precedence, clear_env, clear_env),
        cmocka_unit_test_setup(test_errors, clear_env),
        cmocka_unit_test_setup(test_help_and_version, clear_env),
        cmocka_unit_test(test_url_good),
        cmocka_unit_test(test_url_bad),
        cmocka_unit_test(test_redact),
        cmocka_unit_test_setup_teardown(test_database_options, clear_env, clear_env),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
