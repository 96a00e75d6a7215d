/*
 * backend_check.h - the argument checks that every backend makes alike.
 *
 * Each backend first checks its tensors itself (present, of a type it
 * computes in, of its own memory, with the right number of dimensions:
 * sdx4_cpu_check, cuda_check); what is left is about how the shapes fit
 * together, and that is the same for all backends. These functions do it
 * with one wording, so that a bad call reads the same whichever backend
 * runs it: each returns 0, or -1 with "op: ..." set by sdx4_set_error(). They
 * read shapes and pointers, never the values a tensor holds, so they serve
 * tensors in any memory.
 *
 * The CUDA backend is C++: the declarations are extern "C" there.
 */
#ifndef SDX4_BACKEND_CHECK_H
#define SDX4_BACKEND_CHECK_H

#include <stddef.h>
#include <stdint.h>

#include "backend/backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The element count of a new tensor's shape: 1 to 4 positive dimensions
 * whose float32 byte count fits in int64_t; else -1 with the error set. */
int64_t sdx4_check_shape(const char *op, int ndim, const int64_t *shape);

/* sdx4_check_shape for a weight from file bytes of `type` at `data`. */
int64_t sdx4_check_weight(const void *data, dtype type, int ndim, const int64_t *shape);
/* The first and last of a backend's checks of one tensor: that it is there
 * (has data), and that it has `ndim` dimensions (0: any). */
int sdx4_check_present(const char *op, const char *what, const tensor *t);
int sdx4_check_ndim(const char *op, const char *what, const tensor *t, int ndim);
/* The host side of upload/download is there: "op: no what" if not. */
int sdx4_check_host_buffer(const char *op, const char *what, const void *p);

/* Writes "[2,7,16,24]" into buf and returns buf. */
const char *sdx4_shape_str(const tensor *t, char *buf, size_t n);
#define SHAPE_STR_SIZE 96

int sdx4_check_activation(const char *op, activation act);
/* a and b have the same dimensions. */
int sdx4_check_same_shape(const char *op, const tensor *a, const tensor *b);
/* r, a residual to add to an operation's output, has the output's shape. */
int sdx4_check_residual(const char *op, const tensor *r, int ndim, const int64_t *shape);
/* bias (NULL: none) has one element per output. */
int sdx4_check_bias(const char *op, const tensor *bias, int64_t outputs);
/* gamma and beta have C elements each. */
int sdx4_check_affine(const char *op, const tensor *gamma, const tensor *beta, int64_t C);

/* Each operation's shape rules, with the names and arguments of backend.h;
 * the tensors have passed the backend's own checks. */
int sdx4_check_linear(const tensor *x, const tensor *w);
/* The [M, K] x [K, N] product fits in the int of the library `gemm`. */
int sdx4_check_gemm_size(const char *op, const char *gemm, int64_t M, int64_t N, int64_t K);
/* Also gives the output size, and checks that the sizes of the GEMMs fit
 * in the int of the library named `gemm` ("BLAS", "cuBLAS"). */
int sdx4_check_conv2d(const tensor *x, const tensor *w, const tensor *bias, int stride, int padding,
                 const char *gemm, int64_t *ho, int64_t *wo);
int sdx4_check_attention(const tensor *q, const tensor *k, const tensor *v, int heads);
int sdx4_check_group_norm(const tensor *x, int groups);
int sdx4_check_geglu(const tensor *x);
int sdx4_check_channel_bias(const tensor *x, const tensor *v);
int sdx4_check_concat_channels(const tensor *a, const tensor *b);
int sdx4_check_upsample(int h, int w);
/* slopes NULL or [C] for x [B, C, H, W]; a finite slope. */
int sdx4_check_prelu(const tensor *x, const tensor *slopes, float slope);
/* pixel_shuffle (unshuffle = 0) or pixel_unshuffle of x [B, C, H, W] by r:
 * r >= 1, C a multiple of r*r (shuffle) or H and W of r (unshuffle), and
 * the result within tensor limits. */
int sdx4_check_pixel_shuffle(const tensor *x, int r, int unshuffle);
int sdx4_check_tokens_to_nchw(const tensor *x, int h, int w);
/* ids index the `rows` rows of a table. */
int sdx4_check_embedding(int64_t rows, const int32_t *ids, int n);

#ifdef __cplusplus
}
#endif

#endif
