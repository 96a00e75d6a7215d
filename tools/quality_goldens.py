# quality_goldens.py - golden numbers for sdx4_compare_images()
# (src/engine/tools/quality.c): PSNR and SSIM of small image pairs, as
# scikit-image computes them.
#
# A developer's tool, never a dependency of the product or of CI. It runs in
# a throwaway virtualenv with these exact versions (Python 3.11.7):
#
#   python3 -m venv /tmp/quality-venv
#   /tmp/quality-venv/bin/pip install scikit-image==0.26.0 scipy==1.17.1 \
#       numpy==2.4.6 pillow==13.0.0
#
# and is run from the repository root (it rewrites the folder whole; the
# output is the same on every run):
#
#   /tmp/quality-venv/bin/python tools/quality_goldens.py tests/data/quality
#
# For every case it writes <name>_a.png and <name>_b.png (8-bit RGB) and an
# entry of quality.json with what tests/test_quality.c compares:
#
#   psnr          peak_signal_noise_ratio(a, b, data_range=255)
#   ssim          structural_similarity(a, b, channel_axis=2, data_range=255)
#   psnr_channel  the PSNR of a[..., c] and b[..., c], c = R, G, B
#   ssim_channel  structural_similarity of a[..., c] and b[..., c]
#
# An infinite PSNR (identical images or channels) is written as null: JSON
# has no infinity. Images are synthetic and seeded (numpy's legacy
# RandomState, stable across numpy versions): noise, gradients, edges, a
# bicubic round trip like the benchmark's, flat images (zero variance, the
# SSIM constants alone), and the smallest size SSIM takes (7 x 7).
import json
import os
import sys
import warnings

import numpy as np
import PIL
import scipy
import skimage
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def pattern(h, w, seed):
    """Gradients, hard edges and noise side by side, as a photo mixes them."""
    rs = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w]
    smooth = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                       (x + y) * 255 // max(w + h - 2, 1)], -1)
    edges = np.where(((x // 3) + (y // 4)) % 2 == 0, 230, 20)[..., None].repeat(3, -1)
    noise = rs.randint(0, 256, (h, w, 3))
    col = x[..., None]
    return np.where(col < w // 3, smooth, np.where(col < 2 * w // 3, edges, noise)).astype(np.uint8)


def add_noise(img, sigma, seed):
    rs = np.random.RandomState(seed)
    return np.clip(img + rs.normal(0, sigma, img.shape).round(), 0, 255).astype(np.uint8)


def round_trip(img, factor):
    """Down by `factor` and back up, bicubic: what the benchmark's baseline does."""
    h, w = img.shape[:2]
    small = Image.fromarray(img).resize((w // factor, h // factor), Image.BICUBIC)
    return np.asarray(small.resize((w, h), Image.BICUBIC))


def flat(h, w, rgb):
    return np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3)).copy()


def cases():
    a = pattern(48, 64, 1)
    yield "roundtrip_64x48", a, round_trip(a, 4)
    a = pattern(17, 31, 2)
    yield "noise_31x17", a, add_noise(a, 12.0, 3)
    a = np.random.RandomState(4).randint(0, 256, (8, 9, 3)).astype(np.uint8)
    yield "random_9x8", a, np.random.RandomState(5).randint(0, 256, (8, 9, 3)).astype(np.uint8)
    a = pattern(7, 7, 6)
    yield "smallest_7x7", a, add_noise(a, 30.0, 7)
    a = pattern(40, 7, 8)
    yield "narrow_7x40", a, add_noise(a, 5.0, 9)
    a = pattern(16, 20, 10)
    yield "identical_20x16", a, a.copy()
    b = a.copy()
    b[..., 1] = add_noise(a, 8.0, 11)[..., 1]  # only green differs
    yield "green_only_20x16", a, b
    a = flat(12, 10, (128, 64, 200))
    yield "flat_vs_noise_10x12", a, add_noise(a, 20.0, 12)
    yield "flat_vs_flat_10x12", a, flat(12, 10, (30, 250, 200))
    yield "black_white_8x8", flat(8, 8, (0, 0, 0)), flat(8, 8, (255, 255, 255))


def psnr(a, b):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # identical: 65025 / 0
        v = float(peak_signal_noise_ratio(a, b, data_range=255))
    return None if np.isinf(v) else v


def ssim(a, b, **kw):
    return float(structural_similarity(a, b, data_range=255, **kw))


def main(out):
    os.makedirs(out, exist_ok=True)
    for f in os.listdir(out):
        os.remove(os.path.join(out, f))
    entries = []
    for name, a, b in cases():
        Image.fromarray(a, "RGB").save(os.path.join(out, f"{name}_a.png"))
        Image.fromarray(b, "RGB").save(os.path.join(out, f"{name}_b.png"))
        entries.append({
            "name": name, "width": a.shape[1], "height": a.shape[0],
            "psnr": psnr(a, b), "ssim": ssim(a, b, channel_axis=2),
            "psnr_channel": [psnr(a[..., c], b[..., c]) for c in range(3)],
            "ssim_channel": [ssim(a[..., c], b[..., c]) for c in range(3)],
        })
    versions = {"scikit-image": skimage.__version__, "scipy": scipy.__version__,
                "numpy": np.__version__, "pillow": PIL.__version__}
    with open(os.path.join(out, "quality.json"), "w") as f:
        json.dump({"made_with": versions, "cases": entries}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data/quality")
