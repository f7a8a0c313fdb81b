"""The distill pass: after a width pass, train the compressed model toward the dense model's outputs on the
calibration windows (knowledge distillation; the recovery step ModelOpt and llm-compressor offer after pruning).

The teacher is the model as it was loaded, before any width pass: its output distribution on every calibration
token is kept as its top-k probabilities and the mass of the rest (`teacher_targets`), so no dense copy of the
weights stays in memory. The loss is the KL divergence between teacher p and student q coarse-grained to those
k tokens plus one bucket for the rest (exact when k covers the output; a lower bound of the full KL otherwise):

    KL = Σ_{i∈K} p_i log(p_i / q_i) + p_R log(p_R / q_R),   p_R = 1 − Σ_{i∈K} p_i,  q_R = 1 − Σ_{i∈K} q_i

`loss=mse` matches the outputs themselves instead (for models whose output is not a distribution).
Every 4th calibration batch is held out; the held-out loss is measured before training and after every epoch,
training stops at the first epoch that does not lower it, and the weights of the best epoch are kept (none:
the model is returned unchanged). A bfloat16 or float16 model trains float32 master weights (a step of lr 2e-5
is below bfloat16's resolution) and is cast back at the end; its held-out loss is measured again in its own
dtype, and if the cast undid the gain, the weights it came with are returned. So the pass cannot make the
held-out loss worse, and it trains only on the calibration split; it never sees labels, only the teacher, so it cannot fit the domain past what the dense
model knows.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Literal

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from tqdm.auto import tqdm

from dotresize_fx import dist
from dotresize_fx.errors import DotResizeError
from dotresize_fx.load import model_dtype
from dotresize_fx.outputs import model_outputs

HOLD_EVERY = 4


@dataclass(frozen=True)
class DistillConfig:
    epochs: int = 3             # at most; stops at the first epoch that does not lower the held-out loss
    lr: float = 2e-5            # AdamW (SmolLM2: 1e-4 raises the held-out loss from the first epoch)
    params: Literal["blocks", "all"] = "blocks"   # blocks: all but the input embedding (and a head tied to it)
    loss: Literal["kl", "mse"] = "kl"
    top_k: int = 64             # kl: teacher tokens kept per position (the rest is one bucket)
    samples: int | None = None  # calibration windows to train on (default: the job's --calib-samples)
    micro_batch: int = 1        # sequences per forward and backward; each step still averages the whole batch

    def __post_init__(self):
        if min(self.epochs, self.top_k, self.micro_batch, 1 if self.samples is None else self.samples) < 1:
            raise DotResizeError(f"distill epochs={self.epochs}, top_k={self.top_k}, samples={self.samples}, "
                                 f"micro_batch={self.micro_batch}: use integers ≥ 1")
        if not 0 < self.lr < 1:
            raise DotResizeError(f"distill lr={self.lr}: use a learning rate in (0, 1), e.g. 2e-5")


def teacher_targets(model: torch.nn.Module, batches: list, config: DistillConfig) -> list:
    """Per batch, what the loss compares the student with: (top-k log-probabilities, their indices) for `kl`,
    the outputs for `mse`."""
    out = []
    with torch.no_grad():   # not inference mode: the targets enter the autograd graph of the loss
        for batch in batches:
            y = model_outputs(model, batch).float()
            if config.loss == "mse":
                out.append(y)
                continue
            logp, idx = torch.log_softmax(y, -1).topk(min(config.top_k, y.shape[-1]), -1)
            out.append((logp, idx))
    return out


def coarse_kl(logits: torch.Tensor, top_logp: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
    """Per position, KL(p ‖ q) on the teacher's top-k tokens plus the rest (module docstring); q = softmax(logits)."""
    logits = logits.float()
    norm = torch.logsumexp(logits, -1)
    logq_k = logits.gather(-1, top_idx) - norm[..., None]
    p_k = top_logp.exp()
    kl = (p_k * (top_logp - logq_k)).sum(-1)
    if top_idx.shape[-1] == logits.shape[-1]:   # k covers the output: there is no rest
        return kl
    p_r = (1 - p_k.sum(-1)).clamp_min(0)
    logq_r = torch.logsumexp(logits.scatter(-1, top_idx, float("-inf")), -1) - norm
    return kl + torch.where(p_r > 0, p_r * (torch.log(p_r.clamp_min(1e-30)) - logq_r), torch.zeros_like(p_r))


