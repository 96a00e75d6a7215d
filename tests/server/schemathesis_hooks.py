"""Schemathesis hooks of test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS).

schemathesis.toml lets the upscale operations answer schema-valid data with
415 or 422, for the one input no schema can state: the image must be bytes
that decode as PNG, JPEG or WebP with sides of 64 to 512 pixels, and the
bytes schemathesis makes up (random, a 1x1 PNG) never are. The check below
holds that allowance to exactly that: such a refusal must be about the image;
one about any other field means the schema and the server disagree. The
one other such field is scheduler_options: which JSON objects it may hold
depends on the model's scheduler class, which no schema can state, so its
refusals (by the form, or by the model) are allowed too; test_samplers.py
tests them. So is model: the names it takes are the server's models
(test_models.py tests them). And tile_overlap must be below tile, which no
schema keyword can compare, and multipart schemas cannot state tile's gap
below 32 (see the check): those refusals are allowed too (test_tiles.py
tests them). AUTOMATIC1111's routes (a1111.c) name a model by upscaler_1 and
upscaler_2, which no schema can list either; a blend of a second upscaler
(upscaler_2 a model, its visibility above 0) and a size whose resized image
would be too large for the server (the factor times the image's sides,
which no schema knows) are refused too (test_a1111.py tests them).

Requests whose image is valid (the examples, the data built on them, images
taken from earlier answers) are real upscales, which must answer within the
test's bounds: the server runs with --max-side 64 (larger images are refused
as images) and step counts are lowered to 1 here, so that each costs about a
second on the tiny model instead of up to 150 steps on 512 px. AUTOMATIC1111's
routes have no steps: their bodies name the small GAN the test server serves
beside the tiny model when they name no upscaler. The tiny
model also has 100 class embeddings where the x4 upscaler has 1000, so its
engine refuses noise levels over 99/350: they are lowered to 0.28. Only
values inside the schema's ranges are lowered, so a body stays valid or
invalid as it was generated.
"""
import schemathesis

IMAGE_PROBLEMS = {"unsupported-image-format", "image-size", "invalid-image", "missing-image"}
IMAGE_OPERATIONS = {"/api/v1/upscale", "/api/v1/batch-upscale", "/api/v1/jobs"}
A1111_OPERATIONS = {"/sdapi/v1/extra-single-image", "/sdapi/v1/extra-batch-images"}
A1111_TEST_UPSCALER = "srvgg_x2_relu"  # test_schemathesis.py's second model
MAX_TEST_STEPS = 1
MAX_TINY_NOISE = 0.28  # 98 of the tiny model's 100 class labels


def positive(case):
    return case.meta is not None and case.meta.generation.mode.is_positive


@schemathesis.check
def refusals_name_the_image(ctx, response, case):
    """A schema-valid request is refused (415, 422) for its image only."""
    if not positive(case) or response.status_code not in (415, 422):
        return None
    p = response.json()
    kind = p.get("type", "").rsplit(":", 1)[-1]
    if kind in IMAGE_PROBLEMS or (p.get("field") or "").startswith("image"):
        return None
    if p.get("field") == "scheduler_options" or (kind == "model-refused" and "scheduler" in p.get("detail", "")):
        return None
    # which names the model field takes is the server's configuration (its
    # models: GET /api/v1/models), which no static schema can state
    if p.get("field") == "model" and p.get("detail", "").startswith("unknown model"):
        return None
    if p.get("field") in ("upscaler_1", "upscaler_2") and p.get("detail", "").startswith("unknown upscaler"):
        return None
    if p.get("field") == "extras_upscaler_2_visibility" and "blends no second upscaler" in p.get("detail", ""):
        return None
    if (p.get("field") or "").startswith("upscaling_resize") and "would be resized to" in p.get("detail", ""):
        return None
    # tile_overlap must be below tile, a rule between two fields that no
    # schema keyword states (the descriptions do)
    if p.get("field") == "tile_overlap" and "must be smaller than tile" in p.get("detail", ""):
        return None
    # a batch's webhook_url needs async=true: the JSON body's schema says so
    # (dependentSchemas), but schemathesis cannot generate multipart bodies
    # under such a rule (its check of file parts fails: "Unsupported type:
    # 'Binary'"), so the multipart schema leaves it to the description
    if case.media_type == "multipart/form-data" and p.get("allowed") == "with async=true":
        return None
    # the same failure meets "not" there, which states tile's gap below 32
    # in the JSON bodies' schemas: the multipart ones leave it to the
    # description
    if case.media_type == "multipart/form-data" and p.get("field") == "tile" \
            and "is outside 32.." in p.get("detail", ""):
        return None
    raise AssertionError(f"schema-valid data refused for something other than its image: {p.get('detail')}")


def number(v):
    """v when it is a JSON number (bodies are lowered before serialization)."""
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def capped(value):
    if isinstance(value, list):
        return [capped(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {}
    for k, v in value.items():
        x = number(v)
        if k.startswith("num_inference_steps") and x is not None and x == int(x) and MAX_TEST_STEPS < x <= 150:
            v = MAX_TEST_STEPS
        elif k.startswith("noise_level") and x is not None and MAX_TINY_NOISE < x <= 1:
            v = MAX_TINY_NOISE
        out[k] = capped(v)
    return out


def cheap(body, path):
    """The body with in-range values lowered and a step count instead of the
    default 75; an A1111 body's upscaler the small GAN when it names none."""
    if path in A1111_OPERATIONS:
        body = dict(body)
        body.setdefault("upscaler_1", A1111_TEST_UPSCALER)
        return body
    body = capped(body)
    body.setdefault("num_inference_steps", MAX_TEST_STEPS)
    return body


@schemathesis.hook
def map_body(context, body):
    """Bodies as they are generated, of any media type."""
    if context.operation is None or not isinstance(body, dict) or \
            context.operation.path not in IMAGE_OPERATIONS | A1111_OPERATIONS:
        return body
    return cheap(body, context.operation.path)


@schemathesis.hook
def before_call(context, case, kwargs):
    """JSON bodies not made by generation (examples, coverage cases). A body
    changed here is judged again by schemathesis, which misjudges multipart
    file parts: those are never real images here anyway."""
    if case.operation.path in IMAGE_OPERATIONS | A1111_OPERATIONS and case.media_type == "application/json" \
            and isinstance(case.body, dict):
        case.body = cheap(case.body, case.operation.path)
