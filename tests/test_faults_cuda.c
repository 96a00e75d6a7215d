/*
 * test_faults_cuda.c - test_faults.c's sweep on the GPU: fail the Nth call
 * that the engine makes to the CUDA runtime, cuBLAS, cuBLASLt or cuDNN,
 * for N = 1, 2, 3, ... until a run meets no injected failure (issue 18).
 *
 * The path is test_faults.c's through the public API (sdx4.h), in memory:
 * the GPU machine has no libvips, so the input is a pattern made here and
 * the output is compared as pixels. Device "cuda" in its default mode
 * (fp16, the VAE in bfloat16, cuDNN's legacy call or graph API, steps
 * recorded as CUDA graphs), the plan cache off, so that every run chooses
 * its algorithms afresh and runs are independent; one thread. Three
 * cases: the tiny diffusion model of the reference data with 3 guided
 * steps on 16 x 16 px (the third UNet call is the one recorded as a CUDA
 * graph and replayed, cuda_graph.cu: test_faults.c's 2 would not reach
 * it), and the two small GANs of test_faults.c.
 *
 * How faults are injected. The program links with -Wl,--wrap for every
 * entry point of those libraries that the backend's objects call
 * (CMakeLists.txt's SDX4_CUDA_WRAPS; tests/check-cuda-wraps.sh fails when
 * the backend calls one that is not wrapped), and for the allocations, as
 * every fault test does (faults.h: this program counts host blocks too,
 * and SDX4_FAULTS_KIND=allocation fails them on the CUDA path). Each
 * wrapper below is declared with its function's own type from the
 * library's header (WRAP: a definition that differs is a compile error,
 * not a silent ABI break) and asks fault_hit() whether it is the Nth CUDA
 * call. A failed call does not reach the library and returns what the
 * library returns for such a failure:
 *   - what allocates (memory, streams, events, graph instances, handles,
 *     descriptors): cudaErrorMemoryAllocation, CUBLAS_STATUS_ALLOC_FAILED,
 *     CUDNN_STATUS_ALLOC_FAILED (cuDNN 9's
 *     CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED);
 *   - any other call: cudaErrorLaunchFailure (what every call returns
 *     after a kernel has faulted), CUBLAS_STATUS_EXECUTION_FAILED,
 *     CUDNN_STATUS_EXECUTION_FAILED;
 *   - what releases (cudaFree, cudaFreeHost, the Destroy calls) releases
 *     all the same, as test_faults.c's fclose closes: only the status
 *     lies; and cudaStreamEndCapture ends the capture as a failed end
 *     does, with no graph (cudaErrorStreamCaptureInvalidated);
 *   - a kernel launch: a <<<>>> launch is a call to cudaLaunchKernel
 *     (__cudaLaunchKernel since CUDA 13) in nvcc's stub, which drops its
 *     status. As with every failure of the runtime, the error stays
 *     pending for the thread's next cudaGetLastError (wrapped: it returns
 *     an injected error first), which the backend calls after each launch.
 * Since nothing real failed, the CUDA context never holds a sticky error,
 * and every N runs in one process.
 *
 * What each run must show (faults.h): a failure with a message, or a
 * success whose image is near the clean run's: at most 1% of its values
 * more than 2 levels apart, half precision's tolerance against PyTorch
 * (tests/test_pipeline.c; BENCHMARKS.md, "Correctness on the GPU"). Not
 * the same bytes, because the backend chooses cuDNN's algorithm, the
 * graph API's plan and the way of adding a bias by timing them on the real
 * tensors: a trial that fails only drops its candidate (cuda_time_runs),
 * a failed heuristic query sends a GEMM to cublasGemmEx, and even two
 * clean runs may choose differently. After every run, failed or not, the
 * host blocks and descriptors (faults.h) and everything the wrappers see
 * created and destroyed (device and pinned blocks, streams, events,
 * graphs and their instances, cuBLAS and cuBLASLt handles and cuBLASLt's
 * descriptors, cuDNN's handle and descriptors of both APIs) must be back
 * at their counts from before it, and no error may be left pending in the
 * runtime for the thread's next caller.
 *
 * What this does not reach: the calls that cuBLAS, cuBLASLt and cuDNN
 * make inside their own libraries (to the driver, or to a runtime of their
 * own: --wrap redirects only our objects' references), the driver API,
 * faults that happen on the device after a launch (an illegal address is
 * sticky: a process cannot go on after it), the code nvcc generates to
 * register kernels and configure launches, and the calls that cannot fail
 * (they name a status or a version; check-cuda-wraps.sh lists them).
 * docs/production/resilience.md says more.
 *
 * The Nth call is not always the same call from run to run: where a
 * choice made by timing changes what follows (fused bias or not, a graph
 * plan or the legacy call), the calls after it change too. So an N
 * reproduces only mostly; SDX4_FAULTS_VERBOSE=1 names the function that
 * failed. The controls are faults.h's (SDX4_FAULTS_RUNS, default 10 runs
 * per sweep for every case here, as a GPU run's cost is mostly the
 * engine's opening; SDX4_FAULTS_SECONDS, _FIRST, _STRIDE, _CASE, _KIND,
 * _VERBOSE, _TRAP).
 *
 * Without a CUDA device it prints "skipped: ..." and exits 77. Built only
 * with the CUDA backend (CMakeLists.txt).
 */
#include <stdio.h>
#include <stdlib.h>

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#ifdef SDX4_HAVE_CUDNN
#include <cudnn.h>
#endif

#include "faults.h"
#include "sdx4.h"
#include "test.h"

/* ------------------------------------------------------------------------
 * What the wrappers count: live resources, and the pending error
 * ------------------------------------------------------------------------ */