def batch_loss(model, batch: tuple, target, loss: str) -> torch.Tensor:
    y = model_outputs(model, batch)
    if loss == "mse":
        return (y.float() - target).pow(2).mean()
    return coarse_kl(y, *target).mean()


def micro_batches(batch: tuple, target, size: int):
    """(piece of the batch, its targets, its share of the batch) for pieces of `size` sequences: the activations a
    backward pass keeps grow with the piece, not the batch, and Σ share·loss(piece) is the batch's mean loss."""
    n = next(x for x in batch if isinstance(x, torch.Tensor)).shape[0]
    for s in range(0, n, size):
        piece = tuple(x[s:s + size] if isinstance(x, torch.Tensor) else x for x in batch)
        t = target[s:s + size] if isinstance(target, torch.Tensor) else tuple(x[s:s + size] for x in target)
        yield piece, t, min(size, n - s) / n


def trained_parameters(model: torch.nn.Module, which: str) -> list[torch.nn.Parameter]:
    """The floating-point parameters `params` names, each once (a tied head is its embedding)."""
    skip = set()
    if which == "blocks" and hasattr(model, "get_input_embeddings"):
        skip = {id(p) for p in model.get_input_embeddings().parameters()}
    unique = {id(p): p for p in model.parameters() if p.is_floating_point()}
    return [p for i, p in unique.items() if i not in skip]


def check_trainable(model: torch.nn.Module, batches: list) -> None:
    """What distill needs, checked before the width passes run (and again before it trains)."""
    if dist.world_size() > 1:
        raise DotResizeError("distill runs in one process: start the job without torchrun, or leave distill out")
    if len(batches) < HOLD_EVERY:
        raise DotResizeError(f"distill holds out every {HOLD_EVERY}th calibration batch and got {len(batches)}: "
                             f"raise --calib-samples (or distill samples=) to {HOLD_EVERY}×--batch-size or more")


@contextlib.contextmanager
def trainable(model: torch.nn.Module, params: list[torch.nn.Parameter]):
    """Only `params` require gradients, in float32 (master weights); afterwards every parameter has its own dtype
    and flag again, and no gradient is left."""
    saved = [(p, p.requires_grad, p.dtype) for p in model.parameters()]
    for p, _, dtype in saved:
        p.requires_grad_(False)
        if dtype.is_floating_point:
            p.data = p.data.float()
    for p in params:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag, dtype in saved:
            p.grad = None
            p.data = p.data.to(dtype)
            p.requires_grad_(flag)


