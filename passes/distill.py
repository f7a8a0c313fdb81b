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
the model is returned unchanged). So the pass cannot make the held-out loss worse, and it trains only on the
calibration split; it never sees labels, only the teacher, so it cannot fit the domain past what the dense
model knows.
"""
from __future__ import annotations

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

    def __post_init__(self):
        if self.epochs < 1 or self.top_k < 1 or (self.samples is not None and self.samples < 1):
            raise DotResizeError(f"distill epochs={self.epochs}, top_k={self.top_k}, samples={self.samples}: "
                                 "use integers ≥ 1")
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
    if model_dtype(model) != torch.float32:
        raise DotResizeError(f"distill trains float32 weights, the model is {model_dtype(model)}: "
                             "compress with --dtype float32, or leave distill out")


class DistillPass(PassBase):
    """`call(model)` trains `model` in place toward `targets` (from `teacher_targets` on the dense model) on
    `batches`, the same calibration batches in the same order."""

    name = "distill"
    Config = DistillConfig

    def __init__(self, config: DistillConfig, targets: list, batches: list, device: str = "cpu", progress=True):
        super().__init__()
        self.config, self.targets, self.batches, self.device, self.progress = config, targets, batches, device, progress
        self.report: dict = {}

    def requires(self, model: torch.nn.Module) -> None:
        check_trainable(model, self.batches)

    def call(self, model: torch.nn.Module) -> PassResult:
        cfg, t0 = self.config, time.perf_counter()
        held = self._held()
        train = [i for i in range(len(self.batches)) if i not in held]
        params = trained_parameters(model, cfg.params)
        home = next(model.parameters()).device
        model.to(self.device)
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        try:
            curve, best_epoch = self._train(model, params, train, held)
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)
                p.grad = None
            model.to(home).eval()
        self.report.update(held_out_loss=curve, best_epoch=best_epoch, loss=cfg.loss, lr=cfg.lr,
                           trained_params=sum(p.numel() for p in params), train_batches=len(train),
                           held_out_batches=len(held), train_s=time.perf_counter() - t0)
        return PassResult(model, best_epoch > 0)

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
                loss = batch_loss(model, self._on_device(train[i]), self._target(train[i]), self.config.loss)
                opt.zero_grad(set_to_none=True)
                loss.backward()
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
        """The model returned is the best epoch's: its held-out loss is the one the curve recorded."""
        home = next(model.parameters()).device
        model.to(self.device)
        try:
            again = self._held_out(model, self._held())
        finally:
            model.to(home).eval()
        want = self.report["held_out_loss"][self.report["best_epoch"]]
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
