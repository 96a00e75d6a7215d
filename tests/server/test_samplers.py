"""The API's scheduler and scheduler_options fields on a running server:
a chosen sampler runs and changes the image, the choice is part of the
cache key (options by their content, not their spelling), and bad choices
are refused naming what is wrong: by the form (an unknown class, options
that are not a JSON object) or by the model (an option its scheduler does
not read, a value the engine does not implement). The arithmetic itself is
held to diffusers by tests/test_samplers.c."""
import base64
import json

from conftest import Server, image_bytes, problem

UPSCALE = "/api/v1/upscale"
PARAMS = {"num_inference_steps": "3", "seed": "11"}


def upscale(s, img, extra):
    return s.post(UPSCALE, files={"image": ("in.png", img, "image/png")}, data={**PARAMS, **extra},
                  timeout=300)


def test_chosen_sampler_runs_and_is_part_of_the_cache_key():
    s = Server()
    try:
        png = image_bytes(seed=7)
        base = upscale(s, png, {})
        assert base.status_code == 200 and base.headers["X-Cache"] == "MISS"
        seen = {base.content}
        choices = [{"scheduler": "euler"}, {"scheduler": "euler-a"},
                   {"scheduler": "DPMSolverMultistepScheduler"},
                   {"scheduler": "dpm++2m", "scheduler_options": '{"use_karras_sigmas": true}'},
                   {"scheduler": "heun"},
                   {"scheduler": "dpm++2m", "scheduler_options": '{"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}'},
                   {"scheduler": "dpm++2s"}, {"scheduler": "deis"},
                   {"scheduler": "unipc"},
                   {"scheduler": "ddpm"}, {"scheduler": "pndm", "scheduler_options": '{"skip_prk_steps": true}'}]
        for choice in choices:
            r = upscale(s, png, choice)
            assert r.status_code == 200 and r.headers["X-Cache"] == "MISS", (choice, r.text)
            assert r.content not in seen, choice  # another sampler, another image
            seen.add(r.content)
            again = upscale(s, png, choice)
            assert again.headers["X-Cache"] == "HIT" and again.content == r.content, choice
        # the same options spelled otherwise are the same key
        r = upscale(s, png, {"scheduler": "dpm++2m", "scheduler_options": '{ "use_karras_sigmas" :true }'})
        assert r.headers["X-Cache"] == "HIT"
        # JSON bodies take the same fields
        body = {"image": base64.b64encode(png).decode(), "num_inference_steps": 3, "seed": 11,
                "scheduler": "euler-a"}
        assert s.post(UPSCALE, json=body, timeout=300).headers["X-Cache"] == "HIT"
    finally:
        s.check_clean_exit()


def test_bad_choices_are_refused_by_name(server):
    png = image_bytes(seed=8)
    p = problem(upscale(server, png, {"scheduler": "lcm"}), 422, "invalid-field")
    assert p["field"] == "scheduler" and "lcm" in p["detail"]
    p = problem(upscale(server, png, {"scheduler_options": "[1]"}), 422, "invalid-field")
    assert p["field"] == "scheduler_options" and "JSON object" in p["detail"]
    # the model's config decides what its scheduler reads: a 422 from the model
    p = problem(upscale(server, png, {"scheduler": "euler", "scheduler_options": '{"karras": true}'}), 422,
                "model-refused")
    assert "karras is not a setting of EulerDiscreteScheduler" in p["detail"]
    p = problem(upscale(server, png, {"scheduler": "dpm++2m", "scheduler_options": '{"solver_order": 4}'}), 422,
                "model-refused")
    assert "solver_order=4" in p["detail"]
    p = problem(upscale(server, png, {"scheduler": "dpm++2s", "scheduler_options": '{"timestep_spacing": "leading"}'}),
                422, "model-refused")
    assert "timestep_spacing is not a setting of DPMSolverSinglestepScheduler" in p["detail"]
    p = problem(upscale(server, png, {"scheduler": "unipc", "scheduler_options": '{"solver_type": "bh1"}'}), 422,
                "model-refused")
    assert "solver_type=bh1 needs final_sigmas_type=sigma_min" in p["detail"]
    p = problem(upscale(server, png, {"scheduler": "ddpm", "scheduler_options": '{"variance_type": "learned"}'}),
                422, "model-refused")
    assert "variance_type=learned" in p["detail"]
    p = problem(upscale(server, png, {"scheduler": "pndm"}), 422, "model-refused")  # 3 steps
    assert "too few for its Runge-Kutta warm-up" in p["detail"]


def test_model_info_lists_the_fields(server):
    names = [p["name"] for p in server.get("/api/v1/model-info").json()["upscale_parameters"]]
    assert names[-2:] == ["scheduler", "scheduler_options"]
    doc = server.get("/openapi.json").json()
    described = doc["paths"][UPSCALE]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert "use_karras_sigmas" in json.dumps(described["scheduler_options"])
    # the names openapi.json lists are the ones the engine takes (the aliases
    # run; a class name is the same class, as the engine's tests check)
    png = image_bytes(seed=9)
    enum = described["scheduler"]["enum"]
    assert all(n in enum for n in ("ddim", "unipc", "UniPCMultistepScheduler", "DDPMScheduler")), enum
    # every name listed, the class names too, passes the server's check of
    # the field: what it then refuses is the image (a cheap stand-in for
    # the upscale per name that schemathesis's coverage phase no longer runs)
    for name in enum:
        r = server.post(UPSCALE, json={"scheduler": name, "image": "x"})
        assert r.status_code in (415, 422) and "scheduler" not in r.text, (name, r.text)
    for name in [n for n in enum if not n.endswith("Scheduler")]:
        steps = "4" if name.lower().startswith("pndm") else "1"  # its Runge-Kutta warm-up needs 4
        r = server.post(UPSCALE, files={"image": ("in.png", png, "image/png")},
                        data={"num_inference_steps": steps, "scheduler": name}, timeout=300)
        assert r.status_code == 200, (name, r.text)
