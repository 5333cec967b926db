/* Fuzz target for the message decoder (worker/message.c), the code that reads bytes anyone can push into a
 * queue.
 *
 * With clang and -DCELERIAC_FUZZ=ON this is a libFuzzer target:
 *     build-fuzz/fuzz_message tests/data/messages/<any>/   (or a corpus directory of your own)
 * Without it, main() below replays the seed corpus, tests/data/messages/STAR/message.json, plus every
 * prefix and a set of single-byte mutations of each, so that a plain (sanitized) build exercises the same
 * invariants as an ordinary ctest test. */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "message.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* What must hold whatever the input: no crash or sanitizer report, and a decoded request that is
 * internally consistent (the worker relies on these without checking again). */
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct msg_request r = {0};
    char err[256];
    int st = msg_decode((const char *)data, size, 0, &r, err, sizeof err);
    if (st == MSG_OK) {
        if (!r.body || r.body[r.body_len] != '\0')
            abort();
        if (r.protocol != 1 && r.protocol != 2)
            abort();
        if (!r.id.s || !r.task.s || strlen(r.task.s) != r.task.len || strlen(r.id.s) != r.id.len)
            abort();
    } else if (st > 0 || st < MSG_ERR_TOO_LARGE || !err[0]) {
        abort(); /* every refusal is one of the statuses and says why */
    }
    char label[64];
    msg_label(&r, label, sizeof label);
    msg_request_clear(&r);
    return 0;
}

#ifndef CELERIAC_LIBFUZZER
static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *data = malloc((size_t)n + 1);
    if (!data || fread(data, 1, (size_t)n, f) != (size_t)n) {
        free(data);
        fclose(f);
        return NULL;
    }
    fclose(f);
    *len = (size_t)n;
    return data;
}

/* Each input, every prefix of it (truncations), and each position overwritten with bytes that matter to
 * a JSON scanner. Inputs are copied to a buffer of their exact size so ASan sees any read past the end. */
static unsigned long replay(const char *data, size_t len)
{
    static const char specials[] = {'"', '\\', '{', '}', '[', ']', ',', ':', '0', '\0', '\x80', '\xff', 'u'};
    unsigned long runs = 0;
    for (size_t cut = 0; cut <= len; cut++) {
        uint8_t *copy = malloc(cut ? cut : 1);
        memcpy(copy, data, cut);
        LLVMFuzzerTestOneInput(copy, cut);
        runs++;
        if (cut == len) {
            for (size_t i = 0; i < len; i += 7) {
                for (size_t k = 0; k < sizeof specials; k++) {
                    uint8_t saved = copy[i];
                    copy[i] = (uint8_t)specials[k];
                    LLVMFuzzerTestOneInput(copy, len);
                    copy[i] = saved;
                    runs++;
                }
            }
        }
        free(copy);
    }
    return runs;
}

int main(int argc, char **argv)
{
    const char *dir = argc > 1 ? argv[1] : "tests/data/messages";
    DIR *d = opendir(dir);
    if (!d) {
        fprintf(stderr, "fuzz_message: cannot open %s (run from the repository root)\n", dir);
        return 1;
    }
    unsigned long runs = 0, seeds = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char path[1024];
        snprintf(path, sizeof path, "%s/%s/message.json", dir, e->d_name);
        size_t len = 0;
        char *data = read_file(path, &len);
        if (!data)
            continue;
        runs += replay(data, len);
        seeds++;
        free(data);
    }
    closedir(d);
    if (seeds < 10) {
        fprintf(stderr, "fuzz_message: only %lu seed messages found in %s\n", seeds, dir);
        return 1;
    }
    printf("fuzz_message: %lu seed messages, %lu inputs replayed, no failure\n", seeds, runs);
    return 0;
}
#endif
