# gan_goldens.py - golden data for the engine's ESRGAN family
# (src/engine/model/esrgan.h): small random-weight RRDBNet and
# SRVGGNetCompact model folders in the engine's format, an input image and
# what the reference implementations compute for it.
#
# A developer's tool, never a dependency of the product or of CI. It runs in
# a throwaway virtualenv with these exact versions (torch is PyPI's build,
# used on the CPU only; the CPU-only index was not reachable):
#
#   python3 -m venv /tmp/gan-venv
#   /tmp/gan-venv/bin/pip install torch==2.15.0 spandrel==0.4.2 safetensors==0.8.0 \
#       numpy==2.4.6 pillow==13.0.0          # Python 3.11.7; torchvision 0.29.2 comes along
#   /tmp/gan-venv/bin/pip download --no-deps -d /tmp/bsr basicsr==1.4.2 realesrgan==0.3.0
#   tar xzf /tmp/bsr/basicsr-1.4.2.tar.gz -C /tmp/bsr
#   unzip -qo /tmp/bsr/realesrgan-0.3.0-py3-none-any.whl -d /tmp/bsr/realesrgan-0.3.0
#   # sha256 basicsr-1.4.2.tar.gz      b89b595a87ef964cda9913b4d99380ddb6554c965577c0c10cb7b78e31301e87
#   # sha256 realesrgan-0.3.0-*.whl    59336c16c30dd5130eff350dd27424acb9b7281d18a6810130e265606c9a6088
#
# and is run from the repository root (it rewrites the cases' folders whole;
# the output is the same bytes on every run):
#
#   /tmp/gan-venv/bin/python tools/gan_goldens.py /tmp/bsr tests/data/gan
#
# Two implementations, which must agree bit for bit on every case:
#
# - spandrel 0.4.2 (spandrel.architectures.ESRGAN / .Compact) makes the
#   weights: its classes under torch.manual_seed with PyTorch's default
#   init, then scaled (below) so that activations stay O(1).
# - The reference proper: BasicSR 1.4.2's RRDBNet (basicsr/archs/
#   rrdbnet_arch.py) and Real-ESRGAN 0.3.0's SRVGGNetCompact (realesrgan/
#   archs/srvgg_arch.py), the classes whose constructor arguments are
#   config.json's keys and whose state-dict names are model.safetensors'.
#   Neither package can be pip-installed usefully here (basicsr's sdist
#   imports all its archs, opencv and torchvision.transforms.functional_
#   tensor, gone from torchvision); the two files are imported from the
#   unpacked packages as they are, with basicsr's registry, logger and DCN
#   op stubbed (none of them is used by these classes). The saved state
#   dict is loaded into them with strict=True, so the names and shapes are
#   BasicSR's, and the expected outputs are theirs.
#
# How spandrel's classes relate to BasicSR's:
#
# - SRVGGNetCompact (spandrel "Compact"): a copy of Real-ESRGAN's class,
#   same names (body.<2i>.weight/bias convolutions, body.<2i+1>.weight the
#   PReLU slopes, nothing for ReLU/LeakyReLU(0.1)), same forward (body,
#   PixelShuffle, + nearest-upsampled input). spandrel's loader detects it
#   only by body.1.weight (PReLU) and always builds act_type="prelu": a
#   ReLU or LeakyReLU model must be built from config.json.
# - RRDBNet (spandrel "ESRGAN"): the old ESRGAN layout, model.N names:
#     model.0                                  conv_first
#     model.1.sub.<i>.RDB<j>.conv<k>.0         body.<i>.rdb<j>.conv<k>
#     model.1.sub.<num_block>                  conv_body
#     model.3, model.6                         conv_up1, conv_up2
#     model.8, model.10                        conv_hr, conv_last
#   (model.2/5 nearest x2 upsampling, model.4/7/9 LeakyReLU(0.2)). Its
#   loader converts BasicSR names to these (_to_old_arch), as here. The
#   forward is the same computation: conv_first; the RRDB trunk and
#   conv_body added to it (ShortcutBlock); [nearest x2, conv, lrelu] twice;
#   conv_hr, lrelu, conv_last; RDB = 5 convs on the concatenations,
#   x5 * 0.2 + x; RRDB = 3 RDBs, * 0.2 + x. Differences: spandrel's
#   constructor hard-codes num_grow_ch = 32 (so does its loader; every
#   released model has 32), so this script patches spandrel's block.RRDB
#   for the gc of these small models, and spandrel cannot load them from
#   the state dict alone. Scale 2 (1) is spandrel's in_nc = 12 (48),
#   scale=4, shuffle_factor=2 (4): it reflect-pads odd sides up to a
#   multiple before torch.pixel_unshuffle and crops after, where BasicSR
#   asserts divisibility (the engine does as BasicSR: even sides at x2);
#   basicsr's pixel_unshuffle orders channels as torch's (c, dy, dx).
#
# Weights: PyTorch's default init (kaiming-uniform weights, uniform
# biases) times GAIN for every convolution; then the last convolution is
# scaled so that on the case's input RRDBNet's output has mean 0.5 and std
# 0.25, and SRVGGNetCompact's residual (output - nearest-upsampled input)
# std 0.1: image-like outputs, a few percent of them out of [0, 1], which
# the unclamped expected.safetensors keeps. PReLU slopes are drawn per
# channel in [-0.25, 0.5) so that a shared or misindexed slope shows.
#
# Files (tests/data/README.md describes them): per case a model folder
# (config.json, model.safetensors) with input.png, expected.safetensors
# ("output", float32 [1, C, s*H, s*W], unclamped) and expected.png; the
# "tile" inputs, larger, live in rrdb_x4/ and srvgg_x4_prelu/ as
# tile_input.png and tile_expected.png only (uint8: float32 outputs of
# that size would not fit the folder's size budget).
import importlib
import importlib.util
import json
import os
import shutil
import sys
import types

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import safetensors
import spandrel
from spandrel.architectures.Compact import Compact as SpandrelCompact
from spandrel.architectures.ESRGAN import _to_old_arch as spandrel_to_old_arch

