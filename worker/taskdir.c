/* taskdir: --tasks PATH and dev mode (see taskdir.h).
 *
 * Every generation is loaded from a directory of its own (/tmp/celeriac-tasks-XXXXXX/gen-N): dlopen hands
 * back the module already loaded under a path it has seen, so a rebuilt module must have a new path. A
 * source directory is compiled there; prebuilt .so files are copied there.
 *
 * In dev mode the compiler runs in a forked builder process, so the worker keeps serving while cc works (a
 * rebuild takes a few hundred milliseconds); taskdir_tick looks at the builder every BUILD_POLL_S and loads
 * the generation once it is built. A change made meanwhile schedules another rebuild after this one. */
#include "taskdir.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/inotify.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <dirent.h>

#include "log.h"
#include "modules.h"

#define REBUILD_DELAY_S 0.25 /* an editor saves in several writes: wait for the burst to end */
#define BUILD_POLL_S 0.02     /* how often a running build is looked at */

struct taskdir {
    char *path;               /* owned: as given */
    bool sources;             /* path is a directory of C files: built for every generation */
    char root[64];            /* the private directory holding the generations */
    unsigned gen;             /* the generation in use */
    struct task_modules *mods; /* owned: the generation in use */
    int ifd;                  /* inotify (dev mode), else -1 */
    double due;               /* when a scheduled rebuild runs (monotonic seconds); 0: none */
    pid_t builder;            /* the background build of generation gen + 1 (dev mode), else 0 */
    int build_fd;             /* its output (the compiler's messages), read end; -1 when none */
    char *build_diag;         /* owned: what it printed so far */
    size_t build_len;
};

static void gen_dir(const struct taskdir *t, unsigned gen, char *dst, size_t len)
{
    snprintf(dst, len, "%s/gen-%u", t->root, gen);
}

static void remove_dir(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return;
    struct dirent *e;
    char file[4096];
    while ((e = readdir(d))) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        snprintf(file, sizeof file, "%s/%s", dir, e->d_name);
        unlink(file);
    }
    closedir(d);
    rmdir(dir);
}

static int copy_file(const char *from, const char *to)
{
    FILE *in = fopen(from, "rb");
    if (!in)
        return -1;
    FILE *out = fopen(to, "wb");
    if (!out) {
        fclose(in);
        return -1;
    }
    char chunk[1 << 16];
    size_t n;
    int rc = 0;
    while ((n = fread(chunk, 1, sizeof chunk, in)) > 0)
        if (fwrite(chunk, 1, n, out) != n)
            rc = -1;
    if (ferror(in))
        rc = -1;
    fclose(in);
    if (fclose(out) != 0)
        rc = -1;
    return rc;
}

/* Copies the prebuilt module(s) at path into dir. Returns 0, or -1 with err filled. */
static int copy_modules(const char *path, const char *dir, char *err, size_t errlen)
{
    struct stat st;
    if (stat(path, &st) < 0) {
        snprintf(err, errlen, "--tasks %s: %s", path, strerror(errno));
        return -1;
    }
    char to[4096];
    if (!S_ISDIR(st.st_mode)) {
        const char *base = strrchr(path, '/');
        snprintf(to, sizeof to, "%s/%s", dir, base ? base + 1 : path);
        if (copy_file(path, to) < 0) {
            snprintf(err, errlen, "--tasks %s: cannot copy it: %s", path, strerror(errno));
            return -1;
        }
        return 0;
    }
    DIR *d = opendir(path);
    if (!d) {
        snprintf(err, errlen, "--tasks %s: %s", path, strerror(errno));
        return -1;
    }
    struct dirent *e;
    int rc = 0;
    while (rc == 0 && (e = readdir(d))) {
        size_t n = strlen(e->d_name);
        if (e->d_name[0] == '.' || n < 4 || strcmp(e->d_name + n - 3, ".so") != 0)
            continue;
        char from[4096];
        snprintf(from, sizeof from, "%s/%s", path, e->d_name);
        snprintf(to, sizeof to, "%s/%s", dir, e->d_name);
        if (copy_file(from, to) < 0) {
            snprintf(err, errlen, "--tasks %s: cannot copy %s: %s", path, e->d_name, strerror(errno));
            rc = -1;
        }
    }
    closedir(d);
    return rc;
}

static void log_compiler_output(const char *diag, bool failed)
{
    if (!diag)
        return;
    /* One log line per compiler line, so that "file.c:12:5: error: ..." stays readable in the log. */
    const char *p = diag;
    while (*p) {
        size_t n = strcspn(p, "\n");
        if (n)
            log_msg(failed ? LOG_ERROR : LOG_WARNING, "cc: %.*s", (int)n, p);
        p += n + (p[n] == '\n');
    }
}

static void log_tasks(const struct taskdir *t, const char *verb)
{
    size_t n;
    const struct task_def *const *defs = task_modules_defs(t->mods, &n);
    char names[1024] = "";
    size_t len = 0;
    for (size_t i = 0; i < n && len < sizeof names; i++)
        len += (size_t)snprintf(names + len, sizeof names - len, "%s%s", i ? ", " : "", defs[i]->name);
    log_msg(LOG_INFO, "%s %zu task module(s) from %s: %s", verb, task_modules_count(t->mods), t->path, names);
}

