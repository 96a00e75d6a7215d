/*
 * cuda_graph.cu - backend.h's recorded sequences as CUDA graphs.
 *
 * record_begin() takes the backend's (recursive) lock, keeps it until
 * record_end(), and starts capturing the backend's stream: the operations
 * the recording thread calls in between enqueue their kernels, library
 * calls and copies as usual, and CUDA records them into a graph instead of
 * running them, while other threads' operations wait for the lock (their
 * work would otherwise land in the graph). record_end() instantiates the
 * graph; replay() launches it with one call, which spares the host the
 * per-operation work of a UNet step (about a thousand operations).
 *
 * Memory: a replay writes the very addresses the recording used. The
 * tensors the recording returns stay with the caller; the blocks that the
 * recorded operations allocated and freed (their intermediate tensors and
 * scratch) go to the graph's own free lists instead of the shared cache
 * (cuda_backend.cu), so that no other tensor can be given memory that a
 * replay overwrites, and come back to the cache when the graph is freed.
 * Within the recording they are reused as in a normal run, so a graph
 * holds one step's working set, the size of an eager step's peak.
 *
 * Operations on host data cannot be recorded (a copy from pageable memory
 * is not capturable), nor can a first run of a convolution shape (cuDNN's
 * algorithm search synchronises): backend.h asks callers for both.
 */
#include <stdlib.h>

#include "backend/cuda/cuda_internal.h"

int cuda_record_begin(backend *be) {
    cuda_backend *cb = (cuda_backend *)be;
    if (!cb->use_graphs) return 1;
    pthread_mutex_lock(&cb->lock);
    if (cb->recording) {
        pthread_mutex_unlock(&cb->lock);
        set_error(SDX4_ERR_INVALID_ARGUMENT, "cuda: record_begin: already recording");
        return -1;
    }
    backend_graph *g = (backend_graph *)calloc(1, sizeof *g);
    if (!g) {
        pthread_mutex_unlock(&cb->lock);
        set_error(SDX4_ERR_NO_MEMORY, "cuda: record_begin: out of memory");
        return -1;
    }
    /* relaxed: an operation may still cudaMalloc a block the cache lacks */
    if (cuda_ok(cudaSetDevice(cb->device), "cuda: cudaSetDevice") ||
        cuda_ok(cudaStreamBeginCapture(cb->stream, cudaStreamCaptureModeRelaxed),
                "cuda: record_begin")) {
        free(g);
        pthread_mutex_unlock(&cb->lock);
        return -1;
    }
    cb->recording = g;
    g->profiled_first = cuda_profile_recorded(cb->profile);
    return 0; /* the lock stays held until record_end() */
}

backend_graph *cuda_record_end(backend *be) {
    cuda_backend *cb = (cuda_backend *)be;
    backend_graph *g = cb->recording;
    if (!g) {
        set_error(SDX4_ERR_INVALID_ARGUMENT, "cuda: record_end without record_begin");
        return NULL;
    }
    cb->recording = NULL;
    g->profiled_count = cuda_profile_recorded(cb->profile) - g->profiled_first;
    cudaGraph_t graph = NULL;
    int rc = cuda_ok(cudaStreamEndCapture(cb->stream, &graph), "cuda: record_end") ||
             cuda_ok(cudaGraphInstantiate(&g->exec, graph, 0), "cuda: record_end: instantiate");
    if (graph) (void)cudaGraphDestroy(graph);
    if (rc) {
        cuda_cache_adopt(cb, g->cache);
        free(g);
        g = NULL;
    }
    pthread_mutex_unlock(&cb->lock); /* taken by record_begin() */
    return g;
}

int cuda_replay(backend *be, backend_graph *g) {
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

void cuda_graph_free(backend *be, backend_graph *g) {
    if (!g) return;
    cuda_lock lock(be);
    /* a replay may still run: its blocks are free once it has finished */
    (void)cudaStreamSynchronize(lock.cb->stream);
    (void)cudaGraphExecDestroy(g->exec);
    cuda_cache_adopt(lock.cb, g->cache);
    free(g);
}
