/*
 * cpu_onednn.c - the CPU backend's convolutions and linear layers through
 * oneDNN: bfloat16 operands with float accumulation and float output
 * (sdx4.h's cpu.dtype "bf16"), or the same code with float32 operands,
 * which the tests hold to the OpenBLAS path on any CPU. The tests also
 * run it on float32 operands rounded to a narrower format's values
 * (bfloat16, or FP8 E4M3 with a scale per tensor, for the convolutions,
 * the linear layers or both: round_operands): the format's error, measured
 * on any CPU before, or without, the hardware that computes in it.
 *
 * Only the dense products change. Group norm, layer norm, softmax, the
 * attention (below), every elementwise operation and the scheduler stay in
 * float32 and in the files they were: activations between operations are
 * float32 NCHW or [..., C] tensors as everywhere in this backend.
 *
 * bfloat16 needs the CPU to have it: AMX (Sapphire Rapids and later) or
 * AVX512-BF16 (Cooper Lake, Zen 4). oneDNN would run bfloat16 on a plain
 * AVX512 CPU by emulating the instructions, and not at all on AVX2; this
 * file asks oneDNN which instruction set it dispatches to and refuses the
 * bfloat16 path at open, naming what is missing, when it is neither.
 * Nothing is ever emulated, and nothing falls back to float silently.
 *
 * One operation is one oneDNN primitive (a convolution, or a matmul for
 * linear) whose source and weights are bfloat16 and whose destination is
 * float32, with the bias added by the primitive and a residual (conv2d_add,
 * linear_add) by its "sum" post-op, so the product is rounded once, in
 * float. Around it:
 *   - the input is reordered from float32 NCHW (or [M, K]) into the
 *     primitive's source layout and type, per call (oneDNN's reorder rounds
 *     to nearest even); and the output from the primitive's destination
 *     layout back into NCHW when the primitive chose another one (a blocked
 *     layout such as nChw16c; a residual is reordered into it first);
 *   - weights are reordered once, at their first use (the engine's warm-up
 *     runs every layer), into the layout and type the primitive prefers,
 *     and the float copy is freed: bfloat16 weights take half the memory.
 *     The layout is known only once a primitive is made for a shape, which
 *     weight() does not know; a later shape whose primitive prefers another
 *     layout reorders the prepared weights per call (counted in no figure:
 *     it happens rarely, if ever, as the layout depends on the channels);
 *   - primitives (and their reorders) are made once per shape and kept in a
 *     table, up to CACHE_MAX entries; past that, a new shape's primitive is
 *     made and freed per call, so a server that sees many sizes keeps a
 *     bounded amount of JIT code;
 *   - each call gets its own scratchpad from the backend's allocator
 *     (oneDNN's "user" scratchpad mode) and its own stream, so that one
 *     primitive may run from several threads at once (backend.h);
 *   - oneDNN's OpenMP runtime takes its team size from the calling thread's
 *     setting, which is set to the backend's threads for the call and put
 *     back after.
 *
 * The attention's two products stay in cpu_attention.c, in float: they are
 * interleaved with its streaming softmax block by block (q @ k^T, scale,
 * softmax, @ v over blocks of keys), which keeps [Tq, Tk] from ever being
 * held; as oneDNN primitives each block would be three calls with the
 * softmax between them in float, for products of head_dim 64, which are a
 * small part of a step (the UNet's attention runs only at its lower
 * levels).
 *
 * A primitive cannot be stopped midway: the caller's cancel flag is read
 * before each operation.
 *
 * CMakeLists.txt compiles this file only when it finds oneDNN 2.x (Debian
 * 12's libdnnl-dev): the C API of oneDNN 3 differs.
 */

#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <oneapi/dnnl/dnnl.h>

#include "backend/cpu/cpu_internal.h"
#include "core/cancel.h"
#include "core/error.h"
#include "core/float_round.h"

#define CACHE_BUCKETS 256
#define CACHE_MAX 1024

enum { OP_CONV, OP_LINEAR };

/* The format whose values the emulating paths (tests only) round float32
 * operands to: FORMAT_F32 leaves them as they are. */
typedef enum { FORMAT_F32, FORMAT_BF16, FORMAT_E4M3 } operand_format;

/* An operation's shape: everything a primitive depends on. */
typedef struct {
    int64_t v[11];
} op_key;

typedef struct op_entry {
    struct op_entry *next;
    op_key key;
    dnnl_primitive_t compute;            /* the convolution or matmul */
    dnnl_memory_desc_t src, weights, dst; /* as it reads and writes them */
    dnnl_memory_desc_t user_src, user_dst; /* float32 NCHW or [M, K], [M, N] */
    dnnl_primitive_t src_in;             /* user_src -> src; NULL: same */
    dnnl_primitive_t dst_out;            /* dst -> user_dst; NULL: same */
    dnnl_primitive_t residual_in;        /* user_dst -> dst, for a residual */
} op_entry;