SRC, OUT = sys.argv[1], sys.argv[2]
sp_rrdb = importlib.import_module("spandrel.architectures.ESRGAN.__arch.RRDB")

MODELS = {  # config.json, keys in esrgan.h's order
    "rrdb_x4": dict(architecture="RRDBNet", num_in_ch=3, num_out_ch=3, scale=4, num_feat=8, num_block=2,
                    num_grow_ch=4),
    "rrdb_x2": dict(architecture="RRDBNet", num_in_ch=3, num_out_ch=3, scale=2, num_feat=8, num_block=2,
                    num_grow_ch=4),
    "srvgg_x4_prelu": dict(architecture="SRVGGNetCompact", num_in_ch=3, num_out_ch=3, upscale=4, num_feat=8,
                           num_conv=3, act_type="prelu"),
    "srvgg_x3_leakyrelu": dict(architecture="SRVGGNetCompact", num_in_ch=3, num_out_ch=3, upscale=3,
                               num_feat=6, num_conv=2, act_type="leakyrelu"),
    "srvgg_x2_relu": dict(architecture="SRVGGNetCompact", num_in_ch=3, num_out_ch=3, upscale=2,
                          num_feat=4, num_conv=2, act_type="relu"),
}
SEED = {name: i + 1 for i, name in enumerate(MODELS)}
GAIN = {"RRDBNet": 1.5, "SRVGGNetCompact": 2.0}
TARGET = {"RRDBNet": 0.25, "SRVGGNetCompact": 0.1}
# (h, w, image seed): the cases' inputs, and the larger "tile" inputs
SMALL = (12, 16, 11)
TILE = {"rrdb_x4": (24, 32, 12), "srvgg_x4_prelu": (24, 32, 13)}


def make_image(h, w, seed):  # the pattern of tools/tiled_unet_goldens.py
    rs = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 0.5 + 0.5 * np.sin(x / w * 6.28 * 1.5 + seed)
    g = 0.5 + 0.5 * np.cos(y / h * 6.28 + seed * 0.5)
    b = ((x - w / 2) ** 2 + (y - h / 2) ** 2 < (min(h, w) / 3) ** 2).astype(np.float32)
    img = np.stack([r, g, b], -1) * 0.85 + rs.rand(h, w, 3).astype(np.float32) * 0.15
    return Image.fromarray((img * 255).round().clip(0, 255).astype(np.uint8), "RGB")


