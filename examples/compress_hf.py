"""Compress a Hugging Face causal LM with DOTResize and reload it with stock transformers.

    python examples/compress_hf.py --model smollm2-135m --out out/smollm2-dot        # the embedded model
    python examples/compress_hf.py --out /tmp/tiny                                     # a tiny random Llama
"""
import argparse
import sys
from pathlib import Path

import torch

from dotresize_fx.compress import Job, PassSpec, run

TINY = str(Path(__file__).with_name("factories.py")) + ":tiny_llama"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default=TINY)
    p.add_argument("--passes", default="dotresize:mlp=0.25")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    tiny = args.model == TINY
    job = Job(args.model, PassSpec.parse(args.passes), data="random" if tiny else "sotu",
              calib_samples=4 if tiny else 32, seq_len=256, eval_tokens=4096, out=args.out, overwrite=True)
    report = run(job)
    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(args.out).eval()
    ids = report["_model"].config.vocab_size
    x = torch.randint(0, ids, (1, 12))
    with torch.no_grad():
        same = torch.equal(reloaded(x).logits, report["_model"](x).logits)
    print(f"non-embedding parameters {report['nonembed_params_before']:,} -> {report['nonembed_params_after']:,}; "
          f"perplexity {report['ppl_before']} -> {report['ppl_after']}; reloaded with from_pretrained: "
          f"{'identical logits' if same else 'DIFFERENT logits'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
