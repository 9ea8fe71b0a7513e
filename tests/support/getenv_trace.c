/* LD_PRELOAD shim for tests/test_environment.py: appends the name of every variable looked up
 * with getenv(3) or secure_getenv(3) to the file named by $MODELCLOAK_GETENV_TRACE, one per line.
 * Libraries that read the environment through these calls (onnxruntime, OpenVINO, oneDNN, TBB,
 * OpenMP, OpenSSL, ...) thereby list the switches they actually consult. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

static int trace_fd = -2;

static void record(const char *name) {
    if (trace_fd == -2) {
        char *(*real)(const char *) = (char *(*)(const char *))dlsym(RTLD_NEXT, "getenv");
        const char *path = real ? real("MODELCLOAK_GETENV_TRACE") : 0;
        trace_fd = path ? open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600) : -1;
    }
    if (trace_fd >= 0 && name) {
        ssize_t ignored = write(trace_fd, name, strlen(name));
        ignored = write(trace_fd, "\n", 1);
        (void)ignored;
    }
}

char *getenv(const char *name) {
    static char *(*real)(const char *);
    if (!real) real = (char *(*)(const char *))dlsym(RTLD_NEXT, "getenv");
    record(name);
    return real(name);
}

char *secure_getenv(const char *name) {
    static char *(*real)(const char *);
    if (!real) real = (char *(*)(const char *))dlsym(RTLD_NEXT, "secure_getenv");
    record(name);
    return real(name);
}
