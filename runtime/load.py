"""Bundle (or Hub repo) -> verified files -> backend components -> ``Pipeline``.

    pipe = load("artifacts/sd15-lcm-scribble", backend="onnx")          # onnx/fp32 by default
    pipe = load("artifacts/sd15-lcm-scribble", backend="onnx", section="onnx/int8")
    pipe = load("artifacts/sd15-lcm-scribble", backend="torch")         # the PyTorch reference

A bundle is a folder with a top-level ``manifest.json``: ``files`` (relpath -> sha256, size) and
``sections`` (bundle dir -> {kind, params, metrics, components, extra}). Before any model is loaded,
every file of the sections in use is checked against its sha256 (memoised by path, size, mtime and
inode, so an unchanged multi-GB bundle is hashed once); a mismatch is a UserError naming the files.

``resolve_source`` turns what the user typed into a local folder: a bundle folder, or a Hub repo
``owner/name[@rev]`` fetched (only the sections in use) and verified by ``sdkiln.runtime.fetch``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from sdkiln.runtime.contract.digest import user_memo
from sdkiln.runtime.contract.errors import CorruptArtifactError, UserError
from sdkiln.runtime.contract.families import FAMILIES, get_family
from sdkiln.runtime.contract.layout import BACKEND_KINDS, PREFERRED_SECTIONS, VAE_TINY_DIR, Kind
from sdkiln.runtime.contract.manifest import (
    BundleManifest,
    ModelFacts,
    Section,
    read_bundle_manifest,
    verify_bundle_sections,
)
from sdkiln.runtime.pipeline import Pipeline
from sdkiln.runtime.types import ModelInfo

logger = logging.getLogger(__name__)

BACKENDS = BACKEND_KINDS  # backend -> the section kind it runs
PREFERRED = PREFERRED_SECTIONS
ENGINE_KIND = Kind.TENSORRT_ENGINE

# Files of a bundle are missing or differ from its manifest (found before loading anything): exit 2.
CorruptBundleError = CorruptArtifactError


def check_backend(backend: str) -> None:
    """Fail fast, before reading any bundle, when a backend is unknown or its library is missing."""
    if backend == "auto":
        return  # the chosen backend is checked once chosen
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose from: {', '.join(BACKENDS)}, auto")
    if backend == "onnx":
        from sdkiln.runtime.backends.onnx import _ort

        _ort()
    elif backend == "torch":
        from sdkiln.runtime.backends.torch_io import imports

        imports()
    elif backend == "tensorrt":
        from sdkiln.runtime.backends import nvidia
        from sdkiln.runtime.backends.cuda_rt import _import_cudart

        nvidia.require_tensorrt()
        _import_cudart()
        nvidia.require_gpu()
    elif backend == "torch_cuda":
        from sdkiln.runtime.backends.torch_cuda import require_cuda

        require_cuda()
    elif backend == "openvino":
        from sdkiln.runtime.backends.openvino import _ov

        _ov()
    else:
        from sdkiln.runtime.backends.coreml import _coremltools

        _coremltools()


def resolve_source(model: str, sections: list[str] | None = None) -> Path:
    """The local bundle folder for ``model``: a folder path, or a Hub repo ``owner/name[@rev]`` downloaded
    (only the files of ``sections``, sections or backend kinds as ``hub.fetch_bundle`` takes them; None:
    everything) and verified into a local snapshot. Verification and loading are the same after it.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{model}: not a folder; a bundle is a folder with a manifest.json")
    from sdkiln.runtime.fetch import fetch_bundle, parse_hub_ref

    ref = parse_hub_ref(model)
    if ref is not None:
        # owner/name[@rev] on the Hub ($HF_ENDPOINT honoured): resolved to a commit, downloaded once into
        # real files, every file sha256-checked against manifest.json; a cached commit works offline.
        return fetch_bundle(ref[0], ref[1], backend=sections)
    raise UserError(f"{model}: no such bundle folder, and not a Hub repo (owner/name[@rev])")


# ---------------------------------------------------------------------------------------------------
# Manifest and verification


