/*
 * test_server_gpu_metrics.c - gpu_metrics.c on this machine, whichever it
 * is: with an NVIDIA GPU the sampler must find it through NVML and every
 * series must appear with plausible values; without one, sdx4_gpu_nvml_up
 * must be 0, no sample may appear (only the families' HELP and TYPE
 * lines) and nothing may fail. Either way a scrape must not wait on the
 * driver and the sampler must stop promptly.
 *
 * Which case is expected: $SDX4_EXPECT_GPU (1 or 0; scripts/device-check.sh
 * sets 1), else whether the driver lists a GPU in /proc/driver/nvidia/gpus.
 * Built by CMake with the server library, and by device-check.sh alone
 * (this file, gpu_metrics.c and log.c) where libvips is missing.
 */
#include <dirent.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gpu_metrics.h"
#include "log.h"
#include "server.h"
#include "test.h"

static bool driver_lists_a_gpu(void) {
    DIR *d = opendir("/proc/driver/nvidia/gpus");
    if (!d) return false;
    bool any = false;
    for (struct dirent *e; (e = readdir(d));) any |= e->d_name[0] != '.';
    closedir(d);
    return any;
}

/* The value of the sample `series` (name and labels), or -1 when none. */
static double sample(const char *text, const char *series) {
    char line[160];
    snprintf(line, sizeof line, "\n%s ", series);
    const char *p = strstr(text, line);
    return p ? strtod(p + strlen(line), NULL) : -1;
}

int main(void) {
    const char *env = getenv("SDX4_EXPECT_GPU");
    bool expect = env && *env ? strcmp(env, "1") == 0 : driver_lists_a_gpu();
    log_init(LOG_INFO, false);
    log_start(1 << 16);

    double t0 = mono_now();
    gpu_metrics_start();
    CHECK(mono_now() - t0 < 0.1, "start took %.3f s: NVML must be opened by the sampler thread", mono_now() - t0);
    char *text = NULL;
    /* the first sample: nvmlInit can take seconds while the GPUs wake */
    for (double until = mono_now() + (expect ? 20 : 1); mono_now() < until; usleep(100 * 1000)) {
        free(text);
        double r0 = mono_now();
        text = gpu_metrics_render();
        CHECK(mono_now() - r0 < 0.05, "a render took %.3f s: it must not call the driver", mono_now() - r0);
        if (expect && strstr(text, "\nsdx4_gpu_nvml_up 1\n")) break;
    }
    static const char *const families[] = {"sdx4_gpu_nvml_up", "sdx4_gpu_info", "sdx4_gpu_utilization_percent",
                                           "sdx4_gpu_memory_utilization_percent", "sdx4_gpu_memory_used_bytes",
                                           "sdx4_gpu_memory_total_bytes", "sdx4_gpu_temperature_celsius",
                                           "sdx4_gpu_power_watts"};
    for (size_t i = 0; i < sizeof families / sizeof families[0]; i++) {
        char type[128];
        snprintf(type, sizeof type, "# TYPE %s gauge\n", families[i]);
        CHECK(strstr(text, type), "no TYPE line of %s", families[i]);
    }
    if (expect) {
        CHECK(strstr(text, "\nsdx4_gpu_nvml_up 1\n"), "NVML never answered:\n%s", text);
        CHECK(strstr(text, "\nsdx4_gpu_info{gpu=\"0\",name=\""), "no info series of GPU 0:\n%s", text);
        double used = sample(text, "sdx4_gpu_memory_used_bytes{gpu=\"0\"}");
        double total = sample(text, "sdx4_gpu_memory_total_bytes{gpu=\"0\"}");
        double util = sample(text, "sdx4_gpu_utilization_percent{gpu=\"0\"}");
        double temp = sample(text, "sdx4_gpu_temperature_celsius{gpu=\"0\"}");
        double power = sample(text, "sdx4_gpu_power_watts{gpu=\"0\"}");
        CHECK(total >= (1u << 30) && used > 0 && used <= total, "memory used %.0f of %.0f", used, total);
        CHECK(util >= 0 && util <= 100, "utilization %.0f", util);
        CHECK(temp > 0 && temp < 130, "temperature %.0f C", temp);
        CHECK(power > 0 && power < 2000, "power %.1f W", power);
        printf("GPU 0: %.0f of %.0f MiB, %.0f%%, %.0f C, %.1f W\n", used / 1048576, total / 1048576, util, temp, power);
    } else {
        CHECK(strstr(text, "\nsdx4_gpu_nvml_up 0\n"), "sdx4_gpu_nvml_up is not 0 without a GPU:\n%s", text);
        CHECK(!strstr(text, "{gpu="), "a GPU series without a GPU:\n%s", text);
    }
    free(text);
    t0 = mono_now();
    gpu_metrics_stop();
    CHECK(mono_now() - t0 < 1, "stop took %.3f s", mono_now() - t0);
    log_flush(1);
    printf("test_server_gpu_metrics (%s): %d checks, %d failed\n", expect ? "GPU expected" : "no GPU", test_checks,
           test_failures);
    return test_failures ? 1 : 0;
}
