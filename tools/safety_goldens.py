# safety_goldens.py - golden data for the engine's content check
# (src/engine/model/safety_checker.h): a random-weight
# StableDiffusionSafetyChecker of the real architecture's shape family in
# the real folder layout, a few images, and what diffusers computes for
# them.
#
# A developer's tool, never a dependency of the product or of CI. Run it in
# a throwaway virtualenv with these versions (torch as tools/gan_goldens.py
# pins it; diffusers and transformers as ../shared/reference was made):
#
#   python3 -m venv /tmp/safety-venv
#   /tmp/safety-venv/bin/pip install torch==2.15.0 diffusers==0.40.0 \
#       transformers==5.17.0 safetensors==0.8.0 numpy==2.4.6 pillow==13.0.0
#   /tmp/safety-venv/bin/python tools/safety_goldens.py \
#       ../shared/reference tests/data/safety
#
# The checker: CLIPVisionModel + visual_projection + 17 concept and 3
# special-care embeddings with their thresholds, as CompVis's has them.
# The shapes are the real one's in miniature: image_size 224 and patch 14
# as ViT-L/14 (so the preprocessing, the 16 x 16 patch grid and the 257
# tokens are the real ones), hidden 64, intermediate 256 (4x, as 1024 /
# 4096), 2 layers, 4 heads, projection 32 (the real: 1024, 4096, 24, 16,
# 768). Weights are stored as F16 (half the bytes; the reference computes
# in float32 on the same rounded values); the real file is F32, which the
# engine reads alike.
#
# Images go through CLIPImageProcessorPil, built from the folder's
# preprocessor_config.json (CompVis's, in its old format): Pillow bicubic
# resize of the shortest side to 224, centre crop, rescale, CLIP
# normalisation. That is transformers 4's CLIPImageProcessor, the one
# diffusers' pipelines were written against; transformers 5 made
# CLIPImageProcessor a torchvision port, whose difference on these images
# is printed (and is not what the engine follows).
#
# Thresholds are set from the images' embeddings, so that the decisions
# are far from their edges: image 0 is flagged by one concept, image 2
# only through the special-care adjustment (its special score is > 0, its
# concept score -0.004 without the 0.01 it then gets), the others not.
# Images 0 and 1 are what ../shared/reference's tiny model makes of two
# inputs (case pipe0 and a gradient input, same parameters), so that the
# server's test can upscale one into a refusal and the other through.
import json, os, sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from diffusers import StableDiffusionUpscalePipeline
from diffusers.pipelines.stable_diffusion.safety_checker import (StableDiffusionSafetyChecker,
                                                                 cosine_distance)
from transformers import CLIPConfig, CLIPImageProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

