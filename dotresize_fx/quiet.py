"""The known library warnings that say nothing to a user of this tool, silenced at their source (--debug
shows everything): each entry names the library, the message and why it is noise here."""
from __future__ import annotations

import logging
import warnings

# (logger name, level at and above which it still speaks)
LOGGERS = {
    # torch.onnx looks up torchvision's ops for every export; this project never uses torchvision
    "torch.onnx._internal.exporter._registration": logging.ERROR,
}
# (message regex, category) for warnings.filterwarnings
WARNINGS = [
    # torch.export's own unflatten/pickle path still checks LeafSpec (torch 2.13); nothing a user can change
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
]
# messages onnxruntime's quantizer logs on the root logger on every call: a suggestion (shape inference and
# graph optimisation before quantizing), not a fault; the quantize pass measures its file's parity and perplexity
ROOT_MESSAGES = ("Please consider to run pre-processing before quantization",)


class _DropKnown(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ROOT_MESSAGES)


def silence_known() -> None:
    for name, level in LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for message, category in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    root = logging.getLogger()   # they are logged on the root logger itself: its own filter sees them
    if not any(isinstance(f, _DropKnown) for f in root.filters):
        root.addFilter(_DropKnown())