enum {
    DEVICE_BLOCKS, PINNED_BLOCKS, STREAMS, EVENTS, GRAPHS, GRAPH_EXECS, CUBLAS_HANDLES, CUBLASLT_HANDLES,
    LT_MATMUL_DESCS, LT_LAYOUTS, LT_PREFERENCES, CUDNN_HANDLES, CUDNN_TENSORS, CUDNN_FILTERS, CUDNN_CONVS,
    CUDNN_ACTIVATIONS, CUDNN_BACKEND_DESCS, RESOURCES
};
static const char *const resource_names[RESOURCES] = {
    "device blocks", "pinned host blocks", "streams", "events", "CUDA graphs", "graph instances",
    "cuBLAS handles", "cuBLASLt handles", "cuBLASLt matmul descriptors", "cuBLASLt layouts",
    "cuBLASLt preferences", "cuDNN handles", "cuDNN tensor descriptors", "cuDNN filter descriptors",
    "cuDNN convolution descriptors", "cuDNN activation descriptors", "cuDNN backend descriptors",
};
static long live[RESOURCES]; /* made and not yet released, by the wrappers' count */

static void made(int r, long delta) { __atomic_add_fetch(&live[r], delta, __ATOMIC_RELAXED); }

/* The injected error the runtime would keep as the thread's last error
 * until cudaGetLastError reads it. */
static _Thread_local cudaError_t pending = cudaSuccess;

static cudaError_t runtime_failure(cudaError_t e) {
    pending = e;
    return e;
}

/* The Nth CUDA call? Called in the wrapper itself: its return address is
 * the call site in the backend. */
#define FAILS(name) fault_hit(FAULT_CUDA, name, __builtin_return_address(0))

/* __wrap_f and __real_f with f's own type from its header; the macro
 * expands f first, so that a name the header renames (cublas_v2.h's
 * cublasCreate is cublasCreate_v2, CUDA 12's cudaGetDeviceProperties is
 * cudaGetDeviceProperties_v2) gets the symbol's wrapper. */
#define WRAP(f) WRAP_(f)
#define WRAP_(f) __wrap_##f
#define REAL(f) REAL_(f)
#define REAL_(f) __real_##f
#define DECLARE(f) __typeof__(f) WRAP(f), REAL(f)

/* ------------------------------------------------------------------------
 * The CUDA runtime
 * ------------------------------------------------------------------------ */

DECLARE(cudaGetLastError);
DECLARE(cudaGetDeviceCount);
DECLARE(cudaSetDevice);
DECLARE(cudaGetDeviceProperties);
DECLARE(cudaDriverGetVersion);
DECLARE(cudaRuntimeGetVersion);
DECLARE(cudaFuncSetAttribute);
DECLARE(cudaMalloc);
DECLARE(cudaFree);
DECLARE(cudaHostAlloc);
DECLARE(cudaFreeHost);
DECLARE(cudaMemcpyAsync);
DECLARE(cudaMemcpy2DAsync);
DECLARE(cudaMemsetAsync);
DECLARE(cudaStreamCreateWithFlags);
DECLARE(cudaStreamDestroy);
DECLARE(cudaStreamSynchronize);
DECLARE(cudaStreamBeginCapture);
DECLARE(cudaStreamEndCapture);
DECLARE(cudaGraphDestroy);
DECLARE(cudaGraphInstantiate);
DECLARE(cudaGraphExecDestroy);
DECLARE(cudaGraphLaunch);
DECLARE(cudaEventCreate);
DECLARE(cudaEventCreateWithFlags);
DECLARE(cudaEventDestroy);
DECLARE(cudaEventRecord);
DECLARE(cudaEventRecordWithFlags);
DECLARE(cudaEventSynchronize);
DECLARE(cudaEventElapsedTime);

/* The injected error first, as the runtime reports its last error; both
 * are cleared. */
cudaError_t WRAP(cudaGetLastError)(void) {
    cudaError_t real = REAL(cudaGetLastError)(), injected = pending;
    pending = cudaSuccess;
    return injected != cudaSuccess ? injected : real;
}

cudaError_t WRAP(cudaGetDeviceCount)(int *count) {
    if (FAILS("cudaGetDeviceCount")) return runtime_failure(cudaErrorLaunchFailure);
    return REAL(cudaGetDeviceCount)(count);
}

cudaError_t WRAP(cudaSetDevice)(int device) {
    if (FAILS("cudaSetDevice")) return runtime_failure(cudaErrorLaunchFailure);
    return REAL(cudaSetDevice)(device);
}

cudaError_t WRAP(cudaGetDeviceProperties)(struct cudaDeviceProp *prop, int device) {
    if (FAILS("cudaGetDeviceProperties")) return runtime_failure(cudaErrorLaunchFailure);
    return REAL(cudaGetDeviceProperties)(prop, device);
}

cudaError_t WRAP(cudaDriverGetVersion)(int *version) {
    if (FAILS("cudaDriverGetVersion")) return runtime_failure(cudaErrorLaunchFailure);
    return REAL(cudaDriverGetVersion)(version);
}

cudaError_t WRAP(cudaRuntimeGetVersion)(int *version) {
    if (FAILS("cudaRuntimeGetVersion")) return runtime_failure(cudaErrorLaunchFailure);
    return REAL(cudaRuntimeGetVersion)(version);
}

cudaError_t WRAP(cudaFuncSetAttribute)(const void *func, enum cudaFuncAttribute attr, int value) {
    if (FAILS("cudaFuncSetAttribute")) return runtime_failure(cudaErrorLaunchFailure);
    return REAL(cudaFuncSetAttribute)(func, attr, value);
}

cudaError_t WRAP(cudaMalloc)(void **ptr, size_t size) {
    if (FAILS("cudaMalloc")) return runtime_failure(cudaErrorMemoryAllocation);
    cudaError_t e = REAL(cudaMalloc)(ptr, size);
    if (e == cudaSuccess) made(DEVICE_BLOCKS, 1);
    return e;
}

