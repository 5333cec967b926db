/* modules: building task modules with the system compiler and loading them with dlopen (see modules.h). */
#include "modules.h"

#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef CELERIAC_PQ_INCLUDE
#define CELERIAC_PQ_INCLUDE "/usr/include/postgresql"
#endif

/* Generated from celeriac.h by cmake/embed.cmake. */
extern const char celeriac_header_text[];
extern const size_t celeriac_header_text_len;

#define MODULES_MAX 256

struct task_modules {
    void *handles[MODULES_MAX]; /* dlopen handles, owned */
    size_t nhandles;
    const struct task_def **defs; /* owned array of pointers into the modules' tables */
    size_t ndefs;
};

static bool has_suffix(const char *name, const char *suffix)
{
    size_t n = strlen(name), s = strlen(suffix);
    return n > s && strcmp(name + n - s, suffix) == 0;
}

static int compare_names(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* The names in dir ending in suffix, sorted (so builds and loads happen in a stable order). Caller frees each
 * and the array; NULL with errno on failure, or an empty list (*n == 0). */
static char **list_dir(const char *dir, const char *suffix, size_t *n)
{
    *n = 0;
    DIR *d = opendir(dir);
    if (!d)
        return NULL;
    char **names = NULL;
    size_t cap = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.' || !has_suffix(e->d_name, suffix))
            continue;
        if (*n == cap) {
            cap = cap ? cap * 2 : 8;
            char **grown = realloc(names, cap * sizeof *grown);
            if (!grown)
                abort();
            names = grown;
        }
        if (!(names[(*n)++] = strdup(e->d_name)))
            abort();
    }
    closedir(d);
    if (*n)
        qsort(names, *n, sizeof *names, compare_names);
    else if (!names && !(names = malloc(sizeof *names)))
        abort();
    return names;
}

static void free_list(char **names, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
}

bool task_modules_has_sources(const char *dir)
{
    size_t n;
    char **names = list_dir(dir, ".c", &n);
    free_list(names, names ? n : 0);
    return names && n > 0;
}

int task_modules_write_header(const char *dir)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/celeriac.h", dir);
    FILE *f = fopen(path, "w");
    if (!f)
        return -1;
    size_t w = fwrite(celeriac_header_text, 1, celeriac_header_text_len, f);
    return fclose(f) == 0 && w == celeriac_header_text_len ? 0 : -1;
}