struct cpu_onednn {
    dnnl_engine_t engine;
    dnnl_data_type_t operands; /* dnnl_bf16, or dnnl_f32 for the tests */
    operand_format round[2];   /* per OP_CONV, OP_LINEAR: how the f32
                                  operands are rounded (tests) */
    pthread_mutex_t lock;      /* guards the table and weight preparation */
    op_entry *table[CACHE_BUCKETS];
    int entries;
};

static cpu_onednn *state(backend *be) { return ((cpu_backend *)be)->onednn; }

/* ------------------------------------------------------------------ errors */

static const char *status_text(dnnl_status_t s) {
    switch (s) {
    case dnnl_success: return "success";
    case dnnl_out_of_memory: return "out of memory";
    case dnnl_invalid_arguments: return "invalid arguments";
    case dnnl_unimplemented: return "not implemented for these shapes and types";
    case dnnl_runtime_error: return "runtime error";
    default: return "error";
    }
}

/* Sets the error for a failed oneDNN call and returns -1. */
static int fail(const char *op, const char *call, dnnl_status_t s) {
    sdx4_set_error(s == dnnl_out_of_memory ? SDX4_ERR_NO_MEMORY : SDX4_ERR_DEVICE,
                   "%s: oneDNN %s: %s (%d)", op, call, status_text(s), (int)s);
    return -1;
}

#define DNNL_TRY(op, call)                                     \
    do {                                                       \
        dnnl_status_t st_ = (call);                            \
        if (st_ != dnnl_success) return fail(op, #call, st_); \
    } while (0)

/* ------------------------------------------------------------- execution */

/* Runs p with args (room for one more, the scratchpad) on the backend's
 * threads, with a scratchpad of its own from the backend's allocator. */
static int execute(backend *be, const char *op, const_dnnl_primitive_t p, int nargs,
                   dnnl_exec_arg_t *args) {
    cpu_onednn *d = state(be);
    const_dnnl_primitive_desc_t pd;
    DNNL_TRY(op, dnnl_primitive_get_primitive_desc(p, &pd));
    const dnnl_memory_desc_t *smd = dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
    size_t scratch_bytes = smd ? dnnl_memory_desc_get_size(smd) : 0;
    void *scratch = NULL;
    dnnl_memory_t scratch_mem = NULL;
    dnnl_stream_t stream = NULL;
    dnnl_status_t st = dnnl_success;
    const char *call = "dnnl_memory_create";
    if (scratch_bytes) {
        if (!(scratch = sdx4_cpu_bytes_alloc(be, scratch_bytes))) return -1;
        st = dnnl_memory_create(&scratch_mem, smd, d->engine, scratch);
        args[nargs++] = (dnnl_exec_arg_t){DNNL_ARG_SCRATCHPAD, scratch_mem};
    }
    if (st == dnnl_success) {
        call = "dnnl_stream_create";
        st = dnnl_stream_create(&stream, d->engine, dnnl_stream_default_flags);
    }
    if (st == dnnl_success) {
        int team = omp_get_max_threads();
        omp_set_num_threads(cpu_threads(be));
        call = "dnnl_primitive_execute";
        st = dnnl_primitive_execute(p, stream, nargs, args);
        if (st == dnnl_success) {
            call = "dnnl_stream_wait";
            st = dnnl_stream_wait(stream);
        }
        omp_set_num_threads(team);
    }
    if (stream) dnnl_stream_destroy(stream);
    if (scratch_mem) dnnl_memory_destroy(scratch_mem);
    sdx4_cpu_bytes_free(be, scratch, scratch_bytes);
    return st == dnnl_success ? 0 : fail(op, call, st);
}

/* A memory object over `data` (not owned) described by md. */
static int wrap(const char *op, cpu_onednn *d, const dnnl_memory_desc_t *md, const void *data,
                dnnl_memory_t *m) {
    DNNL_TRY(op, dnnl_memory_create(m, md, d->engine, (void *)data));
    return 0;
}

/* dst = src (same dims) in dst's layout and type, by a reorder primitive
 * `r` (made when NULL, and freed then). */
static int reorder(backend *be, const char *op, const_dnnl_primitive_t r,
                   const dnnl_memory_desc_t *src_md, const void *src,
                   const dnnl_memory_desc_t *dst_md, void *dst) {
    cpu_onednn *d = state(be);
    dnnl_primitive_t made = NULL;
    if (!r) {
        dnnl_primitive_desc_t pd;
        dnnl_primitive_attr_t attr;
        DNNL_TRY(op, dnnl_primitive_attr_create(&attr));
        dnnl_status_t st = dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user);
        if (st == dnnl_success)
            st = dnnl_reorder_primitive_desc_create(&pd, src_md, d->engine, dst_md, d->engine, attr);
        dnnl_primitive_attr_destroy(attr);
        if (st != dnnl_success) return fail(op, "dnnl_reorder_primitive_desc_create", st);
        st = dnnl_primitive_create(&made, pd);
        dnnl_primitive_desc_destroy(pd);
        if (st != dnnl_success) return fail(op, "dnnl_primitive_create", st);
        r = made;
    }
    dnnl_memory_t s = NULL, t = NULL;
    int rc = wrap(op, d, src_md, src, &s) || wrap(op, d, dst_md, dst, &t);
    if (!rc) {
        dnnl_exec_arg_t args[3] = {{DNNL_ARG_FROM, s}, {DNNL_ARG_TO, t}};
        rc = execute(be, op, r, 2, args);
    }
    if (s) dnnl_memory_destroy(s);
    if (t) dnnl_memory_destroy(t);
    if (made) dnnl_primitive_destroy(made);
    return rc;
}

