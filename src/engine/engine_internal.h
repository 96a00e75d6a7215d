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
/* The backend an sdx4_engine_options' device names ("cpu", "cuda", "auto"
 * or NULL); NULL with the error set. The content check opens its own. */
backend *sdx4_backend_open(const char *device, int threads, const cuda_settings *cuda);

#endif
