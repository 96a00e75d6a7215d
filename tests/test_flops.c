/*
 * test_flops.c - sdx4_count_flops: the arithmetic of an upscale counted
 * from the model's configuration.
 *
 * The tiny reference model at two sizes: its attention terms against hand
 * formulas (the VAE's one mid-block attention, the UNet's cross- and
 * self-attention levels, CLIP's causal self-attention), and the shape of
 * the counts: dense FLOPs linear in the pixels, the VAE's attention
 * quadratic, the text part independent of the image, sides rounded down
 * as sdx4_upscale rounds them. The full-size x4 architecture (built from
 * its configs, no weights) against ../shared/tools/unet_flops.py.
 */
#include "model/flops.h"
#include "sdx4.h"
#include "test.h"
#include "test_engine.h"

static sdx4_flop_counts count(sdx4_engine *e, int width, int height) {
    sdx4_flop_counts c = {{0, 0}, {0, 0}, {0, 0}};
    sdx4_status s = sdx4_count_flops(e, width, height, &c);
    CHECK(s == SDX4_OK, "%dx%d: %s", width, height, sdx4_last_error());
    return c;
}

static int same(double a, double b) { return fabs(a - b) <= 1e-12 * fabs(b); }

/* tiny: UNet block_out_channels [32, 32, 64], only_cross_attention
 * [true, true, false], cross_attention_dim 32, 2 layers a level; VAE
 * [32, 32, 64] (scale factor 4, mid-block attention at 64 channels);
 * CLIP 5 layers of 32, 77 tokens. */
static double tiny_unet_attention(double side) {
    double n1 = (side / 2) * (side / 2), n2 = (side / 4) * (side / 4), ctx = 77;
    /* level 1: attn1 and attn2 both attend to the prompt, in 2 down and 3
     * up blocks; level 2: self-attention and the prompt, in 2 down, the
     * mid and 3 up blocks; 4 * queries * keys * channels each */
    double per_image = 5 * 2 * (4 * n1 * ctx * 32) + 6 * (4 * n2 * n2 * 64 + 4 * n2 * ctx * 64);
    return 2 * per_image; /* batch 2: guidance */
}

static void test_tiny(void) {
    sdx4_engine *e = test_engine_open("tiny/model");
    if (!e) {
        CHECK(0, "the tiny model");
        return;
    }
    sdx4_flop_counts a = count(e, 64, 64), b = count(e, 128, 128), c = count(e, 192, 192);

    /* the VAE's mid-block attention: one head over every latent position */
    double n = 64.0 * 64;
    CHECK(a.decode.attention == 4 * n * n * 64, "decode attention %.17g", a.decode.attention);
    CHECK(b.decode.attention == 16 * a.decode.attention, "quadratic: %.17g", b.decode.attention);
    CHECK(a.step.attention == tiny_unet_attention(64), "unet attention %.17g vs %.17g",
          a.step.attention, tiny_unet_attention(64));
    CHECK(b.step.attention == tiny_unet_attention(128), "unet attention %.17g",
          b.step.attention);
    CHECK(a.text.attention == 2 * 5 * 4 * 77.0 * 77 * 32, "text attention %.17g",
          a.text.attention);

    /* dense work grows with the pixels: the VAE's exactly, the UNet's up
     * to the time embedding's few per-image FLOPs (affine in the pixels) */
    CHECK(b.decode.dense == 4 * a.decode.dense, "decode dense %.17g, %.17g", a.decode.dense,
          b.decode.dense);
    double slope1 = (b.step.dense - a.step.dense) / (128.0 * 128 - 64 * 64);
    double slope2 = (c.step.dense - b.step.dense) / (192.0 * 192 - 128 * 128);
    CHECK(same(slope1, slope2), "unet dense not linear in pixels: %.17g, %.17g", slope1, slope2);
    /* what does not grow: time_embedding (32 -> 128 -> 128) and every
     * resnet's time_emb_proj (128 -> its 768 output channels in all), on
     * batch 2 */
    double fixed = 2 * (2 * 32 * 128 + 2 * 128 * 128) + 2 * (2 * 128 * 768);
    CHECK(fabs(a.step.dense - slope1 * 64 * 64 - fixed) < 1, "unet dense at 0 pixels: %.17g",
          a.step.dense - slope1 * 64 * 64);
    CHECK(b.text.dense == a.text.dense && b.text.attention == a.text.attention,
          "the prompt's cost depends on the image");
    CHECK(a.step.dense > 0 && a.decode.dense > 0 && a.text.dense > 0, "empty counts");

    /* sides round down to a multiple of the scale factor (4), as the
     * upscale does; wide images count each side */
    sdx4_flop_counts odd = count(e, 67, 66), wide = count(e, 128, 64);
    CHECK(odd.step.dense == a.step.dense && odd.decode.attention == a.decode.attention,
          "67x66 counts as 64x64");
    CHECK(wide.decode.attention == 4 * (128.0 * 64) * (128.0 * 64) * 64, "128x64: %.17g",
          wide.decode.attention);
    sdx4_flop_counts none;
    CHECK(sdx4_count_flops(e, 3, 64, &none) == SDX4_ERR_INVALID_ARGUMENT, "3 px accepted");
    printf("tiny 64 px: text %.4g, step %.4g + %.4g attention, decode %.4g + %.4g attention\n",
           a.text.dense + a.text.attention, a.step.dense, a.step.attention, a.decode.dense,
           a.decode.attention);
    sdx4_engine_close(e);
}

/* The full-size architecture against the rough counter of the shared
 * tools, `python3 unet_flops.py 64` printed without rounding: per image
 * and step 286,419,058,688 for the UNet, 670,618,877,952 for the VAE
 * decoder, 45,127,233,536 per prompt for the text encoder. The tool counts
 * the prompt's cross-attention keys and values in every step, and leaves
 * out the time embedding and post_quant_conv. */
static void test_full_size(void) {
    model m;
    if (sdx4_model_spec(&m, SDX4_SOURCE_DIR "/assets/x4-upscaler")) {
        CHECK(0, "%s", sdx4_last_error());
        return;
    }
    sdx4_flop_counts c;
    sdx4_model_flops(&m, 64, 64, 2, &c);
    double te = 45127233536.0, unet = 286419058688.0, vae = 670618877952.0;
    double cross_kv = c.text.dense + c.text.attention - 2 * te; /* per upscale, batch 2 */
    CHECK(c.text.attention == 2 * 23 * 4 * 77.0 * 77 * 1024, "text attention %.17g",
          c.text.attention);
    CHECK(cross_kv > 0 && cross_kv < 0.05 * unet, "cross-attention keys and values %g", cross_kv);
    double step = (c.step.dense + c.step.attention + cross_kv) / 2;
    CHECK(fabs(step - unet) < 1e-3 * unet, "unet %.17g, the tool %.17g", step, unet);
    CHECK(c.decode.dense + c.decode.attention - 2.0 * 4 * 4 * 64 * 64 == vae, "vae %.17g",
          c.decode.dense + c.decode.attention);
    printf("x4 64 px: unet per image %.6g (tool %.6g, %+.2g), vae %.6g\n", step, unet,
           (step - unet) / unet, c.decode.dense + c.decode.attention);
    sdx4_model_free(&m);
}

int main(void) {
    test_tiny();
    test_full_size();
    return test_finish("test_flops");
}
