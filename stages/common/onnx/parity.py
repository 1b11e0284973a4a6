"""The parity harness of the ONNX stages: fixed inputs with their PyTorch reference outputs
(``ParityCase``), run through an ONNX Runtime session and compared with the contract's ``compare()``
against the contract's gate for each component and precision; every failure is collected and raised
once (``ParityReport.raise_if_failed``).

    report = ParityReport()
    report.check("unet", cpu_session(path), cases, gate_for("unet", "fp32"))
    report.raise_if_failed("export_onnx")   # ParityError listing every failure
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import Field, model_validator

from sdkiln.runtime.contract.errors import BuildError, ParityError
from sdkiln.runtime.contract.floors import Gate
from sdkiln.runtime.contract.floors import gate as contract_gate
from sdkiln.runtime.contract.metrics import compare, rounded, worst
from sdkiln.stages.engine.core import StageParams


class ParityParams(StageParams):
    """Fixed inputs of the parity gate: every batch size at every image size (pixels, square)."""

    batch_sizes: list[int] = Field(default=[1, 2], min_length=1)
    image_sizes: list[int] = Field(default=[64, 128], min_length=1)
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> ParityParams:
        bad_b = [b for b in self.batch_sizes if b < 1]
        if bad_b:
            raise ValueError(f"batch_sizes must be >= 1 (got {bad_b})")
        bad = [s for s in self.image_sizes if s < 8 or s % 8]
        if bad:
            raise ValueError(f"image_sizes must be positive multiples of 8 (got {bad})")
        return self


@dataclass
class ParityCase:
    """Fixed inputs of one graph and the PyTorch reference outputs for them."""

    label: str  # e.g. "b2_64px"
    feeds: dict[str, Any]  # graph input name -> numpy array
    expected: dict[str, Any]  # graph output name -> numpy array (fp32 PyTorch reference)


@dataclass
class ParityReport:
    """Parity results of every component checked by a stage; failures collected, raised once."""

    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def check(self, component: str, sess: Any, cases: list[ParityCase], gate: Gate) -> dict[str, Any]:
        """Run every case through ``sess`` and compare each output with the reference."""
        names = [o.name for o in sess.get_outputs()]
        entry: dict[str, Any] = {"gate": gate.as_dict(), "cases": {}}
        for case in cases:
            try:
                outs = dict(zip(names, sess.run(None, case.feeds), strict=True))
            except Exception as e:  # an ORT failure is a parity failure of this case, not a crash
                self.failures.append(f"{component} [{case.label}]: ONNX Runtime failed: {e}")
                entry["cases"][case.label] = {"error": str(e)[:500]}
                continue
            per_out: dict[str, Any] = {}
            for out_name, ref in case.expected.items():
                if out_name not in outs:
                    self.failures.append(f"{component} [{case.label}]: graph has no output {out_name}")
                    continue
                try:
                    m = compare(ref, outs[out_name])
                except ValueError as e:  # a wrong output shape fails this case, it does not crash
                    self.failures.append(f"{component} [{case.label}] {out_name}: {e}")
                    continue
                per_out[out_name] = {k: rounded(v) for k, v in m.items()}
                for problem in gate.failures(m):
                    self.failures.append(f"{component} [{case.label}] {out_name}: {problem}")
            entry["cases"][case.label] = per_out
        entry["worst"] = _worst(entry["cases"])
        self.results[component] = entry
        return entry

    def metrics(self) -> dict[str, Any]:
        """``{component: {"gate", "worst", "cases"}}`` for the manifest."""
        return self.results

    def raise_if_failed(self, what: str) -> None:
        if self.failures:
            raise ParityError(what, self.failures)


def gate_for(component: str, precision: str) -> Gate:
    """The contract's gate of a component at a precision (``fp32`` by max-abs/cosine, anything else by
    its SQNR floor); a BuildError when the contract has no floor for that precision."""
    try:
        return contract_gate(component, precision)
    except KeyError as e:
        raise BuildError(str(e.args[0])) from None


def _worst(cases: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    return worst([m for per_out in cases.values() for m in per_out.values() if isinstance(m, Mapping)])
