/*
 * rng.h - a random generator that draws the numbers PyTorch's CPU
 * generator draws.
 *
 * diffusers makes its noise with torch.randn(shape, generator=
 * torch.Generator("cpu").manual_seed(seed)); a user who passes the same
 * seed to sdx4 gets the same image only if the noise is the same, bit for
 * bit. So this is PyTorch's generator, reimplemented:
 *
 *   - the engine is MT19937 seeded as at::mt19937 does (the low 32 bits of
 *     the seed through the reference init_genrand);
 *   - torch.rand (float32) takes one 32-bit word per value and keeps its
 *     low 24 bits: (w & 0xffffff) / 2^24, in [0, 1);
 *   - torch.randn (float32) has two paths, chosen by the element count:
 *       n >= 16: every value first gets a uniform as above, then each run
 *         of 16 becomes 16 normals by Box-Muller (u1 = 1 - data[j] and
 *         u2 = data[j + 8] give data[j] = r cos(2 pi u2) and data[j + 8] =
 *         r sin(2 pi u2)); when n % 16 != 0 the last 16 values are drawn
 *         again from fresh uniforms and transformed again. On x86 PyTorch
 *         does this in float with the AVX2 kernel's own cephes-style log
 *         and sincos (avx_mathfun.h), which this file evaluates in scalar
 *         float, operation for operation, so the result is bit-identical.
 *       n < 16: each value is one draw of at::normal_distribution<double>:
 *         two 53-bit uniforms from 64-bit words, Box-Muller in double, the
 *         sine sample cached in the generator for the next scalar draw (the
 *         cache survives between calls, as it does in PyTorch; the n >= 16
 *         path neither reads nor clears it).
 *
 * Thread safety: a torch_rng is plain data with no global state. One
 * generator must not be used by two threads at once; give each request its
 * own (seeding is cheap: 624 words).
 *
 * Drawing ahead: ancestral and SDE samplers draw randn(latent's size) at
 * every step, 65,536 normals at a 128x128 latent: about 2 ms of Box-Muller,
 * a third of an H100's UNet step, spent while the GPU waits. Those draws
 * depend on nothing but the generator's state, so after each randn of n >=
 * 16 values a generator with sdx4_torch_rng_draw_ahead() on draws the next
 * randn(n) on a thread of its own, from a copy of its state, while the
 * caller does other work (the UNet). The next randn(n) from that same state
 * takes the finished block and the state after it; any other draw first
 * (another size, a rand, a scalar normal, a reseed) leaves the state
 * different, and the block is dropped. Either way the numbers are the
 * generator's own, in its own order: drawing ahead changes when they are
 * computed, never which.
 */
#ifndef SDX4_RNG_H
#define SDX4_RNG_H

#include <stddef.h>
#include <stdint.h>

#define TORCH_MT_N 624

typedef struct {
    uint32_t state[TORCH_MT_N]; /* the MT19937 state words */
    int next;                   /* index of the next word to temper; N: regenerate */
    int has_cached_normal;      /* Box-Muller's second sample is waiting */
    double cached_normal;
    struct randn_ahead *ahead;  /* NULL, or the thread drawing the next randn */
} torch_rng;

/* torch.Generator("cpu").manual_seed(seed): also drops the cached normal.
 * Starts with no drawing ahead (call it before sdx4_torch_rng_draw_ahead). */
void sdx4_torch_rng_seed(torch_rng *g, uint64_t seed);

/* One 32-bit word of the stream (CPUGeneratorImpl::random()). */
uint32_t sdx4_torch_rng_u32(torch_rng *g);

/* Two words, the first in the high half (CPUGeneratorImpl::random64()). */
uint64_t sdx4_torch_rng_u64(torch_rng *g);

/* torch.randn(n elements, dtype=float32, generator=g) into out[0..n). */
void sdx4_torch_randn(torch_rng *g, float *out, size_t n);

/* torch.rand(n elements, dtype=float32, generator=g) into out[0..n). */
void sdx4_torch_rand(torch_rng *g, float *out, size_t n);

/* Draw each next randn ahead on a thread (above) until ..._stop_ahead().
 * -1 when no thread could be made: g then draws as before, just later. */
int sdx4_torch_rng_draw_ahead(torch_rng *g);
void sdx4_torch_rng_stop_ahead(torch_rng *g);

#endif
