"""The lines the CLI prints for a compress report (the passes and the job print nothing themselves)."""
from __future__ import annotations

from collections import Counter


def print_summary(r: dict) -> None:
    """What `compress` prints: parameters, perplexity, widths, fits, timings, ONNX and quantized files."""
    rows = [("", "before", "after"),
            ("parameters", f"{r['params_before'] / 1e6:.2f}M", f"{r['params_after'] / 1e6:.2f}M"),
            ("non-embedding", f"{r['nonembed_params_before'] / 1e6:.2f}M", f"{r['nonembed_params_after'] / 1e6:.2f}M")]
    if r["ppl_before"] is not None:
        rows.append(("perplexity", f"{r['ppl_before']:.3f}", f"{r['ppl_after']:.3f}"))
    for row in rows:
        print(f"{row[0]:<16}{row[1]:>12}{row[2]:>12}")
    print(f"widths: {r['widths']}")
    for p in r["passes"]:
        for line in p.get("rounding", []):
            print(f"rounded {line}")
        a = p.get("allocation")
        if a and "widths" in a:
            print(f"{p['method']} allocation {a['rule']}: {a['params_kept'] / 1e6:.2f}M parameters kept in the "
                  f"groups it spread (uniform {a['params_uniform'] / 1e6:.2f}M)")
        elif a:
            print(f"{p['method']} allocation {a['rule']}: {a['note']}")
        if p.get("untied"):
            print(f"untied: {', '.join(p['untied'])} (counted as non-embedding)")
        if "held_out_loss" in p:
            curve = p["held_out_loss"]
            print(f"{p['method']}: held-out {p['loss']} {curve[0]:.4g} -> {curve[p['best_epoch']]:.4g} "
                  f"(epoch {p['best_epoch']} kept of {len(curve) - 1} run; {p['train_s']:.0f} s)")
        if p.get("ls_reg"):
            picked = Counter(f"{v:g}" if isinstance(v, float) else v for v in p["ls_reg"].values())
            print(f"{p['method']} least squares, ridge λ picked on held-out calibration rows: "
                  + ", ".join(f"{k} ×{n}" for k, n in sorted(picked.items())))
    print(f"graph vs eager compressed model: max |d| {r['graph_check_max_abs_diff']:.2g}; "
          f"compress {r['timing']['compress_s']:.1f} s (calibration forwards {r['timing']['calib_forward_s']:.1f} s), "
          f"peak RSS {r['peak_rss_mb']:.0f} MB" + (f" ({r['peak_anon_mb']:.0f} MB of it the job's own, the rest "
                                                  "mapped weight files)" if r.get("offload") else ""))
    if r.get("out"):
        print(f"saved to {r['out']}")
    if r.get("onnx"):
        o = r["onnx"]
        line = f"ONNX {o['path']}: max |logits ORT - torch| {o['max_abs_diff']:.2g}"
        if "ppl_ort" in o:
            line += f", perplexity ORT {o['ppl_ort']:.3f} / torch {o['ppl_torch']:.3f}"
        if "latency_ratio" in o:
            line += f", latency compressed/dense {o['latency_ratio']:.2f} (FLOPs {o['flops_ratio']:.2f})"
        if "latency_bound" in o:
            line += f"; {bound_line(o)}"
        print(line)
        if o.get("generation"):
            g = o["generation"]
            print(f"KV cache: greedy tokens under onnxruntime equal torch's: {g['same_tokens']} ({g['tokens']} tokens "
                  f"x {g['batch']} rows); cached step max |d logits| {g['cached_step_max_abs_diff']:.2g}")
    if r.get("quantized"):
        q = r["quantized"]
        line = (f"{q['name']} {q['path']}: {q['quantized_nodes']}/{q['matmul_nodes']} MatMuls quantized, "
                f"{q['size_mb_before']:.1f} MB -> {q['size_mb_after']:.1f} MB")
        if "ppl_ort" in q:
            line += f", perplexity ORT {q['ppl_ort']:.3f}"
        print(line)
    for batch, files in r.get("decode", {}).items():
        print(f"decode tokens/s at {batch}: " + ", ".join(
            f"{name} {s['decode_tokens_per_s']:.1f} (±{100 * s['decode_spread']:.0f}%)" for name, s in files.items()))


def bound_line(o: dict) -> str:
    verdict = "within" if o["latency_within_bound"] else "ABOVE"
    return (f"ratio {o['latency_ratio']:.3f} {verdict} the bound {o['latency_bound']:.3f} "
            f"(non-embedding parameter ratio {o['param_ratio']:.3f} + 0.05)")
