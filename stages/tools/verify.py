"""``sdkiln verify --parity``: re-measure a bundle's parity from its files, not from what it says.

``sdkiln verify`` alone re-hashes files against ``manifest.json``: it proves the files are the ones the
manifest lists, not that they are any good (a manifest can be rewritten with a broken graph's sha256).
With ``--parity`` every graph the bundle ships is run again against the PyTorch reference the bundle
carries (its ``pipeline`` section: the fused diffusers folder the exports came from):

- **components**: each ONNX graph (every ``onnx/*`` and TensorRT-ready section) on fixed, seeded
  inputs at batch 1 and 2, against the diffusers module it was exported from, gated by the contract's
  floor for the component and the precision its weights hold (``floors.gate``);
- **end to end**: each task the bundle can run (sketch, text, edit), on every ONNX section, with the
  same seed and initial latents as the reference, as final images (PSNR against
  ``floors.E2E_PSNR_DB``).

Core ML packages need macOS to run (their read-back parity is measured at build time); sections this
machine cannot run are listed as not checked, with the reason, never as passed.

    report = verify_parity(Path("artifacts/tiny"))
    print(report.table()); report.raise_if_failed()
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdkiln.runtime.contract.errors import BuildError, ParityError, UserError
from sdkiln.runtime.contract.layout import PREFERRED_SECTIONS, Kind
from sdkiln.runtime.contract.manifest import BundleManifest, Section, read_bundle_manifest, verify_files

logger = logging.getLogger(__name__)

GRAPH_KINDS = (Kind.ONNX, Kind.TENSORRT)  # sections whose graphs ONNX Runtime runs here
E2E_KINDS = (Kind.ONNX,)  # sections the runtime's ONNX backend runs end to end


@dataclass
class Row:
    """One measurement: a component of a section, or a task end to end."""

    section: str
    what: str  # component key, or "e2e:<task>"
    precision: str
    measured: dict[str, float]
    gate: dict[str, float]
    failures: list[str] = field(default_factory=list)
    note: str = ""  # why it was not checked

    @property
    def status(self) -> str:
        if self.note:
            return "not checked"
        return "FAIL" if self.failures else "ok"


@dataclass
class ParityVerdict:
    """Every row measured by ``verify_parity``."""

    bundle: Path
    reference: str
    rows: list[Row] = field(default_factory=list)

    @property
    def failures(self) -> list[str]:
        return [f"{r.section}: {f}" for r in self.rows for f in r.failures]

    @property
    def failed_components(self) -> list[str]:
        return sorted({f"{r.section} {r.what}" for r in self.rows if r.failures})

    def table(self) -> str:
        head = (
            f"{'section':<22} {'component / task':<24} {'precision':<9} {'measured':<34} {'floor':<26} result"
        )
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.section:<22} {r.what:<24} {r.precision:<9} {_fmt(r.measured):<34} {_fmt(r.gate):<26} "
                + (f"not checked: {r.note}" if r.note else r.status)
            )
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "bundle": str(self.bundle),
            "reference": self.reference,
            "ok": not self.failures,
            "rows": [
                {
                    "section": r.section,
                    "what": r.what,
                    "precision": r.precision,
                    "measured": r.measured,
                    "gate": r.gate,
                    "status": r.status,
                    "failures": r.failures,
                    "note": r.note,
                }
                for r in self.rows
            ],
        }

    def raise_if_failed(self) -> None:
        if self.failures:
            raise ParityError(f"{self.bundle} (failing: {', '.join(self.failed_components)})", self.failures)


def _fmt(m: dict[str, float]) -> str:
    keys = ("max_abs", "cosine", "sqnr_db", "min_sqnr_db", "psnr_db", "min_psnr_db", "ssim")
    short = {"min_sqnr_db": "sqnr_db>=", "min_psnr_db": "psnr_db>=", "max_abs": "max_abs"}
    parts = []
    for k in keys:
        if k in m and m[k] is not None:
            v = m[k]
            parts.append(f"{short.get(k, k)}{'' if short.get(k, '').endswith('=') else '='}{v:.4g}")
    return " ".join(parts) or "-"


# --------------------------------------------------------------------------------------------------


def reference_section(manifest: BundleManifest) -> str:
    """The bundle's PyTorch reference: ``torch/fused`` if present, else its only pipeline section."""
    pipelines = sorted(n for n, s in manifest.sections.items() if s.kind == Kind.PIPELINE)
    preferred = PREFERRED_SECTIONS["torch"]
    if preferred in pipelines:
        return preferred
    if len(pipelines) == 1:
        return pipelines[0]
    if not pipelines:
        raise UserError(
            "verify --parity: this bundle has no PyTorch reference (a section of kind pipeline); "
            "rebuild it with the recipe's reference step exported to the bundle"
        )
    raise UserError(
        f"verify --parity: several reference sections ({', '.join(pipelines)}); none is {preferred}"
    )