REF, OUT = sys.argv[1], sys.argv[2]
CASE = {"prompt": "a white cat", "steps": 3, "guidance": 6.0, "noise_level": 20, "seed": 0}
ROWS = [0, 1, 111, 112, 223]  # the rows of pixel_values recorded (all would be 3 MB)
PREPROCESSOR = {  # CompVis/stable-diffusion-safety-checker's, as published
    "crop_size": 224, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
    "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}


def gradient_input(w, h):
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([x / w, y / h, 0.5 + 0.4 * np.sin((x + y) / 5)], -1)
    return Image.fromarray((img * 255).round().clip(0, 255).astype(np.uint8), "RGB")


def pattern(w, h, seed):
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([0.5 + 0.5 * np.sin(x / (7 + seed)), 0.5 + 0.5 * np.cos(y / (11 + seed)),
                    ((x // 16 + y // 16) % 2).astype(np.float32)], -1) * 0.9
    return Image.fromarray((img * 255).round().clip(0, 255).astype(np.uint8), "RGB")


def tiny_outputs():
    pipe = StableDiffusionUpscalePipeline.from_pretrained(os.path.join(REF, "tiny", "model"),
                                                          torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    a = Image.open(os.path.join(REF, "tiny", "golden", "pipe0_input.png")).convert("RGB")
    outs = []
    for img in (a, gradient_input(32, 32)):
        res = pipe(prompt=CASE["prompt"], image=img, num_inference_steps=CASE["steps"],
                   guidance_scale=CASE["guidance"], noise_level=CASE["noise_level"],
                   generator=torch.Generator("cpu").manual_seed(CASE["seed"]), output_type="pil")
        outs.append((img, res.images[0]))
    golden = Image.open(os.path.join(REF, "tiny", "golden", "pipe0_output.png")).convert("RGB")
    diff = np.abs(np.asarray(outs[0][1], np.int16) - np.asarray(golden, np.int16)).max()
    assert diff <= 1, f"the tiny model's pipe0 output differs from the reference's by {diff}"
    return outs


def make_checker():
    torch.manual_seed(0)
    vision = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, image_size=224, patch_size=14, hidden_act="quick_gelu",
                  layer_norm_eps=1e-5, num_channels=3)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    cfg.architectures = ["StableDiffusionSafetyChecker"]
    m = StableDiffusionSafetyChecker(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():  # every tensor perturbed, norms too
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif p.dim() >= 2:
                p.copy_(torch.randn_like(p) * (p.shape[-1] if p.dim() == 2 else p[0].numel()) ** -0.5)
            else:
                p.copy_(torch.randn_like(p) * 0.1)
        for p in list(m.parameters()) + list(m.buffers()):
            p.copy_(p.half().float())
    return m


def embeds(m, pv):
    with torch.no_grad():
        out = m.vision_model(pv)
        return out[1], m.visual_projection(out[1])


def set_concepts(m, img_emb):
    """Concept 3 points at image 0, concept 9 and special 1 at image 2 (the
    part of its embedding orthogonal to the other images', so that their
    cosines are 0); the others are random. Thresholds: above every image's
    cosine by 0.03, except those three."""
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        ce = torch.randn(17, img_emb.shape[1], generator=g)
        se = torch.randn(3, img_emb.shape[1], generator=g)
        def own(i):
            others = torch.cat([img_emb[:i], img_emb[i + 1:]]).double()
            q, _ = torch.linalg.qr(others.T)
            v = img_emb[i].double()
            return (v - q @ (q.T @ v)).float()
        ce[3], ce[9], se[1] = own(0), own(2), own(2)
        m.concept_embeds.copy_(ce.half().float())
        m.special_care_embeds.copy_(se.half().float())
        cos = cosine_distance(img_emb, m.concept_embeds).numpy()
        print("aimed cosines:", cos[0, 3], cos[2, 9])
        scos = cosine_distance(img_emb, m.special_care_embeds).numpy()
        cw = cos.max(0) + 0.03
        sw = scos.max(0) + 0.03
        cw[3] = cos[0, 3] - 0.02
        sw[1] = scos[2, 1] - 0.02
        cw[9] = cos[2, 9] + 0.0042
        # the other images stay clear of the three aimed thresholds
        for j in range(len(cos)):
            if j != 0: assert cos[j, 3] - cw[3] < -0.03, (j, cos[j, 3], cw[3])
            if j != 2: assert scos[j, 1] - sw[1] < -0.03, (j, scos[j, 1], sw[1])
            if j != 2: assert cos[j, 9] - cw[9] < -0.03, (j, cos[j, 9], cw[9])
        m.concept_embeds_weights.copy_(torch.tensor(cw, dtype=torch.float32).half().float())
        m.special_care_embeds_weights.copy_(torch.tensor(sw, dtype=torch.float32).half().float())


def main():
    os.makedirs(OUT, exist_ok=True)
    model_dir = os.path.join(OUT, "checker")
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "preprocessor_config.json"), "w") as f:
        json.dump(PREPROCESSOR, f, indent=2)
        f.write("\n")
    proc = CLIPImageProcessorPil.from_pretrained(model_dir)

    images = []
    for k, (inp, out) in enumerate(tiny_outputs()):
        inp.save(os.path.join(OUT, f"tiny{k}_input.png"))
        images.append(out)
    images += [pattern(300, 200, 2), pattern(150, 190, 3), pattern(224, 224, 4)]
    pv = proc(images, return_tensors="pt").pixel_values

    tv = CLIPImageProcessor.from_pretrained(model_dir)(images, return_tensors="pt").pixel_values
    print(f"pixel_values, PIL vs torchvision CLIPImageProcessor: max abs {(pv - tv).abs().max():.4g}")

    m = make_checker()
    pooled, img_emb = embeds(m, pv)
    set_concepts(m, img_emb)
    arrays = [np.asarray(im, np.float32) / 255 for im in images]
    with torch.no_grad():
        blacked, nsfw = m(clip_input=pv, images=[a.copy() for a in arrays])
        cos = cosine_distance(img_emb, m.concept_embeds)
        scos = cosine_distance(img_emb, m.special_care_embeds)
    print("has_nsfw_concepts:", nsfw)
    assert nsfw == [True, False, True, False, False], nsfw
    for a, b, flag in zip(arrays, blacked, nsfw):
        assert (not flag and np.array_equal(a, b)) or (flag and not b.any())

    m.half().save_pretrained(model_dir, safe_serialization=True)
    with open(os.path.join(model_dir, "config.json")) as f:
        print("config.json:", len(f.read()), "bytes")
    # the folder loads back in diffusers as the same checker
    back = StableDiffusionSafetyChecker.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    _, emb2 = embeds(back, pv)
    assert torch.equal(emb2, img_emb), (emb2 - img_emb).abs().max()

    for k, im in enumerate(images):
        im.save(os.path.join(OUT, f"image{k}.png"))
    save_file({"pixel_values_rows": pv[:, :, ROWS].contiguous(), "pooled_output": pooled.contiguous(),
               "image_embeds": img_emb.contiguous(), "cos_dist": cos.contiguous(),
               "special_cos_dist": scos.contiguous(),
               "has_nsfw_concepts": torch.tensor([float(x) for x in nsfw])},
              os.path.join(OUT, "golden.safetensors"), metadata={"case": json.dumps(CASE)})


main()