static void append(char **dst, size_t *len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void append(char **dst, size_t *len, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *piece = NULL;
    int n = vasprintf(&piece, fmt, ap);
    va_end(ap);
    if (n < 0)
        abort();
    char *grown = realloc(*dst, *len + (size_t)n + 1);
    if (!grown)
        abort();
    memcpy(grown + *len, piece, (size_t)n + 1);
    *dst = grown;
    *len += (size_t)n;
    free(piece);
}

/* Runs argv, appending what it printed (stdout and stderr) to *out. Returns its exit status as from waitpid,
 * or -1 when it could not be started. */
static int run_capture(char *const argv[], char **out, size_t *outlen)
{
    int pipefd[2];
    if (pipe2(pipefd, O_CLOEXEC) < 0)
        return -1;
    pid_t pid = fork();
    if (pid < 0) {
        close(pipefd[0]);
        close(pipefd[1]);
        return -1;
    }
    if (pid == 0) {
        dup2(pipefd[1], STDOUT_FILENO);
        dup2(pipefd[1], STDERR_FILENO);
        execvp(argv[0], argv);
        fprintf(stderr, "cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    close(pipefd[1]);
    char chunk[4096];
    ssize_t r;
    while ((r = read(pipefd[0], chunk, sizeof chunk)) != 0) {
        if (r < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        append(out, outlen, "%.*s", (int)r, chunk);
    }
    close(pipefd[0]);
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return -1;
    return status;
}

int task_modules_build(const char *src_dir, const char *out_dir, char **diag)
{
    *diag = NULL;
    size_t dlen = 0, n;
    char **sources = list_dir(src_dir, ".c", &n);
    if (!sources) {
        append(diag, &dlen, "cannot read %s: %s\n", src_dir, strerror(errno));
        return -1;
    }
    /* The header goes to a directory of its own, so that a user's file of the same name is not shadowed. */
    char incdir[] = "/tmp/celeriac-include-XXXXXX";
    if (!mkdtemp(incdir) || task_modules_write_header(incdir) < 0) {
        append(diag, &dlen, "cannot write celeriac.h into a temporary directory: %s\n", strerror(errno));
        free_list(sources, n);
        return -1;
    }
    const char *cc = getenv("CC");
    if (!cc || !*cc)
        cc = "cc";
    int built = 0;
    for (size_t i = 0; i < n && built >= 0; i++) {
        char src[4096], out[4096], tmp[4200], inc[4200];
        size_t stem = strlen(sources[i]) - 2;
        snprintf(src, sizeof src, "%s/%s", src_dir, sources[i]);
        snprintf(out, sizeof out, "%s/%.*s.so", out_dir, (int)stem, sources[i]);
        snprintf(tmp, sizeof tmp, "%s.tmp%d", out, (int)getpid());
        snprintf(inc, sizeof inc, "-I%s", incdir);
        /* -fPIC -shared: a module; no -Werror (the user's warnings are shown, not fatal), except calling
         * an undeclared function, which would only fail at load time, far from the line that caused it. */
        char *argv[] = {(char *)cc, "-std=gnu11", "-O2", "-g", "-fPIC", "-shared", "-Wall", "-Wextra",
                        "-Werror=implicit-function-declaration", inc, "-I" CELERIAC_PQ_INCLUDE, "-o", tmp, src,
                        "-ljansson", "-l:libpq.so.5", NULL};
        size_t before = dlen;
        int status = run_capture(argv, diag, &dlen);
        if (status < 0) {
            append(diag, &dlen, "cannot run the C compiler %s: %s\n", cc, strerror(errno));
            built = -1;
        } else if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
            if (WIFEXITED(status) && WEXITSTATUS(status) == 127 && dlen == before)
                append(diag, &dlen, "cannot run the C compiler %s\n", cc);
            unlink(tmp);
            built = -1;
        } else if (rename(tmp, out) < 0) {
            append(diag, &dlen, "cannot write %s: %s\n", out, strerror(errno));
            unlink(tmp);
            built = -1;
        } else {
            built++;
        }
    }
    char header[sizeof incdir + 16];
    snprintf(header, sizeof header, "%s/celeriac.h", incdir);
    unlink(header);
    rmdir(incdir);
    free_list(sources, n);
    return built;
}

static int fail(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return -1;
}

static int compare_defs(const void *a, const void *b)
{
    return strcmp((*(const struct task_def *const *)a)->name, (*(const struct task_def *const *)b)->name);
}

/* Opens one module and appends its tasks to m. Returns 0, or -1 with err filled. */
static int load_one(struct task_modules *m, const char *path, char *err, size_t errlen)
{
    if (m->nhandles == MODULES_MAX)
        return fail(err, errlen, "too many task modules (at most %d)", MODULES_MAX);
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h)
        return fail(err, errlen, "cannot load task module %s: %s", path, dlerror());
    m->handles[m->nhandles++] = h;
    const struct celeriac_module *mod = dlsym(h, "celeriac_module");
    if (!mod)
        return fail(err, errlen, "%s is not a celeriac task module: it has no CELERIAC_MODULE(table) line", path);
    if (mod->abi_version != CELERIAC_ABI_VERSION)
        return fail(err, errlen,
                    "%s was built against celeriac.h version %d, this worker speaks version %d: rebuild it with "
                    "`celeriac build` (or run the worker with --dev)",
                    path, mod->abi_version, CELERIAC_ABI_VERSION);
    if (!mod->tasks || mod->ntasks == 0 || mod->ntasks > 4096)
        return fail(err, errlen, "%s: its task table is empty", path);
    const struct task_def **grown = realloc(m->defs, (m->ndefs + mod->ntasks) * sizeof *grown);
    if (!grown)
        abort();
    m->defs = grown;
    for (size_t i = 0; i < mod->ntasks; i++) {
        const struct task_def *t = &mod->tasks[i];
        if (!t->name || !*t->name || strlen(t->name) > 200)
            return fail(err, errlen, "%s: task %zu of its table has no name", path, i);
        if (!t->fn)
            return fail(err, errlen, "%s: task %s has no function", path, t->name);
        if (!task_params_valid(t->params))
            return fail(err, errlen,
                        "%s: task %s declares params \"%s\", which is not a Python parameter list such as "
                        "\"n, factor=2\"",
                        path, t->name, t->params);
        if (task_registry_is_builtin(t->name))
            return fail(err, errlen, "%s: task %s has the name of a built-in task", path, t->name);
        for (size_t k = 0; k < m->ndefs; k++)
            if (strcmp(m->defs[k]->name, t->name) == 0)
                return fail(err, errlen, "%s: task %s is declared twice (in this module or another)", path,
                            t->name);
        m->defs[m->ndefs++] = t;
    }
    return 0;
}

struct task_modules *task_modules_load(const char *path, char *err, size_t errlen)
{
    struct task_modules *m = calloc(1, sizeof *m);
    if (!m)
        abort();
    struct stat st;
    int rc = 0;
    if (stat(path, &st) < 0) {
        rc = fail(err, errlen, "--tasks %s: %s", path, strerror(errno));
    } else if (S_ISDIR(st.st_mode)) {
        size_t n;
        char **names = list_dir(path, ".so", &n);
        if (!names)
            rc = fail(err, errlen, "--tasks %s: %s", path, strerror(errno));
        else if (n == 0)
            rc = fail(err, errlen, "--tasks %s: no task modules (.so) there; build them with `celeriac build %s`",
                      path, path);
        for (size_t i = 0; names && i < n && rc == 0; i++) {
            char full[4096];
            snprintf(full, sizeof full, "%s/%s", path, names[i]);
            rc = load_one(m, full, err, errlen);
        }
        free_list(names, names ? n : 0);
    } else {
        /* dlopen searches the library path for a name without '/': make a plain file name relative. */
        char full[4096];
        snprintf(full, sizeof full, "%s%s", strchr(path, '/') ? "" : "./", path);
        rc = load_one(m, full, err, errlen);
    }
    if (rc < 0) {
        task_modules_free(m);
        return NULL;
    }
    qsort(m->defs, m->ndefs, sizeof *m->defs, compare_defs);
    return m;
}

const struct task_def *const *task_modules_defs(const struct task_modules *m, size_t *n)
{
    *n = m->ndefs;
    return m->defs;
}

size_t task_modules_count(const struct task_modules *m)
{
    return m->nhandles;
}

void task_modules_free(struct task_modules *m)
{
    if (!m)
        return;
    for (size_t i = 0; i < m->nhandles; i++)
        dlclose(m->handles[i]);
    free(m->defs);
    free(m);
}
