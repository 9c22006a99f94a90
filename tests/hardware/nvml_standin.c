/* A stand-in for the driver's libnvidia-ml.so.1 with the calls hal0 makes, for machines without an NVIDIA GPU.
 *
 * Signatures and structures as in nvml.h, so that the test exercises hal0's ctypes binding (argument passing,
 * structure layout, the too-small-array protocol, error strings) as the real library would. Two GPUs: the first
 * runs processes (one more starts between the count and the listing; one is not accounted), the second none.
 * Built with -DNO_V3 it is a driver from before nvmlDeviceGetComputeRunningProcesses_v3. The test drives it with
 * the standin_* calls.
 */
#include <stdio.h>
#include <string.h>

typedef int nvmlReturn_t;
typedef struct { int index; } device_t;
typedef device_t *nvmlDevice_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int pid; unsigned long long usedGpuMemory; unsigned int gpuInstanceId, computeInstanceId; }
    nvmlProcessInfo_t;

enum { OK = 0, UNINITIALIZED = 1, INVALID_ARGUMENT = 2, INSUFFICIENT_SIZE = 7 };
static device_t devices[2] = {{0}, {1}};
static int started, inits, shutdowns, fail_next, init_error, running = 3;

int standin_inits(void) { return inits; }
int standin_shutdowns(void) { return shutdowns; }
void standin_fail_next(int code) { fail_next = code; }
void standin_fail_init(int code) { init_error = code; }

static nvmlReturn_t query(void) {
    int code = fail_next;
    fail_next = 0;
    if (code) return code;
    return started ? OK : UNINITIALIZED;
}

nvmlReturn_t nvmlInit_v2(void) {
    if (init_error) return init_error;
    inits++;
    started = 1;
    return OK;
}

nvmlReturn_t nvmlShutdown(void) {
    if (!started) return UNINITIALIZED;
    shutdowns++;
    started = 0;
    return OK;
}

const char *nvmlErrorString(nvmlReturn_t r) {
    static char buf[64];
    switch (r) {
    case 3: return "Not Supported";
    case 15: return "GPU is lost";
    default: snprintf(buf, sizeof buf, "stand-in error %d", r); return buf;
    }
}

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *n) {
    nvmlReturn_t r = query();
    if (r == OK) *n = 2;
    return r;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    nvmlReturn_t r = query();
    if (r != OK) return r;
    if (index >= 2) return INVALID_ARGUMENT;
    *device = &devices[index];
    return OK;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *m) {
    nvmlReturn_t r = query();
    if (r != OK) return r;
    m->total = device->index == 0 ? 150754820096ULL : 25757220864ULL;
    m->used = device->index == 0 ? 4294967296ULL + 12345 : 0;
    m->free = m->total - m->used;
    return OK;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    nvmlReturn_t r = query();
    if (r != OK) return r;
    const char *s = device->index == 0 ? "NVIDIA H200" : "NVIDIA GeForce RTX 4090";
    if (strlen(s) + 1 > length) return INSUFFICIENT_SIZE;
    strcpy(name, s);
    return OK;
}

static nvmlReturn_t processes(nvmlDevice_t device, unsigned int *count, nvmlProcessInfo_t *infos) {
    nvmlReturn_t r = query();
    if (r != OK) return r;
    int n = device->index == 0 ? running : 0;
    if (*count < (unsigned)n) {
        *count = n;
        if (device->index == 0) running++; /* a process starts before the caller asks again */
        return INSUFFICIENT_SIZE;
    }
    for (int i = 0; i < n; i++) {
        infos[i].pid = 4000 + i;
        infos[i].usedGpuMemory = i == 1 ? ~0ULL : (unsigned long long)(i + 1) << 30;
        infos[i].gpuInstanceId = infos[i].computeInstanceId = 0xFFFFFFFF;
    }
    *count = n;
    return OK;
}

#ifndef NO_V3
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t d, unsigned int *c, nvmlProcessInfo_t *p) {
    return processes(d, c, p);
}
#endif
nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t d, unsigned int *c, nvmlProcessInfo_t *p) {
    return processes(d, c, p);
}