cudaError_t WRAP(cudaFree)(void *ptr) {
    int fail = FAILS("cudaFree");
    cudaError_t e = REAL(cudaFree)(ptr);
    if (e == cudaSuccess && ptr) made(DEVICE_BLOCKS, -1);
    return fail ? runtime_failure(cudaErrorLaunchFailure) : e;
}

cudaError_t WRAP(cudaHostAlloc)(void **ptr, size_t size, unsigned int flags) {
    if (FAILS("cudaHostAlloc")) return runtime_failure(cudaErrorMemoryAllocation);
    cudaError_t e = REAL(cudaHostAlloc)(ptr, size, flags);
    if (e == cudaSuccess) made(PINNED_BLOCKS, 1);
    return e;
}

cudaError_t WRAP(cudaFreeHost)(void *ptr) {
    int fail = FAILS("cudaFreeHost");
    cudaError_t e = REAL(cudaFreeHost)(ptr);
    if (e == cudaSuccess && ptr) made(PINNED_BLOCKS, -1);
    return fail ? runtime_failure(cudaErrorLaunchFailure) : e;
}

cudaError_t WRAP(cudaMemcpyAsync)(void *dst, const void *src, size_t count, enum cudaMemcpyKind kind,
                                  cudaStream_t stream) {
    if (FAILS("cudaMemcpyAsync")) return runtime_failure(cudaErrorLaunchFailure);
    return REAL(cudaMemcpyAsync)(dst, src, count, kind, stream);
}

cudaError_t WRAP(cudaMemcpy2DAsync)(void *dst, size_t dpitch, const void *src, size_t spitch, size_t width,
                                    size_t height, enum cudaMemcpyKind kind, cudaStream_t stream) {
    if (FAILS("cudaMemcpy2DAsync")) return runtime_failure(cudaErrorLaunchFailure);
    return REAL(cudaMemcpy2DAsync)(dst, dpitch, src, spitch, width, height, kind, stream);
}

cudaError_t WRAP(cudaMemsetAsync)(void *ptr, int value, size_t count, cudaStream_t stream) {
    if (FAILS("cudaMemsetAsync")) return runtime_failure(cudaErrorLaunchFailure);
    return REAL(cudaMemsetAsync)(ptr, value, count, stream);
}

cudaError_t WRAP(cudaStreamCreateWithFlags)(cudaStream_t *stream, unsigned int flags) {
    if (FAILS("cudaStreamCreateWithFlags")) return runtime_failure(cudaErrorMemoryAllocation);
    cudaError_t e = REAL(cudaStreamCreateWithFlags)(stream, flags);
    if (e == cudaSuccess) made(STREAMS, 1);
    return e;
}

cudaError_t WRAP(cudaStreamDestroy)(cudaStream_t stream) {
    int fail = FAILS("cudaStreamDestroy");
    cudaError_t e = REAL(cudaStreamDestroy)(stream);
    if (e == cudaSuccess && stream) made(STREAMS, -1);
    return fail ? runtime_failure(cudaErrorLaunchFailure) : e;
}

cudaError_t WRAP(cudaStreamSynchronize)(cudaStream_t stream) {
    if (FAILS("cudaStreamSynchronize")) return runtime_failure(cudaErrorLaunchFailure);
    return REAL(cudaStreamSynchronize)(stream);
}

cudaError_t WRAP(cudaStreamBeginCapture)(cudaStream_t stream, enum cudaStreamCaptureMode mode) {
    if (FAILS("cudaStreamBeginCapture")) return runtime_failure(cudaErrorLaunchFailure);
    return REAL(cudaStreamBeginCapture)(stream, mode);
}

/* A failed end still ends the capture (the stream must not stay in it),
 * with no graph, as when the capture was invalidated. */
cudaError_t WRAP(cudaStreamEndCapture)(cudaStream_t stream, cudaGraph_t *graph) {
    int fail = FAILS("cudaStreamEndCapture");
    cudaError_t e = REAL(cudaStreamEndCapture)(stream, graph);
    if (fail) {
        if (e == cudaSuccess && *graph) (void)REAL(cudaGraphDestroy)(*graph);
        *graph = NULL;
        return runtime_failure(cudaErrorStreamCaptureInvalidated);
    }
    if (e == cudaSuccess && *graph) made(GRAPHS, 1);
    return e;
}

cudaError_t WRAP(cudaGraphDestroy)(cudaGraph_t graph) {
    int fail = FAILS("cudaGraphDestroy");
    cudaError_t e = REAL(cudaGraphDestroy)(graph);
    if (e == cudaSuccess && graph) made(GRAPHS, -1);
    return fail ? runtime_failure(cudaErrorLaunchFailure) : e;
}

cudaError_t WRAP(cudaGraphInstantiate)(cudaGraphExec_t *exec, cudaGraph_t graph, unsigned long long flags) {
    if (FAILS("cudaGraphInstantiate")) return runtime_failure(cudaErrorMemoryAllocation);
    cudaError_t e = REAL(cudaGraphInstantiate)(exec, graph, flags);
    if (e == cudaSuccess) made(GRAPH_EXECS, 1);
    return e;
}

cudaError_t WRAP(cudaGraphExecDestroy)(cudaGraphExec_t exec) {
    int fail = FAILS("cudaGraphExecDestroy");
    cudaError_t e = REAL(cudaGraphExecDestroy)(exec);
    if (e == cudaSuccess && exec) made(GRAPH_EXECS, -1);
    return fail ? runtime_failure(cudaErrorLaunchFailure) : e;
}

cudaError_t WRAP(cudaGraphLaunch)(cudaGraphExec_t exec, cudaStream_t stream) {
    if (FAILS("cudaGraphLaunch")) return runtime_failure(cudaErrorLaunchFailure);
    return REAL(cudaGraphLaunch)(exec, stream);
}

