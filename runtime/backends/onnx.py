"""ONNX Runtime backend: one InferenceSession per component of an ``onnx/<precision>`` bundle section.

Execution providers: ``provider="auto"`` takes CUDA when onnxruntime-gpu offers it, else the CPU;
``"tensorrt"``, ``"cuda"`` and ``"cpu"`` ask for one explicitly (TensorRT builds an engine per input
shape on first use, which takes minutes, so it is never chosen silently).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from sdkiln.runtime.backends.base import Component
from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.specs import ComponentIO, TensorSpec, check_inputs

logger = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bfloat16)": "bfloat16",
}


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise UserError("the onnx backend needs onnxruntime: pip install 'sdkiln[runtime]'") from e
    return onnxruntime


def choose_providers(provider: str) -> list[str]:
    """The execution providers for ``provider`` (auto, cpu, cuda, tensorrt); a UserError if unavailable."""
    ort = _ort()
    available = set(ort.get_available_providers())
    if provider == "auto":
        return PROVIDERS["cuda"] if "CUDAExecutionProvider" in available else PROVIDERS["cpu"]
    if provider not in PROVIDERS:
        raise UserError(
            f"unknown ONNX Runtime provider {provider!r}; choose from auto, {', '.join(PROVIDERS)}"
        )
    wanted = PROVIDERS[provider][0]
    if wanted not in available:
        raise UserError(
            f"ONNX Runtime here has no {wanted} (available: {', '.join(sorted(available))}); "
            "install onnxruntime-gpu with CUDA/TensorRT, or use --provider cpu"
        )
    return [p for p in PROVIDERS[provider] if p in available]


def fell_back(requested: list[str], got: list[str]) -> bool:
    """True when the session does not run on the provider asked for first (CUDA/TensorRT -> CPU)."""
    return bool(requested) and requested[0] != "CPUExecutionProvider" and (not got or got[0] != requested[0])


def describe(version: str, requested: list[str], loaded: dict[str, Any]) -> str:
    """What runs the sessions: the providers they really got, and which fell back from what was asked."""
    if not loaded:
        return f"onnxruntime {version} (requested {', '.join(requested)})"
    got: list[str] = []
    for comp in loaded.values():
        for prov in getattr(comp, "providers", []):
            if prov not in got:
                got.append(prov)
    text = f"onnxruntime {version} ({', '.join(got)})"
    fell = sorted(n for n, c in loaded.items() if getattr(c, "fell_back", False))
    if fell:
        text += f"; requested {requested[0]} but fell back to {got[0] if got else 'nothing'} for {', '.join(fell)}"
    return text


class OnnxComponent:
    """One ONNX graph. Inputs are checked against the manifest spec before ``session.run``."""

    def __init__(self, name: str, path: Path, io: ComponentIO | None, providers: list[str], threads: int = 0):
        ort = _ort()
        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only; ORT's warnings about unused initializers are noise
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise UserError(f"{name}: ONNX Runtime cannot load {path}: {e}") from e
        # What the session really got: ORT drops a provider it cannot create (no CUDA library, no GPU,
        # a TensorRT engine build failure) and quietly runs on the next one.
        self.requested = list(providers)
        self.providers = list(self.session.get_providers())
        self.fell_back = fell_back(self.requested, self.providers)
        if self.fell_back:
            logger.warning(
                "%s: ONNX Runtime was asked for %s but runs on %s (it could not create %s here)",
                name,
                self.requested[0],
                self.providers[0] if self.providers else "nothing",
                self.requested[0],
            )
        self.name = name
        session_io = _session_io(self.session)
        if io is None:
            logger.debug("%s: no I/O spec in the manifest; using the graph's own", name)
            io = session_io
        else:
            _agree(name, io, session_io)
        self.io = io
        self._outputs = list(io.outputs) or [o.name for o in self.session.get_outputs()]

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        check_inputs(self.name, self.io, inputs)
        values = self.session.run(self._outputs, inputs)
        return dict(zip(self._outputs, values, strict=True))


def _session_io(session: Any) -> ComponentIO:
    def spec(arg: Any, optional: bool = False) -> TensorSpec:
        shape = tuple(
            d if isinstance(d, int) else (d if isinstance(d, str) and d else f"{arg.name}_dim{k}")
            for k, d in enumerate(arg.shape)
        )
        return TensorSpec(arg.name, _ORT_DTYPES.get(arg.type, arg.type), shape, optional=optional)

    # Inputs with a default (an initializer of their name: a UNet's ControlNet residuals) are optional.
    optional = {a.name: spec(a, optional=True) for a in session.get_overridable_initializers()}
    return ComponentIO(
        inputs={a.name: spec(a) for a in session.get_inputs()} | optional,
        outputs={a.name: spec(a) for a in session.get_outputs()},
    )


def _agree(name: str, declared: ComponentIO, actual: ComponentIO) -> None:
    """The manifest spec and the graph must name the same inputs with the same dtypes and ranks."""
    problems = []
    if set(declared.inputs) != set(actual.inputs):
        problems.append(f"inputs: manifest {sorted(declared.inputs)}, graph {sorted(actual.inputs)}")
    missing_out = set(declared.outputs) - set(actual.outputs)
    if missing_out:
        problems.append(f"outputs {sorted(missing_out)} are not in the graph")
    for n in set(declared.inputs) & set(actual.inputs):
        d, a = declared.inputs[n], actual.inputs[n]
        if d.dtype != a.dtype or len(d.shape) != len(a.shape):
            problems.append(f"{n}: manifest {d.dtype}{list(d.shape)}, graph {a.dtype}{list(a.shape)}")
        if d.optional and not a.optional:
            problems.append(f"{n}: optional in the manifest, but the graph has no default for it")
    if problems:
        raise UserError(
            f"{name}: the bundle's manifest does not describe its ONNX graph: " + "; ".join(problems)
        )


class OnnxBackend:
    """The ONNX components of one bundle section (folder + manifest ``components`` table)."""

    name = "onnx"

    def __init__(
        self, folder: Path, components: dict[str, dict[str, Any]], provider: str = "auto", threads: int = 0
    ):
        ort = _ort()
        self._folder = folder
        self._entries = components
        self._providers = choose_providers(provider)
        self._threads = threads
        self._loaded: dict[str, Component] = {}
        self._version = ort.__version__

    @property
    def description(self) -> str:
        """The providers the loaded sessions really run on (``session.get_providers()``), not the ones
        asked for; says so when a session fell back from CUDA/TensorRT to the CPU."""
        return describe(self._version, self._providers, self._loaded)

    @property
    def providers(self) -> dict[str, list[str]]:
        """Per loaded component, the providers its session got."""
        return {n: list(getattr(c, "providers", [])) for n, c in self._loaded.items()}

    def has(self, component: str) -> bool:
        return component in self._entries

    def component(self, component: str) -> Component:
        if component not in self._loaded:
            entry = self._entries.get(component)
            if entry is None:
                raise UserError(
                    f"this bundle section has no {component} (it has: {', '.join(sorted(self._entries))})"
                )
            io = ComponentIO.from_manifest(entry) if entry.get("inputs") else None
            self._loaded[component] = OnnxComponent(
                component, self._folder / entry["path"], io, self._providers, self._threads
            )
        return self._loaded[component]


# The contract's ONNX layout: where each component lives when a manifest has no components table.
LAYOUT = {
    "text_encoder": "text_encoder/model.onnx",
    "text_encoder_2": "text_encoder_2/model.onnx",
    "unet": "unet/model.onnx",
    "vae_encoder": "vae_encoder/model.onnx",
    "vae_decoder": "vae_decoder/model.onnx",
    "taesd_encoder": "taesd_encoder/model.onnx",
    "taesd_decoder": "taesd_decoder/model.onnx",
}


def discover(folder: Path) -> dict[str, dict[str, Any]]:
    """Components found in a contract ONNX folder (no I/O spec: the graphs' own is used)."""
    found = {name: {"path": rel} for name, rel in LAYOUT.items() if (folder / rel).is_file()}
    cn = folder / "controlnet"
    if cn.is_dir():
        for sub in sorted(p for p in cn.iterdir() if (p / "model.onnx").is_file()):
            found[f"controlnet.{sub.name}"] = {"path": f"controlnet/{sub.name}/model.onnx"}
    return found
