/*
 * cuda_gemm.cu - the matrix products of linear layers and 1x1 or im2col
 * convolutions, through cuBLASLt.
 *
 * cuBLASLt adds the bias in the GEMM's epilogue, while the result is still
 * in float registers: a separate pass that first fills the output with the
 * bias and a GEMM with beta = 1 would write and read the output one more
 * time each (a quarter of the time of the UNet's largest linear layers).
 * The heuristic's algorithm for each shape (type, transposes, sizes, bias)
 * is looked up once and kept, as cuDNN's plans are in cuda_conv.cu: a
 * model has a few dozen shapes. The algorithm also goes to the plan cache
 * (cuda_internal.h): cuBLASLt documents cublasLtMatmulAlgo_t as plain
 * bytes that may be saved and restored with the same cuBLAS version (the
 * device key holds it), and a later process checks the restored one with
 * cublasLtMatmulAlgoCheck instead of asking the heuristic again. A residual R (linear_add) is cuBLASLt's C
 * operand with beta = 1, so it too is added in float before the one
 * rounding. Where cuBLASLt offers no algorithm the product falls back to
 * cublasGemmEx, with the bias written first and R added after.
 *
 * All products accumulate in float (CUBLAS_COMPUTE_32F); float operands
 * may use TF32 tensor cores in fp16 mode (cuda_backend.cu).
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "backend/cuda/cuda_internal.h"

#define GEMM_KEY 9

struct gemm_plan {
    gemm_plan *next;
    int64_t key[GEMM_KEY];
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t a, b, c;
    cublasLtMatmulAlgo_t algo;
    int usable; /* 0: no cuBLASLt algorithm, use cublasGemmEx */
};

static void plan_free(gemm_plan *p) {
    if (p->desc) (void)cublasLtMatmulDescDestroy(p->desc);
    if (p->a) (void)cublasLtMatrixLayoutDestroy(p->a);
    if (p->b) (void)cublasLtMatrixLayoutDestroy(p->b);
    if (p->c) (void)cublasLtMatrixLayoutDestroy(p->c);
    free(p);
}

void cuda_gemm_plans_free(cuda_backend *cb) {
    while (cb->gemm_plans) {
        gemm_plan *p = cb->gemm_plans;
        cb->gemm_plans = p->next;
        plan_free(p);
    }
}

/* The plan for a shape, made on first use; NULL with the error set. */
static gemm_plan *find_plan(cuda_backend *cb, const int64_t *key, cudaDataType_t t,
                            cublasComputeType_t compute, cublasOperation_t ta,
                            cublasOperation_t tb, int m, int n, int k, int lda, int ldb, int ldc,
                            int bias) {
    gemm_plan *p = cb->gemm_plans;
    while (p && memcmp(p->key, key, sizeof p->key)) p = p->next;
    if (p) return p;
    if (!(p = (gemm_plan *)calloc(1, sizeof *p))) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "gemm: out of memory");
        return NULL;
    }
    memcpy(p->key, key, sizeof p->key);
    cublasLtEpilogue_t epilogue = bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
    uint64_t workspace = cb->gemm_workspace.bytes;
    cublasLtMatmulPreference_t pref = NULL;
    cublasLtMatmulHeuristicResult_t result;
    int found = 0;
    if (cublas_ok((cublasStatus_t)cublasLtMatmulDescCreate(&p->desc, compute, CUDA_R_32F),
                  "cublasLtMatmulDescCreate") ||
        cublas_ok(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta,
                                                 sizeof ta),
                  "cublasLt: transa") ||
        cublas_ok(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb,
                                                 sizeof tb),
                  "cublasLt: transb") ||
        cublas_ok(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE,
                                                 &epilogue, sizeof epilogue),
                  "cublasLt: epilogue") ||
        cublas_ok(cublasLtMatrixLayoutCreate(&p->a, t, ta == CUBLAS_OP_N ? m : k,
                                             ta == CUBLAS_OP_N ? k : m, lda),
                  "cublasLt: layout") ||
        cublas_ok(cublasLtMatrixLayoutCreate(&p->b, t, tb == CUBLAS_OP_N ? k : n,
                                             tb == CUBLAS_OP_N ? n : k, ldb),
                  "cublasLt: layout") ||
        cublas_ok(cublasLtMatrixLayoutCreate(&p->c, t, m, n, ldc), "cublasLt: layout") ||
        cublas_ok(cublasLtMatmulPreferenceCreate(&pref), "cublasLt: preference") ||
        cublas_ok(cublasLtMatmulPreferenceSetAttribute(
                      pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof workspace),
                  "cublasLt: workspace")) {
        if (pref) (void)cublasLtMatmulPreferenceDestroy(pref);
        plan_free(p);
        return NULL;
    }
    if (bias) { /* the bias pointer is set per call; its type is the data's */
        cudaDataType_t bt = t;
        if (cublas_ok(cublasLtMatmulDescSetAttribute(p->desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                                                     &bt, sizeof bt),
                      "cublasLt: bias type")) {
            (void)cublasLtMatmulPreferenceDestroy(pref);
            plan_free(p);
            return NULL;
        }
    }
    char ck[192];
    snprintf(ck, sizeof ck, "gemm %s ta %d tb %d m %d n %d k %d lda %d ldb %d ldc %d flags %" PRId64,
             dtype_name((dtype)key[0]), (int)ta, (int)tb, m, n, k, lda, ldb, ldc, key[8]);
    const cublasLtMatmulAlgo_t *cached =
        (const cublasLtMatmulAlgo_t *)cuda_choice_get(cb, ck, sizeof *cached);
    if (cached &&
        cublasLtMatmulAlgoCheck(cb->cublaslt, p->desc, p->a, p->b, p->c, p->c, cached,
                                &result) == CUBLAS_STATUS_SUCCESS &&
        result.workspaceSize <= workspace) {
        p->algo = *cached;
        p->usable = 1;
    } else if (cublasLtMatmulAlgoGetHeuristic(cb->cublaslt, p->desc, p->a, p->b, p->c, p->c,
                                              pref, 1, &result, &found) ==
                   CUBLAS_STATUS_SUCCESS &&
               found > 0) {
        p->algo = result.algo;
        p->usable = 1;
        cuda_choice_put(cb, ck, &p->algo, sizeof p->algo);
    }
    (void)cublasLtMatmulPreferenceDestroy(pref);
    p->next = cb->gemm_plans;
    cb->gemm_plans = p;
    return p;
}