def load_reference(src):
    """BasicSR's RRDBNet and Real-ESRGAN's SRVGGNetCompact, from the unpacked packages."""
    bsr = os.path.join(src, "basicsr-1.4.2", "basicsr")
    srvgg = os.path.join(src, "realesrgan-0.3.0", "realesrgan", "archs", "srvgg_arch.py")

    class Registry:
        def register(self, suffix=None):
            return lambda cls: cls

    def module(name, path=None, **attrs):
        m = types.ModuleType(name)
        if path is not None:
            m.__path__ = [path]
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    module("basicsr", bsr)
    module("basicsr.utils", os.path.join(bsr, "utils"), get_root_logger=lambda *a, **k: None)
    module("basicsr.utils.registry", ARCH_REGISTRY=Registry())
    module("basicsr.ops", os.path.join(bsr, "ops"))
    module("basicsr.ops.dcn", ModulatedDeformConvPack=torch.nn.Module, modulated_deform_conv=None)
    module("basicsr.archs", os.path.join(bsr, "archs"))
    rrdb = importlib.import_module("basicsr.archs.rrdbnet_arch")  # imports the real arch_util
    spec = importlib.util.spec_from_file_location("realesrgan_srvgg_arch", srvgg)
    sv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sv)
    return rrdb.RRDBNet, sv.SRVGGNetCompact


def reference_args(cfg):
    return {k: v for k, v in cfg.items() if k != "architecture"}


def spandrel_model(cfg):
    """spandrel's class for cfg (PyTorch's default init under the current seed)."""
    if cfg["architecture"] == "SRVGGNetCompact":
        return SpandrelCompact(**reference_args(cfg))
    unshuffle = {4: None, 2: 2, 1: 4}[cfg["scale"]]
    orig = sp_rrdb.B.RRDB  # spandrel builds every RRDB with gc=32
    sp_rrdb.B.RRDB = lambda *a, **k: orig(*a, **{**k, "gc": cfg["num_grow_ch"]})
    try:
        return sp_rrdb.RRDBNet(in_nc=cfg["num_in_ch"] * (unshuffle or 1) ** 2, out_nc=cfg["num_out_ch"],
                               num_filters=cfg["num_feat"], num_blocks=cfg["num_block"], scale=4,
                               shuffle_factor=unshuffle)
    finally:
        sp_rrdb.B.RRDB = orig


def old_to_basicsr(sd, num_block):
    """spandrel's RRDBNet names -> BasicSR's."""
    last = {"0": "conv_first", "3": "conv_up1", "6": "conv_up2", "8": "conv_hr", "10": "conv_last"}
    out = {}
    for k, v in sd.items():
        p = k.split(".")
        if p[1] in last:
            out[f"{last[p[1]]}.{p[-1]}"] = v
        elif p[3] == str(num_block):
            out[f"conv_body.{p[-1]}"] = v
        else:  # model.1.sub.<i>.RDB<j>.conv<k>.0.<w|b>
            out[f"body.{p[3]}.rdb{p[4][3:]}.{p[5]}.{p[-1]}"] = v
    assert len(out) == len(sd)
    return out


def small_input():
    h, w, seed = SMALL
    return torch.from_numpy(np.asarray(make_image(h, w, seed), dtype=np.float32) / np.float32(255)).permute(2, 0, 1)[None]


def make_weights(name, cfg):
    torch.manual_seed(SEED[name])
    m = spandrel_model(cfg)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.Conv2d):
                mod.weight.mul_(GAIN[cfg["architecture"]])
            if isinstance(mod, torch.nn.PReLU):
                mod.weight.copy_(torch.rand(mod.weight.shape) * 0.75 - 0.25)
        # the last convolution scaled: the small input's output (RRDBNet) or
        # residual (SRVGGNetCompact) gets the std TARGET (RRDBNet: mean 0.5)
        x = small_input()
        if cfg["architecture"] == "RRDBNet":
            last = m.model[-1]
            y = m.eval()(x)
            s = TARGET["RRDBNet"] / y.std()
            last.weight.mul_(s)
            last.bias.mul_(s).add_(0.5 - y.mean() * s)
        else:
            last = m.body[-1]
            r = m.eval()(x) - torch.nn.functional.interpolate(x, scale_factor=cfg["upscale"], mode="nearest")
            s = TARGET["SRVGGNetCompact"] / r.std()
            last.weight.mul_(s)
            last.bias.mul_(s)
    sd = {k: v.detach().clone() for k, v in m.state_dict().items()}
    if cfg["architecture"] == "RRDBNet":
        new = old_to_basicsr(sd, cfg["num_block"])
        back = spandrel_to_old_arch(dict(new))  # spandrel's own loader's conversion
        assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
        return m, new
    return m, sd