def resolve_bundle(target: str, endpoint: str | None = None) -> Path:
    """A local bundle folder, or ``owner/name[@rev]`` fetched (every section) and verified."""
    path = Path(target)
    if path.is_dir():
        return path
    from sdkiln.runtime.fetch import fetch_bundle, parse_hub_ref

    ref = parse_hub_ref(target)
    if ref is None:
        raise UserError(f"{target}: no such bundle folder, and not a Hub repo id (owner/name[@revision])")
    return fetch_bundle(ref[0], ref[1], backend=None, endpoint=endpoint)


def verify_parity(
    bundle: Path,
    *,
    sections: list[str] | None = None,
    batch_sizes: tuple[int, ...] = (1, 2),
    image_size: int | None = None,
    tasks: tuple[str, ...] = ("sketch", "text", "edit"),
    steps: int | None = None,
    e2e: bool = True,
    seed: int = 0,
) -> ParityVerdict:
    """Re-run every component gate and the end-to-end check of ``bundle`` (see the module docstring).

    ``sections``: only these (default: every section ONNX Runtime can run); ``image_size``: pixels
    (default: the reference's own sample size; a TensorRT-ready static graph uses its shape).
    Files are checked against their sha256 first: a corrupt bundle is an error, not a parity result.
    """
    bundle = Path(bundle)
    manifest = read_bundle_manifest(bundle)
    files = verify_files(bundle, manifest.files)
    if not files.ok:
        raise UserError(
            f"{bundle}: files do not match manifest.json, so parity would measure the wrong files:\n  "
            + "\n  ".join(files.lines())
        )
    ref_name = reference_section(manifest)
    verdict = ParityVerdict(bundle, ref_name)
    chosen = _sections(manifest, sections)
    from sdkiln.stages.common.torch.pipeline import open_pipeline

    ref = manifest.sections[ref_name]
    family = ref.family
    loaded = open_pipeline(bundle / ref_name, family=family)
    fp32_graphs = _fp32_graphs(bundle, manifest)
    for name in chosen:
        sec = manifest.sections[name]
        if sec.kind in GRAPH_KINDS:
            verdict.rows += _component_rows(
                bundle, ref_name, ref, loaded, name, sec, batch_sizes, image_size, seed, fp32_graphs
            )
        else:
            verdict.rows.append(
                Row(
                    name,
                    "*",
                    sec.precision,
                    {},
                    {},
                    note=f"{sec.kind} sections do not run on this machine"
                    if sec.kind != Kind.COREML
                    else "Core ML needs macOS (read-back parity is in its build record)",
                )
            )
    del loaded
    if e2e:
        verdict.rows += _e2e_rows(
            bundle,
            manifest,
            ref_name,
            [n for n in chosen if manifest.sections[n].kind in E2E_KINDS],
            tasks,
            steps,
            image_size,
        )
    return verdict


def _fp32_graphs(bundle: Path, manifest: BundleManifest) -> dict[str, Path]:
    """Component key -> its fp32 ONNX graph (``onnx/fp32`` first): the source the weights of the lossy
    sections are compared with (fp16 and int8 noise hides a wrong layer from the output floors)."""
    names = sorted(
        (n for n, s in manifest.sections.items() if s.kind == Kind.ONNX),
        key=lambda n: (n != PREFERRED_SECTIONS["onnx"], n),
    )
    out: dict[str, Path] = {}
    for n in names:
        for key, entry in manifest.sections[n].components.items():
            if entry.precision == "fp32" and entry.path and key not in out:
                out[key] = bundle / n / entry.path
    return out


def _sections(manifest: BundleManifest, wanted: list[str] | None) -> list[str]:
    checkable = [
        n
        for n, s in sorted(manifest.sections.items())
        if s.kind not in (Kind.PIPELINE, Kind.REPORT, Kind.PUBLISHED, Kind.DATA) and s.components
    ]
    if wanted is None:
        return checkable
    unknown = [w for w in wanted if w not in manifest.sections]
    if unknown:
        raise UserError(
            f"verify --parity --section: {', '.join(unknown)} not in this bundle; it has: "
            + ", ".join(sorted(manifest.sections))
        )
    return [w for w in wanted if w in checkable]


class _Feeder:
    """An ORT session that takes fp32 feeds for any graph: inputs the graph does not have are dropped
    (TensorRT-ready UNets lose the optional residuals), fp16 inputs are cast. Optional inputs (an ONNX
    UNet's zero-default residuals: ORT lists them as overridable initializers, not inputs) are fed."""

    def __init__(self, sess: Any):
        import numpy as np

        self.sess = sess
        self.types = {
            i.name: (np.float16 if i.type == "tensor(float16)" else None)
            for i in [*sess.get_inputs(), *sess.get_overridable_initializers()]
        }

    def get_outputs(self) -> Any:
        return self.sess.get_outputs()

    def run(self, names: Any, feeds: dict[str, Any]) -> Any:
        fed = {
            k: (v.astype(self.types[k]) if self.types[k] is not None else v)
            for k, v in feeds.items()
            if k in self.types
        }
        return self.sess.run(names, fed)


