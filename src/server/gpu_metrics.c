/*
 * gpu_metrics.c - GPU utilisation, memory, temperature and power through
 * NVML (see the header).
 *
 * NVML, libnvidia-ml.so.1, is installed with NVIDIA's driver (and mounted
 * into containers by NVIDIA's container toolkit), not with the CUDA
 * toolkit, and machines without the driver have none: CI, CPU nodes, the
 * CPU image. So it is opened with dlopen at run time, never linked, and
 * the handful of types and functions used are declared below as nvml.h of
 * NVML API version 13 declares them (CUDA 13.3's cuda_nvml_dev 13.3.29, the
 * copy in NVIDIA/go-nvml's gen/nvml/nvml.h): building needs no NVIDIA
 * header. Each function is looked up alone: one an older driver lacks
 * drops its series, only init, count and the device handles are required.
 *
 * Sampling runs in a thread of its own, every SAMPLE_SECONDS: nvmlInit can
 * take a second or more (the driver wakes the GPUs when persistence mode
 * is off) and a GPU fallen off the bus can make a query hang, neither of
 * which may hold a scrape. The scrape formats the last sample under a
 * mutex. A sample older than STALE_SECONDS (the thread is stuck in the
 * driver) is not shown: sdx4_gpu_nvml_up drops to 0 and the per-GPU
 * series vanish, as they do when NVML is missing, fails to initialise or
 * sees no GPU. Absent series rather than zeros, because a zero would read
 * as an idle, cool, empty GPU; the always-present sdx4_gpu_nvml_up says
 * which case it is.
 *
 * GPUs are numbered as NVML numbers them (PCI bus order), which is not
 * CUDA's default order: the info series gives each index's UUID, which
 * nvidia-smi, DCGM and the Kubernetes device plugin also show. NVML sees
 * every GPU of the machine or container, not only CUDA_VISIBLE_DEVICES.
 */
#include "gpu_metrics.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"
#include "server.h"

/* ---- what is used of nvml.h (NVML API version 13) ---------------------------- */

typedef int nvmlReturn_t; /* an enum: NVML_SUCCESS = 0 */
typedef struct nvmlDevice_st *nvmlDevice_t;
typedef struct {
    unsigned int gpu;    /* % of the last sample period a kernel was running */
    unsigned int memory; /* % of it device memory was being read or written */
} nvmlUtilization_t;
typedef struct {
    unsigned long long total, free, used; /* bytes; used includes the driver's reserve */
} nvmlMemory_t;
enum { NVML_SUCCESS = 0, NVML_TEMPERATURE_GPU = 0 };
enum { NVML_DEVICE_NAME_V2_BUFFER_SIZE = 96, NVML_DEVICE_UUID_V2_BUFFER_SIZE = 96 };

typedef struct {
    nvmlReturn_t (*init)(void);                                     /* nvmlInit_v2 */
    nvmlReturn_t (*shutdown)(void);                                 /* nvmlShutdown */
    const char *(*error_string)(nvmlReturn_t);                      /* nvmlErrorString */
    nvmlReturn_t (*count)(unsigned int *);                          /* nvmlDeviceGetCount_v2 */
    nvmlReturn_t (*handle)(unsigned int, nvmlDevice_t *);           /* nvmlDeviceGetHandleByIndex_v2 */
    nvmlReturn_t (*name)(nvmlDevice_t, char *, unsigned int);       /* nvmlDeviceGetName */
    nvmlReturn_t (*uuid)(nvmlDevice_t, char *, unsigned int);       /* nvmlDeviceGetUUID */
    nvmlReturn_t (*utilization)(nvmlDevice_t, nvmlUtilization_t *); /* nvmlDeviceGetUtilizationRates */
    nvmlReturn_t (*memory)(nvmlDevice_t, nvmlMemory_t *);           /* nvmlDeviceGetMemoryInfo */
    /* nvmlDeviceGetTemperature: deprecated by API 13 for ...TemperatureV,
     * which drivers before 2025 lack; the old one is still exported */
    nvmlReturn_t (*temperature)(nvmlDevice_t, int sensor, unsigned int *);
    nvmlReturn_t (*power)(nvmlDevice_t, unsigned int *milliwatts); /* nvmlDeviceGetPowerUsage */
} nvml_api;

