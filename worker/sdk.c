/* sdk: new-task, build and stubs (see sdk.h). */
#include "sdk.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "buf.h"
#include "modules.h"
#include "task.h"
#include "taskdir.h"

static bool is_identifier(const char *s)
{
    if (!s || !((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || *s == '_'))
        return false;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') || (*s >= '0' && *s <= '9') || *s == '_'))
            return false;
    return true;
}

/* The example a user starts from: it builds, runs and shows the parts of the contract they need first. @NAME@
 * stands for the task's name. */
static const char new_task_template[] =
    "/* @NAME@: a native Celery task, run by celeriac.\n"
    " *\n"
    " * Try it:\n"
    " *   celeriac worker --tasks DIR --dev      (DIR: this file's directory; rebuilt on every save)\n"
    " *   python3 -c 'from celery import Celery; app = Celery(broker=\"redis://\", backend=\"redis://\");\n"
    " *               print(app.send_task(\"native.@NAME@\", args=[[1, 2, 3]], kwargs={\"weight\": 2}).get())'\n"
    " *   -> 12\n"
    " *\n"
    " * Everything a task can do (arguments, failures, retries, progress, time limits, PostgreSQL, subtasks) is\n"
    " * described in celeriac.h; `celeriac build DIR` finds it, you do not need a copy. */\n"
    "#include <celeriac.h>\n"
    "\n"
    "/* The task: weight * sum(values). Its parameters are declared in the table below; by the time it runs, the\n"
    " * worker has matched the caller's positional and keyword arguments to them (and answered a wrong call with\n"
    " * Python's TypeError), so `args` holds one value per parameter, defaults filled in. */\n"
    "static enum task_outcome @NAME@(struct task_ctx *ctx, json_t *args, json_t *kwargs, json_t **result)\n"
    "{\n"
    "    (void)kwargs; /* only for tasks declared with **kwargs */\n"
    "    json_t *values;\n"
    "    long long weight;\n"
    "    /* Typed reads: on a wrong type they set a TypeError naming the parameter, and the task returns. */\n"
    "    if (!task_arg_list(ctx, args, \"values\", &values) || !task_arg_int(ctx, args, \"weight\", &weight))\n"
    "        return TASK_FAILURE;\n"
    "\n"
    "    long long total = 0;\n"
    "    size_t i;\n"
    "    json_t *v;\n"
    "    json_array_foreach(values, i, v) {\n"
    "        if (!json_is_integer(v)) /* a failure the Python caller sees as ValueError(message) */\n"
    "            return task_fail(ctx, \"ValueError\", \"@NAME@(): values[%zu] is %s, not an int\", i,\n"
    "                             task_pytype(v));\n"
    "        total += json_integer_value(v);\n"
    "        if (task_should_stop(ctx)) /* soft time limit passed, or revoked: give up cleanly */\n"
    "            return task_stop(ctx);\n"
    "    }\n"
    "    /* The result: any JSON value (a new reference, handed over); AsyncResult.get() returns it. */\n"
    "    return task_return(ctx, result, json_integer(total * weight));\n"
    "}\n"
    "\n"
    "/* The module's tasks: Celery name (native.* is routed to celeriac by python_tasks), function, Python-style\n"
    " * parameters with defaults, one line of doc (it becomes the Python stub's docstring). Optional fields:\n"
    " * .acks_late, .rate_limit (\"10/s\"), .time_limit, .soft_time_limit. */\n"
    "static const struct task_def tasks[] = {\n"
    "    {.name = \"native.@NAME@\", .fn = @NAME@, .params = \"values, weight=1\", .doc = \"-> weight * sum(values).\"},\n"
    "};\n"
    "CELERIAC_MODULE(tasks);\n";

static int usage(const char *line)
{
    fprintf(stderr, "celeriac: error: %s\n", line);
    return 2;
}

static int cmd_new_task(int argc, char **argv)
{
    const char *name = NULL, *dir = ".";
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--dir") == 0 && i + 1 < argc)
            dir = argv[++i];
        else if (strncmp(argv[i], "--dir=", 6) == 0)
            dir = argv[i] + 6;
        else if (argv[i][0] == '-')
            return usage("usage: celeriac new-task NAME [--dir DIR]");
        else if (!name)
            name = argv[i];
        else
            return usage("usage: celeriac new-task NAME [--dir DIR]");
    }
    if (!name)
        return usage("usage: celeriac new-task NAME [--dir DIR]");
    if (!is_identifier(name))
        return usage("new-task: NAME must be a C identifier (letters, digits, '_'), e.g. score");
    if (mkdir(dir, 0777) < 0 && errno != EEXIST) {
        fprintf(stderr, "celeriac: error: cannot create %s: %s\n", dir, strerror(errno));
        return 1;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.c", dir, name);
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0644);
    if (fd < 0) {
        fprintf(stderr, "celeriac: error: cannot create %s: %s%s\n", path, strerror(errno),
                errno == EEXIST ? " (not overwritten)" : "");
        return 1;
    }
    FILE *f = fdopen(fd, "w");
    if (!f) {
        close(fd);
        return 1;
    }
    for (const char *p = new_task_template; *p;) {
        const char *at = strstr(p, "@NAME@");
        size_t n = at ? (size_t)(at - p) : strlen(p);
        fwrite(p, 1, n, f);
        p += n;
        if (at) {
            fputs(name, f);
            p += 6;
        }
    }
    if (fclose(f) != 0) {
        fprintf(stderr, "celeriac: error: writing %s: %s\n", path, strerror(errno));
        return 1;
    }
    printf("wrote %s: task native.%s\n"
           "next: celeriac worker --tasks %s --dev   (rebuilds on every save)\n",
           path, name, dir);
    return 0;
}

