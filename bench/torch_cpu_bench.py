# torch_cpu_bench.py - the PyTorch side of the CPU benchmark: the figures of
# `sdx4 bench`, timed the same way with diffusers on the same model folder.
#
# It loads the random-weight model that `sdx4 make-model` wrote (so both
# sides run the very same weights) into diffusers' StableDiffusionUpscale-
# Pipeline in float32 and mirrors src/engine/tools/bench.c step by step:
#   text encoder   "a white cat" and "" (classifier-free guidance), batch 2,
#                  tokenization included
#   UNet step      one forward, batch 2, 7 x size x size, t=500, class 20,
#                  encoder states from the text encoder
#   VAE decode     one 4 x size x size latent -> 3 x 4size x 4size
#   pipeline       a whole upscale of a size x size image: `steps` DDIM
#                  steps, guidance 9, noise_level 20, PIL image out
#   --bf16         also the UNet step under torch.autocast("cpu",
#                  dtype=torch.bfloat16), in the same process after the
#                  float32 one (unet_step_bf16_ms): PyTorch's bfloat16
#                  beside `sdx4 bench --device cpu --dtype bf16` (issue 16;
#                  scripts/device-check.sh cpu-bf16), with one untimed run
#                  first, as autocast's first call casts the weights
# Each figure is the median of --repeats runs, with no separate warm-up run
# (sdx4 bench has none either; its first run also pages the weights in).
# Peak RSS is this process's (getrusage), so run one process per size, as
# bench/run_cpu_bench.sh does. Prints one line of JSON on stdout.
#
# Not part of the product: it runs in a throwaway venv (see BENCHMARKS.md).
import argparse
import json
import os
import resource
import statistics
import sys
import time

parser = argparse.ArgumentParser(description="PyTorch side of the sdx4 CPU benchmark")
parser.add_argument("--model", required=True, help="diffusers folder (sdx4 make-model output)")
parser.add_argument("--size", type=int, default=64, help="input side in pixels = latent side")
parser.add_argument("--steps", type=int, default=20, help="steps of the whole upscale")
parser.add_argument("--repeats", type=int, default=1, help="runs per figure; the median is kept")
parser.add_argument("--threads", type=int, default=0, help="CPU threads, 0 = all cores")
parser.add_argument("--skip-pipeline", action="store_true", help="time the parts only")
parser.add_argument("--bf16", action="store_true",
                    help="also time the UNet step under bfloat16 autocast (unet_step_bf16_ms)")
args = parser.parse_args()

threads = args.threads or len(os.sched_getaffinity(0))
# before torch is imported, so that OpenMP and MKL size their pools to match
os.environ["OMP_NUM_THREADS"] = str(threads)
os.environ["MKL_NUM_THREADS"] = str(threads)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import diffusers  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402
from diffusers import StableDiffusionUpscalePipeline  # noqa: E402

torch.set_num_threads(threads)
diffusers.utils.logging.set_verbosity_error()
transformers.utils.logging.set_verbosity_error()


def rss_mib(peak=True):
    if peak:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def median_ms(fn, repeats, label):
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
        print(f"torch {label} run {i + 1}: {times[-1]:.1f} ms", file=sys.stderr, flush=True)
    return statistics.median(times)


cpu0 = time.process_time()
t0 = time.perf_counter()
pipe = StableDiffusionUpscalePipeline.from_pretrained(args.model, dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
load_s = time.perf_counter() - t0
rss_after_load = rss_mib(peak=False)
tok, te, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
size = args.size
out = {
    "side": "pytorch", "torch": torch.__version__, "diffusers": diffusers.__version__,
    "transformers": transformers.__version__, "threads": torch.get_num_threads(),
    "size": size, "steps": args.steps, "repeats": args.repeats,
    "load_s": round(load_s, 2), "rss_after_load_mib": round(rss_after_load, 1),
}

with torch.inference_mode():
    def encode():
        ids = tok(["", "a white cat"], padding="max_length", max_length=tok.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
        return te(ids)[0]

    out["text_encoder_ms"] = median_ms(encode, args.repeats, "text encoder")
    context = encode()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, unet.config.in_channels, size, size, generator=g)
    labels = torch.tensor([20, 20])
    out["unet_step_ms"] = median_ms(
        lambda: unet(x, 500, encoder_hidden_states=context, class_labels=labels).sample,
        args.repeats, f"unet {size}")

    if args.bf16:
        out["cpu_capability"] = torch.backends.cpu.get_cpu_capability()

        def unet_bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return unet(x, 500, encoder_hidden_states=context, class_labels=labels).sample

        unet_bf16()  # untimed: autocast casts the weights on first use
        out["unet_step_bf16_ms"] = median_ms(unet_bf16, args.repeats, f"unet bf16 {size}")

    z = torch.randn(1, vae.config.latent_channels, size, size, generator=g)
    out["vae_decode_ms"] = median_ms(lambda: vae.decode(z).sample, args.repeats, f"vae {size}")

    if not args.skip_pipeline:
        # the input image of bench.c: byte i of the RGB buffer is i*37 % 251
        pixels = (np.arange(3 * size * size, dtype=np.int64) * 37 % 251).astype(np.uint8)
        image = Image.fromarray(pixels.reshape(size, size, 3), "RGB")
        out["pipeline_ms"] = median_ms(
            lambda: pipe(prompt="a white cat", image=image, num_inference_steps=args.steps,
                         guidance_scale=9.0, noise_level=20,
                         generator=torch.Generator().manual_seed(0), output_type="pil"),
            args.repeats, f"pipeline {size} x {args.steps} steps")

for k in ("text_encoder_ms", "unet_step_ms", "unet_step_bf16_ms", "vae_decode_ms", "pipeline_ms"):
    if k in out:
        out[k] = round(out[k], 1)
out["peak_rss_mib"] = round(rss_mib(), 1)
out["cpu_s"] = round(time.process_time() - cpu0, 1)
print(json.dumps(out), flush=True)