/* ---- the sampler ------------------------------------------------------------------ */

enum { MAX_GPUS = 64 };
/* Prometheus scrapes every 15 to 60 s; 5 s keeps a scrape's view fresh
 * for a few NVML calls per GPU, about a millisecond each */
#define SAMPLE_SECONDS 5.0
#define STALE_SECONDS (3 * SAMPLE_SECONDS)

typedef struct {
    unsigned int index; /* NVML's */
    char name[NVML_DEVICE_NAME_V2_BUFFER_SIZE], uuid[NVML_DEVICE_UUID_V2_BUFFER_SIZE];
    bool has_utilization, has_memory, has_temperature, has_power;
    nvmlUtilization_t utilization;
    nvmlMemory_t memory;
    unsigned int temperature_c, power_mw;
} gpu_sample;

static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    pthread_t thread;
    bool started, stopping;
    /* the last sample, under the lock */
    bool up;
    double sampled_at; /* mono_now() */
    int ngpus;
    gpu_sample gpus[MAX_GPUS];
} s = {.lock = PTHREAD_MUTEX_INITIALIZER};

static void *lookup(void *lib, const char *name, bool *missing) {
    void *f = dlsym(lib, name);
    if (!f && missing) *missing = true;
    return f;
}

/* Opens NVML: the library handle, or NULL with `why` set. */
static void *open_nvml(nvml_api *api, char *why, size_t n) {
    void *lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        snprintf(why, n, "%s", dlerror());
        return NULL;
    }
    bool missing = false;
    /* ISO C does not convert object to function pointers; POSIX's dlsym
     * page assigns through *(void **)&f for that reason */
    *(void **)&api->init = lookup(lib, "nvmlInit_v2", &missing);
    *(void **)&api->shutdown = lookup(lib, "nvmlShutdown", &missing);
    *(void **)&api->count = lookup(lib, "nvmlDeviceGetCount_v2", &missing);
    *(void **)&api->handle = lookup(lib, "nvmlDeviceGetHandleByIndex_v2", &missing);
    *(void **)&api->error_string = lookup(lib, "nvmlErrorString", NULL);
    *(void **)&api->name = lookup(lib, "nvmlDeviceGetName", NULL);
    *(void **)&api->uuid = lookup(lib, "nvmlDeviceGetUUID", NULL);
    *(void **)&api->utilization = lookup(lib, "nvmlDeviceGetUtilizationRates", NULL);
    *(void **)&api->memory = lookup(lib, "nvmlDeviceGetMemoryInfo", NULL);
    *(void **)&api->temperature = lookup(lib, "nvmlDeviceGetTemperature", NULL);
    *(void **)&api->power = lookup(lib, "nvmlDeviceGetPowerUsage", NULL);
    if (missing) {
        snprintf(why, n, "libnvidia-ml.so.1 lacks nvmlInit_v2, nvmlDeviceGetCount_v2 or nvmlDeviceGetHandleByIndex_v2");
        dlclose(lib);
        return NULL;
    }
    nvmlReturn_t rc = api->init();
    if (rc != NVML_SUCCESS) {
        snprintf(why, n, "nvmlInit: %s", api->error_string ? api->error_string(rc) : "failed");
        dlclose(lib);
        return NULL;
    }
    return lib;
}

static void read_gpu(const nvml_api *api, nvmlDevice_t d, gpu_sample *g) {
    g->has_utilization = api->utilization && api->utilization(d, &g->utilization) == NVML_SUCCESS;
    g->has_memory = api->memory && api->memory(d, &g->memory) == NVML_SUCCESS;
    g->has_temperature = api->temperature && api->temperature(d, NVML_TEMPERATURE_GPU, &g->temperature_c) == NVML_SUCCESS;
    g->has_power = api->power && api->power(d, &g->power_mw) == NVML_SUCCESS;
}