def verify_files(root: Path, manifest: BundleManifest, sections: list[str], memo: Any = None) -> int:
    """Check every file of ``sections`` (and top-level files) against the manifest; returns the count.

    Sizes first (cheap), then sha256 (memoised per user). Raises CorruptBundleError listing every bad file.
    """
    return verify_bundle_sections(root, manifest, sections, memo if memo is not None else user_memo())


def pick_section(manifest: BundleManifest, backend: str, section: str | None) -> str:
    """The section ``backend`` runs: ``section`` if given (and of the right kind), else the preferred one."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose from: {', '.join(BACKENDS)}")
    kind = BACKENDS[backend]
    sections = manifest.sections
    if section is not None:
        entry = sections.get(section)
        if entry is None:
            raise UserError(
                f"the bundle has no section {section!r} (it has: {', '.join(sorted(sections)) or 'none'})"
            )
        if entry.kind != kind:
            raise UserError(
                f"section {section!r} is {entry.kind!r}; the {backend} backend runs {kind!r} sections"
            )
        return section
    preferred = sections.get(PREFERRED[backend])
    if preferred is not None and preferred.kind == kind:
        return PREFERRED[backend]
    matching = sorted(name for name, e in sections.items() if e.kind == kind)
    if not matching:
        have = ", ".join(f"{n} ({e.kind})" for n, e in sorted(sections.items())) or "none"
        raise UserError(f"the bundle has no {kind} section for the {backend} backend (it has: {have})")
    if len(matching) > 1:  # never guess between two artifacts (e.g. onnx/fp16 and onnx/int8)
        listed = ", ".join(f"{n} ({sections[n].precision or 'precision unknown'})" for n in matching)
        raise UserError(
            f"the bundle has no {PREFERRED[backend]} section and {len(matching)} {kind} sections fit the "
            f"{backend} backend: {listed}; choose one with --section (load(..., section=...))"
        )
    logger.info(
        "the bundle has no %s section: using %s, its only %s section", PREFERRED[backend], matching[0], kind
    )
    return matching[0]


# ---------------------------------------------------------------------------------------------------
# Model info from a section's files

# A bundle section or a build cache artifact: both carry ``kind``, ``components`` and ``model``.
Entry = Any


def _json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise CorruptBundleError(f"{path}: missing ({what})")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CorruptBundleError(f"{path}: unreadable {what} ({e})") from e


def _facts(*entries: Entry) -> ModelFacts:
    """The model facts of the first entry that has them; the family must be one this runtime knows."""
    for entry in entries:
        facts = entry.model if entry is not None else None
        if facts is not None:
            if facts.family not in FAMILIES:
                raise UserError(
                    f"the bundle's model family {facts.family!r} is unknown to this runtime ({', '.join(FAMILIES)})"
                )
            return facts
    raise CorruptBundleError("the bundle does not say its model family (manifest model.family)")


def _controlnet_dirs(folder: Path) -> tuple[str, ...]:
    cn_dir = folder / "controlnet"
    if not cn_dir.is_dir():
        return ()
    return tuple(sorted(f"controlnet.{p.name}" for p in cn_dir.iterdir() if p.is_dir()))


def model_info(
    folder: Path,
    entry: Entry,
    section: str = "",
    config_from: tuple[Path, Entry] | None = None,
) -> ModelInfo:
    """Everything the loop needs besides components, read from a PIPELINE or ONNX folder (or, for Core
    ML, from ``config_from``: the bundle's pipeline section, which has the configs Core ML packages lack)."""
    facts = _facts(entry, config_from[1] if config_from else None)
    fam = get_family(facts.family)
    components = entry.components or {}
    if entry.kind == "coreml":
        if config_from is None:
            raise UserError(
                "a Core ML section needs the bundle's pipeline section for its configs (none found)"
            )
        cfg_dir, cfg_entry = config_from
        base = model_info(cfg_dir, cfg_entry)
        tok_dirs = (folder,) + base.tokenizer_dirs[1:]
        controlnets = tuple(sorted(k for k in components if k.startswith("controlnet.")))
        # Packages have fixed shapes: their size is the default (and the only one the UNet takes).
        own = entry.model.image_size if entry.model is not None else None
        size = (int(own[0]), int(own[1])) if own else None
        return replace(
            base,
            tokenizer_dirs=tok_dirs,
            controlnets=controlnets,
            section=section,
            taesd=False,
            default_size=size or base.default_size,
        )
    onnx = entry.kind in ("onnx", "tensorrt", "openvino")  # TensorRT-ready ONNX and IR keep the ONNX layout
    unet_cfg = _json(folder / "unet" / "config.json", "UNet config")
    vae_cfg = _json(folder / ("vae_decoder" if onnx else "vae") / "config.json", "VAE config")
    taesd_dir = folder / ("taesd_decoder" if onnx else VAE_TINY_DIR)
    taesd_cfg = (
        _json(taesd_dir / "config.json", "TAESD config") if (taesd_dir / "config.json").is_file() else {}
    )
    sched = _json(folder / "scheduler" / "scheduler_config.json", "scheduler config")
    index = (
        _json(folder / "model_index.json", "model index") if (folder / "model_index.json").is_file() else {}
    )
    if onnx and components:
        controlnets = tuple(sorted(k for k in components if k.startswith("controlnet.")))
    else:
        controlnets = _controlnet_dirs(folder)
    tok_dirs = tuple(folder / t.folder for t in fam.tokenizers)
    sample = unet_cfg.get("sample_size") or fam.default_size // fam.vae_scale_factor
    sample = sample if isinstance(sample, list | tuple) else (sample, sample)
    lcm = facts.lcm or sched.get("_class_name") == "LCMScheduler" or bool(unet_cfg.get("time_cond_proj_dim"))
    return ModelInfo(
        family=facts.family,
        lcm=lcm,
        scheduler_config=sched,
        tokenizer_dirs=tok_dirs,
        pad_tokens=tuple(t.pad_token for t in fam.tokenizers),
        vae_scaling_factor=float(vae_cfg.get("scaling_factor", fam.vae_scaling_factor)),
        vae_shift_factor=vae_cfg.get("shift_factor"),
        taesd_scaling_factor=float(taesd_cfg.get("scaling_factor", 1.0)),
        default_size=(int(sample[0]) * fam.vae_scale_factor, int(sample[1]) * fam.vae_scale_factor),
        vae_scale_factor=fam.vae_scale_factor,
        time_cond_proj_dim=unet_cfg.get("time_cond_proj_dim"),
        controlnets=controlnets,
        taesd=bool(taesd_cfg),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        section=section,
    )


# ---------------------------------------------------------------------------------------------------
# Backends


def open_section(
    folder: Path,
    entry: Entry,
    backend: str,
    *,
    section: str = "",
    vae: str = "full",
    provider: str = "auto",
    dtype: str = "float32",
    compute_units: str = "all",
    threads: int = 0,
    config_from: tuple[Path, Entry] | None = None,
    source: str = "",
    cuda_graphs: bool = False,
    compile: str = "none",
    engine_sections: list[tuple[Path, Section]] | None = None,
    bundle_files: dict[str, Any] | None = None,
    inference_precision: str = "f32",
) -> Pipeline:
    """A Pipeline over one section folder and its manifest entry (a bundle ``Section`` or a build cache
    ``ArtifactManifest``: the same blocks). No verification here; ``load`` verifies before calling it.

    ``tensorrt``: ``engine_sections`` are the bundle's engine sections for this ONNX section and
    ``bundle_files`` the bundle manifest's file table (engines are matched to graphs by sha256)."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose from: {', '.join(BACKENDS)}")
    if entry.kind != BACKENDS[backend]:
        raise UserError(f"the {backend} backend runs {BACKENDS[backend]} artifacts, not {entry.kind!r}")
    info = model_info(folder, entry, section, config_from)
    components = {k: v.model_dump(mode="json") for k, v in (entry.components or {}).items()}
    if backend == "onnx":
        from sdkiln.runtime.backends.onnx import OnnxBackend, discover

        be = OnnxBackend(folder, components or discover(folder), provider=provider, threads=threads)
    elif backend == "torch":
        from sdkiln.runtime.backends.torch_ref import TorchBackend

        be = TorchBackend(
            folder, info.family, [c.split(".", 1)[1] for c in info.controlnets], info.taesd, dtype=dtype
        )
    elif backend == "tensorrt":
        from sdkiln.runtime.backends.tensorrt import TensorrtBackend

        files = bundle_files if bundle_files is not None else _prefixed(entry, section)
        be = TensorrtBackend(folder, entry, files, section, engine_sections, cuda_graphs=cuda_graphs)
    elif backend == "openvino":
        from sdkiln.runtime.backends import openvino as ovb

        be = ovb.OpenVinoBackend(
            folder,
            components or ovb.discover(folder),
            inference_precision=inference_precision,
            threads=threads,
        )
    elif backend == "torch_cuda":
        from sdkiln.runtime.backends.torch_cuda import TorchCudaBackend

        be = TorchCudaBackend(
            folder,
            info.family,
            [c.split(".", 1)[1] for c in info.controlnets],
            info.taesd,
            dtype="float16" if dtype == "float32" else dtype,
            compile=compile,
            cuda_graphs=cuda_graphs,
        )
    else:
        from sdkiln.runtime.backends.coreml import CoreMLBackend

        be = CoreMLBackend(folder, components, compute_units=compute_units)
    return Pipeline(be, info, vae=vae, source=source or str(folder))


def _prefixed(entry: Entry, section: str) -> dict[str, Any]:
    """A file table for a section opened outside a bundle (a cache entry: its own manifest's files)."""
    files = getattr(entry, "files", None) or {}
    prefix = f"{section}/" if section else ""
    return {f"{prefix}{rel}": meta for rel, meta in files.items()}


def engine_sections_for(manifest: BundleManifest, onnx_section: str) -> list[str]:
    """The bundle's engine sections built from ``onnx_section`` (by the step that made it)."""
    sections = manifest.sections
    step, digest = sections[onnx_section].step, sections[onnx_section].digest
    out = []
    for name, sec in sorted(sections.items()):
        if sec.kind != ENGINE_KIND:
            continue
        src = sec.details.get("source") or {}
        if (digest and src.get("digest") == digest) or (not digest and src.get("step") == step):
            out.append(name)
    return out


def _engine_source_section(manifest: BundleManifest, engine_section: str) -> str:
    """The TensorRT-ready ONNX section an engine section was built from."""
    src = manifest.sections[engine_section].details.get("source") or {}
    for name, sec in manifest.sections.items():
        if sec.kind == BACKENDS["tensorrt"] and (
            sec.digest == src.get("digest") or sec.step == src.get("step")
        ):
            return name
    raise UserError(
        f"engine section {engine_section!r}: the bundle lacks the TensorRT-ready ONNX it was built from"
    )


def load(
    model: str | Path,
    backend: str = "onnx",
    *,
    section: str | None = None,
    vae: str = "full",
    provider: str = "auto",
    dtype: str = "float32",
    compute_units: str = "all",
    threads: int = 0,
    verify: bool = True,
    memo: Any = None,
    cuda_graphs: bool = False,
    compile: str = "none",
    inference_precision: str = "f32",
    profile: str = "exact",
    task: str = "sketch",
) -> Pipeline:
    """Load a bundle for one backend.

    Args:
        model: a bundle folder (Hub repos: see ``resolve_source``).
        backend: ``onnx`` (ONNX Runtime), ``torch`` (the PyTorch reference) or ``coreml`` (macOS).
        section: which bundle section to run (``onnx/int8``...); default ``onnx/fp32``, ``torch/fused``,
            ``coreml/split_einsum``, else the first of the backend's kind.
        vae: ``full`` or ``tiny`` (TAESD, where the bundle has it).
        provider: ONNX Runtime execution provider: ``auto``, ``cpu``, ``cuda``, ``tensorrt``.
        dtype: the torch backend's compute dtype (the VAE stays fp32 where fp16 overflows); torch_cuda
            runs float16 unless bfloat16 is asked for.
        verify: check sha256 of every file in use before loading (on by default).
        cuda_graphs: tensorrt/torch_cuda: replay each denoising call as a captured CUDA graph.
        compile: torch_cuda: ``none``, ``default``, ``max-autotune-no-cudagraphs`` or ``reduce-overhead``
            (``torch.compile`` modes).
        inference_precision: openvino: ``f32`` (exact; the default), ``bf16`` (where the CPU has it), or
            per component: ``"f32,vae_decoder=bf16"`` (a default, then ``component=precision`` items).
        profile, task: ``backend="auto"`` only: run the configuration ``sdkiln bench`` measured fastest on
            this machine for this bundle and ``task`` (``sketch``, ``text``, ``edit``): ``exact`` (the same
            algorithm, parity passed) or ``fast`` (declared trade-offs with their measured deviation); see
            ``sdkiln.runtime.auto``. ``pipe.choice`` says what was chosen and why.

    Example::

        pipe = load("artifacts/tiny", backend="onnx")
        img = pipe.text("a lighthouse at dusk", steps=1, seed=7)
    """
    if backend == "auto":
        if section is not None:
            raise UserError("a section does not apply to backend 'auto' (it picks one); leave --section out")
        return _load_auto(
            model, profile=profile, task=task, threads=threads, verify=verify, memo=memo, provider=provider
        )
    check_backend(backend)
    # Core ML takes its configs from the bundle's pipeline section, so that one is fetched too.
    fetch_as = {"torch_cuda": "torch"}.get(backend, backend)
    wanted = [section or fetch_as] + (["torch"] if backend == "coreml" else [])
    root = resolve_source(str(model), wanted)
    manifest = read_bundle_manifest(root)
    engine_pick = None
    picked = manifest.sections.get(section) if section else None
    if backend == "tensorrt" and picked is not None and picked.kind == ENGINE_KIND:
        engine_pick, section = section, _engine_source_section(manifest, section)
    name = pick_section(manifest, backend, section)
    entry: Section = manifest.sections[name]
    used = [name]
    engines: list[tuple[Path, Section]] = []
    if backend == "tensorrt":
        names = [engine_pick] if engine_pick else engine_sections_for(manifest, name)
        used += names
        engines = [(root / n, manifest.sections[n]) for n in names]
    config_from = None
    if backend == "coreml":
        sections = manifest.sections
        ref = next(
            (
                s
                for s in (PREFERRED["torch"], *sorted(sections))
                if s in sections and sections[s].kind == "pipeline"
            ),
            None,
        )
        if ref is not None:
            used.append(ref)
            config_from = (root / ref, sections[ref])
    if verify:
        n = verify_files(root, manifest, used, memo)
        logger.debug("verified %d files of %s", n, ", ".join(used))
    return open_section(
        root / name,
        entry,
        backend,
        section=name,
        vae=vae,
        provider=provider,
        dtype=dtype,
        compute_units=compute_units,
        threads=threads,
        config_from=config_from,
        source=f"{root}:{name}",
        cuda_graphs=cuda_graphs,
        compile=compile,
        engine_sections=engines,
        bundle_files=manifest.files,
        inference_precision=inference_precision,
    )


def _load_auto(model: str | Path, *, profile: str, task: str, **kwargs: Any) -> Pipeline:
    """``backend="auto"``: choose (``runtime.auto``), load the chosen configuration, and keep the choice."""
    from sdkiln.runtime.auto import PROFILES, choose

    if profile not in PROFILES:
        raise UserError(f"unknown profile {profile!r}; choose from: {', '.join(PROFILES)}")
    root = resolve_source(str(model), None)
    choice = choose(root, read_bundle_manifest(root), profile=profile, task=task)
    s = choice.settings
    check_backend(s["backend"])
    pipe = load(
        root,
        backend=s["backend"],
        section=s["section"],
        vae=s.get("vae", "full"),
        dtype=s.get("dtype") or "float32",
        inference_precision=s.get("inference_precision") or "f32",
        **kwargs,
    )
    pipe.choice = choice
    if s.get("steps"):
        pipe.default_steps = int(s["steps"])
    pipe.default_control_end = float(s.get("control_end") or 1.0)
    logger.debug("%s", choice.describe())  # the CLI prints it; pipe.choice has it
    return pipe
