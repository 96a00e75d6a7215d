# gan_torch_bench.py - the PyTorch side of the ESRGAN-family benchmark
# (RRDBNet, SRVGGNetCompact: src/engine/model/esrgan.h), and a checker of
# sdx4's output against PyTorch's.
#
# Not part of the product: it runs in the throwaway venv of
# tools/gan_goldens.py (torch 2.15.0, spandrel 0.4.2, safetensors 0.8.0,
# numpy 2.4.6, pillow 13.0.0). The model is an sdx4 model folder
# (config.json + model.safetensors, float32 or float16), built with
# spandrel's class for config.json and given the state dict (float32) as
# spandrel's loader would convert it. It must be built from config.json:
# spandrel's own detection reads neither num_grow_ch (it assumes 32) nor
# SRVGGNetCompact's act_type (it assumes prelu).
#
# Timing (default):
#   python bench/gan_torch_bench.py --model DIR [--size 256] [--threads 2] [--repeats 3]
# times a whole upscale of a size x size RGB8 image, sdx4 bench's input
# (byte i is i*37 % 251) unless --input PNG is given: uint8 -> float
# [0, 1] NCHW -> forward (float32, torch.inference_mode, NCHW as is) ->
# clamp, * 255, round -> uint8. One untimed run first, then the median of
# --repeats runs. Prints one line of JSON on stdout:
#   {"side": "pytorch", "model": ..., "architecture": ..., "size": 256,
#    "out_size": 1024, "threads": 2, "repeats": 3, "ms": ..., "forward_ms": ...,
#    "first_ms": ..., "cpu_ms": ..., "loadavg_1m_before": ..., "peak_rss_mib": ...,
#    "torch": "2.x", "spandrel": ...}
# ms is the whole upscale (sdx4 bench's pipeline_ms), forward_ms the
# network alone, first_ms the untimed first run, cpu_ms the process's CPU
# time per timed run (median; near threads x ms when the cores were the
# run's own), loadavg_1m_before the machine's load when it started: on a
# shared machine, ms is only as good as those two say.
#
# Checking (--check):
#   python bench/gan_torch_bench.py --check --model DIR --input in.png \
#       --output sdx4.png [--float sdx4_out.safetensors] [--float-key output]
# runs PyTorch on in.png and prints one line of JSON: the max abs
# difference of the uint8 images and the fraction of values within 1 level
# (and equal), and with --float the max and mean abs difference of sdx4's
# float output (a [1,] C x H x W tensor, clamped or not: compared with
# PyTorch's output clamped the same way when every value of it lies in
# [0, 1]). With --expect-within1 F it exits 1 when fewer than F of the
# uint8 values are within 1 level.
import argparse
import json
import os
import resource
import statistics
import sys
import time

parser = argparse.ArgumentParser(description="PyTorch side of the sdx4 ESRGAN-family benchmark")
parser.add_argument("--model", required=True, help="sdx4 model folder: config.json + model.safetensors")
parser.add_argument("--size", type=int, default=256, help="input side in pixels (timing)")
parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is kept")
parser.add_argument("--input", help="input PNG (timing: instead of the generated size x size image)")
parser.add_argument("--check", action="store_true", help="compare sdx4's output with PyTorch's")
parser.add_argument("--output", help="--check: sdx4's output PNG")
parser.add_argument("--float", help="--check: sdx4's float output (.safetensors)")
parser.add_argument("--float-key", help="--check: its tensor's name (default: the only one)")
parser.add_argument("--expect-within1", type=float, help="--check: least fraction within 1 level, else exit 1")
parser.add_argument("--save", help="also write PyTorch's uint8 output PNG here")
args = parser.parse_args()

# before torch is imported, so that OpenMP and MKL size their pools to match
os.environ["OMP_NUM_THREADS"] = str(args.threads)
os.environ["MKL_NUM_THREADS"] = str(args.threads)

import importlib  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import spandrel  # noqa: E402
from spandrel.architectures.Compact import Compact  # noqa: E402
from spandrel.architectures.ESRGAN import _to_old_arch  # noqa: E402

torch.set_num_threads(args.threads)


def load_model(folder):
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    sd = {k: v.float() for k, v in load_file(os.path.join(folder, "model.safetensors")).items()}
    arch = cfg.get("architecture")
    if arch == "SRVGGNetCompact":
        model = Compact(num_in_ch=cfg.get("num_in_ch", 3), num_out_ch=cfg.get("num_out_ch", 3),
                        num_feat=cfg.get("num_feat", 64), num_conv=cfg.get("num_conv", 16),
                        upscale=cfg.get("upscale", 4), act_type=cfg.get("act_type", "prelu"))
        scale = model.upscale
    elif arch == "RRDBNet":
        scale = cfg.get("scale", 4)
        unshuffle = {4: None, 2: 2, 1: 4}[scale]
        rrdb = importlib.import_module("spandrel.architectures.ESRGAN.__arch.RRDB")
        orig, gc = rrdb.B.RRDB, cfg.get("num_grow_ch", 32)
        rrdb.B.RRDB = lambda *a, **k: orig(*a, **{**k, "gc": gc})  # spandrel hard-codes gc=32
        try:
            model = rrdb.RRDBNet(in_nc=cfg.get("num_in_ch", 3) * (unshuffle or 1) ** 2,
                                 out_nc=cfg.get("num_out_ch", 3), num_filters=cfg.get("num_feat", 64),
                                 num_blocks=cfg.get("num_block", 23), scale=4, shuffle_factor=unshuffle)
        finally:
            rrdb.B.RRDB = orig
        sd = _to_old_arch(sd)  # BasicSR's names -> spandrel's, by spandrel's loader's code
    else:
        sys.exit(f"{folder}: unknown architecture {arch!r}")
    model.load_state_dict(sd, strict=True)
    return model.eval(), cfg, scale


