# tiled_unet_goldens.py - golden data for the engine's tiled UNet
# (MultiDiffusion, src/engine/model/tiling.h), made with diffusers' own
# components on ../shared/reference's tiny model.
#
# A developer's tool, never a dependency of the product or of CI. Run it in
# the throwaway virtualenv of tools/scheduler_goldens.py (diffusers 0.40.0,
# torch 2.11.0, transformers 5.17.0):
#
#   /tmp/sched-venv/bin/python tools/tiled_unet_goldens.py \
#       ../shared/reference tests/data/tiled_unet
#
# diffusers has no tiled UNet: this script is the reference of sdx4's, in
# PyTorch. StableDiffusionUpscalePipeline runs as it is, with its UNet
# wrapped: the wrapper cuts the UNet's input (latents and noisy image, one
# batch entry per guidance half) into the same windows as tiling.c (same
# origins, same weights), runs the real UNet on each, and returns the
# weighted mean of the windows' predictions at every pixel. The pipeline
# then applies guidance to that mean, which is the mean of the guided
# windows (guidance is linear), as the engine computes it.
import json, os, sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import diffusers
from diffusers import StableDiffusionUpscalePipeline

REF, OUT = sys.argv[1], sys.argv[2]
CASE = {"h": 16, "w": 32, "prompt": "a white cat", "steps": 5, "guidance": 6.0, "noise_level": 20, "seed": 0}
SETTINGS = {"tile8_overlap2": (8, 2), "tile12_overlap4": (12, 4)}


def make_image(h, w, seed):  # the pattern of ../shared/tools/gen_reference.py
    rs = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 0.5 + 0.5 * np.sin(x / w * 6.28 * 1.5 + seed)
    g = 0.5 + 0.5 * np.cos(y / h * 6.28 + seed * 0.5)
    b = ((x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(h, w) / 3) ** 2).astype(np.float32)
    img = np.stack([r, g, b], -1) * 0.85 + rs.rand(h, w, 3).astype(np.float32) * 0.15
    return Image.fromarray((img * 255).round().clip(0, 255).astype(np.uint8), "RGB")


def plan_axis(length, tile, overlap):
    """tiling.c's plan_axis: the windows' origins and 1-D weights (float32)."""
    size = min(tile, length)
    n = 1 if size == length else (length - overlap + (size - overlap) - 1) // (size - overlap)
    origins, weights = [], []
    for i in range(n):
        o = 0 if n == 1 else i * (length - size) // (n - 1)
        w = np.ones(size, np.float32)
        for k in range(size):
            v = np.float32(1)
            if overlap > 0 and o > 0 and k < overlap:
                v = np.float32((k + np.float32(0.5)) / np.float32(overlap))
            if overlap > 0 and o + size < length and size - 1 - k < overlap:
                v = min(v, np.float32((size - 1 - k + np.float32(0.5)) / np.float32(overlap)))
            w[k] = v
        origins.append(o)
        weights.append(torch.from_numpy(w))
    return size, origins, weights


class TiledUNet(torch.nn.Module):
    def __init__(self, unet, tile, overlap):
        super().__init__()
        self.unet, self.tile, self.overlap = unet, tile, overlap
        self.config, self.dtype, self.device = unet.config, unet.dtype, unet.device

    def forward(self, sample, t, encoder_hidden_states=None, class_labels=None, return_dict=False, **kw):
        _, _, h, w = sample.shape
        th, ys, wy = plan_axis(h, self.tile, self.overlap)
        tw, xs, wx = plan_axis(w, self.tile, self.overlap)
        acc = torch.zeros(sample.shape[0], self.unet.config.out_channels, h, w)
        total = torch.zeros(h, w)
        for y0, ry in zip(ys, wy):
            for x0, rx in zip(xs, wx):
                window = sample[:, :, y0:y0 + th, x0:x0 + tw]
                out = self.unet(window, t, encoder_hidden_states=encoder_hidden_states,
                                class_labels=class_labels, return_dict=False, **kw)[0]
                weight = ry[:, None] * rx[None, :]
                acc[:, :, y0:y0 + th, x0:x0 + tw] += weight * out
                total[y0:y0 + th, x0:x0 + tw] += weight
        return (acc / total,)


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    image = make_image(CASE["h"], CASE["w"], 7)
    with open(os.path.join(OUT, "input.rgb"), "wb") as f:  # 16x32 RGB bytes, row-major
        f.write(np.asarray(image).tobytes())
    pipe = StableDiffusionUpscalePipeline.from_pretrained(os.path.join(REF, "tiny", "model"),
                                                          torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    unet = pipe.unet
    versions = f"diffusers {diffusers.__version__}, torch {torch.__version__}, numpy {np.__version__}"
    for name, (tile, overlap) in SETTINGS.items():
        pipe.unet = TiledUNet(unet, tile, overlap)
        lat = []
        pipe(prompt=CASE["prompt"], image=image, num_inference_steps=CASE["steps"],
             guidance_scale=CASE["guidance"], noise_level=CASE["noise_level"],
             generator=torch.Generator("cpu").manual_seed(CASE["seed"]), output_type="latent",
             callback=lambda i, ts, l: lat.append(l.detach().clone()), callback_steps=1)
        t = {f"latents_step{i}": l for i, l in enumerate(lat) if i in (0, 1, len(lat) - 1)}
        meta = {"tile": str(tile), "tile_overlap": str(overlap), "case": json.dumps(CASE),
                "callbacks": str(len(lat)), "versions": versions}
        save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(OUT, name + ".safetensors"), meta)
        print(name, len(t), "tensors")


main()