def save_expected(path, out, meta):
    """safetensors' save_file, with the metadata in a fixed order (save_file's
    order varies from run to run): the same bytes on every run."""
    data = out.contiguous().numpy().astype("<f4").tobytes()
    header = {"__metadata__": dict(sorted(meta.items())),
              "output": {"dtype": "F32", "shape": list(out.shape), "data_offsets": [0, len(data)]}}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + data)
    assert torch.equal(load_file(path)["output"], out)


def quantize(out):
    q = (out.clamp(0, 1) * 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    return Image.fromarray(q, "RGB")


def save_case(folder, cfg, weights, image, out, meta):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(folder, "model.safetensors"))
    image.save(os.path.join(folder, "input.png"))
    save_expected(os.path.join(folder, "expected.safetensors"), out, meta)
    quantize(out).save(os.path.join(folder, "expected.png"))


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    RRDBNet, SRVGGNetCompact = load_reference(SRC)
    for name in list(MODELS) + ["rrdb_x4_fp16"]:  # the cases' folders only
        shutil.rmtree(os.path.join(OUT, name), ignore_errors=True)
    versions = (f"torch {torch.__version__}, spandrel {spandrel.__version__}, basicsr 1.4.2, realesrgan 0.3.0, "
                f"safetensors {safetensors.__version__}, numpy {np.__version__}")

    def run(cfg, weights, sp_model, image, label):
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / np.float32(255)).permute(2, 0, 1)[None]
        ref = (RRDBNet if cfg["architecture"] == "RRDBNet" else SRVGGNetCompact)(**reference_args(cfg))
        ref.load_state_dict(weights, strict=True)
        ref.eval()
        with torch.inference_mode():
            out = ref(x.clone()).contiguous()
            sp = sp_model.eval()(x.clone())
        diff = (out - sp).abs().max().item()
        assert diff == 0, f"{label}: spandrel and the reference differ by {diff}"
        clipped = ((out < 0) | (out > 1)).float().mean().item()
        print(f"{label}: in {tuple(x.shape)} out {tuple(out.shape)} mean {out.mean():.3f} std {out.std():.3f}"
              f" out of [0,1] {clipped:.1%}, spandrel == reference")
        return out

    for name, cfg in MODELS.items():
        sp_model, weights = make_weights(name, cfg)
        cases = [(name, cfg, weights, sp_model, SMALL)]
        if name == "rrdb_x4":  # the same weights rounded to float16, run in float32
            w16 = {k: v.half() for k, v in weights.items()}
            sp16 = spandrel_model(cfg)
            sp16.load_state_dict(spandrel_to_old_arch({k: v.float() for k, v in w16.items()}))
            cases.append((name + "_fp16", cfg, w16, sp16, SMALL))
        for case, c, w, spm, (h, wd, seed) in cases:
            image = make_image(h, wd, seed)
            out = run(c, {k: v.float() for k, v in w.items()}, spm, image, case)
            meta = {"config": json.dumps(c), "weights": str(w[next(iter(w))].dtype), "input": f"{h}x{wd}",
                    "seed": str(SEED[name]), "versions": versions}
            save_case(os.path.join(OUT, case), c, w, image, out, meta)
        if name in TILE:  # whole run on a larger input, for the engine's tiled path
            h, wd, seed = TILE[name]
            image = make_image(h, wd, seed)
            out = run(cfg, weights, sp_model, image, name + " tile")
            image.save(os.path.join(OUT, name, "tile_input.png"))
            quantize(out).save(os.path.join(OUT, name, "tile_expected.png"))

main()