/* ------------------------------------------------------------- primitives */

static void entry_free(op_entry *e) {
    if (!e) return;
    if (e->compute) dnnl_primitive_destroy(e->compute);
    if (e->src_in) dnnl_primitive_destroy(e->src_in);
    if (e->dst_out) dnnl_primitive_destroy(e->dst_out);
    if (e->residual_in) dnnl_primitive_destroy(e->residual_in);
    free(e);
}

/* *out = a reorder primitive from a to b, or NULL when they are the same. */
static int make_reorder(const char *op, cpu_onednn *d, const dnnl_memory_desc_t *a,
                        const dnnl_memory_desc_t *b, dnnl_primitive_t *out) {
    *out = NULL;
    if (dnnl_memory_desc_equal(a, b)) return 0;
    dnnl_primitive_attr_t attr;
    dnnl_primitive_desc_t pd;
    DNNL_TRY(op, dnnl_primitive_attr_create(&attr));
    dnnl_status_t st = dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user);
    if (st == dnnl_success) st = dnnl_reorder_primitive_desc_create(&pd, a, d->engine, b, d->engine, attr);
    dnnl_primitive_attr_destroy(attr);
    if (st != dnnl_success) return fail(op, "dnnl_reorder_primitive_desc_create", st);
    st = dnnl_primitive_create(out, pd);
    dnnl_primitive_desc_destroy(pd);
    return st == dnnl_success ? 0 : fail(op, "dnnl_primitive_create", st);
}

/* The primitive's layouts, and the reorders between them and the user's. */
static int finish_entry(const char *op, cpu_onednn *d, op_entry *e, const_dnnl_primitive_desc_t pd,
                        int residual) {
    e->src = *dnnl_primitive_desc_query_md(pd, dnnl_query_src_md, 0);
    e->weights = *dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
    e->dst = *dnnl_primitive_desc_query_md(pd, dnnl_query_dst_md, 0);
    if (make_reorder(op, d, &e->user_src, &e->src, &e->src_in) ||
        make_reorder(op, d, &e->dst, &e->user_dst, &e->dst_out))
        return -1;
    return residual ? make_reorder(op, d, &e->user_dst, &e->dst, &e->residual_in) : 0;
}

/* Attributes of a dense primitive: a user scratchpad, and the sum post-op
 * when a residual is added (dst = product + bias + dst). */
static dnnl_status_t dense_attr(dnnl_primitive_attr_t *attr, int residual) {
    dnnl_status_t st = dnnl_primitive_attr_create(attr);
    if (st != dnnl_success) return st;
    st = dnnl_primitive_attr_set_scratchpad_mode(*attr, dnnl_scratchpad_mode_user);
    if (st == dnnl_success && residual) {
        dnnl_post_ops_t po;
        st = dnnl_post_ops_create(&po);
        if (st == dnnl_success) {
            st = dnnl_post_ops_append_sum(po, 1.0f);
            if (st == dnnl_success) st = dnnl_primitive_attr_set_post_ops(*attr, po);
            dnnl_post_ops_destroy(po);
        }
    }
    if (st != dnnl_success) dnnl_primitive_attr_destroy(*attr);
    return st;
}

/* Makes the primitive of `key`'s shape from its op descriptor. */
static int make_compute(const char *op, cpu_onednn *d, op_entry *e, const_dnnl_op_desc_t desc,
                        int residual) {
    dnnl_primitive_attr_t attr;
    dnnl_primitive_desc_t pd;
    DNNL_TRY(op, dense_attr(&attr, residual));
    dnnl_status_t st = dnnl_primitive_desc_create(&pd, desc, attr, d->engine, NULL);
    dnnl_primitive_attr_destroy(attr);
    if (st != dnnl_success) return fail(op, "dnnl_primitive_desc_create", st);
    st = dnnl_primitive_create(&e->compute, pd);
    int rc = st == dnnl_success ? finish_entry(op, d, e, pd, residual)
                                : fail(op, "dnnl_primitive_create", st);
    dnnl_primitive_desc_destroy(pd);
    return rc;
}

