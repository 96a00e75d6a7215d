/*
 * cuda_graph.cu - backend.h's steps, recorded as CUDA graphs.
 *
 * sdx4_step_run() runs the first call of a step as it is called: a first run of
 * a convolution shape chooses its algorithm (cuDNN's search synchronises,
 * which a capture cannot hold), and the step may fill caches that the
 * later calls read. It runs the second as a planning pass for the third
 * (below), records the third and replays it at once, and from then on
 * replays the recording without calling the step's function.
 *
 * record_begin() takes the backend's (recursive) lock, keeps it until
 * record_end(), and starts capturing the backend's stream: the operations
 * the recording thread calls in between enqueue their kernels, library
 * calls and copies as usual, and CUDA records them into a graph instead of
 * running them, while other threads' operations wait for the lock (their
 * work would otherwise land in the graph). record_end() instantiates the
 * graph; replay() launches it with one call, which spares the host the
 * per-operation work of a UNet step (about a thousand operations). With
 * graphs off (cuda_settings.use_graphs) the backend has no step entries,
 * and every step runs as called (backend.c).
 *
 * Memory: a replay writes the very addresses the recording used, so the
 * memory of a recording belongs to its graph until the graph is freed
 * (the tensors it returns also stay valid after that, until the caller
 * frees them). Where a planning pass came first (plan_begin/plan_end: the
 * step ran the same operations once more before recording, and the
 * allocator traced them), the recording takes every buffer from one arena
 * at the place the plan gave it (core/memplan.h), which packs the step's
 * buffers by their lifetimes into little more than the bytes the step has
 * alive at once. Where there was none, or from the first allocation that
 * differs from the trace, the blocks that the recorded operations allocate
 * and free go to the graph's own free lists instead of the shared cache
 * (cuda_backend.cu), so that no other tensor can be given memory that a
 * replay overwrites, and come back to the cache when the graph is freed;
 * within the recording they are reused by size class as in a normal run.
 *
 * Operations on host data cannot be recorded (a copy from pageable memory
 * is not capturable): backend.h asks a step's function for none.
 */
#include <stdio.h>
#include <stdlib.h>

#include "backend/cuda/cuda_internal.h"

/* 0 recording, or -1 with the error set. */
static int cuda_record_begin(backend *be) {
    cuda_backend *cb = (cuda_backend *)be;
    pthread_mutex_lock(&cb->lock);
    if (cb->recording) {
        pthread_mutex_unlock(&cb->lock);
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "cuda: record_begin: already recording");
        return -1;
    }
    backend_graph *g = (backend_graph *)calloc(1, sizeof *g);
    if (!g) {
        pthread_mutex_unlock(&cb->lock);
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "cuda: record_begin: out of memory");
        return -1;
    }
    int rc = cuda_ok(cudaSetDevice(cb->device), "cuda: cudaSetDevice");
    cuda_plan_slot *s = rc ? NULL : cuda_memory_plan_slot(cb, false);
    if (s && s->planned) {
        g->arena = cuda_arena_new(cb, s->planned);
        s->planned = NULL;
        if (!g->arena) sdx4_error_clear(); /* no memory for it: recorded unplanned */
    }
    /* relaxed: an operation may still cudaMalloc a block the cache lacks */
    if (rc || cuda_ok(cudaStreamBeginCapture(cb->stream, cudaStreamCaptureModeRelaxed),
                      "cuda: record_begin")) {
        cuda_arena_release(cb, g->arena);
        free(g);
        pthread_mutex_unlock(&cb->lock);
        return -1;
    }
    cb->recording = g;
    g->profiled_first = cuda_profile_recorded(cb->profile);
    return 0; /* the lock stays held until record_end() */
}

/* NULL with the error set, also when the recorded operations failed. */
static backend_graph *cuda_record_end(backend *be) {
    cuda_backend *cb = (cuda_backend *)be;
    backend_graph *g = cb->recording;
    if (!g) {
        sdx4_set_error(SDX4_ERR_INVALID_ARGUMENT, "cuda: record_end without record_begin");
        return NULL;
    }
    cb->recording = NULL;
    g->profiled_count = cuda_profile_recorded(cb->profile) - g->profiled_first;
    cudaGraph_t graph = NULL;
    int rc = cuda_ok(cudaStreamEndCapture(cb->stream, &graph), "cuda: record_end") ||
             cuda_ok(cudaGraphInstantiate(&g->exec, graph, 0), "cuda: record_end: instantiate");
    if (graph) cuda_ignore(cudaGraphDestroy(graph));
    if (g->arena && cb->profile)
        fprintf(stderr,
                "cuda: recorded into a planned arena of %.1f MiB (%.1f MiB alive at most, %d "
                "buffers): %s at event %d of %d\n",
                sdx4_memplan_arena_bytes(g->arena->plan) / 1048576.0,
                sdx4_memplan_peak_bytes(g->arena->plan) / 1048576.0, sdx4_memplan_buffers(g->arena->plan),
                sdx4_memplan_on_track(g->arena->plan) ? "on plan" : "left the plan",
                sdx4_memplan_position(g->arena->plan), sdx4_memplan_events(g->arena->plan));
    if (g->arena && sdx4_memplan_position(g->arena->plan) == 0) { /* never used: give it back */
        cuda_arena_release(cb, g->arena);
        g->arena = NULL;
    }
    if (rc) {
        cuda_cache_adopt(cb, g->cache);
        cuda_arena_release(cb, g->arena);
        free(g);
        g = NULL;
    }
    pthread_mutex_unlock(&cb->lock); /* taken by record_begin() */
    return g;
}