static void *sampler(void *arg) {
    (void)arg;
    nvml_api api = {0};
    char why[256];
    void *lib = open_nvml(&api, why, sizeof why);
    unsigned int count = 0;
    nvmlReturn_t rc = lib ? api.count(&count) : NVML_SUCCESS;
    if (lib && rc != NVML_SUCCESS) snprintf(why, sizeof why, "nvmlDeviceGetCount: %s", api.error_string ? api.error_string(rc) : "failed");
    else if (lib && count == 0) snprintf(why, sizeof why, "NVML sees no GPU");
    if (!lib || rc != NVML_SUCCESS || count == 0) {
        log_event(LOG_INFO, "gpu_metrics_off", json_pack("{s:s}", "reason", why));
        if (lib) {
            api.shutdown();
            dlclose(lib);
        }
        return NULL;
    }
    if (count > MAX_GPUS) count = MAX_GPUS;
    /* handles, names and UUIDs do not change while NVML is initialised */
    nvmlDevice_t devices[MAX_GPUS];
    gpu_sample sample[MAX_GPUS] = {0};
    int n = 0;
    for (unsigned int i = 0; i < count; i++) {
        if (api.handle(i, &devices[n]) != NVML_SUCCESS) continue; /* e.g. no permission to one GPU */
        sample[n].index = i;
        if (!api.name || api.name(devices[n], sample[n].name, sizeof sample[n].name) != NVML_SUCCESS)
            snprintf(sample[n].name, sizeof sample[n].name, "unknown");
        if (!api.uuid || api.uuid(devices[n], sample[n].uuid, sizeof sample[n].uuid) != NVML_SUCCESS)
            snprintf(sample[n].uuid, sizeof sample[n].uuid, "unknown");
        n++;
    }
    log_event(LOG_INFO, "gpu_metrics_on", json_pack("{s:i,s:s}", "gpus", n, "first", n ? sample[0].name : ""));

    pthread_mutex_lock(&s.lock);
    while (!s.stopping) {
        pthread_mutex_unlock(&s.lock);
        for (int i = 0; i < n; i++) read_gpu(&api, devices[i], &sample[i]);
        pthread_mutex_lock(&s.lock);
        memcpy(s.gpus, sample, sizeof sample[0] * (size_t)n);
        s.ngpus = n;
        s.up = n > 0;
        s.sampled_at = mono_now();
        double next = s.sampled_at + SAMPLE_SECONDS;
        struct timespec at = {(time_t)next, (long)((next - (double)(time_t)next) * 1e9)};
        while (!s.stopping && mono_now() < next) pthread_cond_timedwait(&s.wake, &s.lock, &at);
    }
    s.up = false;
    pthread_mutex_unlock(&s.lock);
    api.shutdown();
    dlclose(lib);
    return NULL;
}

void gpu_metrics_start(void) {
    if (s.started) return;
    cond_init_monotonic(&s.wake);
    s.stopping = false;
    s.started = pthread_create(&s.thread, NULL, sampler, NULL) == 0;
    if (!s.started) log_event(LOG_WARN, "gpu_metrics_off", json_pack("{s:s}", "reason", "cannot start the sampler thread"));
}

void gpu_metrics_stop(void) {
    if (!s.started) return;
    pthread_mutex_lock(&s.lock);
    s.stopping = true;
    pthread_cond_signal(&s.wake);
    pthread_mutex_unlock(&s.lock);
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += 2;
    if (pthread_timedjoin_np(s.thread, NULL, &deadline) != 0) {
        /* inside a driver call that does not return: leave it to exit() */
        log_event(LOG_WARN, "gpu_metrics_stuck", json_pack("{s:s}", "message", "an NVML call did not return in 2 s"));
        pthread_detach(s.thread);
        return; /* the condition variable stays: the thread may still wait on it */
    }
    pthread_cond_destroy(&s.wake);
    s.started = false;
}

/* ---- rendering ---------------------------------------------------------------------- */

/* A label value as the text format wants it: \\, \" and \n escaped. */
static void escape_label(const char *in, char *out, size_t n) {
    size_t j = 0;
    for (; *in && j + 3 < n; in++) {
        if (*in == '\\' || *in == '"') out[j++] = '\\', out[j++] = *in;
        else if (*in == '\n') out[j++] = '\\', out[j++] = 'n';
        else out[j++] = *in;
    }
    out[j] = '\0';
}

