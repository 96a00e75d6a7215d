# gan_real_goldens.py - what PyTorch computes with the real Real-ESRGAN
# models that scripts/get-default-models.sh converts from ncnn, for
# test_gan's check of the engine on them (tests/data/gan/real/).
#
# A developer's tool, never a dependency of the product or of CI. Run it in
# the throwaway virtualenv of tools/gan_goldens.py (torch 2.15.0, spandrel
# 0.4.2), after converting the models (scripts/get-default-models.sh):
#
#   /tmp/gan-venv/bin/python tools/gan_real_goldens.py models tests/data/gan/real
#
# The converted model.safetensors holds BasicSR's names, which spandrel
# loads as it would Real-ESRGAN's own .pth (it detects the architecture
# from them); so this checks the engine and the conversion's naming
# together, and, through the ncnn weights, that the converter kept every
# tensor where PyTorch expects it. Input: tests/data/gan/rrdb_x4/
# tile_input.png (32 x 24); output: <model>.png, float32 forward, clamped,
# x 255, rounded, as the engine quantizes.
import os, sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from spandrel import ModelLoader

MODELS, OUT = sys.argv[1], sys.argv[2]
NAMES = ["realesrgan-x4plus", "realesrgan-x4plus-anime", "realesr-animevideov3-x4"]
torch.set_num_threads(2)
src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "gan", "rrdb_x4",
                   "tile_input.png")
x = np.asarray(Image.open(src).convert("RGB"), dtype=np.float32) / 255.0
x = torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()
os.makedirs(OUT, exist_ok=True)
for name in NAMES:
    sd = {k: v.float() for k, v in load_file(os.path.join(MODELS, name, "model.safetensors")).items()}
    model = ModelLoader().load_from_state_dict(sd).model.eval()
    with torch.inference_mode():
        y = model(x)
    img = (y[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Image.fromarray(img, "RGB").save(os.path.join(OUT, name + ".png"), optimize=True)
    print(name, type(model).__name__, tuple(y.shape))