static int cuda_replay(backend *be, backend_graph *g) {
    int rc;
    {
        cuda_lock lock(be, "replay");
        if (!lock) return -1;
        rc = cuda_ok(cudaGraphLaunch(g->exec, lock.cb->stream), "cuda: replay");
    }
    if (!rc && ((cuda_backend *)be)->profile) { /* after "replay" itself has ended */
        cuda_lock lock(be);
        if (lock) cuda_profile_replayed(lock.cb->profile, g->profiled_first, g->profiled_count);
    }
    return rc;
}

static void cuda_graph_free(backend *be, backend_graph *g) {
    if (!g) return;
    cuda_lock lock(be);
    /* a replay may still run: its blocks are free once it has finished */
    cuda_ignore(cudaStreamSynchronize(lock.cb->stream));
    cuda_ignore(cudaGraphExecDestroy(g->exec));
    cuda_cache_adopt(lock.cb, g->cache);
    cuda_arena_release(lock.cb, g->arena);
    free(g);
}

cuda_plan_slot *cuda_memory_plan_slot(cuda_backend *cb, bool make) {
    const pthread_t self = pthread_self();
    cuda_plan_slot *free_slot = NULL;
    for (int i = 0; i < CUDA_PLAN_SLOTS; i++) {
        cuda_plan_slot *s = &cb->memory_plans[i];
        bool used = s->tracing || s->planned;
        if (used && pthread_equal(s->thread, self)) return s;
        if (!used && !free_slot) free_slot = s;
    }
    if (!make || !free_slot) return NULL;
    free_slot->thread = self;
    return free_slot;
}

void cuda_memory_plan_clear(cuda_backend *cb, cuda_plan_slot *s) {
    if (s->tracing) cb->tracing_threads--;
    sdx4_memplan_free(s->tracing);
    sdx4_memplan_free(s->planned);
    s->tracing = s->planned = NULL;
}

/* A planning pass for this thread's next recording: until plan_end() the
 * operations run as usual while the allocator notes the sizes and
 * lifetimes of the memory they take. A recording that then calls the same
 * operations in the same order keeps all of its memory in one arena laid
 * out from those notes; from the first operation that differs, it takes
 * memory as usual. Best effort, so nothing to report. */
static void cuda_plan_begin(backend *be) {
    cuda_lock lock(be);
    if (!lock) return;
    cuda_backend *cb = lock.cb;
    if (!cb->use_plans) return; /* not asked */
    cuda_plan_slot *s = cuda_memory_plan_slot(cb, true);
    if (!s) return; /* every slot is another thread's: this one records unplanned */
    cuda_memory_plan_clear(cb, s); /* what an earlier pass left unused */
    if ((s->tracing = sdx4_memplan_new())) cb->tracing_threads++;
}

static void cuda_plan_end(backend *be) {
    cuda_lock lock(be);
    if (!lock) return;
    cuda_backend *cb = lock.cb;
    cuda_plan_slot *s = cuda_memory_plan_slot(cb, false);
    if (!s || !s->tracing) return;
    memplan *trace = s->tracing;
    s->tracing = NULL;
    cb->tracing_threads--;
    /* 256 bytes: cudaMalloc's alignment, which every kernel may assume */
    if (sdx4_memplan_finish(trace, 256) == 0) {
        s->planned = trace;
    } else {
        sdx4_memplan_free(trace);
        sdx4_error_clear(); /* out of host memory, or nothing allocated: no plan */
    }
}

/* ------------------------------------------------------------------ steps */

struct backend_step {
    int runs;             /* calls that ran the step's function */
    backend_graph *graph; /* the recording, replayed from then on; or NULL */
};

backend_step *cuda_step_new(backend *be) {
    (void)be;
    backend_step *s = (backend_step *)calloc(1, sizeof *s);
    if (!s) sdx4_set_error(SDX4_ERR_NO_MEMORY, "cuda: step: out of memory");
    return s;
}

int cuda_step_run(backend *be, backend_step *s, int (*fn)(void *ctx), void *ctx) {
    if (s->graph) return cuda_replay(be, s->graph);
    /* see the top comment: the first run as called, the second planned,
     * the third recorded */
    const bool planning = s->runs == 1, recording = s->runs >= 2;
    if (recording && cuda_record_begin(be)) return -1;
    if (planning) cuda_plan_begin(be);
    const int rc = fn(ctx);
    if (planning) cuda_plan_end(be);
    if (recording) {
        backend_graph *g = cuda_record_end(be); /* also after a failed operation */
        if (rc || !g) {
            if (g) cuda_graph_free(be, g);
            return -1;
        }
        s->graph = g;
        if (cuda_replay(be, g)) return -1;
    }
    if (rc) return -1;
    s->runs++;
    return 0;
}

void cuda_step_free(backend *be, backend_step *s) {
    if (s->graph) cuda_graph_free(be, s->graph);
    free(s);
}
