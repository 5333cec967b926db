/* sdk: the commands for writing native tasks: `celeriac new-task`, `celeriac build` and `celeriac stubs`. */
#ifndef CELERIAC_SDK_H
#define CELERIAC_SDK_H

#include <stdbool.h>

/* Whether argv1 names one of these commands. */
bool sdk_is_command(const char *argv1);
/* Runs the command argv[1] with its arguments; returns the process exit code (0, 1 on failure, 2 on a usage
 * error). Messages go to stdout/stderr. */
int sdk_main(int argc, char **argv);

#endif
