/*
 * gpu_metrics.h - the GPUs' utilisation, memory, temperature and power for
 * GET /metrics, sampled through NVML when the NVIDIA driver provides it.
 *
 * One sampler per process: gpu_metrics_start starts a thread that loads
 * NVML and samples every GPU every few seconds; gpu_metrics_render formats
 * the last sample and never calls NVML itself, so a scrape never waits on
 * the driver. Without the driver's library or a GPU the per-GPU series are
 * absent and sdx4_gpu_nvml_up is 0. Start and stop from one thread (the
 * main one); render from any.
 */
#ifndef SDX4_SERVER_GPU_METRICS_H
#define SDX4_SERVER_GPU_METRICS_H

/* Starts the sampler (a no-op when already started). */
void gpu_metrics_start(void);
/* Stops it, waiting at most a couple of seconds for a call into NVML to
 * return (past that the thread is left to the process's exit). */
void gpu_metrics_stop(void);
/* The exposition text (malloc'd; NULL only when out of memory). The
 * families' HELP and TYPE lines are always there, their samples only
 * while NVML answers. */
char *gpu_metrics_render(void);

#endif
