"""One error type for everything the toolkit refuses, so the CLI can print it as one line; and the translation
of a resized model's own forward failing into one."""
from __future__ import annotations

import contextlib
from pathlib import Path


class DotResizeError(Exception):
    """A failure the user can act on: the message says what failed, why, and what to do."""


@contextlib.contextmanager
def resized_forward(method: str, analysis, targets):
    """Errors raised by the model's own forward once resized (not by this toolkit's code) become one
    DotResizeError that says why such a forward breaks and which graph constants encode the width."""
    try:
        yield
    except DotResizeError:
        raise
    except Exception as e:
        if _raised_by_toolkit(e):
            raise
        kinds = targets.kinds() if targets is not None else set(analysis.kinds())
        constants = [f"{c.node}[{c.index}] = {c.value} ({g.name})" for g in analysis.groups if g.kind in kinds
                     for c in g.constants][:3]
        where = f"; the graph encodes these widths as constants: {', '.join(constants)}" if constants else ""
        raise DotResizeError(
            f"the model no longer runs after {method} resized it ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}): its forward derives a width from something the "
            f"rewrite cannot see (a tensor's shape, a hard-coded number){where}; leave that width unchanged "
            "(--debug shows where)") from e


_TOOLKIT = (Path(__file__).resolve().parent, Path(__file__).resolve().parents[1] / "passes")


def _raised_by_toolkit(e: BaseException) -> bool:
    """Whether the error comes from this package's code (a bug of ours) rather than from a model's forward:
    going outward from where it was raised, the first frame that is either ours or some module's `forward`."""
    frames = []
    tb = e.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        path = Path(frame.f_code.co_filename).resolve()
        if any(root in path.parents for root in _TOOLKIT):
            return True
        if frame.f_code.co_name == "forward":
            return False
    return False
