"""OpenVINO backend: one compiled model per component of an ``openvino/<variant>`` bundle section (IR
``<component>/model.xml`` + ``model.bin``, in the ONNX folder layout), on the CPU plugin.

Precision: OpenVINO's CPU plugin runs fp32 models in bf16 by default on CPUs with AVX512_BF16 or AMX.
That is a different numeric result, so this backend always sets ``INFERENCE_PRECISION_HINT``
itself: ``inference_precision="f32"`` (the default: the exact profile; an fp32 IR then matches the ONNX
export to ~1e-5) or ``"bf16"`` (where the CPU has native bf16), or per component:
``"f32,vae_decoder=bf16"`` (a default, then ``component=precision`` overrides; ``controlnet`` names every
ControlNet). ``sdkiln bench`` composes such a mix from the components whose bf16 outputs met their
parity floors on this machine. INT8 IRs (NNCF FakeQuantize / compressed weights) run their quantized
convolutions and matmuls in int8 either way; the hint decides what the rest runs in. ``description``
names the precision each compiled model reports.

Inputs are checked against the manifest's I/O spec (``contract.specs.check_inputs``) before every call,
and the spec is checked against each compiled model's own inputs when it is loaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from sdkiln.runtime.backends.base import Component
from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.layout import OPENVINO_XML, onnx_folder
from sdkiln.runtime.contract.specs import ComponentIO, TensorSpec, check_inputs

logger = logging.getLogger(__name__)

# What the runtime calls a precision -> OpenVINO's INFERENCE_PRECISION_HINT.
INFERENCE_PRECISIONS = {"f32": "f32", "bf16": "bf16"}


def _ov():
    try:
        import openvino
    except ImportError as e:
        raise UserError("the openvino backend needs OpenVINO: pip install 'sdkiln[openvino]'") from e
    return openvino


def compile_config(inference_precision: str = "f32", threads: int = 0) -> dict[str, Any]:
    """The CPU plugin config every component is compiled with (latency: one stream, one request)."""
    if inference_precision not in INFERENCE_PRECISIONS:
        raise UserError(
            f"unknown OpenVINO inference precision {inference_precision!r}; "
            f"choose from: {', '.join(INFERENCE_PRECISIONS)}"
        )
    cfg: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": INFERENCE_PRECISIONS[inference_precision],
        "PERFORMANCE_HINT": "LATENCY",
    }
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    return cfg


def parse_precision(spec: str) -> tuple[str, dict[str, str]]:
    """``"f32"`` -> ``("f32", {})``; ``"f32,vae_decoder=bf16,controlnet=bf16"`` -> the default and the
    per-component overrides. A UserError names a malformed item or an unknown precision."""
    default: str | None = None
    overrides: dict[str, str] = {}
    for item in (x.strip() for x in str(spec).split(",")):
        name, eq, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not eq:
            if default is not None or not name:
                raise UserError(
                    f"inference_precision {spec!r}: give one default precision, then component=precision "
                    "items (e.g. f32,vae_decoder=bf16)"
                )
            default = name
        elif not name or not value:
            raise UserError(f"inference_precision {spec!r}: {item!r} is not component=precision")
        else:
            overrides[name] = value
    default = default or "f32"
    for value in (default, *overrides.values()):
        compile_config(value)  # names the unknown precision
    return default, overrides


def format_precision(default: str, overrides: dict[str, str]) -> str:
    """The inverse of ``parse_precision`` (overrides equal to the default left out, sorted)."""
    items = [f"{k}={v}" for k, v in sorted(overrides.items()) if v != default]
    return ",".join([default, *items])


def precision_of(component: str, default: str, overrides: dict[str, str]) -> str:
    """The precision ``component`` runs in: its own override, its kind's (``controlnet``), else the default."""
    return overrides.get(component) or overrides.get(component.split(".", 1)[0]) or default


def check_precision(inference_precision: str) -> None:
    """A UserError when bf16 is asked for (anywhere in the spec) on a CPU OpenVINO cannot run it natively on."""
    default, overrides = parse_precision(inference_precision)
    if "bf16" in (default, *overrides.values()):
        _check_bf16()


