/*
 * weights.h - where model code gets its parameters from.
 *
 * A weight_source serves the tensors of one component (unet, vae,
 * text_encoder) by name, checking each against the shape the config
 * implies, and hands them to the backend. Each tensor is read from the file
 * into memory the process owns, never mapped: a model file truncated or
 * rewritten under a running server can neither crash it (SIGBUS) nor
 * change its output. The CPU backend uses float32 bytes in place (they
 * live as long as the tensor); what a backend converts (F16 on the CPU) or
 * uploads (CUDA) is freed as soon as it returns, so the host holds one
 * copy of the weights at most, and none on a GPU. sdx4_weights_finish() closes
 * the file once the model is built. The same model-building code runs
 * in a second mode, `spec`, where nothing is read: each request is recorded
 * as (name, shape) so that `sdx4 make-model` writes exactly the tensors the
 * loader will ask for. One description of the architecture serves both.
 */
#ifndef SDX4_WEIGHTS_H
#define SDX4_WEIGHTS_H

#include "backend/backend.h"
#include "core/safetensors.h"

typedef struct {
    char *name;
    int ndim;
    int64_t shape[4];
} weight_spec;

typedef struct {
    backend *be;
    st_file file;       /* loading mode */
    char label[512];    /* "unet/diffusion_pytorch_model.safetensors" */
    char path[4096];    /* the file, still known once it is closed */
    const char *prefix; /* prepended to every name ("", "text_model.") */
    int64_t params;     /* elements served so far */
    dtype file_dtype;   /* dtype of the first tensor served */

    struct served_weight {
        tensor *t;
        void *bytes;    /* the file's bytes when t uses them in place, else NULL */
    } *owned;           /* tensors served, freed by sdx4_weights_close() */
    int nowned, owned_cap;

    int spec;           /* spec mode: record instead of load */
    weight_spec *specs;
    int nspecs, cap;
    tensor placeholder; /* what spec mode returns: never computed on */
} weight_source;

/* Opens <dir>/<component>/<stem>[.<variant>].safetensors. Without the
 * variant file, falls back to the plain one (and vice versa) as diffusers
 * does with a warning; the chosen file is in ws->label. */
int sdx4_weights_open(weight_source *ws, backend *be, const char *dir,
                 const char *component, const char *stem, const char *variant);
/* Opens the safetensors file at `path`, named `label` in errors. */
int sdx4_weights_open_file(weight_source *ws, backend *be, const char *path, const char *label);
void sdx4_weights_spec_init(weight_source *ws);
/* Loading is over: closes the file and forgets its index (sdx4_weight_get and
 * sdx4_weight_exists find nothing after this). The tensors served stay. */
void sdx4_weights_finish(weight_source *ws);
/* Frees every tensor served: the model's weights live until then. */
void sdx4_weights_close(weight_source *ws);

/* The tensor `name` (printf-style) of the given shape (ndim 1..4, unused
 * dimensions ignored); NULL with an error naming file, tensor and both
 * shapes when missing or different. */
tensor *sdx4_weight_get(weight_source *ws, int ndim, const int64_t *shape,
                   const char *fmt, ...) __attribute__((format(printf, 4, 5)));

/* Shorthands for the common shapes. */
#define W1(ws, a, ...) sdx4_weight_get((ws), 1, (const int64_t[]){(a)}, __VA_ARGS__)
#define W2(ws, a, b, ...) sdx4_weight_get((ws), 2, (const int64_t[]){(a), (b)}, __VA_ARGS__)
#define W4(ws, a, b, c, d, ...) \
    sdx4_weight_get((ws), 4, (const int64_t[]){(a), (b), (c), (d)}, __VA_ARGS__)

/* Does the file hold a tensor of this name (prefix applied)? */
int sdx4_weight_exists(const weight_source *ws, const char *name);

#endif