static int cmd_build(int argc, char **argv)
{
    if (argc != 3 || argv[2][0] == '-')
        return usage("usage: celeriac build DIR");
    const char *dir = argv[2];
    char *diag = NULL;
    int built = task_modules_build(dir, dir, &diag);
    if (diag)
        fputs(diag, stderr);
    free(diag);
    if (built < 0) {
        fprintf(stderr, "celeriac: build of %s failed\n", dir);
        return 1;
    }
    if (built == 0) {
        fprintf(stderr, "celeriac: error: no .c files in %s (celeriac new-task NAME --dir %s writes one)\n", dir,
                dir);
        return 1;
    }
    /* Loading them here catches what compiles but would be refused by a worker (no table, bad params...). */
    char err[512];
    struct task_modules *m = task_modules_load(dir, err, sizeof err);
    if (!m) {
        fprintf(stderr, "celeriac: error: %s\n", err);
        return 1;
    }
    size_t n;
    const struct task_def *const *defs = task_modules_defs(m, &n);
    printf("built %d module(s) in %s:", built, dir);
    for (size_t i = 0; i < n; i++)
        printf("%s %s", i ? "," : "", defs[i]->name);
    printf("\n");
    task_modules_free(m);
    return 0;
}

/* ---------------------------------------------------------------- stubs */

/* A JSON default as Python source: null/true/false become None/True/False; the rest is valid Python as JSON
 * writes it (numbers, strings with JSON escapes, lists, dicts with string keys). */
static void py_literal(struct buf *out, const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_NULL: buf_append_str(out, "None"); return;
    case JSON_TRUE: buf_append_str(out, "True"); return;
    case JSON_FALSE: buf_append_str(out, "False"); return;
    case JSON_ARRAY: {
        buf_append_str(out, "[");
        size_t i;
        json_t *x;
        json_array_foreach(v, i, x) {
            if (i)
                buf_append_str(out, ", ");
            py_literal(out, x);
        }
        buf_append_str(out, "]");
        return;
    }
    case JSON_OBJECT: {
        buf_append_str(out, "{");
        const char *k;
        json_t *x;
        bool first = true;
        json_object_foreach((json_t *)v, k, x) {
            json_t *key = json_string(k);
            char *ks = json_dumps(key, JSON_ENCODE_ANY);
            buf_printf(out, "%s%s: ", first ? "" : ", ", ks ? ks : "''");
            free(ks);
            json_decref(key);
            py_literal(out, x);
            first = false;
        }
        buf_append_str(out, "}");
        return;
    }
    default: {
        char *s = json_dumps(v, JSON_ENCODE_ANY | JSON_REAL_PRECISION(17));
        buf_append_str(out, s ? s : "None");
        free(s);
    }
    }
}

/* The params string as a Python parameter list: names kept, defaults converted (task_params_valid holds). */
static void py_params(struct buf *out, const char *params)
{
    const char *p = params ? params : "";
    bool first = true;
    while (*p) {
        size_t n = strcspn(p, ",");
        const char *item = p, *end = p + n;
        while (item < end && (*item == ' ' || *item == '\t'))
            item++;
        while (end > item && (end[-1] == ' ' || end[-1] == '\t'))
            end--;
        if (item < end) {
            const char *eq = memchr(item, '=', (size_t)(end - item));
            const char *name_end = eq ? eq : end;
            while (name_end > item && (name_end[-1] == ' ' || name_end[-1] == '\t'))
                name_end--;
            buf_printf(out, "%s%.*s", first ? "" : ", ", (int)(name_end - item), item);
            if (eq) {
                const char *d = eq + 1;
                while (d < end && (*d == ' ' || *d == '\t'))
                    d++;
                json_t *v = NULL;
                size_t dl = (size_t)(end - d);
                if ((dl == 4 && memcmp(d, "None", 4) == 0) || (dl == 4 && memcmp(d, "True", 4) == 0) ||
                    (dl == 5 && memcmp(d, "False", 5) == 0))
                    buf_printf(out, "=%.*s", (int)dl, d);
                else if ((v = json_loadb(d, dl, JSON_DECODE_ANY, NULL))) {
                    buf_append_str(out, "=");
                    py_literal(out, v);
                }
                json_decref(v);
            }
            first = false;
        }
        p += n + (p[n] == ',');
    }
}

