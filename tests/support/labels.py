"""Labels against bytes: every component's recorded precision is what its files hold.

``label_problems(bundle)`` reads every ONNX graph (``io.weight_precision``) and Core ML package
(``readback.precision_label``) of a bundle and lists each component whose manifest precision differs,
each section whose card tags say ``quantized`` without a quantized component, and each model card line
that calls a section INT8 or n-bit when none of its components is. Used on the tiny bundles here and on
every shipped recipe's bundle (tests/recipes).
"""

from __future__ import annotations

from pathlib import Path

from sdkiln.runtime.contract.manifest import read_bundle_manifest

LOSSY = ("int8", "uint8", "qint8", "qfloat8", "qint4")


def file_precision(path: Path) -> str | None:
    """What a component file holds: the ONNX graph's weight storage or the Core ML package's (None: a
    format this check does not read)."""
    if path.suffix == ".onnx":
        import onnx

        from sdkiln.stages.common.onnx.io import weight_precision

        return weight_precision(onnx.load(str(path), load_external_data=True))[0]
    if path.suffix == ".mlpackage":
        from sdkiln.stages.common.coreml.readback import precision_label, read_weights, summarize_weights

        return precision_label(summarize_weights(read_weights(path)))
    return None


def label_problems(bundle: Path) -> list[str]:
    bundle = Path(bundle)
    manifest = read_bundle_manifest(bundle)
    problems: list[str] = []
    checked = 0
    for name, sec in sorted(manifest.sections.items()):
        for key, entry in sorted(sec.components.items()):
            paths = [entry.path] if entry.path else []
            chunks = entry.get("chunks")
            if isinstance(chunks, list) and chunks:
                paths = [c if isinstance(c, str) else c.get("path") for c in chunks]
            held = {file_precision(bundle / name / p) for p in paths if p}
            held.discard(None)
            if not held:
                continue
            checked += 1
            label = held.pop() if len(held) == 1 else "mixed"
            if label != entry.precision:
                problems.append(f"{name} {key}: labelled {entry.precision}, its files hold {label}")
    readme = bundle / "README.md"
    if readme.is_file():
        from sdkiln.stages.tools.publish.card import _is_quantized

        text = readme.read_text()
        quantized = [n for n, s in manifest.sections.items() if _is_quantized(s)]
        front = text.split("---")[1] if text.startswith("---") else ""
        if "quantized" in front and not quantized:
            problems.append("README.md: tagged quantized, but no section holds quantized weights")
    if not checked:
        problems.append(f"{bundle}: no component file could be read; nothing was checked")
    return problems