/* conv key: OP_CONV, B, C, H, W, O, k, stride, pad, bias, residual. */
static op_entry *make_conv(const char *op, cpu_onednn *d, const op_key *key, int64_t Ho, int64_t Wo) {
    const int64_t *v = key->v;
    int64_t B = v[1], C = v[2], H = v[3], W = v[4], O = v[5], k = v[6], stride = v[7], pad = v[8];
    op_entry *e = calloc(1, sizeof *e);
    if (!e) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "%s: out of memory", op);
        return NULL;
    }
    e->key = *key;
    dnnl_memory_desc_t src, wei, bias, dst;
    dnnl_dims_t src_dims = {B, C, H, W}, wei_dims = {O, C, k, k}, bias_dims = {O};
    dnnl_dims_t dst_dims = {B, O, Ho, Wo}, strides = {stride, stride}, pad_l = {pad, pad};
    /* PyTorch's floor: the right and bottom padding may be less than pad */
    dnnl_dims_t pad_r = {(Ho - 1) * stride + k - H - pad, (Wo - 1) * stride + k - W - pad};
    dnnl_convolution_desc_t desc;
    dnnl_status_t st = dnnl_memory_desc_init_by_tag(&src, 4, src_dims, d->operands, dnnl_format_tag_any);
    if (st == dnnl_success)
        st = dnnl_memory_desc_init_by_tag(&wei, 4, wei_dims, d->operands, dnnl_format_tag_any);
    if (st == dnnl_success) st = dnnl_memory_desc_init_by_tag(&bias, 1, bias_dims, dnnl_f32, dnnl_a);
    if (st == dnnl_success)
        st = dnnl_memory_desc_init_by_tag(&dst, 4, dst_dims, dnnl_f32, dnnl_format_tag_any);
    if (st == dnnl_success) st = dnnl_memory_desc_init_by_tag(&e->user_src, 4, src_dims, dnnl_f32, dnnl_nchw);
    if (st == dnnl_success) st = dnnl_memory_desc_init_by_tag(&e->user_dst, 4, dst_dims, dnnl_f32, dnnl_nchw);
    if (st == dnnl_success)
        st = dnnl_convolution_forward_desc_init(&desc, dnnl_forward_inference, dnnl_convolution_direct,
                                                &src, &wei, v[9] ? &bias : NULL, &dst, strides,
                                                pad_l, pad_r);
    if (st != dnnl_success) {
        fail(op, "convolution descriptor", st);
        entry_free(e);
        return NULL;
    }
    if (make_compute(op, d, e, &desc, (int)v[10])) {
        entry_free(e);
        return NULL;
    }
    return e;
}

/* linear key: OP_LINEAR, M, K, N, bias, residual. y[M, N] = x[M, K] @ w^T
 * as a matmul of x by the weights [K, N], which are w[N, K] read in "ba"
 * order. */
static op_entry *make_linear(const char *op, cpu_onednn *d, const op_key *key) {
    const int64_t *v = key->v;
    int64_t M = v[1], K = v[2], N = v[3];
    op_entry *e = calloc(1, sizeof *e);
    if (!e) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "%s: out of memory", op);
        return NULL;
    }
    e->key = *key;
    dnnl_memory_desc_t src, wei, bias, dst;
    dnnl_dims_t src_dims = {M, K}, wei_dims = {K, N}, bias_dims = {1, N}, dst_dims = {M, N};
    dnnl_matmul_desc_t desc;
    dnnl_status_t st = dnnl_memory_desc_init_by_tag(&src, 2, src_dims, d->operands, dnnl_ab);
    if (st == dnnl_success)
        st = dnnl_memory_desc_init_by_tag(&wei, 2, wei_dims, d->operands, dnnl_format_tag_any);
    if (st == dnnl_success) st = dnnl_memory_desc_init_by_tag(&bias, 2, bias_dims, dnnl_f32, dnnl_ab);
    if (st == dnnl_success) st = dnnl_memory_desc_init_by_tag(&dst, 2, dst_dims, dnnl_f32, dnnl_ab);
    if (st == dnnl_success) st = dnnl_memory_desc_init_by_tag(&e->user_src, 2, src_dims, dnnl_f32, dnnl_ab);
    if (st == dnnl_success) e->user_dst = dst;
    if (st == dnnl_success) st = dnnl_matmul_desc_init(&desc, &src, &wei, v[4] ? &bias : NULL, &dst);
    if (st != dnnl_success) {
        fail(op, "matmul descriptor", st);
        entry_free(e);
        return NULL;
    }
    if (make_compute(op, d, e, &desc, (int)v[5])) {
        entry_free(e);
        return NULL;
    }
    return e;
}

static size_t key_hash(const op_key *k) {
    uint64_t h = 1469598103934665603ull;
    for (int i = 0; i < 11; i++) h = (h ^ (uint64_t)k->v[i]) * 1099511628211ull;
    return (size_t)(h % CACHE_BUCKETS);
}

/* The entry of `key`, made on first use; *transient is set when the table
 * is full and the caller must free the entry after the call. */
