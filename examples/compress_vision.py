"""Compress vision models that are not Hugging Face models, written as timm and torchvision write them
(`examples/vision_models.py`), without touching their code: a ResNet's conv channels and a ViT's heads and MLP.

Each is given as a factory `file.py:func`, resized as its captured program, saved (`OUT/model.pt2`), reloaded
and exported to ONNX with parity checked under onnxruntime; parameters and FLOPs are printed before and after.

    python examples/compress_vision.py --out /tmp/vision
"""
import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dotresize_fx.compress import Job, PassSpec, run
from dotresize_fx.load import load

MODELS = str(Path(__file__).with_name("vision_models.py"))
JOBS = {"resnet": "prune:channels=0.25,round_to=4", "vit": "dotresize:heads=0.25,mlp=0.25"}


def flops(model, inputs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    ok = True
    for name, passes in JOBS.items():
        spec, out = f"{MODELS}:{name}", Path(args.out) / name
        dense, _, inputs = load(spec)
        report = run(Job(spec, PassSpec.parse(passes), data="random", calib_samples=8, out=str(out),
                         overwrite=True, evaluate=False, progress=False, onnx=True))
        reloaded = load(out).model
        with torch.no_grad():
            same = torch.equal(reloaded(*inputs), report["_model"](*inputs))
        f0, f1 = flops(dense, inputs), flops(reloaded, inputs)
        print(f"{name}: {passes} ({report['rewrite_path']} path); widths {report['widths']}\n"
              f"  parameters {report['params_before']:,} -> {report['params_after']:,}; FLOPs {f0:,} -> {f1:,} "
              f"({f1 / f0:.2f}); ONNX parity {report['onnx']['max_abs_diff']:.2g}; reload "
              f"{'identical' if same else 'DIFFERENT'}")
        ok &= same and report["onnx"]["max_abs_diff"] < 1e-4
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
