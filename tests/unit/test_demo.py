"""The demo: its verdict on decode speed and its plot (on a report written here), and a quiet log."""
import struct

from dotresize_fx.demo import _verdict, plot


def _report(dense: float, shipped: float, spread: float) -> dict:
    speed = {"dense": {"decode_tokens_per_s": dense, "decode_spread": spread, "prefill_tokens_per_s": 100.0},
             "compressed": {"decode_tokens_per_s": dense * 1.05, "decode_spread": spread,
                            "prefill_tokens_per_s": 110.0},
             "compressed int4": {"decode_tokens_per_s": shipped, "decode_spread": spread,
                                 "prefill_tokens_per_s": 90.0}}
    return {"decode": {"batch1": speed, "batch8": speed}, "quantized": {"scheme": "int4", "name": "int4", "path": "m.int4.onnx",
            "ppl_ort": 31.0}, "onnx": {"path": "m.onnx", "ppl_ort": 30.0}, "params_before": 134.5e6,
            "params_after": 124.6e6, "ppl_before": 24.7}


def test_speed_up_counts_only_beyond_the_run_to_run_spread():
    assert "1.50x the dense float file, beyond the run-to-run spread (10%)" in _verdict(_report(20.0, 30.0, 0.1))
    assert "1.05x the dense float file, NOT beyond the run-to-run spread (10%)" in _verdict(_report(20.0, 21.0, 0.1))


def test_plot_is_a_png_of_the_figure_size(tmp_path):
    path = plot(_report(20.0, 30.0, 0.1), tmp_path / "summary.png")
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (1000, 400)   # 10 × 4 inches at 100 dpi
    assert not list(tmp_path.glob(".*"))                          # written atomically: no temporary left


def test_known_library_noise_is_dropped_and_other_messages_are_not():
    """onnxruntime's quantizer suggestion goes to the root logger before any handler exists; the root
    logger's own filter drops it, and nothing else."""
    import logging
    from dotresize_fx.quiet import silence_known
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    silence_known()
    logging.getLogger().addHandler(handler)
    try:
        logging.warning("Please consider to run pre-processing before quantization. Refer to example: ...")
        logging.warning("a warning a user should see")
    finally:
        logging.getLogger().removeHandler(handler)
    assert seen == ["a warning a user should see"]