static op_entry *lookup(const char *op, cpu_onednn *d, const op_key *key, int64_t Ho, int64_t Wo,
                        int *transient) {
    size_t h = key_hash(key);
    *transient = 0;
    pthread_mutex_lock(&d->lock);
    op_entry *e = d->table[h];
    while (e && memcmp(&e->key, key, sizeof *key)) e = e->next;
    if (!e) {
        e = key->v[0] == OP_CONV ? make_conv(op, d, key, Ho, Wo) : make_linear(op, d, key);
        if (e && d->entries < CACHE_MAX) {
            e->next = d->table[h];
            d->table[h] = e;
            d->entries++;
        } else if (e) {
            *transient = 1;
        }
    }
    pthread_mutex_unlock(&d->lock);
    return e;
}

/* The n operands at x rounded to the values of format f, in place (any
 * layout: the operation is elementwise but for E4M3's scale, and a blocked
 * layout's padding is zero). Only the emulating paths (tests) call it.
 *
 * bfloat16 rounds each value (float_round.h). E4M3 holds too few values
 * for a tensor's own range, so an H100 FP8 GEMM or convolution reads each
 * operand as E4M3 codes times one float scale per tensor; the scale here
 * is "current scaling" (Transformer Engine's name): amax(|x|) / 448, which
 * maps the largest magnitude onto E4M3's largest. A weight's is computed
 * once, when it is prepared; the source's per call. Each value becomes
 * E4M3(v / s) * s. A tensor that is all zeros (or whose amax is not
 * finite) keeps scale 1. The bias, the residual and the output stay float:
 * an H100 FP8 product writes fp16, bf16 or fp32, and the rounding of an
 * fp16 or bf16 output is not modelled here.
 *
 * What this leaves out makes the emulated error a lower bound of the
 * hardware's: oneDNN accumulates the exact products in float32, while
 * Hopper's FP8 tensor cores keep fewer bits of the running sum (about 14,
 * measured on H800 in DeepSeek-V3's technical report, arXiv:2412.19437,
 * section 3.3.2). */
static void round_operands(backend *be, operand_format f, float *x, int64_t n) {
    if (f == FORMAT_F32) return;
    float s = 1;
    if (f == FORMAT_E4M3) {
        float amax = 0;
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static) reduction(max : amax)
        for (int64_t i = 0; i < n; i++) /* NaN compares false: skipped */
            if (fabsf(x[i]) > amax) amax = fabsf(x[i]);
        s = amax / 448.0f;
        if (!(s > 0) || s > FLT_MAX) s = 1; /* zeros, infinities, or an amax that underflows */
    }
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static)
    for (int64_t i = 0; i < n; i++)
        x[i] = f == FORMAT_BF16 ? f32_round_bf16(x[i]) : f32_round_e4m3(x[i] / s) * s;
}

/* --------------------------------------------------------------- weights */

typedef struct {
    dnnl_memory_desc_t md; /* the layout and type of the first primitive */
    void *data;
    size_t bytes;
} prepared_weight;

/* The user's view of w: [O, C, k, k] row-major, or w[N, K] as [K, N]. */
static int weight_user_md(const tensor *w, dnnl_memory_desc_t *md) {
    if (w->ndim == 4) {
        dnnl_dims_t dims = {w->shape[0], w->shape[1], w->shape[2], w->shape[3]};
        return dnnl_memory_desc_init_by_tag(md, 4, dims, dnnl_f32, dnnl_oihw) == dnnl_success ? 0 : -1;
    }
    dnnl_dims_t dims = {w->shape[1], w->shape[0]};
    return dnnl_memory_desc_init_by_tag(md, 2, dims, dnnl_f32, dnnl_ba) == dnnl_success ? 0 : -1;
}

/* w's weights in the layout e reads: prepared at its first use (the float
 * copy is then freed if the backend owns it), or reordered from there into
 * *tmp (of *tmp_bytes, the caller frees) when e wants another layout. */