/* Loads the built or copied generation t->gen + 1 from its directory; on success it becomes the registered one,
 * else the directory is removed. */
static int install_generation(struct taskdir *t, char *err, size_t errlen)
{
    unsigned gen = t->gen + 1;
    char dir[128];
    gen_dir(t, gen, dir, sizeof dir);
    struct task_modules *mods = task_modules_load(dir, err, errlen);
    if (!mods) {
        remove_dir(dir);
        return -1;
    }
    size_t n;
    const struct task_def *const *defs = task_modules_defs(mods, &n);
    task_registry_use(defs, n);
    /* The pool processes forked before keep their own copies; this process is done with the old ones. */
    task_modules_free(t->mods);
    if (t->gen) {
        char old[128];
        gen_dir(t, t->gen, old, sizeof old);
        remove_dir(old);
    }
    t->mods = mods;
    t->gen = gen;
    return 0;
}

static int make_generation_dir(const struct taskdir *t, char *dir, size_t len, char *err, size_t errlen)
{
    gen_dir(t, t->gen + 1, dir, len);
    if (mkdir(dir, 0700) < 0) {
        snprintf(err, errlen, "cannot create %s: %s", dir, strerror(errno));
        return -1;
    }
    return 0;
}

static int build_failed(const struct taskdir *t, const char *dir, char *err, size_t errlen)
{
    snprintf(err, errlen, "building the task modules in %s failed (the compiler's messages are above)", t->path);
    remove_dir(dir);
    return -1;
}

/* Builds or copies, then loads, generation t->gen + 1, in this process. */
static int next_generation(struct taskdir *t, char *err, size_t errlen)
{
    char dir[128];
    if (make_generation_dir(t, dir, sizeof dir, err, errlen) < 0)
        return -1;
    if (t->sources) {
        char *diag = NULL;
        int built = task_modules_build(t->path, dir, &diag);
        log_compiler_output(diag, built < 0);
        free(diag);
        if (built < 0)
            return build_failed(t, dir, err, errlen);
    } else if (copy_modules(t->path, dir, err, errlen) < 0) {
        remove_dir(dir);
        return -1;
    }
    return install_generation(t, err, errlen);
}

/* Forks the builder of generation t->gen + 1: it runs the compiler and writes its messages to a pipe; its exit
 * status says whether the build succeeded. */