cudaError_t WRAP(cudaEventCreate)(cudaEvent_t *event) {
    if (FAILS("cudaEventCreate")) return runtime_failure(cudaErrorMemoryAllocation);
    cudaError_t e = REAL(cudaEventCreate)(event);
    if (e == cudaSuccess) made(EVENTS, 1);
    return e;
}

cudaError_t WRAP(cudaEventCreateWithFlags)(cudaEvent_t *event, unsigned int flags) {
    if (FAILS("cudaEventCreateWithFlags")) return runtime_failure(cudaErrorMemoryAllocation);
    cudaError_t e = REAL(cudaEventCreateWithFlags)(event, flags);
    if (e == cudaSuccess) made(EVENTS, 1);
    return e;
}

cudaError_t WRAP(cudaEventDestroy)(cudaEvent_t event) {
    int fail = FAILS("cudaEventDestroy");
    cudaError_t e = REAL(cudaEventDestroy)(event);
    if (e == cudaSuccess && event) made(EVENTS, -1);
    return fail ? runtime_failure(cudaErrorLaunchFailure) : e;
}

cudaError_t WRAP(cudaEventRecord)(cudaEvent_t event, cudaStream_t stream) {
    if (FAILS("cudaEventRecord")) return runtime_failure(cudaErrorLaunchFailure);
    return REAL(cudaEventRecord)(event, stream);
}

cudaError_t WRAP(cudaEventRecordWithFlags)(cudaEvent_t event, cudaStream_t stream, unsigned int flags) {
    if (FAILS("cudaEventRecordWithFlags")) return runtime_failure(cudaErrorLaunchFailure);
    return REAL(cudaEventRecordWithFlags)(event, stream, flags);
}

cudaError_t WRAP(cudaEventSynchronize)(cudaEvent_t event) {
    if (FAILS("cudaEventSynchronize")) return runtime_failure(cudaErrorLaunchFailure);
    return REAL(cudaEventSynchronize)(event);
}

cudaError_t WRAP(cudaEventElapsedTime)(float *ms, cudaEvent_t start, cudaEvent_t end) {
    if (FAILS("cudaEventElapsedTime")) return runtime_failure(cudaErrorLaunchFailure);
    return REAL(cudaEventElapsedTime)(ms, start, end);
}

/* Kernel launches. nvcc's stub of a <<<>>> launch calls the runtime and
 * drops the status: the backend learns of a failure from
 * cudaGetLastError, which returns the pending one. */
#if CUDART_VERSION >= 13000
/* what nvcc 13's stub calls (crt/device_functions.h declares it for C++ only) */
cudaError_t __cudaLaunchKernel(cudaKernel_t kernel, dim3 gridDim, dim3 blockDim, void **args, size_t sharedMem,
                               cudaStream_t stream);
DECLARE(__cudaLaunchKernel);

cudaError_t WRAP(__cudaLaunchKernel)(cudaKernel_t kernel, dim3 grid, dim3 block, void **args, size_t smem,
                                     cudaStream_t stream) {
    if (FAILS("kernel launch")) return runtime_failure(cudaErrorLaunchFailure);
    return REAL(__cudaLaunchKernel)(kernel, grid, block, args, smem, stream);
}
#else
DECLARE(cudaLaunchKernel);

cudaError_t WRAP(cudaLaunchKernel)(const void *func, dim3 grid, dim3 block, void **args, size_t smem,
                                   cudaStream_t stream) {
    if (FAILS("kernel launch")) return runtime_failure(cudaErrorLaunchFailure);
    return REAL(cudaLaunchKernel)(func, grid, block, args, smem, stream);
}
#endif

/* ------------------------------------------------------------------------
 * cuBLAS and cuBLASLt
 * ------------------------------------------------------------------------ */

DECLARE(cublasCreate);
DECLARE(cublasDestroy);
DECLARE(cublasSetStream);
DECLARE(cublasSetMathMode);
DECLARE(cublasGemmEx);
DECLARE(cublasLtCreate);
DECLARE(cublasLtDestroy);
DECLARE(cublasLtMatmulDescCreate);
DECLARE(cublasLtMatmulDescDestroy);
DECLARE(cublasLtMatmulDescSetAttribute);
DECLARE(cublasLtMatrixLayoutCreate);
DECLARE(cublasLtMatrixLayoutDestroy);
DECLARE(cublasLtMatmulPreferenceCreate);
DECLARE(cublasLtMatmulPreferenceDestroy);
DECLARE(cublasLtMatmulPreferenceSetAttribute);
DECLARE(cublasLtMatmulAlgoCheck);
DECLARE(cublasLtMatmulAlgoGetHeuristic);
DECLARE(cublasLtMatmul);

/* The status of a create: counted when it made its object. */
static cublasStatus_t blas_made(int r, cublasStatus_t s) {
    if (s == CUBLAS_STATUS_SUCCESS) made(r, 1);
    return s;
}

/* A release of `handle`: released whatever the status says. */
static cublasStatus_t blas_released(int r, int fail, const void *handle, cublasStatus_t s) {
    if (s == CUBLAS_STATUS_SUCCESS && handle) made(r, -1);
    return fail ? CUBLAS_STATUS_EXECUTION_FAILED : s;
}

cublasStatus_t WRAP(cublasCreate)(cublasHandle_t *handle) {
    if (FAILS("cublasCreate")) return CUBLAS_STATUS_ALLOC_FAILED;
    return blas_made(CUBLAS_HANDLES, REAL(cublasCreate)(handle));
}

cublasStatus_t WRAP(cublasDestroy)(cublasHandle_t handle) {
    int fail = FAILS("cublasDestroy");
    return blas_released(CUBLAS_HANDLES, fail, handle, REAL(cublasDestroy)(handle));
}