static const void *weights_for(backend *be, const char *op, tensor *w, const op_entry *e,
                               void **tmp, size_t *tmp_bytes) {
    cpu_onednn *d = state(be);
    *tmp = NULL;
    *tmp_bytes = 0;
    pthread_mutex_lock(&d->lock);
    prepared_weight *p = w->prepared;
    if (!p) {
        dnnl_memory_desc_t user;
        int failed = 1;
        if (weight_user_md(w, &user)) {
            sdx4_set_error(SDX4_ERR_DEVICE, "%s: oneDNN cannot describe the weight", op);
        } else if (!(p = calloc(1, sizeof *p))) {
            sdx4_set_error(SDX4_ERR_NO_MEMORY, "%s: out of memory", op);
        } else {
            p->md = e->weights;
            p->bytes = dnnl_memory_desc_get_size(&p->md);
            if ((p->data = sdx4_cpu_bytes_alloc(be, p->bytes)) &&
                !reorder(be, op, NULL, &user, w->data, &p->md, p->data))
                failed = 0;
            if (!failed)
                round_operands(be, d->round[e->key.v[0]], p->data, (int64_t)(p->bytes / sizeof(float)));
        }
        if (failed) {
            if (p) sdx4_cpu_bytes_free(be, p->data, p->bytes);
            free(p);
            pthread_mutex_unlock(&d->lock);
            return NULL;
        }
        w->prepared = p;
        if (w->owns_data) { /* the float copy is done with */
            sdx4_cpu_bytes_free(be, w->data, (size_t)tensor_numel(w) * sizeof(float));
            w->data = NULL;
            w->owns_data = 0;
        }
    }
    pthread_mutex_unlock(&d->lock);
    if (dnnl_memory_desc_equal(&p->md, &e->weights)) return p->data;
    *tmp_bytes = dnnl_memory_desc_get_size(&e->weights);
    if (!(*tmp = sdx4_cpu_bytes_alloc(be, *tmp_bytes)) ||
        reorder(be, op, NULL, &p->md, p->data, &e->weights, *tmp)) {
        sdx4_cpu_bytes_free(be, *tmp, *tmp_bytes);
        *tmp = NULL;
        return NULL;
    }
    return *tmp;
}

void sdx4_cpu_onednn_weight_release(backend *be, tensor *w) {
    prepared_weight *p = w->prepared;
    sdx4_cpu_bytes_free(be, p->data, p->bytes);
    free(p);
    w->prepared = NULL;
}

/* ------------------------------------------------------------- operations */

/* A weight tensor: F32 with ndim dimensions, its float data or its
 * prepared form present. */
static int check_weight(const char *op, const tensor *w, int ndim) {
    if (w && !w->data && w->prepared) return sdx4_check_ndim(op, "weight", w, ndim);
    return sdx4_cpu_check(op, "weight", w, ndim);
}

/* Runs entry e on x (user layout) into y (user layout), with the bias and
 * the residual r (already checked), reordering where e's layouts differ. */
static int run_dense(backend *be, const char *op, const op_entry *e, const tensor *x, tensor *w,
                     const tensor *bias, const tensor *r, tensor *y) {
    cpu_onednn *d = state(be);
    if (cancel_is_set(sdx4_cancel_flag())) return sdx4_cancel_stopped();
    operand_format format = d->round[e->key.v[0]];
    size_t src_bytes = e->src_in || format != FORMAT_F32 ? dnnl_memory_desc_get_size(&e->src) : 0;
    size_t dst_bytes = e->dst_out ? dnnl_memory_desc_get_size(&e->dst) : 0;
    void *src = NULL, *dst = NULL, *wtmp = NULL;
    size_t wtmp_bytes = 0;
    dnnl_memory_t m[4] = {0};
    int rc = -1;
    const void *wdata = weights_for(be, op, w, e, &wtmp, &wtmp_bytes);
    if (!wdata) return -1;
    if ((src_bytes && !(src = sdx4_cpu_bytes_alloc(be, src_bytes))) ||
        (dst_bytes && !(dst = sdx4_cpu_bytes_alloc(be, dst_bytes))))
        goto done;
    if (src && e->src_in && reorder(be, op, e->src_in, &e->user_src, x->data, &e->src, src)) goto done;
    if (src && !e->src_in) memcpy(src, x->data, src_bytes);
    if (src) round_operands(be, format, src, (int64_t)(src_bytes / sizeof(float)));
    void *out = dst ? dst : y->data;
    if (r) { /* the sum post-op adds the product to what dst holds */
        if (e->residual_in) {
            if (reorder(be, op, e->residual_in, &e->user_dst, r->data, &e->dst, out)) goto done;
        } else {
            memcpy(out, r->data, (size_t)tensor_numel(r) * sizeof(float));
        }
    }
    if (wrap(op, d, &e->src, src ? src : x->data, &m[0]) ||
        wrap(op, d, &e->weights, wdata, &m[1]) || wrap(op, d, &e->dst, out, &m[2]))
        goto done;
    dnnl_exec_arg_t args[5] = {{DNNL_ARG_SRC, m[0]}, {DNNL_ARG_WEIGHTS, m[1]}, {DNNL_ARG_DST, m[2]}};
    int nargs = 3;
    if (bias) {
        dnnl_memory_desc_t bmd;
        dnnl_dims_t conv_dims = {tensor_numel(bias)}, linear_dims = {1, tensor_numel(bias)};
        int conv = e->key.v[0] == OP_CONV;
        dnnl_status_t st = dnnl_memory_desc_init_by_tag(&bmd, conv ? 1 : 2, conv ? conv_dims : linear_dims,
                                                        dnnl_f32, conv ? dnnl_a : dnnl_ab);
        if (st != dnnl_success) {
            fail(op, "bias descriptor", st);
            goto done;
        }
        if (wrap(op, d, &bmd, bias->data, &m[3])) goto done;
        args[nargs++] = (dnnl_exec_arg_t){DNNL_ARG_BIAS, m[3]};
    }
    if (execute(be, op, e->compute, nargs, args)) goto done;
    if (dst && reorder(be, op, e->dst_out, &e->dst, dst, &e->user_dst, y->data)) goto done;
    rc = 0;
done:
    for (int i = 0; i < 4; i++)
        if (m[i]) dnnl_memory_destroy(m[i]);
    sdx4_cpu_bytes_free(be, src, src_bytes);
    sdx4_cpu_bytes_free(be, dst, dst_bytes);
    sdx4_cpu_bytes_free(be, wtmp, wtmp_bytes);
    return rc;
}

