# scheduler_goldens.py - golden data for the engine's samplers, made by
# diffusers itself on ../shared/reference's tiny model.
#
# A developer's tool, never a dependency of the product or of CI. Run it in
# a throwaway virtualenv with the versions that made ../shared/reference
# (diffusers 0.40.0 is the release of its 0.40.0.dev0):
#
#   python3 -m venv /tmp/sched-venv
#   /tmp/sched-venv/bin/pip install torch==2.11.0 diffusers==0.40.0 \
#       transformers==5.17.0 scipy==1.17.1 safetensors numpy pillow
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
from diffusers import (DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
                       DPMSolverSinglestepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler,
                       KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler,
                       LMSDiscreteScheduler, PNDMScheduler, StableDiffusionUpscalePipeline,
                       UniPCMultistepScheduler)

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
    "heun": (HeunDiscreteScheduler, {}),
    "heun_karras": (HeunDiscreteScheduler, {"use_karras_sigmas": True, "clip_sample": False}),
    "dpm2": (KDPM2DiscreteScheduler, {}),
    "dpm2_karras": (KDPM2DiscreteScheduler, {"use_karras_sigmas": True}),
    "dpm2_a": (KDPM2AncestralDiscreteScheduler, {"timestep_spacing": "linspace"}),
    "lms": (LMSDiscreteScheduler, {}),
    "lms_karras": (LMSDiscreteScheduler, {"use_karras_sigmas": True, "timestep_spacing": "trailing"}),
    # the DPM-Solver family in full (use_beta_sigmas needs scipy in the venv)
    "dpmpp_3m": (DPMSolverMultistepScheduler, {"solver_order": 3}),
    "dpmpp_3m_sde": (DPMSolverMultistepScheduler,
                     {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}),
    "dpm_3m_heun_exponential": (DPMSolverMultistepScheduler,
                                {"solver_order": 3, "algorithm_type": "dpmsolver", "solver_type": "heun",
                                 "final_sigmas_type": "sigma_min", "use_exponential_sigmas": True}),
    "dpm_2m_sde_heun": (DPMSolverMultistepScheduler,
                        {"algorithm_type": "sde-dpmsolver", "solver_type": "heun",
                         "final_sigmas_type": "sigma_min"}),
    "dpmpp_2m_sde_heun_lu": (DPMSolverMultistepScheduler,
                             {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun",
                              "use_lu_lambdas": True}),
    "dpmpp_2m_beta": (DPMSolverMultistepScheduler, {"use_beta_sigmas": True}),
    "dpmpp_2m_thresholding_clipped": (DPMSolverMultistepScheduler,
                                      {"thresholding": True, "sample_max_value": 100.0,
                                       "lambda_min_clipped": -2.5, "timestep_spacing": "trailing",
                                       "euler_at_final": True}),
    "dpmpp_2s": (DPMSolverSinglestepScheduler, {}),
    "dpmpp_3s_sde": (DPMSolverSinglestepScheduler,
                     {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}),
    "dpm_3s_heun_karras": (DPMSolverSinglestepScheduler,
                           {"solver_order": 3, "algorithm_type": "dpmsolver", "solver_type": "heun",
                            "final_sigmas_type": "sigma_min", "use_karras_sigmas": True}),
    "deis_2m": (DEISMultistepScheduler, {}),
    "deis_3m_karras": (DEISMultistepScheduler, {"solver_order": 3, "use_karras_sigmas": True}),
    "euler_exponential": (EulerDiscreteScheduler, {"use_exponential_sigmas": True}),
    "unipc": (UniPCMultistepScheduler, {}),
    "unipc_bh1": (UniPCMultistepScheduler, {"solver_type": "bh1", "final_sigmas_type": "sigma_min",
                                            "lower_order_final": False}),
    "unipc_3": (UniPCMultistepScheduler, {"solver_order": 3}),
    "unipc_3_karras": (UniPCMultistepScheduler, {"solver_order": 3, "use_karras_sigmas": True,
                                                 "timestep_spacing": "trailing"}),
    "unipc_no_corrector": (UniPCMultistepScheduler, {"disable_corrector": [1, 3],
                                                     "timestep_spacing": "linspace"}),
    "unipc_noise": (UniPCMultistepScheduler, {"predict_x0": False, "final_sigmas_type": "sigma_min",
                                              "solver_order": 3, "prediction_type": "sample"}),
    "unipc_threshold": (UniPCMultistepScheduler, {"thresholding": True, "sample_max_value": 1.5,
                                                  "dynamic_thresholding_ratio": 0.9}),
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
    only = sys.argv[3:]  # optional: the names of the files to make
    for name, (cls, opts) in SCHEDULERS.items():
        if only and name not in only:
            continue
        t = {}
        schedules(cls, opts, t)
        steps(cls, opts, t)
        callbacks = pipeline_run(pipe, cls, opts, image, t, name == "euler")
        meta = {"class": cls.__name__, "options": json.dumps(opts), "case": json.dumps(CASE),
                "callbacks": str(callbacks), "versions": versions}
        save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(OUT, name + ".safetensors"), meta)
        print(name, len(t), "tensors")


main()