def _component_rows(
    bundle: Path,
    ref_name: str,
    ref: Section,
    loaded: Any,
    name: str,
    sec: Section,
    batch_sizes: tuple[int, ...],
    image_size: int | None,
    seed: int,
    fp32_graphs: dict[str, Path],
) -> list[Row]:
    from sdkiln.stages.common.onnx import components as oc
    from sdkiln.stages.common.onnx import io as ou
    from sdkiln.stages.common.onnx.parity import ParityReport, gate_for
    from sdkiln.stages.common.onnx.weights import weight_drift

    facts = sec.model or ref.model
    residuals = bool(facts and facts.unet_controlnet_residuals)
    fam, planned = oc.plan_components(bundle / ref_name, ref.model, unet_residuals=residuals)
    by_key = {c.key: c for c in planned}
    size = image_size or _default_size(loaded, fam)
    static = facts.static if facts else None
    rows = []
    for key, entry in sorted(sec.components.items()):
        if key not in by_key or not entry.path:
            rows.append(
                Row(name, key, entry.precision, {}, {}, note="no PyTorch reference for this component")
            )
            continue
        comp = by_key[key]
        # The graph's own inputs (a TensorRT-ready UNet has no residual inputs), in fp32 for the reference.
        own = {t.name for t in entry.inputs} or set(comp.input_names)
        comp = oc.Component(
            comp.key,
            comp.kind,
            comp.folder,
            comp.config_source,
            tuple(t for t in comp.inputs if t["name"] in own),
            comp.outputs,
        )
        try:
            gate = gate_for(key, entry.precision)
        except BuildError as e:
            rows.append(Row(name, key, entry.precision, {}, {}, failures=[str(e)]))
            continue
        path = bundle / name / entry.path
        try:
            sess = _Feeder(ou.cpu_session(path))
        except Exception as e:  # a graph ORT cannot load here (a TensorRT plugin op): say so
            rows.append(
                Row(
                    name,
                    key,
                    entry.precision,
                    {},
                    gate.as_dict(),
                    note=f"ONNX Runtime cannot load it: {str(e)[:120]}",
                )
            )
            continue
        module = oc.torch_graph(loaded, comp)
        cases = oc.parity_cases(module, comp, list(batch_sizes), [size], seed, fam.vae_scale_factor, static)
        report = ParityReport()
        result = report.check(key, sess, cases, gate)
        worst = {k: v for k, v in (result.get("worst") or {}).items() if v is not None}
        failures = list(report.failures)
        source = fp32_graphs.get(key)
        if entry.precision != "fp32" and source is not None and source != path:
            drift = weight_drift(path, source)
            if drift.errors:
                worst["weights_rel_rms"] = max(drift.worst().values())
                failures += [f"{key}: {f}" for f in drift.failures()[:5]]
        rows.append(Row(name, key, entry.precision, worst, gate.as_dict(), failures=failures))
        logger.info("%s %s (%s): %s", name, key, entry.precision, "FAIL" if report.failures else "ok")
    return rows


def _default_size(loaded: Any, fam: Any) -> int:
    sample = loaded.pipe.unet.config.sample_size
    sample = sample[0] if isinstance(sample, (list, tuple)) else sample
    return int(sample) * fam.vae_scale_factor


def _e2e_rows(
    bundle: Path,
    manifest: BundleManifest,
    ref_name: str,
    names: list[str],
    tasks: tuple[str, ...],
    steps: int | None,
    size: int | None,
) -> list[Row]:
    if not names:
        return []
    from dataclasses import replace

    from sdkiln.runtime.contract.floors import e2e_floor
    from sdkiln.runtime.load import open_section
    from sdkiln.runtime.parity import CASES, available_cases, compare, run_case

    reference = open_section(bundle / ref_name, manifest.sections[ref_name], "torch", section=ref_name)
    cases = [c for c in available_cases(reference, CASES) if c.task in tasks]
    rows = []
    candidates = []
    for name in names:
        sec = manifest.sections[name]
        floor = e2e_floor(sec.precision, [c.precision for c in sec.components.values()])
        candidates.append(
            (name, sec, floor, open_section(bundle / name, sec, "onnx", section=name, provider="cpu"))
        )
    for case in cases:
        case = replace(case)
        ref = run_case(reference, case, steps=steps, size=size)
        for name, sec, floor, pipe in candidates:
            m = compare(ref, run_case(pipe, case, steps=steps, size=size))
            fails = (
                [f"e2e {case.task}: PSNR {m['psnr_db']:.2f} dB < floor {floor:.1f} dB"]
                if not m["psnr_db"] >= floor
                else []
            )
            rows.append(
                Row(
                    name,
                    f"e2e:{case.task}",
                    sec.precision,
                    {"psnr_db": m["psnr_db"], "ssim": m["ssim"]},
                    {"min_psnr_db": floor},
                    failures=fails,
                )
            )
    return rows