int cuda_gemm(cuda_backend *cb, dtype type, cublasOperation_t ta, cublasOperation_t tb, int m,
              int n, int k, const void *A, int lda, const void *B, int ldb, const void *bias,
              const void *R, void *C, int ldc) {
    cudaDataType_t t = type == DTYPE_F16 ? CUDA_R_16F : type == DTYPE_BF16 ? CUDA_R_16BF : CUDA_R_32F;
    cublasComputeType_t compute = type == DTYPE_F32 && cb->allow_tf32
                                      ? CUBLAS_COMPUTE_32F_FAST_TF32
                                      : CUBLAS_COMPUTE_32F;
    const float alpha = 1.0f, zero = 0.0f, one = 1.0f;
    int64_t key[GEMM_KEY] = {type, ta, tb, m, n, k, ((int64_t)lda << 32) | ldb, ldc,
                             (bias != NULL) | (int64_t)cb->allow_tf32 << 1 | (int64_t)(R != NULL) << 2};
    gemm_plan *p = find_plan(cb, key, t, compute, ta, tb, m, n, k, lda, ldb, ldc, bias != NULL);
    if (!p) return -1;
    if (p->usable) {
        if (bias && cublas_ok(cublasLtMatmulDescSetAttribute(p->desc,
                                                             CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                                                             &bias, sizeof bias),
                              "cublasLt: bias"))
            return -1;
        /* D = A B + bias + 1 * R, R read as the C operand */
        return cublas_ok(cublasLtMatmul(cb->cublaslt, p->desc, &alpha, A, p->a, B, p->b,
                                        R ? &one : &zero, R ? R : C, p->c, C, p->c, &p->algo,
                                        cb->gemm_workspace.ptr, cb->gemm_workspace.bytes,
                                        cb->stream),
                         "cublasLtMatmul");
    }
    /* y = bias (each column of the column-major C), then y += A B, then + R */
    if (bias && cuda_fill_bias(cb, C, bias, type, n, m, 1)) return -1;
    return cublas_ok(cublasGemmEx(cb->cublas, ta, tb, m, n, k, &alpha, A, t, lda, B, t, ldb,
                                  bias ? &one : &zero, C, t, ldc, compute, CUBLAS_GEMM_DEFAULT),
                     "cublasGemmEx") ||
                   (R && cuda_add(cb, type, C, R, (int64_t)ldc * n, 1.0f))
               ? -1
               : 0;
}
