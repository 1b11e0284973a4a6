"""The one skeleton of the stages that turn an ONNX artifact into another, graph by graph
(``optimize_onnx``, ``quantize_onnx``, ``prepare_tensorrt``, ``export_openvino``):

    t = GraphTransform(ctx, components=p.components)
    for comp in t.planned:
        if comp not in t.selected:
            t.copy(comp)
            continue
        model = transform(t.in_path(comp))          # the stage's own work
        t.save(comp, model, wanted="int8")          # I/O spec re-checked, precision read from the content
        t.check_parity(comp, p.parity)              # against the PyTorch reference (one loader, lazily)
    t.finish("quantize_onnx", details={...})        # metrics, model facts, ParityError if any gate failed

Precision labels come from what the saved graph holds (``io.weight_precision``), never from what was
asked: a component asked to be int8 whose weights stayed mostly fp32 is labelled fp32 and recorded in
``details.precision_warnings`` (a log warning too).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sdkiln.runtime.contract.errors import BuildError, UserError
from sdkiln.stages.common.onnx import components as oc
from sdkiln.stages.common.onnx import defaults as od
from sdkiln.stages.common.onnx import io as ou
from sdkiln.stages.common.onnx.parity import ParityParams, ParityReport, gate_for
from sdkiln.stages.engine.core import StageContext

logger = logging.getLogger(__name__)


class GraphTransform:
    """Plans the components of ``ctx.inputs["onnx"]`` against the PIPELINE ``ctx.inputs["model"]`` it was
    exported from, copies the non-model files, and keeps the per-component records of the stage."""

    def __init__(
        self,
        ctx: StageContext,
        components: list[str] | None,
        default: tuple[str, ...] | None = None,
        require_fp32: bool = False,
    ):
        self.ctx = ctx
        self.src = ctx.input("onnx")
        self.ref = ctx.input("model")
        self.fam, self.planned = oc.plan_exported(self.src, self.ref)
        if components is None and default is not None:
            self.selected = [c for c in self.planned if c.key in default or c.kind in default]
        else:
            self.selected = oc.select(self.planned, components)
        if require_fp32:
            not_fp32 = [c.key for c in self.selected if self.entry(c)["precision"] != "fp32"]
            if not_fp32:
                raise UserError(f"{ctx.stage.name} needs fp32 graphs; {not_fp32} are not fp32")
        self.static: dict[str, int] | None = self.src.model.static
        self.report = ParityReport()
        self.bytes: dict[str, int] = {}
        self.warnings: list[str] = []
        self._loaded: Any = None
        ou.copy_non_model_files(self.src.path, ctx.out_dir)

    # -- paths and entries --------------------------------------------------------------------------
    def entry(self, comp: oc.Component) -> dict[str, Any]:
        return self.src.components[comp.key]

    def in_path(self, comp: oc.Component) -> Path:
        return self.src.path / self.entry(comp)["path"]

    def out_path(self, comp: oc.Component) -> Path:
        return self.ctx.out_dir / self.entry(comp)["path"]

    @property
    def loaded(self) -> Any:
        """The reference PIPELINE in memory, loaded on first use."""
        if self._loaded is None:
            from sdkiln.stages.common.torch.pipeline import open_pipeline

            self._loaded = open_pipeline(self.ref.path, family=self.fam.name)
        return self._loaded

    # -- per component ------------------------------------------------------------------------------
    def copy(self, comp: oc.Component) -> None:
        """Carry a component over unchanged."""
        files = ou.copy_model(self.in_path(comp), self.out_path(comp))
        self.bytes[comp.key] = ou.files_bytes(files)
        self.ctx.components[comp.key] = self.entry(comp)

    def save(
        self, comp: oc.Component, model: Any, wanted: str | None = None, entry: dict[str, Any] | None = None
    ) -> list[Path]:
        """Save a transformed graph in the component's place, check that its I/O spec did not change
        (or is ``entry``'s, a stage's new manifest entry for it), and record it with the precision its
        weights hold (``wanted``: what the stage meant to make; a difference is recorded as a warning)."""
        entry = entry or self.entry(comp)
        files = ou.save_model(model, self.out_path(comp), "auto", restore=False)
        spec = ou.io_spec(model)
        problems = ou.spec_mismatches(spec, {k: entry[k] for k in ("inputs", "outputs")}, comp.key)
        self.record(comp, files, problems, ou.weight_precision(model), wanted, entry=entry)
        return files

    def record(
        self,
        comp: oc.Component,
        files: list[Path],
        problems: list[str],
        precision: tuple[str, dict[str, float]],
        wanted: str | None = None,
        path: str | None = None,
        entry: dict[str, Any] | None = None,
    ) -> None:
        """Record a saved model of any format (ONNX here; OpenVINO IR in ``export_openvino``): its I/O
        mismatches (a BuildError), its precision read from its content (``(label, shares)``) against
        ``wanted``, its bytes, and its manifest entry (``path`` when the file is not the ONNX one;
        ``entry``: a stage's new entry for it, default the input's)."""
        if problems:
            raise BuildError(f"{self.ctx.stage.name}: a graph changed its I/O:\n  " + "\n  ".join(problems))
        label, shares = precision
        if wanted is not None and label != wanted:
            msg = f"{comp.key}: asked for {wanted}, but its weights are {label} ({_shares(shares)})"
            self.warnings.append(msg)
            logger.warning("%s: %s", self.ctx.step_id, msg)
        self.bytes[comp.key] = ou.files_bytes(files)
        entry = {**(entry or self.entry(comp)), "precision": label, "weight_storage": shares}
        if path is not None:
            entry["path"] = path
        self.ctx.components[comp.key] = entry

    def check_parity(
        self,
        comp: oc.Component,
        parity: ParityParams,
        provider: str = "CPUExecutionProvider",
        session: Any = None,
    ) -> list[str]:
        """Gate the saved graph against the PyTorch reference at its recorded precision; ``session``
        runs it (default: ONNX Runtime on ``provider``; anything with ``get_outputs()`` and ``run``).
        Returns this component's failures (also collected in the report)."""
        module = oc.torch_graph(self.loaded, comp)
        cases = oc.parity_cases(
            module,
            comp,
            parity.batch_sizes,
            parity.image_sizes,
            parity.seed,
            self.fam.vae_scale_factor,
            self.static,
        )
        precision = self.ctx.components[comp.key]["precision"]
        sess = session if session is not None else ou.session(self.out_path(comp), provider)
        before = len(self.report.failures)
        self.report.check(comp.key, sess, cases, gate_for(comp.key, precision))
        if session is None:
            # A graph with optional ControlNet residuals must still mean "no ControlNet" when they are left
            # out (ONNX Runtime sessions: they list the overridable initializers).
            unfed = od.check_unfed(sess, cases[0].feeds, f"{self.ctx.stage.name} {comp.key}")
            if unfed:
                self.ctx.metrics.setdefault("optional_inputs", {})[comp.key] = unfed
        self.check_weights(comp)
        return self.report.failures[before:]

    def check_weights(self, comp: oc.Component) -> None:
        """Gate a saved ONNX graph's fp16/int8 weights against its fp32 source graph's (``weights``):
        output floors cannot see a single layer a few percent off under fp16 or int8 noise."""
        from sdkiln.stages.common.onnx.weights import weight_drift

        out, src = self.out_path(comp), self.in_path(comp)
        if out.suffix != ".onnx" or self.entry(comp)["precision"] != "fp32" or not out.is_file():
            return
        drift = weight_drift(out, src)
        if not drift.errors:
            return
        worst = drift.worst()
        self.report.results.setdefault(comp.key, {})["weights"] = {
            "max_rel_rms": {k: float(f"{v:.4g}") for k, v in worst.items()},
            "coverage": round(drift.coverage, 4),
        }
        self.report.failures += [f"{comp.key}: {f}" for f in drift.failures()[:5]]

    def below_floor(self, comp: oc.Component, failures: list[str]) -> dict[str, Any]:
        """Take a component's gate failures back out of the report (the stage replaces the component by
        its fp32 version and gates that instead); returns what the failed candidate measured, for the
        manifest's record of what was tried and did not pass."""
        self.report.failures = [f for f in self.report.failures if f not in failures]
        tried = self.report.results.pop(comp.key)
        return {"gate": tried["gate"], "worst": tried["worst"], "failures": failures}

    # -- the end --------------------------------------------------------------------------------------
    def finish(self, what: str, details: dict[str, Any] | None = None, parity: bool = True) -> None:
        """Record sizes, parity, model facts and details; raise the collected parity failures."""
        self.ctx.metrics.update({"bytes": self.bytes, "total_bytes": sum(self.bytes.values())})
        if parity:
            self.ctx.metrics["parity"] = self.report.metrics()
        self.ctx.model = self.src.model
        self.ctx.details.update(details or {})
        if self.warnings:
            self.ctx.details["precision_warnings"] = self.warnings
        self.report.raise_if_failed(what)


def _shares(shares: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0%}" for k, v in sorted(shares.items(), key=lambda kv: -kv[1])) or "no weights"