static tensor *onednn_conv(backend *be, const tensor *x, const tensor *w_in, const tensor *bias,
                           int stride, int padding, const tensor *r) {
    const char *op = r ? "conv2d_add" : "conv2d";
    tensor *w = (tensor *)w_in; /* weights are read-only; prepared once */
    if (sdx4_cpu_check(op, "input", x, 4) || check_weight(op, w, 4)) return NULL;
    if (bias && sdx4_cpu_check(op, "bias", bias, 0)) return NULL;
    if (r && sdx4_cpu_check(op, "residual", r, 4)) return NULL;
    int64_t Ho, Wo;
    if (sdx4_check_conv2d(x, w, bias, stride, padding, "oneDNN", &Ho, &Wo)) return NULL;
    int64_t B = x->shape[0], O = w->shape[0], shape[4] = {B, O, Ho, Wo};
    if (r && sdx4_check_residual(op, r, 4, shape)) return NULL;
    op_key key = {{OP_CONV, B, x->shape[1], x->shape[2], x->shape[3], O, w->shape[2], stride,
                   padding, bias != NULL, r != NULL}};
    int transient;
    op_entry *e = lookup(op, state(be), &key, Ho, Wo, &transient);
    if (!e) return NULL;
    tensor *y = sdx4_cpu_new_tensor(be, 4, shape);
    if (y && run_dense(be, op, e, x, w, bias, r, y)) {
        tensor_free(y);
        y = NULL;
    }
    if (transient) entry_free(e);
    return y;
}

static tensor *onednn_linear(backend *be, const tensor *x, const tensor *w_in, const tensor *bias,
                             const tensor *r) {
    const char *op = r ? "linear_add" : "linear";
    tensor *w = (tensor *)w_in;
    if (sdx4_cpu_check(op, "input", x, 0) || check_weight(op, w, 2)) return NULL;
    if (sdx4_check_linear(x, w)) return NULL;
    int64_t K = x->shape[x->ndim - 1], N = w->shape[0], M = tensor_numel(x) / K;
    if (bias && (sdx4_cpu_check(op, "bias", bias, 0) || sdx4_check_bias(op, bias, N))) return NULL;
    int64_t shape[4];
    memcpy(shape, x->shape, sizeof shape);
    shape[x->ndim - 1] = N;
    if (r && (sdx4_cpu_check(op, "residual", r, 0) || sdx4_check_residual(op, r, x->ndim, shape)))
        return NULL;
    op_key key = {{OP_LINEAR, M, K, N, bias != NULL, r != NULL}};
    int transient;
    op_entry *e = lookup(op, state(be), &key, 0, 0, &transient);
    if (!e) return NULL;
    tensor *y = sdx4_cpu_new_tensor(be, x->ndim, shape);
    if (y && run_dense(be, op, e, x, w, bias, r, y)) {
        tensor_free(y);
        y = NULL;
    }
    if (transient) entry_free(e);
    return y;
}

static tensor *onednn_conv2d(backend *be, const tensor *x, const tensor *w, const tensor *bias,
                             int stride, int padding) {
    return onednn_conv(be, x, w, bias, stride, padding, NULL);
}

static tensor *onednn_conv2d_add(backend *be, const tensor *x, const tensor *w, const tensor *bias,
                                 int stride, int padding, const tensor *r) {
    if (sdx4_check_present("conv2d_add", "residual", r)) return NULL;
    return onednn_conv(be, x, w, bias, stride, padding, r);
}

static tensor *onednn_linear_plain(backend *be, const tensor *x, const tensor *w, const tensor *bias) {
    return onednn_linear(be, x, w, bias, NULL);
}

static tensor *onednn_linear_add(backend *be, const tensor *x, const tensor *w, const tensor *bias,
                                 const tensor *r) {
    if (sdx4_check_present("linear_add", "residual", r)) return NULL;
    return onednn_linear(be, x, w, bias, r);
}

/* ------------------------------------------------------------- lifetime */

