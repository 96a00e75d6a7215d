/*
 * engine_internal.h - what the engine's own tools (bench.c) may reach
 * behind the opaque sdx4_engine of the public header.
 */
#ifndef SDX4_ENGINE_INTERNAL_H
#define SDX4_ENGINE_INTERNAL_H

#include "backend/backend.h"
#include "model/esrgan.h"
#include "model/model.h"
#include "sdx4.h"

/* The diffusion model, or NULL in an engine of a GAN; and the reverse. */
model *sdx4_engine_model(sdx4_engine *e);
esrgan *sdx4_engine_gan(sdx4_engine *e);
backend *sdx4_engine_backend(sdx4_engine *e);
/* The backend the options name (device "cpu", "cuda", "auto" or NULL;
 * threads; the cuda settings), once they are checked and a folder is
 * given (`what` names it in the error); NULL with the error set. The
 * engine and the content check open one each. */
backend *sdx4_backend_open(const sdx4_engine_options *o, const char *what);

#endif
