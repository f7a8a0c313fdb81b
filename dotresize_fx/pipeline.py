"""Width passes (shape of torch.fx.passes.infra: PassBase → PassResult): one construction path for all.

A width pass turns calibration statistics into one WidthMap per group (`group_map`), optionally refits the
consumers on real activations (`refit`), and `rewrite.apply` does the rest. Calibrate → map → refit → apply
runs the same way for every model: groups that span blocks (the residual stream) first, from statistics of
the whole model; then block by block, each block's statistics taken on inputs that the already resized blocks
produce (DESIGN §5.6). A model whose blocks do not chain is one block.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from tqdm.auto import tqdm

from .allocate import allocate
from .blocks import BlockRunner, Blocks, blocks
from .calibrate import Calibration, Stats, collect_stats, observing
from .errors import DotResizeError
from .foldbn import fold_batch_norms
from .groups import Analysis, WidthGroup
from .maps import WidthMap
from .outputs import model_outputs
from .refit import refit_consumer
from .refit_residual import refit_readers
from .rewrite import apply, finalize
from .stages import prefix_stages, projected
from .targets import WidthPlan, plan_widths

log = logging.getLogger(__name__)


def probe_output(model: torch.nn.Module, probe: tuple) -> torch.Tensor:
    with torch.no_grad():
        return model_outputs(model, probe)


class WidthPass(PassBase):
    """Base of prune / dotresize / pca: `group_map()` is the method; planning, order, refit and rewriting
    are shared. `config` is the pass's frozen config dataclass (with `targets`); `batches` are tuples of model
    inputs for calibration; `probe` a fixed input batch on which the output change is measured; `progress`
    shows a bar over the blocks."""

    name = "width"
    Config: type
    keep_maps = False   # keep every WidthMap's matrices in `maps` (tests replay them); else only their widths

    def __init__(self, config, analysis: Analysis, probe: tuple, batches, progress: bool = False,
                 layerwise: bool = True, device: str = "cpu", inplace: bool = False, offload=None):
        super().__init__()
        if not batches:
            raise DotResizeError(f"{self.name}: calibration batches are needed (tuples of model inputs); "
                                 "give data (--data, or batches=[...])")
        self.config, self.targets = config, config.targets
        self.analysis, self.probe, self.batches = analysis, probe, batches
        self.progress, self.layerwise, self.device, self.offload = progress, layerwise, device, offload
        # in place: no second copy of the weights (the caller keeps no use for the dense model); a refit toward
        # the dense model's own activations needs it, so that one still copies
        self.inplace = inplace and getattr(config, "ls_target", "current") != "dense" and \
            not self.targets.residual_refit
        self.report: dict = {}

    @classmethod
    def build(cls, config, context) -> "WidthPass":
        """The pass a compress job runs (`passes.PassContext`)."""
        return cls(config, context.analysis, context.inputs, context.batches, context.progress, context.layerwise,
                   context.device, inplace=context.inplace, offload=context.offload)

    def group_map(self, model: torch.nn.Module, g: WidthGroup, m: int, kv_after: int | None,
                  stats: Stats | None) -> WidthMap:
        raise NotImplementedError

    def refits(self, g: WidthGroup) -> bool:
        """Whether the group's consumers are refitted on real activations (`refit`)."""
        return False

    def record_ls(self, g: WidthGroup, lam: float) -> None:
        """The ridge λ each least-squares fit chose (relative; ∞: the fit kept the pass's own map)."""
        self.report.setdefault("ls_reg", {})[g.name] = lam if math.isfinite(lam) else "prior"

    def requires(self, model: torch.nn.Module) -> None:
        """The analysis must describe this model: every member parameter there, with the analysed width."""
        params = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
        for g in self.analysis.groups:
            for m in g.members:
                if m.param not in params:
                    raise DotResizeError(f"{self.name}: the analysis is of another model (no {m.param} here): "
                                         "analyse this model first")
                if m.role != "index" and params[m.param].shape[m.dim] < m.offset + (m.length or g.size * g.unit):
                    raise DotResizeError(f"{self.name}: the analysis is of another model ({m.param} dim {m.dim} "
                                         f"is {params[m.param].shape[m.dim]} wide): analyse this model first")

    def call(self, model: torch.nn.Module) -> PassResult:
        heads = {g.size for g in self.analysis.by_kind("heads")}
        # a stock config needs hidden_size % heads == 0; per-layer maps are saved in our format, which does not
        stock = hasattr(model, "config") and len(heads) == 1 and self.targets.residual_maps == "global"
        stock_multiple = heads.pop() if stock else 1
        targets = self.targets.budget_targets(model, self.analysis)
        plan = plan_widths(self.analysis, targets, stock_multiple, where=self.name)
        self.report["rounding"], self.report["skipped"] = plan.rounding, plan.skipped
        if self.targets.budget is not None:
            self.report["budget"] = {"fraction": self.targets.budget, "mlp_fraction": targets.mlp}
        if self.targets.allocation != "uniform":
            self._allocate(model, plan, targets.mlp if self.targets.budget is not None else None)
        reference = probe_output(model, self.probe)   # the dense output on the probe: all that is kept of it
        new = model if self.inplace else self.offload.copy(model) if self.offload else copy.deepcopy(model)
        if self.targets.fold_bn:
            self.report["folded_bn"] = fold_batch_norms(new, self.analysis)
        order = blocks(new, self.analysis, self.batches, self.layerwise)
        if not order.whole:
            self.report["layerwise"] = True
        elif self.layerwise:
            self.report["layerwise_skipped"] = "the model's blocks do not chain (residual added outside them)"
        maps, untied, notes = self._spanning(model, new, plan, order)
        maps.update(self._blockwise(model, new, plan, order))
        self.maps = maps
        rewrite = finalize(new, self.analysis, maps)
        self.report.update(widths=rewrite.widths, untied=untied + rewrite.untied, config=rewrite.config,
                           stock=rewrite.stock, notes=notes + rewrite.notes,
                           probe_max_abs_diff=(reference - probe_output(new, self.probe)).abs().max().item(),
                           inplace=self.inplace)  # the probe change is measured, not asserted: lossy
        return PassResult(new, True)

    def _allocate(self, model, plan: WidthPlan, budget_fraction: float | None) -> None:
        """Spread the plan's MLP and heads units by measured sensitivity, on the dense model."""
        order = blocks(model, self.analysis, self.batches, self.layerwise)
        report = allocate(model, self.analysis, plan, self.targets.allocation, self.batches, order,
                          getattr(self.config, "importance", "act_weight"), self.targets.round_to, self.device,
                          budget_fraction)
        self._count_forward(report.pop("forward_s", 0.0))
        self.report["allocation"] = report
        if "widths" in report:   # the uniform plan's rounding was only the reference
            self.report["rounding"] = []

    def _spanning(self, model, new, plan: WidthPlan, order: Blocks):
        """Groups that span the blocks (and the residual stream): mapped from whole-model statistics first."""
        names = [n for n in plan.widths if order.index(self.analysis.group(n)) is None
                 or self.analysis.group(n).kind == "residual"]
        if not names:
            return {}, [], []
        per_layer = self.targets.residual_maps == "per_layer"
        if per_layer and order.whole:
            raise DotResizeError("per_layer residual maps need blocks that chain (hidden = block(hidden)); "
                                 "use residual_maps=global")
        cal = collect_stats(new, self.analysis, self.batches, names, progress=False)
        self._count_forward(cal.forward_s)
        maps = {n: self._spanning_map(new, self.analysis.group(n), *plan.widths[n], cal, order) for n in names}
        simulated = {n: self._simulated(new, n, maps[n], order) for n in names if maps[n].stages}
        _, first = apply(new, self.analysis, maps, inplace=True, finalize=False)
        if self.offload is not None:   # the stream's readers and writers in every block: back to disk
            self.offload.store(new)
        for name, want in simulated.items():   # measured, not asserted: exact only where readers rebuild Q·Qᵀ
            self.report.setdefault("per_layer_vs_simulated_prefix", {})[name] = \
                (probe_output(new, self.probe) - want).abs().max().item()
        if self.targets.residual_refit:
            for g in (self.analysis.group(n) for n in names if self.analysis.group(n).kind == "residual"):
                lams, seconds = refit_readers(new, model, g, order, self.batches, getattr(self.config, "ls_reg", 1e-4),
                                              self.device, self.offload)
                self._count_forward(seconds)
                self.report.setdefault("residual_refit", {}).update(
                    {norm: lam if math.isfinite(lam) else "prior" for norm, lam in lams.items()})
        return self._kept(maps), first.untied, first.notes

    def _simulated(self, model, name: str, w: WidthMap, order: Blocks) -> torch.Tensor:
        """The probe's output with the stream projected as the per-layer map carries it (`stages.projected`),
        which the bases were computed on and the rewrite should reproduce."""
        with projected(model, self.analysis.group(name), order, w.stages):
            return probe_output(model, self.probe)

    def _kept(self, maps: dict[str, WidthMap]) -> dict:
        """Applied maps as the pass keeps them: their widths only, so memory does not grow block by block."""
        return maps if self.keep_maps else {n: w.applied() for n, w in maps.items()}

    def _spanning_map(self, model, g: WidthGroup, m, kv, cal: Calibration, order: Blocks) -> WidthMap:
        """One map, or for a per_layer residual one per block plus the last, each calibrated on the stream the
        resized blocks before it carry (`stages.prefix_stages`)."""
        w = self.group_map(model, g, m, kv, cal.stats.get(g.name))
        if g.kind != "residual" or self.targets.residual_maps == "global":
            return w
        w.stages, seconds = prefix_stages(model, self.analysis, g, order, self.batches,
                                          lambda stats: self.group_map(model, g, m, kv, stats), self.device)
        w.stage_prefix = order.prefix
        self._count_forward(seconds)
        return w

    def _blockwise(self, model, new, plan: WidthPlan, order: Blocks) -> dict[str, WidthMap]:
        inside = {n: order.index(self.analysis.group(n)) for n in plan.widths
                  if self.analysis.group(n).kind != "residual"}
        inside = {n: b for n, b in inside.items() if b is not None}
        maps: dict[str, WidthMap] = {}
        runner = BlockRunner(new, order, self.batches, self.device, self.offload)
        dense = self._dense_runner(model, order, inside)
        bar = tqdm(total=len(order.modules), desc=f"{self.name} block by block", unit="block", leave=False,
                   disable=not self.progress)
        for b in range(len(order.modules)):
            names = [n for n, blk in inside.items() if blk == b]
            with runner.onloaded(b), (dense[1].onloaded(b) if dense else contextlib.nullcontext()):
                if names:
                    cal = Calibration()
                    with observing(new, self.analysis, names, cal):
                        runner.run(b)
                    cal.reduce()
                    block_maps = {n: self._map_and_refit(new, n, plan, cal.stats[n], runner, b, dense)
                                  for n in names}
                    apply(new, self.analysis, block_maps, inplace=True, finalize=False)
                    maps.update(self._kept(block_maps))
                runner.advance(b)
                if dense is not None:
                    dense[1].advance(b)
            bar.update()
        bar.close()
        self._count_forward(runner.forward_s + (dense[1].forward_s if dense else 0.0))
        return maps

    def _count_forward(self, seconds: float) -> None:
        self.report["calib_forward_s"] = self.report.get("calib_forward_s", 0.0) + seconds

    def _map_and_refit(self, new, name, plan, stats, runner, b, dense) -> WidthMap:
        g = self.analysis.group(name)
        w = self.group_map(new, g, *plan.widths[name], stats)
        if self.refits(g):
            w, lam = refit_consumer(new, self.analysis, g, w, runner, b, self.config.ls_reg, dense)
            self.record_ls(g, lam)
        return w

    def _dense_runner(self, model, order: Blocks, inside: dict):
        """The dense model's own block inputs, for refits that target the dense model's activations."""
        if getattr(self.config, "ls_target", "current") != "dense" or not any(
                self.refits(self.analysis.group(n)) for n in inside):
            return None
        dense_order = Blocks(order.prefix, list(model.get_submodule(order.prefix)) if order.prefix else [model])
        return model, BlockRunner(model, dense_order, self.batches, self.device)
