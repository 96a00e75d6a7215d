# vae_tiling_goldens.py - golden data for the engine's tiled VAE decode,
# made by diffusers itself (AutoencoderKL.tiled_decode, vae.enable_tiling())
# on ../shared/reference's tiny model.
#
# A developer's tool, never a dependency of the product or of CI. Run it in
# the throwaway virtualenv of tools/scheduler_goldens.py (diffusers 0.40.0,
# torch 2.11.0, transformers 5.17.0):
#
#   /tmp/sched-venv/bin/python tools/vae_tiling_goldens.py \
#       ../shared/reference tests/data/vae_tiling
#
# The tiny VAE's sample_size 32 gives tiles of 8 latents (32 pixels); the
# decode cases also set diffusers' tile attributes to 12 latents (48
# pixels), as a caller of diffusers would. What each file holds is in
# tests/data/vae_tiling/README.md.
import json, os, sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import diffusers
from diffusers import AutoencoderKL, StableDiffusionUpscalePipeline

REF, OUT = sys.argv[1], sys.argv[2]
LATENT = (1, 4, 13, 14)  # 13 rows: with tiles of 8 the last two tile rows are short (7, then 1)
TILES = (8, 12)          # tile_latent_min_size; tile_sample_min_size is 4x
CASE = {"h": 12, "w": 16, "prompt": "a white cat", "steps": 3, "guidance": 6.0, "noise_level": 20,
        "seed": 0}


def make_image(h, w, seed):  # the pattern of ../shared/tools/gen_reference.py
    rs = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 0.5 + 0.5 * np.sin(x / w * 6.28 * 1.5 + seed)
    g = 0.5 + 0.5 * np.cos(y / h * 6.28 + seed * 0.5)
    b = ((x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(h, w) / 3) ** 2).astype(np.float32)
    img = np.stack([r, g, b], -1) * 0.85 + rs.rand(h, w, 3).astype(np.float32) * 0.15
    return Image.fromarray((img * 255).round().clip(0, 255).astype(np.uint8), "RGB")


def decode_cases(versions):
    """vae.decode(latents) with tiling on, for each tile size."""
    vae = AutoencoderKL.from_pretrained(os.path.join(REF, "tiny", "model", "vae"), torch_dtype=torch.float32)
    vae.enable_tiling()
    t = {"latents": torch.randn(LATENT, generator=torch.Generator().manual_seed(3)) * 4}
    for tile in TILES:
        vae.tile_latent_min_size, vae.tile_sample_min_size = tile, tile * 4
        with torch.no_grad():
            t[f"image_tile{tile}"] = vae.decode(t["latents"]).sample
    meta = {"tiles": json.dumps(TILES), "overlap_factor": str(vae.tile_overlap_factor), "versions": versions}
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(OUT, "decode.safetensors"), meta)


def pipeline_case(versions):
    """A whole upscale with pipe.vae.enable_tiling(), the config's tiles."""
    image = make_image(CASE["h"], CASE["w"], 100)
    with open(os.path.join(OUT, "input.rgb"), "wb") as f:  # the pixels, for tests without a PNG reader
        f.write(np.asarray(image).tobytes())
    pipe = StableDiffusionUpscalePipeline.from_pretrained(os.path.join(REF, "tiny", "model"),
                                                          torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.vae.enable_tiling()
    lat = []
    res = pipe(prompt=CASE["prompt"], image=image, num_inference_steps=CASE["steps"],
               guidance_scale=CASE["guidance"], noise_level=CASE["noise_level"],
               generator=torch.Generator("cpu").manual_seed(CASE["seed"]), output_type="np",
               callback=lambda i, ts, l: lat.append(l.detach().clone()), callback_steps=1)
    t = {"latents": lat[-1], "output": torch.from_numpy(res.images[0]).permute(2, 0, 1)[None]}
    meta = {"case": json.dumps(CASE), "tile": str(pipe.vae.tile_latent_min_size), "versions": versions}
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(OUT, "pipeline.safetensors"), meta)


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    versions = f"diffusers {diffusers.__version__}, torch {torch.__version__}, numpy {np.__version__}"
    decode_cases(versions)
    pipeline_case(versions)


main()