cublasStatus_t WRAP(cublasSetStream)(cublasHandle_t handle, cudaStream_t stream) {
    if (FAILS("cublasSetStream")) return CUBLAS_STATUS_EXECUTION_FAILED;
    return REAL(cublasSetStream)(handle, stream);
}

cublasStatus_t WRAP(cublasSetMathMode)(cublasHandle_t handle, cublasMath_t mode) {
    if (FAILS("cublasSetMathMode")) return CUBLAS_STATUS_EXECUTION_FAILED;
    return REAL(cublasSetMathMode)(handle, mode);
}

cublasStatus_t WRAP(cublasGemmEx)(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m,
                                  int n, int k, const void *alpha, const void *A, cudaDataType Atype, int lda,
                                  const void *B, cudaDataType Btype, int ldb, const void *beta, void *C,
                                  cudaDataType Ctype, int ldc, cublasComputeType_t computeType,
                                  cublasGemmAlgo_t algo) {
    if (FAILS("cublasGemmEx")) return CUBLAS_STATUS_EXECUTION_FAILED;
    return REAL(cublasGemmEx)(handle, transa, transb, m, n, k, alpha, A, Atype, lda, B, Btype, ldb, beta, C, Ctype,
                              ldc, computeType, algo);
}

cublasStatus_t WRAP(cublasLtCreate)(cublasLtHandle_t *handle) {
    if (FAILS("cublasLtCreate")) return CUBLAS_STATUS_ALLOC_FAILED;
    return blas_made(CUBLASLT_HANDLES, REAL(cublasLtCreate)(handle));
}

cublasStatus_t WRAP(cublasLtDestroy)(cublasLtHandle_t handle) {
    int fail = FAILS("cublasLtDestroy");
    return blas_released(CUBLASLT_HANDLES, fail, handle, REAL(cublasLtDestroy)(handle));
}

cublasStatus_t WRAP(cublasLtMatmulDescCreate)(cublasLtMatmulDesc_t *desc, cublasComputeType_t compute,
                                              cudaDataType_t scale) {
    if (FAILS("cublasLtMatmulDescCreate")) return CUBLAS_STATUS_ALLOC_FAILED;
    return blas_made(LT_MATMUL_DESCS, REAL(cublasLtMatmulDescCreate)(desc, compute, scale));
}

cublasStatus_t WRAP(cublasLtMatmulDescDestroy)(cublasLtMatmulDesc_t desc) {
    int fail = FAILS("cublasLtMatmulDescDestroy");
    return blas_released(LT_MATMUL_DESCS, fail, desc, REAL(cublasLtMatmulDescDestroy)(desc));
}

cublasStatus_t WRAP(cublasLtMatmulDescSetAttribute)(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr,
                                                    const void *buf, size_t size) {
    if (FAILS("cublasLtMatmulDescSetAttribute")) return CUBLAS_STATUS_EXECUTION_FAILED;
    return REAL(cublasLtMatmulDescSetAttribute)(desc, attr, buf, size);
}

cublasStatus_t WRAP(cublasLtMatrixLayoutCreate)(cublasLtMatrixLayout_t *layout, cudaDataType type, uint64_t rows,
                                                uint64_t cols, int64_t ld) {
    if (FAILS("cublasLtMatrixLayoutCreate")) return CUBLAS_STATUS_ALLOC_FAILED;
    return blas_made(LT_LAYOUTS, REAL(cublasLtMatrixLayoutCreate)(layout, type, rows, cols, ld));
}

cublasStatus_t WRAP(cublasLtMatrixLayoutDestroy)(cublasLtMatrixLayout_t layout) {
    int fail = FAILS("cublasLtMatrixLayoutDestroy");
    return blas_released(LT_LAYOUTS, fail, layout, REAL(cublasLtMatrixLayoutDestroy)(layout));
}

cublasStatus_t WRAP(cublasLtMatmulPreferenceCreate)(cublasLtMatmulPreference_t *pref) {
    if (FAILS("cublasLtMatmulPreferenceCreate")) return CUBLAS_STATUS_ALLOC_FAILED;
    return blas_made(LT_PREFERENCES, REAL(cublasLtMatmulPreferenceCreate)(pref));
}

cublasStatus_t WRAP(cublasLtMatmulPreferenceDestroy)(cublasLtMatmulPreference_t pref) {
    int fail = FAILS("cublasLtMatmulPreferenceDestroy");
    return blas_released(LT_PREFERENCES, fail, pref, REAL(cublasLtMatmulPreferenceDestroy)(pref));
}

cublasStatus_t WRAP(cublasLtMatmulPreferenceSetAttribute)(cublasLtMatmulPreference_t pref,
                                                          cublasLtMatmulPreferenceAttributes_t attr,
                                                          const void *buf, size_t size) {
    if (FAILS("cublasLtMatmulPreferenceSetAttribute")) return CUBLAS_STATUS_EXECUTION_FAILED;
    return REAL(cublasLtMatmulPreferenceSetAttribute)(pref, attr, buf, size);
}

cublasStatus_t WRAP(cublasLtMatmulAlgoCheck)(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                                             cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                             cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d,
                                             const cublasLtMatmulAlgo_t *algo,
                                             cublasLtMatmulHeuristicResult_t *result) {
    if (FAILS("cublasLtMatmulAlgoCheck")) return CUBLAS_STATUS_EXECUTION_FAILED;
    return REAL(cublasLtMatmulAlgoCheck)(handle, desc, a, b, c, d, algo, result);
}