/* The doc, wrapped at the file's line length, as a docstring body. */
static void py_docstring(struct buf *out, const char *doc)
{
    const size_t width = 116 - 4;
    buf_append_str(out, "    \"\"\"");
    size_t col = 7;
    const char *p = doc && *doc ? doc : "A native task.";
    bool first = true;
    while (*p) {
        while (*p == ' ')
            p++;
        size_t n = strcspn(p, " ");
        if (!n)
            break;
        if (!first && col + 1 + n > width) {
            buf_append_str(out, "\n    ");
            col = 4;
        } else if (!first) {
            buf_append_str(out, " ");
            col++;
        }
        for (size_t i = 0; i < n; i++) {
            if (p[i] == '\\' || (p[i] == '"' && i + 2 < n && p[i + 1] == '"' && p[i + 2] == '"'))
                buf_append_char(out, '\\');
            buf_append_char(out, p[i]);
        }
        col += n;
        p += n;
        first = false;
    }
    buf_append_str(out, "\"\"\"\n");
}

struct stubs {
    struct buf out;
    int bad; /* tasks whose name gives no Python identifier */
};

static void stub_one(const struct task_def *t, void *arg)
{
    struct stubs *s = arg;
    const char *dot = strrchr(t->name, '.');
    const char *fname = dot ? dot + 1 : t->name;
    if (!is_identifier(fname)) {
        fprintf(stderr, "celeriac: warning: task %s: '%s' is not a Python identifier, no stub written\n", t->name,
                fname);
        s->bad++;
        return;
    }
    buf_printf(&s->out, "\n\n@app.task(name=\"%s\", shared=False)\ndef %s(", t->name, fname);
    py_params(&s->out, t->params);
    buf_append_str(&s->out, "):\n");
    py_docstring(&s->out, t->doc);
    buf_printf(&s->out, "    _native_only(\"%s\")\n", t->name);
}

static const char stubs_header[] =
    "\"\"\"Client-side stubs for celeriac's native tasks. Generated by `celeriac stubs`: do not edit.\n"
    "\n"
    "Each stub has the task's Celery name and parameters, so ``add.delay(2, 3)`` builds the same message a Python\n"
    "task would (and Celery checks the argument count before sending). The bodies never run in Python: celeriac\n"
    "executes the task. python_tasks.celeryconfig routes native.* to celeriac's queue (or, with\n"
    "CELERIAC_MODE=python, to a Python worker running python_tasks.fallbacks).\n"
    "\"\"\"\n"
    "from python_tasks.app import app\n"
    "\n"
    "\n"
    "def _native_only(name):\n"
    "    raise NotImplementedError(f\"{name} runs on a celeriac worker, not in Python \"\n"
    "                              f\"(python_tasks.fallbacks has a Python version of the built-ins)\")\n";

static int cmd_stubs(int argc, char **argv)
{
    const char *tasks = NULL, *output = NULL;
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--tasks") == 0 && i + 1 < argc)
            tasks = argv[++i];
        else if (strncmp(argv[i], "--tasks=", 8) == 0)
            tasks = argv[i] + 8;
        else if ((strcmp(argv[i], "-o") == 0 || strcmp(argv[i], "--output") == 0) && i + 1 < argc)
            output = argv[++i];
        else
            return usage("usage: celeriac stubs [--tasks PATH] [-o FILE]");
    }
    struct taskdir *td = NULL;
    if (tasks) {
        char err[512];
        td = taskdir_open(tasks, false, err, sizeof err);
        if (!td) {
            fprintf(stderr, "celeriac: error: %s\n", err);
            return 1;
        }
    }
    struct stubs s = {0};
    buf_append_str(&s.out, stubs_header);
    task_registry_each(stub_one, &s);
    taskdir_close(td);
    FILE *f = output ? fopen(output, "w") : stdout;
    if (!f) {
        fprintf(stderr, "celeriac: error: cannot write %s: %s\n", output, strerror(errno));
        buf_free(&s.out);
        return 1;
    }
    fwrite(s.out.data, 1, s.out.len, f);
    int rc = (output ? fclose(f) : fflush(f)) == 0 ? 0 : 1;
    buf_free(&s.out);
    return rc || s.bad ? 1 : 0;
}

bool sdk_is_command(const char *argv1)
{
    return argv1 && (strcmp(argv1, "new-task") == 0 || strcmp(argv1, "build") == 0 || strcmp(argv1, "stubs") == 0);
}

int sdk_main(int argc, char **argv)
{
    if (strcmp(argv[1], "new-task") == 0)
        return cmd_new_task(argc, argv);
    if (strcmp(argv[1], "build") == 0)
        return cmd_build(argc, argv);
    return cmd_stubs(argc, argv);
}