def _check_bf16() -> None:
    caps = set(_ov().Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    if "BF16" not in caps:
        raise UserError(
            "inference_precision bf16: this CPU has no native bf16 for OpenVINO "
            f"(its capabilities: {', '.join(sorted(caps))}); use f32"
        )


def _dims(partial_shape: Any) -> tuple[Any, ...]:
    return tuple(d.get_length() if d.is_static else "?" for d in partial_shape)


def port_name(port: Any, wanted: Any = ()) -> str:
    """The port's name: one of ``wanted`` when the port carries it (a compiled model's port may have
    several tensor names, e.g. ``input_ids`` and the Cast output fused into it), else any of them."""
    names = port.get_names()
    return next((n for n in wanted if n in names), port.get_any_name())


def port_spec(port: Any, wanted: Any = ()) -> TensorSpec:
    """The contract's TensorSpec of a model port (dtype from the element type; dynamic dims as ``?``)."""
    dtype = np.dtype(port.get_element_type().to_dtype()).name
    return TensorSpec(port_name(port, wanted), dtype, _dims(port.get_partial_shape()))


def model_io(compiled: Any, declared: ComponentIO | None = None) -> ComponentIO:
    ins = declared.inputs if declared else {}
    outs = declared.outputs if declared else {}
    return ComponentIO(
        inputs={s.name: s for s in (port_spec(p, ins) for p in compiled.inputs)},
        outputs={s.name: s for s in (port_spec(p, outs) for p in compiled.outputs)},
    )


def agree(name: str, declared: ComponentIO, actual: ComponentIO) -> None:
    """The manifest spec and the model must name the same inputs with the same dtypes and ranks."""
    problems = []
    if set(declared.inputs) != set(actual.inputs):
        problems.append(f"inputs: manifest {sorted(declared.inputs)}, model {sorted(actual.inputs)}")
    missing = set(declared.outputs) - set(actual.outputs)
    if missing:
        problems.append(f"outputs {sorted(missing)} are not in the model")
    for n in set(declared.inputs) & set(actual.inputs):
        d, a = declared.inputs[n], actual.inputs[n]
        if d.dtype != a.dtype or len(d.shape) != len(a.shape):
            problems.append(f"{n}: manifest {d.dtype}{list(d.shape)}, model {a.dtype}{list(a.shape)}")
    if problems:
        raise UserError(
            f"{name}: the bundle's manifest does not describe its OpenVINO model: " + "; ".join(problems)
        )


class OpenVinoComponent:
    """One compiled OpenVINO model with one infer request. Inputs are checked against the spec."""

    def __init__(self, name: str, path: Path, io: ComponentIO | None, core: Any, config: dict[str, Any]):
        if not Path(path).is_file():
            raise UserError(f"{name}: {path} is missing")
        try:
            # From the path: the .bin is memory-mapped instead of read into a second buffer.
            self.compiled = core.compile_model(str(path), "CPU", config)
        except Exception as e:  # OpenVINO raises RuntimeError subclasses of its own
            raise UserError(f"{name}: OpenVINO cannot compile {path}: {e}") from e
        self.name = name
        actual = model_io(self.compiled, io)
        if io is None:
            io = actual
        else:
            agree(name, io, actual)
        self.io = io
        self._outputs = list(io.outputs)
        by_name = {port_name(p, self._outputs): p for p in self.compiled.outputs}
        self._ports = {n: by_name[n] for n in self._outputs}
        self.request = self.compiled.create_infer_request()
        hint = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # an ov.Type: f32, bf16
        self.inference_precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        bindings = check_inputs(self.name, self.io, inputs)
        feeds = dict(inputs)
        for n, spec in self.io.inputs.items():  # optional inputs left out take their default
            if n not in feeds:
                feeds[n] = np.full(self.io.resolve(n, bindings), spec.default or 0, dtype=spec.dtype)
        result = self.request.infer(feeds)
        return {n: np.array(result[p]) for n, p in self._ports.items()}


class OpenVinoBackend:
    """The OpenVINO components of one bundle section (folder + manifest ``components`` table)."""

    name = "openvino"

    def __init__(
        self,
        folder: Path,
        components: dict[str, dict[str, Any]],
        inference_precision: str = "f32",
        threads: int = 0,
    ):
        ov = _ov()
        default, overrides = parse_precision(inference_precision)
        if "bf16" in (default, *overrides.values()):
            _check_bf16()
        kinds = {c.split(".", 1)[0] for c in components}
        unknown = sorted(k for k in overrides if k not in components and k not in kinds)
        if unknown:
            raise UserError(
                f"inference_precision {inference_precision!r}: this section has no {', '.join(unknown)} "
                f"(it has: {', '.join(sorted(components))})"
            )
        self._folder = folder
        self._entries = components
        self._default, self._overrides = default, overrides
        self._threads = threads
        self._core = ov.Core()
        self._loaded: dict[str, Component] = {}
        self._version = ov.get_version().split("-", 1)[0]
        self.inference_precision = format_precision(default, overrides)

    def precision_of(self, component: str) -> str:
        """The inference precision ``component`` is (or will be) compiled with."""
        return precision_of(component, self._default, self._overrides)

    @property
    def description(self) -> str:
        got = {n: getattr(c, "inference_precision", "?") for n, c in self._loaded.items()}
        kinds = sorted(set(got.values()))
        if len(kinds) > 1:
            hint = ", ".join(f"{n} {p}" for n, p in sorted(got.items()))
        else:
            hint = kinds[0] if kinds else self.inference_precision
        return f"openvino {self._version} (CPU, inference precision {hint})"

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
            config = compile_config(self.precision_of(component), self._threads)
            self._loaded[component] = OpenVinoComponent(
                component, self._folder / entry["path"], io, self._core, config
            )
        return self._loaded[component]


def discover(folder: Path) -> dict[str, dict[str, Any]]:
    """Components found in an OpenVINO folder without a components table (the models' own I/O is used)."""
    names = ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder", "taesd_encoder")
    found = {
        n: {"path": f"{onnx_folder(n)}/{OPENVINO_XML}"}
        for n in (*names, "taesd_decoder")
        if (folder / n / OPENVINO_XML).is_file()
    }
    cn = folder / "controlnet"
    if cn.is_dir():
        for sub in sorted(p for p in cn.iterdir() if (p / OPENVINO_XML).is_file()):
            found[f"controlnet.{sub.name}"] = {"path": f"controlnet/{sub.name}/{OPENVINO_XML}"}
    return found