cublasStatus_t WRAP(cublasLtMatmulAlgoGetHeuristic)(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc,
                                                    cublasLtMatrixLayout_t a, cublasLtMatrixLayout_t b,
                                                    cublasLtMatrixLayout_t c, cublasLtMatrixLayout_t d,
                                                    cublasLtMatmulPreference_t pref, int requested,
                                                    cublasLtMatmulHeuristicResult_t results[], int *returned) {
    if (FAILS("cublasLtMatmulAlgoGetHeuristic")) return CUBLAS_STATUS_EXECUTION_FAILED;
    return REAL(cublasLtMatmulAlgoGetHeuristic)(handle, desc, a, b, c, d, pref, requested, results, returned);
}

cublasStatus_t WRAP(cublasLtMatmul)(cublasLtHandle_t handle, cublasLtMatmulDesc_t desc, const void *alpha,
                                    const void *A, cublasLtMatrixLayout_t a, const void *B,
                                    cublasLtMatrixLayout_t b, const void *beta, const void *C,
                                    cublasLtMatrixLayout_t c, void *D, cublasLtMatrixLayout_t d,
                                    const cublasLtMatmulAlgo_t *algo, void *workspace, size_t workspace_size,
                                    cudaStream_t stream) {
    if (FAILS("cublasLtMatmul")) return CUBLAS_STATUS_EXECUTION_FAILED;
    return REAL(cublasLtMatmul)(handle, desc, alpha, A, a, B, b, beta, C, c, D, d, algo, workspace,
                                workspace_size, stream);
}

/* ------------------------------------------------------------------------
 * cuDNN: the legacy calls and the graph (backend) API
 * ------------------------------------------------------------------------ */

#ifdef SDX4_HAVE_CUDNN
DECLARE(cudnnCreate);
DECLARE(cudnnDestroy);
DECLARE(cudnnSetStream);
DECLARE(cudnnCreateTensorDescriptor);
DECLARE(cudnnDestroyTensorDescriptor);
DECLARE(cudnnSetTensor4dDescriptor);
DECLARE(cudnnCreateFilterDescriptor);
DECLARE(cudnnDestroyFilterDescriptor);
DECLARE(cudnnSetFilter4dDescriptor);
DECLARE(cudnnCreateConvolutionDescriptor);
DECLARE(cudnnDestroyConvolutionDescriptor);
DECLARE(cudnnSetConvolution2dDescriptor);
DECLARE(cudnnSetConvolutionMathType);
DECLARE(cudnnCreateActivationDescriptor);
DECLARE(cudnnDestroyActivationDescriptor);
DECLARE(cudnnSetActivationDescriptor);
DECLARE(cudnnGetConvolutionForwardWorkspaceSize);
DECLARE(cudnnFindConvolutionForwardAlgorithmEx);
DECLARE(cudnnConvolutionForward);
DECLARE(cudnnConvolutionBiasActivationForward);
DECLARE(cudnnBackendCreateDescriptor);
DECLARE(cudnnBackendDestroyDescriptor);
DECLARE(cudnnBackendSetAttribute);
DECLARE(cudnnBackendGetAttribute);
DECLARE(cudnnBackendFinalize);
DECLARE(cudnnBackendExecute);

/* cuDNN 9's name for CUDNN_STATUS_ALLOC_FAILED, which it deprecates */
#define DNN_ALLOC_FAILED CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED

static cudnnStatus_t dnn_made(int r, cudnnStatus_t s) {
    if (s == CUDNN_STATUS_SUCCESS) made(r, 1);
    return s;
}

static cudnnStatus_t dnn_released(int r, int fail, const void *handle, cudnnStatus_t s) {
    if (s == CUDNN_STATUS_SUCCESS && handle) made(r, -1);
    return fail ? CUDNN_STATUS_EXECUTION_FAILED : s;
}

cudnnStatus_t WRAP(cudnnCreate)(cudnnHandle_t *handle) {
    if (FAILS("cudnnCreate")) return DNN_ALLOC_FAILED;
    return dnn_made(CUDNN_HANDLES, REAL(cudnnCreate)(handle));
}

cudnnStatus_t WRAP(cudnnDestroy)(cudnnHandle_t handle) {
    int fail = FAILS("cudnnDestroy");
    return dnn_released(CUDNN_HANDLES, fail, handle, REAL(cudnnDestroy)(handle));
}

cudnnStatus_t WRAP(cudnnSetStream)(cudnnHandle_t handle, cudaStream_t stream) {
    if (FAILS("cudnnSetStream")) return CUDNN_STATUS_EXECUTION_FAILED;
    return REAL(cudnnSetStream)(handle, stream);
}