def upscale(model, pixels):
    """uint8 HWC -> (uint8 HWC, float NCHW unclamped, forward ms)."""
    x = torch.from_numpy(pixels.astype(np.float32) / np.float32(255)).permute(2, 0, 1)[None]
    t0 = time.perf_counter()
    y = model(x)
    fwd = 1e3 * (time.perf_counter() - t0)
    q = (y.clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).contiguous().numpy()
    return q, y, fwd


def read_png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def bench(model, cfg, scale):
    if args.input:
        pixels = read_png(args.input)
    else:  # sdx4 bench's input image
        n = 3 * args.size * args.size
        pixels = (np.arange(n, dtype=np.int64) * 37 % 251).astype(np.uint8).reshape(args.size, args.size, 3)
    times, fwds, cpus = [], [], []
    load = os.getloadavg()[0]
    with torch.inference_mode():
        for i in range(-1, args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            q, _, fwd = upscale(model, pixels)
            ms = 1e3 * (time.perf_counter() - t0)
            cpu = 1e3 * (time.process_time() - c0)
            print(f"torch run {i + 1}{' (untimed)' if i < 0 else ''}: {ms:.1f} ms", file=sys.stderr, flush=True)
            if i < 0:
                first = ms
            else:
                times.append(ms)
                fwds.append(fwd)
                cpus.append(cpu)
    if args.save:
        Image.fromarray(q, "RGB").save(args.save)
    out = {"side": "pytorch", "model": os.path.basename(os.path.normpath(args.model)),
           "architecture": cfg["architecture"], "size": pixels.shape[0] if pixels.shape[0] == pixels.shape[1]
           else f"{pixels.shape[1]}x{pixels.shape[0]}", "out_size": q.shape[0] if q.shape[0] == q.shape[1]
           else f"{q.shape[1]}x{q.shape[0]}", "threads": torch.get_num_threads(), "repeats": args.repeats,
           "ms": round(statistics.median(times), 1), "forward_ms": round(statistics.median(fwds), 1),
           "first_ms": round(first, 1), "cpu_ms": round(statistics.median(cpus), 1),
           "loadavg_1m_before": round(load, 2), "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                                              / 1024.0, 1),
           "torch": torch.__version__, "spandrel": spandrel.__version__}
    print(json.dumps(out), flush=True)


def check(model, cfg, scale):
    if not args.input or not args.output:
        sys.exit("--check needs --input and --output")
    pixels = read_png(args.input)
    with torch.inference_mode():
        q, y, _ = upscale(model, pixels)
    if args.save:
        Image.fromarray(q, "RGB").save(args.save)
    theirs = read_png(args.output)
    if theirs.shape != q.shape:
        sys.exit(f"{args.output}: {theirs.shape[1]}x{theirs.shape[0]}, PyTorch gives {q.shape[1]}x{q.shape[0]}")
    d = np.abs(theirs.astype(np.int16) - q.astype(np.int16))
    out = {"model": os.path.basename(os.path.normpath(args.model)), "input": f"{pixels.shape[1]}x{pixels.shape[0]}",
           "output": f"{q.shape[1]}x{q.shape[0]}", "max_abs_diff_u8": int(d.max()),
           "within1_fraction": float((d <= 1).mean()), "equal_fraction": float((d == 0).mean())}
    if args.float:
        t = load_file(args.float)
        key = args.float_key or (next(iter(t)) if len(t) == 1 else None)
        if key not in t:
            sys.exit(f"{args.float}: name the tensor with --float-key (it has {sorted(t)})")
        f = t[key].float()
        ref = y[0]
        f = f[0] if f.dim() == 4 else f
        if f.shape != ref.shape and f.dim() == 3 and f.permute(2, 0, 1).shape == ref.shape:
            f = f.permute(2, 0, 1)  # HWC
        if f.shape != ref.shape:
            sys.exit(f"{args.float}: {key} is {tuple(t[key].shape)}, PyTorch gives {tuple(y.shape)}")
        clamped = bool(((f >= 0) & (f <= 1)).all())
        if clamped:
            ref = ref.clamp(0, 1)
        fd = (f - ref).abs()
        out.update({"max_abs_diff_float": float(fd.max()), "mean_abs_diff_float": float(fd.mean()),
                    "float_compared_clamped": clamped})
    print(json.dumps(out), flush=True)
    if args.expect_within1 is not None and out["within1_fraction"] < args.expect_within1:
        sys.exit(1)


model, cfg, scale = load_model(args.model)
(check if args.check else bench)(model, cfg, scale)
