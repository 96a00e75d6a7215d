# Minimal FastAPI equivalent (bench/http/run_http_bench.sh) of the three benchmarked routes (comparison only).
import hashlib, io
from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import JSONResponse, Response
from PIL import Image

app = FastAPI()
cache = {}
MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF")

@app.get("/api/v1/health")
def health():
    return {"status": "ready", "ready": True, "queue": {"depth": 0, "capacity": 100, "running": 0, "workers": 3}}

@app.post("/api/v1/upscale")
async def upscale(image: UploadFile = File(...), seed: int = Form(None), num_inference_steps: int = Form(75)):
    data = await image.read()
    if not data.startswith(MAGIC):
        return JSONResponse({"type": "urn:sdx4:problem:unsupported-image-format", "status": 415,
                             "title": "Unsupported image format"}, status_code=415,
                            media_type="application/problem+json")
    img = Image.open(io.BytesIO(data)).convert("RGB")
    key = hashlib.sha256(img.tobytes() + f"{seed}|{num_inference_steps}".encode()).digest()
    if key in cache:
        return Response(cache[key], media_type="image/png", headers={"X-Cache": "HIT"})
    out = io.BytesIO()
    img.resize((img.width * 4, img.height * 4)).save(out, "PNG")
    cache[key] = out.getvalue()
    return Response(cache[key], media_type="image/png", headers={"X-Cache": "MISS"})