/* A legacy descriptor's create and destroy, counted under `counter`. */
#define DNN_DESCRIPTOR_WRAPS(Kind, counter)                                                     \
    cudnnStatus_t WRAP(cudnnCreate##Kind##Descriptor)(cudnn##Kind##Descriptor_t * desc) {        \
        if (FAILS("cudnnCreate" #Kind "Descriptor")) return DNN_ALLOC_FAILED;                   \
        return dnn_made(counter, REAL(cudnnCreate##Kind##Descriptor)(desc));                    \
    }                                                                                           \
    cudnnStatus_t WRAP(cudnnDestroy##Kind##Descriptor)(cudnn##Kind##Descriptor_t desc) {        \
        int fail = FAILS("cudnnDestroy" #Kind "Descriptor");                                    \
        return dnn_released(counter, fail, desc, REAL(cudnnDestroy##Kind##Descriptor)(desc));   \
    }

DNN_DESCRIPTOR_WRAPS(Tensor, CUDNN_TENSORS)
DNN_DESCRIPTOR_WRAPS(Filter, CUDNN_FILTERS)
DNN_DESCRIPTOR_WRAPS(Convolution, CUDNN_CONVS)
DNN_DESCRIPTOR_WRAPS(Activation, CUDNN_ACTIVATIONS)

cudnnStatus_t WRAP(cudnnSetTensor4dDescriptor)(cudnnTensorDescriptor_t desc, cudnnTensorFormat_t format,
                                               cudnnDataType_t type, int n, int c, int h, int w) {
    if (FAILS("cudnnSetTensor4dDescriptor")) return CUDNN_STATUS_EXECUTION_FAILED;
    return REAL(cudnnSetTensor4dDescriptor)(desc, format, type, n, c, h, w);
}

cudnnStatus_t WRAP(cudnnSetFilter4dDescriptor)(cudnnFilterDescriptor_t desc, cudnnDataType_t type,
                                               cudnnTensorFormat_t format, int k, int c, int h, int w) {
    if (FAILS("cudnnSetFilter4dDescriptor")) return CUDNN_STATUS_EXECUTION_FAILED;
    return REAL(cudnnSetFilter4dDescriptor)(desc, type, format, k, c, h, w);
}

cudnnStatus_t WRAP(cudnnSetConvolution2dDescriptor)(cudnnConvolutionDescriptor_t desc, int pad_h, int pad_w,
                                                    int u, int v, int dilation_h, int dilation_w,
                                                    cudnnConvolutionMode_t mode, cudnnDataType_t compute) {
    if (FAILS("cudnnSetConvolution2dDescriptor")) return CUDNN_STATUS_EXECUTION_FAILED;
    return REAL(cudnnSetConvolution2dDescriptor)(desc, pad_h, pad_w, u, v, dilation_h, dilation_w, mode,
                                                 compute);
}

cudnnStatus_t WRAP(cudnnSetConvolutionMathType)(cudnnConvolutionDescriptor_t desc, cudnnMathType_t math) {
    if (FAILS("cudnnSetConvolutionMathType")) return CUDNN_STATUS_EXECUTION_FAILED;
    return REAL(cudnnSetConvolutionMathType)(desc, math);
}

cudnnStatus_t WRAP(cudnnSetActivationDescriptor)(cudnnActivationDescriptor_t desc, cudnnActivationMode_t mode,
                                                 cudnnNanPropagation_t nan, double coef) {
    if (FAILS("cudnnSetActivationDescriptor")) return CUDNN_STATUS_EXECUTION_FAILED;
    return REAL(cudnnSetActivationDescriptor)(desc, mode, nan, coef);
}

cudnnStatus_t WRAP(cudnnGetConvolutionForwardWorkspaceSize)(cudnnHandle_t handle, const cudnnTensorDescriptor_t x,
                                                            const cudnnFilterDescriptor_t w,
                                                            const cudnnConvolutionDescriptor_t conv,
                                                            const cudnnTensorDescriptor_t y,
                                                            cudnnConvolutionFwdAlgo_t algo, size_t *size) {
    if (FAILS("cudnnGetConvolutionForwardWorkspaceSize")) return CUDNN_STATUS_EXECUTION_FAILED;
    return REAL(cudnnGetConvolutionForwardWorkspaceSize)(handle, x, w, conv, y, algo, size);
}

cudnnStatus_t WRAP(cudnnFindConvolutionForwardAlgorithmEx)(
    cudnnHandle_t handle, const cudnnTensorDescriptor_t xd, const void *x, const cudnnFilterDescriptor_t wd,
    const void *w, const cudnnConvolutionDescriptor_t conv, const cudnnTensorDescriptor_t yd, void *y,
    const int requested, int *returned, cudnnConvolutionFwdAlgoPerf_t *perf, void *workspace,
    size_t workspace_size) {
    if (FAILS("cudnnFindConvolutionForwardAlgorithmEx")) return CUDNN_STATUS_EXECUTION_FAILED;
    return REAL(cudnnFindConvolutionForwardAlgorithmEx)(handle, xd, x, wd, w, conv, yd, y, requested, returned,
                                                        perf, workspace, workspace_size);
}

cudnnStatus_t WRAP(cudnnConvolutionForward)(cudnnHandle_t handle, const void *alpha, const cudnnTensorDescriptor_t xd,
                                            const void *x, const cudnnFilterDescriptor_t wd, const void *w,
                                            const cudnnConvolutionDescriptor_t conv, cudnnConvolutionFwdAlgo_t algo,
                                            void *workspace, size_t workspace_size, const void *beta,
                                            const cudnnTensorDescriptor_t yd, void *y) {
    if (FAILS("cudnnConvolutionForward")) return CUDNN_STATUS_EXECUTION_FAILED;
    return REAL(cudnnConvolutionForward)(handle, alpha, xd, x, wd, w, conv, algo, workspace, workspace_size, beta,
                                         yd, y);
}

cudnnStatus_t WRAP(cudnnConvolutionBiasActivationForward)(
    cudnnHandle_t handle, const void *alpha1, const cudnnTensorDescriptor_t xd, const void *x,
    const cudnnFilterDescriptor_t wd, const void *w, const cudnnConvolutionDescriptor_t conv,
    cudnnConvolutionFwdAlgo_t algo, void *workspace, size_t workspace_size, const void *alpha2,
    const cudnnTensorDescriptor_t zd, const void *z, const cudnnTensorDescriptor_t bd, const void *bias,
    const cudnnActivationDescriptor_t act, const cudnnTensorDescriptor_t yd, void *y) {
    if (FAILS("cudnnConvolutionBiasActivationForward")) return CUDNN_STATUS_EXECUTION_FAILED;
    return REAL(cudnnConvolutionBiasActivationForward)(handle, alpha1, xd, x, wd, w, conv, algo, workspace,
                                                       workspace_size, alpha2, zd, z, bd, bias, act, yd, y);
}

cudnnStatus_t WRAP(cudnnBackendCreateDescriptor)(cudnnBackendDescriptorType_t type, cudnnBackendDescriptor_t *desc) {
    if (FAILS("cudnnBackendCreateDescriptor")) return DNN_ALLOC_FAILED;
    return dnn_made(CUDNN_BACKEND_DESCS, REAL(cudnnBackendCreateDescriptor)(type, desc));
}

cudnnStatus_t WRAP(cudnnBackendDestroyDescriptor)(cudnnBackendDescriptor_t desc) {
    int fail = FAILS("cudnnBackendDestroyDescriptor");
    return dnn_released(CUDNN_BACKEND_DESCS, fail, desc, REAL(cudnnBackendDestroyDescriptor)(desc));
}

cudnnStatus_t WRAP(cudnnBackendSetAttribute)(cudnnBackendDescriptor_t desc, cudnnBackendAttributeName_t name,
                                             cudnnBackendAttributeType_t type, int64_t count, const void *values) {
    if (FAILS("cudnnBackendSetAttribute")) return CUDNN_STATUS_EXECUTION_FAILED;
    return REAL(cudnnBackendSetAttribute)(desc, name, type, count, values);
}

cudnnStatus_t WRAP(cudnnBackendGetAttribute)(cudnnBackendDescriptor_t const desc, cudnnBackendAttributeName_t name,
                                             cudnnBackendAttributeType_t type, int64_t requested, int64_t *count,
                                             void *values) {
    if (FAILS("cudnnBackendGetAttribute")) return CUDNN_STATUS_EXECUTION_FAILED;
    return REAL(cudnnBackendGetAttribute)(desc, name, type, requested, count, values);
}

cudnnStatus_t WRAP(cudnnBackendFinalize)(cudnnBackendDescriptor_t desc) {
    if (FAILS("cudnnBackendFinalize")) return CUDNN_STATUS_EXECUTION_FAILED;
    return REAL(cudnnBackendFinalize)(desc);
}

cudnnStatus_t WRAP(cudnnBackendExecute)(cudnnHandle_t handle, cudnnBackendDescriptor_t plan,
                                        cudnnBackendDescriptor_t pack) {
    if (FAILS("cudnnBackendExecute")) return CUDNN_STATUS_EXECUTION_FAILED;
    return REAL(cudnnBackendExecute)(handle, plan, pack);
}
#endif

/* ------------------------------------------------------------------------
 * The path: image -> engine on cuda -> upscale -> pixels
 * ------------------------------------------------------------------------ */

typedef struct {
    fault_model m;
    sdx4_image input;
} cuda_case;

/* Runs the path once (a fault_path's run): 0 with the output's pixels in
 * *pixels, or -1 with the message in err. The engine's default options
 * leave the plan cache off (sdx4_cuda_options.plan_cache NULL): every run
 * times its algorithms afresh, independent of the others. Once the engine
 * is closed, no error may be left pending for the thread's next CUDA call
 * (it would be reported as that call's, a kernel launch's). */
static int run_path(const void *ctx, void **pixels, size_t *len, char *err, size_t errlen) {
    const cuda_case *c = ctx;
    sdx4_image out = {0};
    int rc = fault_upscale(&c->m, "cuda", &c->input, &out, err, errlen);
    if (!rc) {
        *pixels = out.pixels;
        *len = (size_t)3 * out.width * out.height;
    }
    cudaError_t left = cudaGetLastError();
    CHECK(left == cudaSuccess, "%s %ld (%s): the engine closed with an error pending: %s",
          fault_kind_names[fault.kind], fault.fail_at, fault.injected ? fault.injected : "none failed",
          cudaGetErrorString(left));
    return rc;
}

/* Within half precision's tolerance of the clean run: at most 1% of the
 * values more than 2 levels apart (see the top comment). */
static int near(const void *clean, size_t clean_len, const void *pixels, size_t len, char *why, size_t whylen) {
    const uint8_t *a = clean, *b = pixels;
    size_t far = 0;
    int worst = 0;
    if (len != clean_len) {
        snprintf(why, whylen, "%zu values, not %zu", len, clean_len);
        return 0;
    }
    for (size_t i = 0; i < len; i++) {
        int d = abs((int)a[i] - (int)b[i]);
        far += d > 2;
        if (d > worst) worst = d;
    }
    snprintf(why, whylen, "%zu of %zu values more than 2 levels from the clean run's, at most %d", far, len,
             worst);
    return far * 100 <= len;
}

/* What a run must give back: the host's, and what the wrappers count. */
static void count_resources(fault_counts *c) {
    fault_count_host(c);
    for (int r = 0; r < RESOURCES; r++)
        fault_count(c, resource_names[r], __atomic_load_n(&live[r], __ATOMIC_RELAXED));
}

int main(void) {
    fault_init();
    int devices = 0;
    cudaError_t e = cudaGetDeviceCount(&devices);
    (void)cudaGetLastError();
    if (e != cudaSuccess || devices == 0) {
        printf("skipped: no CUDA device (%s)\n",
               e != cudaSuccess ? cudaGetErrorString(e) : "the driver reports none");
        return 77;
    }
    cuda_case cases[3] = {{.input = {16, 16, NULL}}, {.input = {16, 12, NULL}}, {.input = {40, 36, NULL}}};
    fault_models(&cases[0].m, &cases[1].m, &cases[2].m, 3);
    static const char *const names[3] = {
        "diffusion on cuda (tiny model, 3 guided steps, 16 x 16 px)",
        "gan on cuda (srvgg_x4_prelu, whole, 16 x 12 px)",
        "gan on cuda (rrdb_x2, 2 x 2 tiles of 32 px, 40 x 36 px)",
    };
    long budget = fault_budget();
    const unsigned wrapped = 1u << FAULT_ALLOC | 1u << FAULT_JSON | 1u << FAULT_CUDA;
    for (int i = 0; i < 3; i++) {
        if (fault_pattern(&cases[i].input)) return 1;
        fault_path path = {names[i], run_path, &cases[i], near, count_resources};
        fault_run_case(&path, wrapped, 1u << FAULT_CUDA, budget);
        sdx4_image_free(&cases[i].input);
    }
    return test_finish("test_faults_cuda");
}