/* oneDNN's name of the instruction set it dispatches to. */
static const char *isa_name(dnnl_cpu_isa_t isa) {
    switch (isa) {
    case dnnl_cpu_isa_sse41: return "sse41";
    case dnnl_cpu_isa_avx: return "avx";
    case dnnl_cpu_isa_avx2: return "avx2";
    case dnnl_cpu_isa_avx2_vnni: return "avx2_vnni";
    case dnnl_cpu_isa_avx512_mic: return "avx512_mic";
    case dnnl_cpu_isa_avx512_mic_4ops: return "avx512_mic_4ops";
    case dnnl_cpu_isa_avx512_core: return "avx512_core";
    case dnnl_cpu_isa_avx512_core_vnni: return "avx512_core_vnni";
    case dnnl_cpu_isa_avx512_core_bf16: return "avx512_core_bf16";
    case dnnl_cpu_isa_avx512_core_amx: return "avx512_core_amx";
    default: return "unknown";
    }
}

int sdx4_cpu_onednn_open(backend *be, cpu_dense_path path) {
    cpu_backend *cb = (cpu_backend *)be;
    dnnl_cpu_isa_t isa = dnnl_get_effective_cpu_isa();
    /* the ISA values are bit sets: AMX's includes AVX512-BF16's */
    int has_bf16 = ((unsigned)isa & (unsigned)dnnl_cpu_isa_avx512_core_bf16) ==
                   (unsigned)dnnl_cpu_isa_avx512_core_bf16;
    if (path == CPU_DENSE_ONEDNN_BF16 && !has_bf16) {
        sdx4_set_error(SDX4_ERR_DEVICE,
                       "cpu.dtype bf16: this CPU has no AVX512-BF16 or AMX (oneDNN dispatches to %s); "
                       "bfloat16 is refused rather than emulated: use fp32",
                       isa_name(isa));
        return -1;
    }
    cpu_onednn *d = calloc(1, sizeof *d);
    if (!d) {
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "cpu backend: out of memory");
        return -1;
    }
    /* the emulating paths (tests): which operands each rounds, and to what */
    static const struct {
        cpu_dense_path path;
        operand_format conv, linear;
        const char *what;
    } emulating[] = {
        {CPU_DENSE_ONEDNN_F32_BF16_OPERANDS, FORMAT_BF16, FORMAT_BF16,
         "fp32 on bf16-rounded operands of convolutions and linear layers"},
        {CPU_DENSE_ONEDNN_F32_FP8_OPERANDS, FORMAT_E4M3, FORMAT_E4M3,
         "fp32 on FP8 E4M3 operands (per-tensor scales) of convolutions and linear layers"},
        {CPU_DENSE_ONEDNN_F32_FP8_LINEAR_OPERANDS, FORMAT_F32, FORMAT_E4M3,
         "fp32 convolutions, and linear layers on FP8 E4M3 operands (per-tensor scales),"},
        {CPU_DENSE_ONEDNN_F32_FP8_CONV_OPERANDS, FORMAT_E4M3, FORMAT_F32,
         "fp32 linear layers, and convolutions on FP8 E4M3 operands (per-tensor scales),"},
    };
    const char *what = path == CPU_DENSE_ONEDNN_BF16 ? "bf16 convolutions and linear layers"
                                                     : "fp32 convolutions and linear layers";
    d->operands = path == CPU_DENSE_ONEDNN_BF16 ? dnnl_bf16 : dnnl_f32;
    for (size_t i = 0; i < sizeof emulating / sizeof *emulating; i++)
        if (path == emulating[i].path) {
            d->round[OP_CONV] = emulating[i].conv;
            d->round[OP_LINEAR] = emulating[i].linear;
            what = emulating[i].what;
        }
    dnnl_status_t st = dnnl_engine_create(&d->engine, dnnl_cpu, 0);
    if (st != dnnl_success) {
        free(d);
        return fail("cpu backend", "dnnl_engine_create", st);
    }
    if (pthread_mutex_init(&d->lock, NULL) != 0) {
        dnnl_engine_destroy(d->engine);
        free(d);
        sdx4_set_error(SDX4_ERR_NO_MEMORY, "cpu backend: cannot create a lock");
        return -1;
    }
    cb->onednn = d;
    const dnnl_version_t *v = dnnl_version();
    size_t len = strlen(cb->description);
    snprintf(cb->description + len, sizeof cb->description - len,
             "; %s through oneDNN %d.%d.%d (%s)", what, v->major, v->minor, v->patch, isa_name(isa));
    be->conv2d = onednn_conv2d;
    be->conv2d_add = onednn_conv2d_add;
    be->linear = onednn_linear_plain;
    be->linear_add = onednn_linear_add;
    if (path == CPU_DENSE_ONEDNN_BF16) be->dense_type = DTYPE_BF16;
    return 0;
}

void sdx4_cpu_onednn_close(backend *be) {
    cpu_onednn *d = state(be);
    for (int i = 0; i < CACHE_BUCKETS; i++)
        for (op_entry *e = d->table[i], *next; e; e = next) {
            next = e->next;
            entry_free(e);
        }
    pthread_mutex_destroy(&d->lock);
    dnnl_engine_destroy(d->engine);
    free(d);
    ((cpu_backend *)be)->onednn = NULL;
}
