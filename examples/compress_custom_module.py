"""Compress an nn.Module that is not a Hugging Face model, given as a factory `file.py:func`.

The analysis finds its groups from the graph (residual stream, MLP hidden widths); DOTResize merges them;
the model is resized as its captured program (its code is never touched), saved as `model.pt2` with a
resize plan and reloaded with `dotresize_fx.load(dir)`.

    python examples/compress_custom_module.py --out /tmp/audio
"""
import argparse
import sys
from pathlib import Path

import torch

from dotresize_fx.analyze import analyze
from dotresize_fx.compress import Job, PassSpec, run
from dotresize_fx.load import load

FACTORY = str(Path(__file__).with_name("factories.py")) + ":audio_encoder"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=FACTORY)
    p.add_argument("--passes", default="dotresize:mlp=0.25,residual=0.25")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    model, _, inputs = load(args.model)
    print(analyze(model, inputs).table())
    report = run(Job(args.model, PassSpec.parse(args.passes), data="random", calib_samples=8, out=args.out,
                     overwrite=True, evaluate=False, progress=False))
    reloaded = load(args.out).model
    with torch.no_grad():
        same = torch.equal(reloaded(*inputs), report["_model"](*inputs))
        change = (report["_model"](*inputs) - model(*inputs)).abs().max().item()
    print(f"widths {report['widths']}; parameters {report['params_before']:,} -> {report['params_after']:,}; "
          f"max output change {change:.3g}; reload from plan: {'identical' if same else 'DIFFERENT'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