class DistillPass(PassBase):
    """`call(model)` trains `model` in place toward `targets` (from `teacher_targets` on the dense model) on
    `batches`, the same calibration batches in the same order."""

    name = "distill"
    Config = DistillConfig

    def __init__(self, config: DistillConfig, targets: list, batches: list, device: str = "cpu", progress=True):
        super().__init__()
        self.config, self.targets, self.batches, self.device, self.progress = config, targets, batches, device, progress
        self.report: dict = {}

    @classmethod
    def build(cls, config: DistillConfig, context) -> "DistillPass":
        """The pass a compress job runs: `context.teacher` holds the dense model's targets and their batches."""
        if context.teacher is None:
            raise DotResizeError("distill needs the dense model's outputs, taken before the width passes ran: "
                                 "run it through compress (--passes \"prune:mlp=0.25 distill\")")
        return cls(config, *context.teacher, context.device, context.progress)

    def requires(self, model: torch.nn.Module) -> None:
        check_trainable(model, self.batches)

    def call(self, model: torch.nn.Module) -> PassResult:
        cfg, t0 = self.config, time.perf_counter()
        held = self._held()
        train = [i for i in range(len(self.batches)) if i not in held]
        params = trained_parameters(model, cfg.params)
        home, dtype = next(model.parameters()).device, model_dtype(model)
        model.to(self.device)
        try:
            given = None if dtype == torch.float32 else ([p.detach().clone() for p in params],
                                                         self._held_out(model, held))
            with trainable(model, params):
                curve, best_epoch = self._train(model, params, train, held)
            if given is not None:
                best_epoch = self._in_own_dtype(model, params, held, given, best_epoch)
        finally:
            model.to(home).eval()
        self.report.update(held_out_loss=curve, best_epoch=best_epoch, loss=cfg.loss, lr=cfg.lr,
                           micro_batch=cfg.micro_batch, trained_params=sum(p.numel() for p in params),
                           train_batches=len(train), held_out_batches=len(held), train_s=time.perf_counter() - t0)
        return PassResult(model, best_epoch > 0)

    def _in_own_dtype(self, model, params, held: list[int], given: tuple, best_epoch: int) -> int:
        """Cast back to a lower precision: the held-out loss again, in that dtype; the weights the model came
        with if the cast undid the gain. The best epoch (0: those weights)."""
        weights, before = given
        after = self._held_out(model, held) if best_epoch else before
        if after >= before:
            with torch.no_grad():
                for p, w in zip(params, weights):
                    p.copy_(w)
            after, best_epoch = before, 0
        self.report["held_out_loss_in_dtype"] = {"dtype": str(model_dtype(model)).removeprefix("torch."),
                                                 "before": before, "after": after, "master_weights": "float32"}
        return best_epoch

    def _train(self, model, params, train: list[int], held: list[int]) -> tuple[list[float], int]:
        opt = torch.optim.AdamW(params, lr=self.config.lr, weight_decay=0.0)
        order = torch.Generator().manual_seed(0)
        best, best_epoch = [p.detach().clone() for p in params], 0
        curve = [self._held_out(model, held)]
        bar = tqdm(total=self.config.epochs * len(train), desc="distill", unit="batch", disable=not self.progress,
                   leave=False)
        for epoch in range(1, self.config.epochs + 1):
            model.train()
            for i in torch.randperm(len(train), generator=order).tolist():
                opt.zero_grad(set_to_none=True)
                for piece, target, share in micro_batches(self._on_device(train[i]), self._target(train[i]),
                                                          self.config.micro_batch):
                    (batch_loss(model, piece, target, self.config.loss) * share).backward()
                opt.step()
                bar.update()
            curve.append(self._held_out(model, held))
            if curve[-1] >= min(curve[:-1]):
                break
            for b, p in zip(best, params):
                b.copy_(p.detach())
            best_epoch = epoch
        bar.close()
        with torch.no_grad():
            for p, b in zip(params, best):
                p.copy_(b)
        return curve, best_epoch

    def ensures(self, model: torch.nn.Module) -> None:
        """The model returned is the best epoch's: its held-out loss is the one the curve recorded (in a lower
        precision: the one measured after the cast)."""
        home = next(model.parameters()).device
        model.to(self.device)
        try:
            again = self._held_out(model, self._held())
        finally:
            model.to(home).eval()
        own = self.report.get("held_out_loss_in_dtype")
        want = own["after"] if own else self.report["held_out_loss"][self.report["best_epoch"]]
        if abs(again - want) > 1e-6 * max(abs(want), 1e-12):
            raise DotResizeError(f"distill: the returned weights give held-out loss {again:.6g}, the best epoch "
                                 f"measured {want:.6g}; the restore failed (please report this)")

    def _held(self) -> list[int]:
        """The held-out batches: every HOLD_EVERY-th."""
        return list(range(HOLD_EVERY - 1, len(self.batches), HOLD_EVERY))

    def _held_out(self, model, held: list[int]) -> float:
        model.eval()
        with torch.no_grad():
            return sum(batch_loss(model, self._on_device(i), self._target(i), self.config.loss).item()
                       for i in held) / len(held)

    def _on_device(self, i: int) -> tuple:
        return tuple(x.to(self.device) if isinstance(x, torch.Tensor) else x for x in self.batches[i])

    def _target(self, i: int):
        t = self.targets[i]
        return t.to(self.device) if isinstance(t, torch.Tensor) else tuple(x.to(self.device) for x in t)
