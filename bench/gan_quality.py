"""How much of a photo each upscaler gets back: PSNR and SSIM after a 4x
round trip, beside PIL's bicubic.

    /tmp/quality-venv/bin/python bench/gan_quality.py --sdx4 build/sdx4 \\
        [--steps 20] [--size 256] [--side-by-side docs/gan_quality.png] \\
        [MODEL_DIR ...]

The venv is tools/quality_goldens.py's (scikit-image 0.26.0, scipy 1.17.1,
numpy 2.4.6, pillow 13.0.0); nothing else is needed.

The photographs are scikit-image's own (skimage.data: chelsea, coffee,
astronaut, rocket, hubble_deep_field; they ship with the package). Each is
cropped to its centre, --size px square (256 by default, a multiple of 2,
3 and 4 is best: see below), the reference. The reference is shrunk by the
model's scale with PIL's bicubic (antialiased: Image.resize, BICUBIC) and
brought back to the reference's size by (a) PIL's bicubic, the baseline,
and (b) each model folder given, through the CLI:

    sdx4 upscale --model DIR [--device D] LOW.png OUT.png
        a GAN folder (config.json: ESRGAN, Real-ESRGAN): no prompt
    ... --prompt "" --steps N --seed 0
        a diffusion folder (model_index.json), N from --steps

A model's scale is its config.json's "outscale", else "scale" (RRDBNet) or "upscale"
(SRVGGNetCompact), 4 for diffusion; for scales other than 4 the crop is
cut down to a multiple of the scale, and a bicubic row of that scale is
added. 256 px keeps a run short on 2 CPU cores: a 64 px input is seconds
for a GAN, and a diffusion model's 20 steps at 64 x 64 a few minutes.

PSNR and SSIM of each result against the reference are computed with
scikit-image (peak_signal_noise_ratio(data_range=255),
structural_similarity(channel_axis=2, data_range=255)) and again with
`sdx4 compare --json`: any disagreement beyond 1e-6 relative is reported
and the script exits 1. The markdown table (image x method, and each
method's mean) goes to stdout, with seconds per upscale: the engine's
own time as the CLI reports it (load excluded), and the whole command's.
--side-by-side PATH writes a PNG of a 96 px centre crop of each image:
the reference, bicubic, then each model of scale 4, one row per image,
enlarged 2x with nearest pixels.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import skimage
import skimage.data
from PIL import Image, ImageDraw
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

PHOTOS = ["chelsea", "coffee", "astronaut", "rocket", "hubble_deep_field"]
TOLERANCE = 1e-6  # relative, between skimage and `sdx4 compare`


def centre_crop(img, side):
    h, w = img.shape[:2]
    side = min(side, h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return img[top:top + side, left:left + side]


def model_kind(folder):
    """("diffusion", 4) or ("gan", its scale)."""
    if os.path.exists(os.path.join(folder, "model_index.json")):
        return "diffusion", 4
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    return "gan", int(cfg.get("outscale", cfg.get("scale", cfg.get("upscale", 4))))


def metrics(ref, out):
    psnr = float(peak_signal_noise_ratio(ref, out, data_range=255))
    ssim = float(structural_similarity(ref, out, channel_axis=2, data_range=255))
    return psnr, ssim


def close(ours, theirs):
    if theirs is None:  # JSON null: +inf
        return np.isinf(ours)
    return abs(ours - theirs) <= TOLERANCE * abs(theirs)


class Run:
    def __init__(self, args, work, models):
        self.args, self.work, self.models = args, work, models
        self.labels = [os.path.basename(m[0]) for m in models]
        self.rows = []        # (image, method, scale, psnr, ssim, engine s, wall s)
        self.mismatches = []
        self.crops = {}       # image -> [(label, array)] for --side-by-side

    def sdx4(self, *argv):
        return subprocess.run([self.args.sdx4, *argv], capture_output=True, text=True)

    def record(self, image, method, scale, ref, ref_path, out, out_path, engine_s, wall_s):
        psnr, ssim = metrics(ref, out)
        r = self.sdx4("compare", "--json", ref_path, out_path)
        if r.returncode != 0:
            self.mismatches.append(f"{image}/{method}: sdx4 compare failed: {r.stderr.strip()}")
        else:
            q = json.loads(r.stdout)
            if not (close(psnr, q["psnr"]) and close(ssim, q["ssim"])):
                self.mismatches.append(f"{image}/{method}: skimage psnr {psnr!r} ssim {ssim!r}, "
                                       f"sdx4 compare psnr {q['psnr']!r} ssim {q['ssim']!r}")
        self.rows.append((image, method, scale, psnr, ssim, engine_s, wall_s))
        if scale == 4:
            self.crops.setdefault(image, []).append((method, out))

    def upscale(self, folder, kind, low_path, out_path):
        argv = ["upscale", "--model", folder]
        if self.args.device:
            argv += ["--device", self.args.device]
        if kind == "diffusion":
            argv += ["--prompt", "", "--steps", str(self.args.steps), "--seed", "0"]
        start = time.perf_counter()
        r = self.sdx4(*argv, low_path, out_path)
        wall = time.perf_counter() - start
        if r.returncode != 0:
            sys.exit(f"{folder}: sdx4 upscale failed ({r.returncode}): {r.stderr.strip()}")
        m = re.search(r": \d+x\d+ in ([0-9.]+) s", r.stderr)
        return float(m.group(1)) if m else wall, wall

    def image(self, name):
        photo = getattr(skimage.data, name)()
        for scale in sorted({4} | {s for _, _, s in self.models}):
            side = self.args.size // scale * scale
            ref = np.ascontiguousarray(centre_crop(photo, side))
            side = ref.shape[0] // scale * scale
            ref = ref[:side, :side]
            ref_path = os.path.join(self.work, f"{name}_x{scale}_ref.png")
            low_path = os.path.join(self.work, f"{name}_x{scale}_low.png")
            Image.fromarray(ref).save(ref_path)
            low = Image.fromarray(ref).resize((side // scale, side // scale), Image.BICUBIC)
            low.save(low_path)
            if scale == 4:
                self.crops[name] = [("reference", ref)]

            start = time.perf_counter()
            bicubic = np.asarray(low.resize((side, side), Image.BICUBIC))
            seconds = time.perf_counter() - start
            out_path = os.path.join(self.work, f"{name}_x{scale}_bicubic.png")
            Image.fromarray(bicubic).save(out_path)
            method = "bicubic" if scale == 4 else f"bicubic x{scale}"
            self.record(name, method, scale, ref, ref_path, bicubic, out_path, seconds, seconds)

            for label, (folder, kind, s) in zip(self.labels, self.models):
                if s != scale:
                    continue
                print(f"{name}: {label} ...", file=sys.stderr, flush=True)
                out_path = os.path.join(self.work, f"{name}_x{scale}_{len(self.rows)}.png")
                engine_s, wall_s = self.upscale(folder, kind, low_path, out_path)
                out = np.asarray(Image.open(out_path).convert("RGB"))
                if out.shape != ref.shape:
                    sys.exit(f"{folder}: {out.shape[1]}x{out.shape[0]} out of a "
                             f"{side // scale} px input, expected {side}x{side}")
                self.record(name, label, scale, ref, ref_path, out, out_path, engine_s, wall_s)

    def table(self):
        print(f"{self.args.size} px centre crops of skimage.data's photographs, shrunk by the "
              f"scale with PIL bicubic and upscaled back; PSNR and SSIM by scikit-image "
              f"{skimage.__version__} (and `sdx4 compare`).\n")
        print("| image | method | scale | PSNR (dB) | SSIM | s / upscale | s / command |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for image, method, scale, psnr, ssim, engine_s, wall_s in self.rows:
            print(f"| {image} | {method} | {scale} | {psnr:.3f} | {ssim:.4f} | "
                  f"{engine_s:.3f} | {wall_s:.3f} |")
        methods = dict.fromkeys((m, s) for _, m, s, *_ in self.rows)
        for method, scale in methods:
            rows = [r for r in self.rows if r[1] == method]
            mean = [sum(r[k] for r in rows) / len(rows) for k in (3, 4, 5, 6)]
            print(f"| **mean** | {method} | {scale} | {mean[0]:.3f} | {mean[1]:.4f} | "
                  f"{mean[2]:.3f} | {mean[3]:.3f} |")

    def side_by_side(self, path, crop=96, zoom=2, label_h=16):
        names = [n for n in PHOTOS if n in self.crops]
        cols = max(len(self.crops[n]) for n in names)
        tile = crop * zoom
        sheet = Image.new("RGB", (cols * tile, len(names) * (tile + label_h)), "white")
        draw = ImageDraw.Draw(sheet)
        for row, name in enumerate(names):
            y = row * (tile + label_h)
            for col, (label, img) in enumerate(self.crops[name]):
                part = Image.fromarray(np.ascontiguousarray(centre_crop(img, crop)))
                sheet.paste(part.resize((tile, tile), Image.NEAREST), (col * tile, y + label_h))
                draw.text((col * tile + 3, y + 2), f"{name}: {label}", fill="black")
        sheet.save(path)
        print(f"wrote {path}", file=sys.stderr)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", metavar="MODEL_DIR", help="GAN or diffusion model folders")
    p.add_argument("--sdx4", default="build/sdx4", help="the sdx4 binary (default build/sdx4)")
    p.add_argument("--size", type=int, default=256, help="side of the centre crops (default 256)")
    p.add_argument("--steps", type=int, default=20, help="a diffusion model's steps (default 20)")
    p.add_argument("--device", help="sdx4 upscale's --device (default: its own, auto)")
    p.add_argument("--side-by-side", metavar="PNG", help="write crops of every result side by side")
    p.add_argument("--keep", metavar="DIR", help="keep the images in DIR instead of a temporary folder")
    args = p.parse_args()
    if not os.access(args.sdx4, os.X_OK):
        sys.exit(f"{args.sdx4}: not an executable (build it, or give --sdx4)")
    if args.size < 7 * 4:
        sys.exit("--size must be at least 28: SSIM needs 7 px a side")
    models = [(os.path.abspath(m), *model_kind(m)) for m in args.models]

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or tmp
        os.makedirs(work, exist_ok=True)
        run = Run(args, work, models)
        for name in PHOTOS:
            print(f"{name} ...", file=sys.stderr, flush=True)
            run.image(name)
        run.table()
        if args.side_by_side:
            run.side_by_side(args.side_by_side)
    for m in run.mismatches:
        print(f"cross-check: {m}", file=sys.stderr)
    return 1 if run.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
