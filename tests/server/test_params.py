"""The upscale parameters a running server describes (model-info's
upscale_parameters, from the engine's table) against the API description
it serves, and the server's own narrowing of them (max-steps).
tests/test_server_params.c holds every request schema of openapi.json to
the table; here the running server is held to both."""
from conftest import Server, problem

UPSCALE = "/api/v1/upscale"
SCHEMA_KEYS = {"minimum": "minimum", "maximum": "maximum", "maxLength": "max_length", "default": "default"}


def request_schema(doc, content_type):
    return doc["paths"][UPSCALE]["post"]["requestBody"]["content"][content_type]["schema"]["properties"]


def test_model_info_parameters_match_openapi(server):
    info = server.get("/api/v1/model-info").json()
    doc = server.get("/openapi.json").json()
    parameters = info["upscale_parameters"]
    assert [p["name"] for p in parameters] == ["prompt", "negative_prompt", "noise_level", "num_inference_steps",
                                               "guidance_scale", "seed", "eta", "vae_tiling", "tile", "tile_overlap", "scheduler",
                                               "scheduler_options"]
    for content_type in ("multipart/form-data", "application/json"):
        described = request_schema(doc, content_type)
        for p in parameters:
            s = described[p["name"]]
            assert s["type"] == p["type"], (content_type, p)
            for schema_key, key in SCHEMA_KEYS.items():
                assert s.get(schema_key) == p.get(key), (content_type, p["name"], schema_key)
    for p in parameters:  # the defaults object says the same
        assert info["defaults"].get(p["name"]) == p.get("default")
    assert info["limits"]["max_guidance_scale"] == next(p["maximum"] for p in parameters
                                                        if p["name"] == "guidance_scale")


def test_max_steps_narrows_the_engines_range():
    s = Server("--max-steps", "80")
    try:
        steps = next(p for p in s.get("/api/v1/model-info").json()["upscale_parameters"]
                     if p["name"] == "num_inference_steps")
        assert (steps["minimum"], steps["maximum"], steps["default"]) == (1, 80, 75)
        p = problem(s.post(UPSCALE, json={"num_inference_steps": 81, "image": "x"}), 422, "invalid-field")
        assert p["field"] == "num_inference_steps" and p["allowed"] == "1 to 80"
        p = problem(s.post(UPSCALE, json={"guidance_scale": 50.000001, "image": "x"}), 422, "invalid-field")
        assert p["field"] == "guidance_scale" and p["allowed"] == "0 to 50"
    finally:
        s.check_clean_exit()