static int start_build(struct taskdir *t, char *err, size_t errlen)
{
    char dir[128];
    if (make_generation_dir(t, dir, sizeof dir, err, errlen) < 0)
        return -1;
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) < 0) {
        snprintf(err, errlen, "pipe: %s", strerror(errno));
        remove_dir(dir);
        return -1;
    }
    log_flush(); /* or the builder would write the lines buffered here a second time */
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(err, errlen, "fork: %s", strerror(errno));
        close(fds[0]);
        close(fds[1]);
        remove_dir(dir);
        return -1;
    }
    if (pid == 0) {
        /* Touches nothing of the worker's (connections, pool sockets): builds, reports, leaves. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        signal(SIGINT, SIG_IGN);
        signal(SIGTERM, SIG_DFL);
        close(fds[0]);
        char *diag = NULL;
        int built = task_modules_build(t->path, dir, &diag);
        for (size_t off = 0, len = diag ? strlen(diag) : 0; off < len;) {
            ssize_t w = write(fds[1], diag + off, len - off);
            if (w <= 0)
                break;
            off += (size_t)w;
        }
        _exit(built < 0 ? 1 : 0);
    }
    close(fds[1]);
    fcntl(fds[0], F_SETFL, O_NONBLOCK);
    t->builder = pid;
    t->build_fd = fds[0];
    t->build_len = 0;
    return 0;
}

static void read_build_output(struct taskdir *t)
{
    for (;;) {
        char chunk[4096];
        ssize_t n = read(t->build_fd, chunk, sizeof chunk);
        if (n <= 0)
            return;
        char *grown = realloc(t->build_diag, t->build_len + (size_t)n + 1);
        if (!grown)
            abort();
        t->build_diag = grown;
        memcpy(t->build_diag + t->build_len, chunk, (size_t)n);
        t->build_len += (size_t)n;
        t->build_diag[t->build_len] = '\0';
    }
}

/* Ends the builder: waited for (block) or only looked at. Returns 1 when it is done and its generation is
 * installed, -1 when it failed (logged), 0 while it runs. */
static int finish_build(struct taskdir *t, bool block, char *err, size_t errlen)
{
    read_build_output(t);
    int status = 0;
    pid_t r;
    while ((r = waitpid(t->builder, &status, block ? 0 : WNOHANG)) < 0 && errno == EINTR)
        ;
    if (r == 0)
        return 0;
    read_build_output(t);
    close(t->build_fd);
    t->build_fd = -1;
    t->builder = 0;
    bool ok = r > 0 && WIFEXITED(status) && WEXITSTATUS(status) == 0;
    log_compiler_output(t->build_diag, !ok);
    free(t->build_diag);
    t->build_diag = NULL;
    t->build_len = 0;
    char dir[128];
    gen_dir(t, t->gen + 1, dir, sizeof dir);
    if (!ok)
        return build_failed(t, dir, err, errlen);
    return install_generation(t, err, errlen) < 0 ? -1 : 1;
}

/* A build that is no longer wanted (a reload now, or closing). */
static void cancel_build(struct taskdir *t)
{
    if (!t->builder)
        return;
    kill(t->builder, SIGKILL);
    char err[256];
    finish_build(t, true, err, sizeof err); /* reaps it; a killed build counts as failed, its directory removed */
}

struct taskdir *taskdir_open(const char *path, bool watch, char *err, size_t errlen)
{
    struct taskdir *t = calloc(1, sizeof *t);
    if (!t || !(t->path = strdup(path)))
        abort();
    t->ifd = -1;
    t->build_fd = -1;
    struct stat st;
    t->sources = stat(path, &st) == 0 && S_ISDIR(st.st_mode) && task_modules_has_sources(path);
    if (watch && !t->sources) {
        snprintf(err, errlen, "--dev needs --tasks to name a directory of C files (%s holds none)", path);
        goto fail;
    }
    snprintf(t->root, sizeof t->root, "/tmp/celeriac-tasks-XXXXXX");
    if (!mkdtemp(t->root)) {
        snprintf(err, errlen, "cannot create a directory for task modules: %s", strerror(errno));
        t->root[0] = '\0';
        goto fail;
    }
    if (next_generation(t, err, errlen) < 0)
        goto fail;
    log_tasks(t, "Loaded");
    if (watch) {
        t->ifd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
        if (t->ifd < 0 ||
            inotify_add_watch(t->ifd, path, IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_CREATE | IN_DELETE) < 0) {
            snprintf(err, errlen, "cannot watch %s: %s", path, strerror(errno));
            goto fail;
        }
        log_msg(LOG_INFO, "Dev mode: watching %s; a change rebuilds and swaps its modules in", path);
    }
    return t;
fail:
    taskdir_close(t);
    return NULL;
}

void taskdir_close(struct taskdir *t)
{
    if (!t)
        return;
    cancel_build(t);
    if (t->mods)
        task_registry_use(NULL, 0);
    task_modules_free(t->mods);
    if (t->gen) {
        char dir[128];
        gen_dir(t, t->gen, dir, sizeof dir);
        remove_dir(dir);
    }
    if (t->root[0])
        rmdir(t->root);
    if (t->ifd >= 0)
        close(t->ifd);
    free(t->path);
    free(t);
}

int taskdir_fd(const struct taskdir *t)
{
    return t ? t->ifd : -1;
}

void taskdir_on_readable(struct taskdir *t, double now)
{
    char events[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
    ssize_t n;
    while ((n = read(t->ifd, events, sizeof events)) > 0) {
        for (char *p = events; p < events + n;) {
            const struct inotify_event *e = (const struct inotify_event *)p;
            size_t len = e->len ? strlen(e->name) : 0;
            bool source = len > 2 && e->name[0] != '.' &&
                          (strcmp(e->name + len - 2, ".c") == 0 || strcmp(e->name + len - 2, ".h") == 0);
            if (source)
                t->due = now + REBUILD_DELAY_S;
            p += sizeof *e + e->len;
        }
    }
}

int taskdir_next_ms(const struct taskdir *t, double now)
{
    if (!t)
        return -1;
    if (t->builder)
        return (int)(BUILD_POLL_S * 1000);
    if (t->due <= 0)
        return -1;
    return t->due <= now ? 0 : (int)((t->due - now) * 1000) + 1;
}

int taskdir_reload(struct taskdir *t)
{
    char err[512];
    t->due = 0;
    cancel_build(t);
    if (next_generation(t, err, sizeof err) < 0) {
        log_msg(LOG_ERROR, "%s; the previous version keeps serving", err);
        return -1;
    }
    log_tasks(t, "Reloaded");
    return 1;
}

int taskdir_tick(struct taskdir *t, double now)
{
    if (!t)
        return 0;
    char err[512];
    if (t->builder) {
        int done = finish_build(t, false, err, sizeof err);
        if (done == 0)
            return 0;
        if (done < 0) {
            log_msg(LOG_ERROR, "%s; the previous version keeps serving", err);
            return -1;
        }
        log_tasks(t, "Reloaded");
        return 1;
    }
    if (t->due <= 0 || now < t->due)
        return 0;
    t->due = 0; /* a change from now on schedules the next build */
    if (start_build(t, err, sizeof err) < 0) {
        log_msg(LOG_ERROR, "%s; the previous version keeps serving", err);
        return -1;
    }
    return 0;
}

size_t taskdir_task_count(const struct taskdir *t)
{
    size_t n = 0;
    if (t && t->mods)
        task_modules_defs(t->mods, &n);
    return n;
}
