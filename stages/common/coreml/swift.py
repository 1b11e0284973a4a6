"""A Core ML section as the resources folder of Apple's Swift ``StableDiffusion`` package.

The package loads compiled models (``.mlmodelc``) by fixed names from one folder
(``StableDiffusionPipeline+Resources.swift``, ``StableDiffusionXL+Resources.swift``): ``TextEncoder``
(+ ``TextEncoder2`` for SDXL), ``Unet`` or ``UnetChunk1``/``UnetChunk2``, ``ControlledUnet`` (or its
chunks) when ControlNets are asked for, ``controlnet/<name>``, ``VAEDecoder``, optionally ``VAEEncoder``,
plus ``vocab.json`` and ``merges.txt``. Our packages already carry those names
(``contract.layout.APPLE_NAMES``): ``packages/<Name>.mlpackage`` compiles to ``<Name>.mlmodelc`` and
``packages/controlnet/<type>.mlpackage`` to ``controlnet/<type>.mlmodelc``.

``resources_plan`` lists what goes where; ``compile_resources`` runs Apple's compiler
(``xcrun coremlcompiler compile <package> <folder>``, what Apple's ``torch2coreml.py`` runs when it
bundles resources for its Swift CLI) and copies the tokenizer files: macOS with Xcode only.

Example::

    plan = resources_plan(section_dir, manifest_components)   # [(package, "Unet.mlmodelc"), ...]
    compile_resources(section_dir, manifest_components, Path("Resources"))
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sdkiln.runtime.contract.errors import BuildError, UserError

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("vocab.json", "merges.txt")
COMPILER = ("xcrun", "coremlcompiler", "compile")


def _packages(entry: Any) -> list[str]:
    chunks = entry.get("chunks") if hasattr(entry, "get") else None
    if chunks:
        return [c["path"] for c in chunks]
    return [entry["path"] if isinstance(entry, Mapping) else entry.path]


def resources_plan(section: Path, components: Mapping[str, Any]) -> list[tuple[Path, str]]:
    """``(package, path in the resources folder)`` for every package of a Core ML section, chunks
    included: ``packages/Unet.mlpackage`` -> ``Unet.mlmodelc``, ``packages/controlnet/x.mlpackage`` ->
    ``controlnet/x.mlmodelc``."""
    out = []
    for key in sorted(components):
        for rel in _packages(components[key]):
            path = Path(rel)
            if path.suffix != ".mlpackage" or path.parts[0] != "packages":
                raise UserError(f"{key}: {rel} is not a packages/*.mlpackage of a Core ML section")
            out.append((Path(section) / rel, Path(*path.parts[1:]).with_suffix(".mlmodelc").as_posix()))
    return out


def compile_resources(
    section: Path, components: Mapping[str, Any], out_dir: Path, compiler: tuple[str, ...] = COMPILER
) -> list[Path]:
    """Compile every package of ``section`` into ``out_dir`` under its Swift name and copy the tokenizer
    files beside them; returns the compiled models. Needs macOS with Xcode (``xcrun``)."""
    if shutil.which(compiler[0]) is None:
        raise UserError(f"{compiler[0]} not found: compiling Core ML models needs macOS with Xcode")
    out_dir = Path(out_dir)
    made = []
    for package, target in resources_plan(section, components):
        dest = out_dir / target
        dest.parent.mkdir(parents=True, exist_ok=True)
        run = subprocess.run([*compiler, str(package), str(dest.parent)], capture_output=True, text=True)
        if run.returncode != 0:
            raise BuildError(
                f"{' '.join(compiler)} {package} failed ({run.returncode}): {run.stderr.strip()}"
            )
        compiled = dest.parent / f"{package.stem}.mlmodelc"
        if not compiled.is_dir():
            raise BuildError(f"{' '.join(compiler)} {package} wrote no {compiled.name}")
        if compiled != dest:
            shutil.move(str(compiled), str(dest))
        made.append(dest)
    for name in TOKENIZER_FILES:
        src = Path(section) / name
        if not src.is_file():
            raise UserError(f"{section}: no {name} (Apple's BPETokenizer needs it)")
        shutil.copyfile(src, out_dir / name)
    logger.info("compiled %d Core ML models into %s", len(made), out_dir)
    return made