enum { INFO, UTILIZATION, MEMORY_UTILIZATION, MEMORY_USED, MEMORY_TOTAL, TEMPERATURE, POWER, FAMILIES };
static const struct {
    const char *name, *help;
} families[FAMILIES] = {
    [INFO] = {"sdx4_gpu_info", "A GPU NVML sees (value 1): its NVML index, name and UUID."},
    [UTILIZATION] = {"sdx4_gpu_utilization_percent", "Percent of the last sample period a kernel ran on the GPU."},
    [MEMORY_UTILIZATION] = {"sdx4_gpu_memory_utilization_percent",
                            "Percent of the last sample period GPU memory was read or written."},
    [MEMORY_USED] = {"sdx4_gpu_memory_used_bytes", "GPU memory in use by every process and the driver."},
    [MEMORY_TOTAL] = {"sdx4_gpu_memory_total_bytes", "GPU memory in all."},
    [TEMPERATURE] = {"sdx4_gpu_temperature_celsius", "GPU die temperature."},
    [POWER] = {"sdx4_gpu_power_watts", "GPU power draw (averaged over a second on recent GPUs)."},
};

/* One GPU's sample of family `f`, if NVML gave it. */
static void emit_sample(FILE *out, int f, const gpu_sample *g) {
    const char *m = families[f].name;
    switch (f) {
    case INFO: {
        char name[2 * sizeof g->name], uuid[2 * sizeof g->uuid];
        escape_label(g->name, name, sizeof name);
        escape_label(g->uuid, uuid, sizeof uuid);
        fprintf(out, "%s{gpu=\"%u\",name=\"%s\",uuid=\"%s\"} 1\n", m, g->index, name, uuid);
        break;
    }
    case UTILIZATION:
        if (g->has_utilization) fprintf(out, "%s{gpu=\"%u\"} %u\n", m, g->index, g->utilization.gpu);
        break;
    case MEMORY_UTILIZATION:
        if (g->has_utilization) fprintf(out, "%s{gpu=\"%u\"} %u\n", m, g->index, g->utilization.memory);
        break;
    case MEMORY_USED:
        if (g->has_memory) fprintf(out, "%s{gpu=\"%u\"} %llu\n", m, g->index, g->memory.used);
        break;
    case MEMORY_TOTAL:
        if (g->has_memory) fprintf(out, "%s{gpu=\"%u\"} %llu\n", m, g->index, g->memory.total);
        break;
    case TEMPERATURE:
        if (g->has_temperature) fprintf(out, "%s{gpu=\"%u\"} %u\n", m, g->index, g->temperature_c);
        break;
    case POWER:
        if (g->has_power) fprintf(out, "%s{gpu=\"%u\"} %.3f\n", m, g->index, g->power_mw / 1000.0);
        break;
    }
}

char *gpu_metrics_render(void) {
    pthread_mutex_lock(&s.lock);
    bool fresh = s.up && mono_now() - s.sampled_at <= STALE_SECONDS;
    int n = fresh ? s.ngpus : 0;
    gpu_sample gpus[MAX_GPUS];
    memcpy(gpus, s.gpus, sizeof gpus[0] * (size_t)n);
    pthread_mutex_unlock(&s.lock);

    char *text = NULL;
    size_t len = 0;
    FILE *out = open_memstream(&text, &len);
    if (!out) return NULL;
    fprintf(out,
            "# HELP sdx4_gpu_nvml_up Whether NVML (the NVIDIA driver's libnvidia-ml.so.1) answered the last sample "
            "and sees a GPU; the other sdx4_gpu_* series exist only when 1.\n"
            "# TYPE sdx4_gpu_nvml_up gauge\nsdx4_gpu_nvml_up %d\n",
            fresh);
    for (int f = 0; f < FAMILIES; f++) {
        fprintf(out, "# HELP %s %s\n# TYPE %s gauge\n", families[f].name, families[f].help, families[f].name);
        for (int i = 0; i < n; i++) emit_sample(out, f, &gpus[i]);
    }
    if (fclose(out) != 0) {
        free(text);
        return NULL;
    }
    return text;
}
