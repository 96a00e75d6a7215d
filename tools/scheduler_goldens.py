# scheduler_goldens.py - golden data for the engine's samplers, made by
# diffusers itself on ../shared/reference's tiny model.
#
# A developer's tool, never a dependency of the product or of CI. Run it in
# a throwaway virtualenv with the versions that made ../shared/reference
# (diffusers 0.40.0 is the release of its 0.40.0.dev0):
#
#   python3 -m venv /tmp/sched-venv
#   /tmp/sched-venv/bin/pip install torch==2.11.0 diffusers==0.40.0 \
#       transformers==5.17.0 safetensors numpy pillow
#   /tmp/sched-venv/bin/python tools/scheduler_goldens.py \
#       ../shared/reference tests/data/schedulers
#
# Every scheduler is built as diffusers builds one for a pipeline,
# X.from_config(the model's scheduler config, **options); what each file
# holds is in tests/data/schedulers/README.md.
import json, os, sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import diffusers
from diffusers import (DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, PNDMScheduler, StableDiffusionUpscalePipeline)

REF, OUT = sys.argv[1], sys.argv[2]
STEP_COUNTS = (1, 2, 7, 20)
RUN_STEPS = 7
CASE = {"h": 16, "w": 16, "prompt": "a white cat", "steps": RUN_STEPS, "guidance": 6.0,
        "noise_level": 20, "seed": 0}
SCHEDULERS = {  # file name: class, options
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "dpmpp_1_sigma_min": (DPMSolverMultistepScheduler,
                          {"solver_order": 1, "final_sigmas_type": "sigma_min"}),
    "ddpm": (DDPMScheduler, {}),
    "ddpm_small_log_thresholding": (DDPMScheduler, {"variance_type": "fixed_small_log", "thresholding": True,
                                                    "sample_max_value": 10.0}),
    "ddpm_large_trailing_eps": (DDPMScheduler, {"variance_type": "fixed_large", "timestep_spacing": "trailing",
                                                "prediction_type": "epsilon"}),
    "pndm": (PNDMScheduler, {}),
    "pndm_plms_linspace_eps": (PNDMScheduler, {"skip_prk_steps": True, "timestep_spacing": "linspace",
                                               "set_alpha_to_one": False, "prediction_type": "epsilon"}),
}


def make_image(h, w, seed):  # the pattern of ../shared/tools/gen_reference.py
    rs = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 0.5 + 0.5 * np.sin(x / w * 6.28 * 1.5 + seed)
    g = 0.5 + 0.5 * np.cos(y / h * 6.28 + seed * 0.5)
    b = ((x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(h, w) / 3) ** 2).astype(np.float32)
    img = np.stack([r, g, b], -1) * 0.85 + rs.rand(h, w, 3).astype(np.float32) * 0.15
    return Image.fromarray((img * 255).round().clip(0, 255).astype(np.uint8), "RGB")


def model_config(name):
    with open(os.path.join(REF, name, "model", "scheduler", "scheduler_config.json")) as f:
        return json.load(f)


def schedules(cls, opts, t):
    """timesteps, sigmas (where the class has them) and init_noise_sigma for
    each step count; none for a count the class refuses (PNDM's Runge-Kutta
    warm-up needs 4 steps)."""
    for cfg in ("tiny", "small"):
        for n in STEP_COUNTS:
            s = cls.from_config(model_config(cfg), **opts)
            try:
                s.set_timesteps(n)
            except ValueError:
                continue
            t[f"{cfg}_timesteps_{n}"] = s.timesteps.float()
            if hasattr(s, "sigmas"):
                t[f"{cfg}_sigmas_{n}"] = s.sigmas.float()
            t[f"{cfg}_init_noise_sigma_{n}"] = torch.tensor([float(s.init_noise_sigma)])


def steps(cls, opts, t):
    """Three steps in a row on recorded inputs (tiny config, 7 steps), with
    scale_model_input at each; a generator seeded 5 for the noise."""
    s = cls.from_config(model_config("tiny"), **opts)
    s.set_timesteps(RUN_STEPS)
    g = torch.Generator().manual_seed(4)
    sample = torch.randn(1, 4, 8, 8, generator=g) * 3
    t["step_sample"] = sample.clone()
    gen = torch.Generator().manual_seed(5)
    for k in range(3):
        mo = torch.randn(1, 4, 8, 8, generator=g)
        tk = s.timesteps[k]
        t[f"step_scaled_{k}"] = s.scale_model_input(sample, tk)
        t[f"step_model_output_{k}"] = mo
        kw = {"generator": gen} if "generator" in s.step.__code__.co_varnames else {}
        sample = s.step(mo, tk, sample, **kw).prev_sample
        t[f"step_prev_{k}"] = sample.clone()


def pipeline_run(pipe, cls, opts, image, t, with_output):
    pipe.scheduler = cls.from_config(model_config("tiny"), **opts)
    lat = []
    res = pipe(prompt=CASE["prompt"], image=image, num_inference_steps=CASE["steps"],
               guidance_scale=CASE["guidance"], noise_level=CASE["noise_level"],
               generator=torch.Generator("cpu").manual_seed(CASE["seed"]), output_type="np",
               callback=lambda i, ts, l: lat.append(l.detach().clone()), callback_steps=1)
    for i, l in enumerate(lat):  # the solvers' first orders and the last step, to keep the files small
        if i < 3 or i == len(lat) - 1:
            t[f"latents_step{i}"] = l
    if with_output:  # the decode is every sampler's: one file holds the image
        t["output"] = torch.from_numpy(res.images[0]).permute(2, 0, 1)[None].contiguous()
    return len(lat)


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    image = make_image(CASE["h"], CASE["w"], 100)
    image.save(os.path.join(OUT, "input.png"))
    with open(os.path.join(OUT, "input.rgb"), "wb") as f:  # the same pixels, for tests without a PNG reader
        f.write(np.asarray(image).tobytes())
    pipe = StableDiffusionUpscalePipeline.from_pretrained(os.path.join(REF, "tiny", "model"),
                                                          torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    versions = f"diffusers {diffusers.__version__}, torch {torch.__version__}, numpy {np.__version__}"
    for name, (cls, opts) in SCHEDULERS.items():
        t = {}
        schedules(cls, opts, t)
        steps(cls, opts, t)
        callbacks = pipeline_run(pipe, cls, opts, image, t, name == "euler")
        meta = {"class": cls.__name__, "options": json.dumps(opts), "case": json.dumps(CASE),
                "callbacks": str(callbacks), "versions": versions}
        save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(OUT, name + ".safetensors"), meta)
        print(name, len(t), "tensors")


main()
