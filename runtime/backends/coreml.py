"""Core ML backend (macOS only): the ``packages/*.mlpackage`` of a ``coreml/<attention>`` bundle section
behind the contract's component interface.

The packages follow Apple's Swift ``StableDiffusion`` package (names and layouts: ``input_ids`` as
float32 -> ``last_hidden_state``/``hidden_embeds`` + ``pooled_outputs``; UNet ``encoder_hidden_states``
as (B, D, 1, 77) -> ``noise_pred``; a ``ControlledUnet`` that takes ``additional_residual_0..N`` with the
mid residual last; ``z`` -> ``image``; ``x`` -> ``latent`` moments) and have fixed shapes. This module
translates: the loop feeds contract names and layouts, each wrapper renames, transposes, casts, splits a
batch into the package's batch size and maps the outputs back. The contract-side spec it checks inputs
against is derived from the package specs in the manifest, so static sizes stay static (a size the
packages were not converted for is refused by the pipeline's size check).

Core ML runs only on macOS: anywhere else loading this backend is a clear UserError, not a crash at the
first ``predict``.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.specs import ComponentIO, TensorSpec, check_inputs

COMPUTE_UNITS = ("all", "cpu_and_ne", "cpu_and_gpu", "cpu_only")
RESIDUAL = "additional_residual_"


def _on_macos() -> bool:
    return platform.system() == "Darwin"


def _coremltools():
    if not _on_macos():
        raise UserError(
            f"the coreml backend runs only on macOS (Core ML prediction is macOS-only; this is {platform.system()}); "
            "use --backend onnx here"
        )
    try:
        import coremltools
    except ImportError as e:
        raise UserError("the coreml backend needs coremltools: pip install coremltools") from e
    return coremltools


class _Package:
    """One loaded ``.mlpackage`` and its Apple-side spec from the manifest."""

    def __init__(self, ct: Any, folder: Path, key: str, entry: dict[str, Any], compute_units: str):
        path = folder / entry["path"]
        try:
            self.model = ct.models.MLModel(
                str(path), compute_units=getattr(ct.ComputeUnit, compute_units.upper())
            )
        except Exception as e:  # coremltools raises plain Exceptions for unreadable packages
            raise UserError(f"{key}: Core ML cannot load {path}: {e}") from e
        self.key = key
        self.inputs = {t["name"]: t for t in entry["inputs"]}
        self.outputs = [t["name"] for t in entry["outputs"]]
        # A flexible-batch UNet/ControlNet takes each of these (its declared shape is the first).
        self.batch_sizes = sorted(int(b) for b in entry.get("batch_sizes") or [self.batch])

    @property
    def batch(self) -> int:
        """The declared batch (of the first input's shape)."""
        return int(next(iter(self.inputs.values()))["shape"][0])

    def predict(self, feeds: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        """Run ``feeds`` (Apple names) in one call when the package takes their batch, else in chunks of
        the largest batch size it takes that divides it."""
        rows = next(v.shape[0] for k, v in feeds.items() if k != "conditioning_scale")
        fits = [b for b in self.batch_sizes if rows % b == 0]
        if not fits:
            raise UserError(
                f"{self.key}: the Core ML package takes batches of {' or '.join(map(str, self.batch_sizes))}, "
                f"got {rows}"
            )
        step = max(fits)
        results = []
        for start in range(0, rows, step):
            chunk = {
                # conditioning_scale is (1,) whatever the batch; everything else is split along it.
                name: np.ascontiguousarray(
                    arr if name == "conditioning_scale" else arr[start : start + step],
                    dtype=self.inputs[name].get("dtype", "float32"),
                )
                for name, arr in feeds.items()
            }
            out = self.model.predict(chunk)
            results.append({k: np.asarray(out[k], dtype=np.float32) for k in self.outputs})
        return results


def _cat(results: list[dict[str, np.ndarray]], name: str) -> np.ndarray:
    return np.concatenate([r[name] for r in results], axis=0)


def _spec(name: str, shape: list[int | str], dtype: str = "float32") -> TensorSpec:
    return TensorSpec(name, dtype, tuple(shape))


def _channels_last_text(ehs: np.ndarray) -> np.ndarray:
    """(B, 77, D) -> Apple's (B, D, 1, 77)."""
    return ehs.transpose(0, 2, 1)[:, :, None, :]


class CoreMLComponent:
    """A contract-named component over one or two packages (UNet: plain and ControlNet-ready)."""

    def __init__(
        self, name: str, io: ComponentIO, call: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    ):
        self.name = name
        self.io = io
        self._call = call

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        check_inputs(self.name, self.io, inputs)
        return self._call(inputs)


def _text_encoder(name: str, pkg: _Package) -> CoreMLComponent:
    seq = int(pkg.inputs["input_ids"]["shape"][1])
    hidden_name = "penultimate_hidden_state" if "hidden_embeds" in pkg.outputs else "last_hidden_state"
    pooled_name = "text_embeds" if name == "text_encoder_2" else "pooler_output"
    apple_hidden = "hidden_embeds" if "hidden_embeds" in pkg.outputs else "last_hidden_state"
    io = ComponentIO(
        inputs={"input_ids": _spec("input_ids", ["batch", seq], "int32")},
        outputs={
            hidden_name: _spec(hidden_name, ["batch", seq, "hidden"]),
            pooled_name: _spec(pooled_name, ["batch", "pooled"]),
        },
    )

    def call(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        res = pkg.predict({"input_ids": feeds["input_ids"]})
        return {hidden_name: _cat(res, apple_hidden), pooled_name: _cat(res, "pooled_outputs")}

    return CoreMLComponent(name, io, call)


def _unet_like_inputs(pkg: _Package) -> dict[str, TensorSpec]:
    """Contract-side inputs of a UNet/ControlNet package: batch free, latent size fixed, text (B, 77, D)."""
    sample = pkg.inputs["sample"]["shape"]
    ehs = pkg.inputs["encoder_hidden_states"]["shape"]  # (B, D, 1, 77)
    inputs = {
        "sample": _spec("sample", ["batch", *sample[1:]]),
        "timestep": _spec("timestep", ["batch"]),
        "encoder_hidden_states": _spec("encoder_hidden_states", ["batch", ehs[3], ehs[1]]),
    }
    for extra in ("timestep_cond", "text_embeds", "time_ids"):
        if extra in pkg.inputs:
            inputs[extra] = _spec(extra, ["batch", *pkg.inputs[extra]["shape"][1:]])
    return inputs


def _apple_feeds(feeds: dict[str, np.ndarray], pkg: _Package) -> dict[str, np.ndarray]:
    out = {k: v for k, v in feeds.items() if k in pkg.inputs and k != "encoder_hidden_states"}
    out["encoder_hidden_states"] = _channels_last_text(feeds["encoder_hidden_states"])
    return out


def _residual_names(n: int) -> list[str]:
    return [f"down_block_additional_residual_{i}" for i in range(n - 1)] + ["mid_block_additional_residual"]


def _unet(plain: _Package | None, controlled: _Package | None) -> CoreMLComponent:
    base = controlled or plain
    assert base is not None
    inputs = _unet_like_inputs(base)
    res_names: list[str] = []
    if controlled is not None:
        apple = sorted(
            (k for k in controlled.inputs if k.startswith(RESIDUAL)), key=lambda k: int(k[len(RESIDUAL) :])
        )
        res_names = _residual_names(len(apple))
        for ours, theirs in zip(res_names, apple, strict=True):
            inputs[ours] = _spec(ours, ["batch", *controlled.inputs[theirs]["shape"][1:]])
    sample = base.inputs["sample"]["shape"]
    io = ComponentIO(inputs=inputs, outputs={"out_sample": _spec("out_sample", ["batch", *sample[1:]])})

    def call(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        residuals = [feeds[n] for n in res_names]
        # Zero residuals mean "no ControlNet": the plain UNet, where there is one, is the cheaper package.
        use = (
            controlled
            if controlled is not None and (plain is None or any(r.any() for r in residuals))
            else plain
        )
        assert use is not None
        apple = _apple_feeds(feeds, use)
        if use is controlled:
            apple |= {f"{RESIDUAL}{i}": r for i, r in enumerate(residuals)}
        return {"out_sample": _cat(use.predict(apple), "noise_pred")}

    return CoreMLComponent("unet", io, call)


def _controlnet(name: str, pkg: _Package) -> CoreMLComponent:
    inputs = _unet_like_inputs(pkg)
    cond = pkg.inputs["controlnet_cond"]["shape"]
    inputs["controlnet_cond"] = _spec("controlnet_cond", ["batch", *cond[1:]])
    inputs["conditioning_scale"] = _spec("conditioning_scale", [1])
    apple = sorted(pkg.outputs, key=lambda k: int(k[len(RESIDUAL) :]))
    ours = [f"down_block_res_sample_{i}" for i in range(len(apple) - 1)] + ["mid_block_res_sample"]
    io = ComponentIO(inputs=inputs, outputs={n: _spec(n, ["batch", "c", "h", "w"]) for n in ours})

    def call(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        res = pkg.predict(_apple_feeds(feeds, pkg) | {"controlnet_cond": feeds["controlnet_cond"]})
        return {o: _cat(res, a) for o, a in zip(ours, apple, strict=True)}

    return CoreMLComponent(name, io, call)


def _vae_decoder(pkg: _Package) -> CoreMLComponent:
    z = pkg.inputs["z"]["shape"]
    io = ComponentIO(
        inputs={"latent_sample": _spec("latent_sample", ["batch", *z[1:]])},
        outputs={"sample": _spec("sample", ["batch", 3, z[2] * 8, z[3] * 8])},
    )
    return CoreMLComponent(
        "vae_decoder", io, lambda f: {"sample": _cat(pkg.predict({"z": f["latent_sample"]}), "image")}
    )


def _vae_encoder(pkg: _Package) -> CoreMLComponent:
    x = pkg.inputs["x"]["shape"]
    io = ComponentIO(
        inputs={"sample": _spec("sample", ["batch", *x[1:]])},
        outputs={"latent_sample": _spec("latent_sample", ["batch", "c", x[2] // 8, x[3] // 8])},
    )

    def call(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        moments = _cat(pkg.predict({"x": feeds["sample"]}), "latent")
        # Apple's encoder gives mean and log-variance along channels; the contract's output is the mean.
        return {"latent_sample": moments[:, : moments.shape[1] // 2]}

    return CoreMLComponent("vae_encoder", io, call)


class CoreMLBackend:
    """The Core ML packages of one bundle section, as contract components."""

    name = "coreml"

    def __init__(self, folder: Path, components: dict[str, dict[str, Any]], compute_units: str = "all"):
        ct = _coremltools()
        if compute_units not in COMPUTE_UNITS:
            raise UserError(
                f"compute units must be one of {', '.join(COMPUTE_UNITS)} (got {compute_units!r})"
            )
        missing = sorted(k for k, v in components.items() if not v.get("inputs") or not v.get("outputs"))
        if missing:
            raise UserError(f"the bundle's Core ML section has no I/O spec for {', '.join(missing)}")
        self._folder, self._entries, self._units, self._ct = folder, components, compute_units, ct
        self._packages: dict[str, _Package] = {}
        self._built: dict[str, CoreMLComponent] = {}
        names = {k for k in components if k.startswith(("text_encoder", "controlnet.", "vae_"))}
        if "unet" in components or "controlled_unet" in components:
            names.add("unet")
        self._names = names
        self.description = f"coremltools {ct.__version__} ({compute_units})"

    def _pkg(self, key: str) -> _Package | None:
        if key not in self._entries:
            return None
        if key not in self._packages:
            self._packages[key] = _Package(self._ct, self._folder, key, self._entries[key], self._units)
        return self._packages[key]

    def has(self, component: str) -> bool:
        return component in self._names

    def component(self, component: str) -> CoreMLComponent:
        if component not in self._names:
            raise UserError(
                f"this bundle section has no {component} (it has: {', '.join(sorted(self._names))})"
            )
        if component not in self._built:
            if component == "unet":
                built = _unet(self._pkg("unet"), self._pkg("controlled_unet"))
            elif component.startswith("text_encoder"):
                built = _text_encoder(component, self._pkg(component))  # type: ignore[arg-type]
            elif component.startswith("controlnet."):
                built = _controlnet(component, self._pkg(component))  # type: ignore[arg-type]
            elif component == "vae_decoder":
                built = _vae_decoder(self._pkg(component))  # type: ignore[arg-type]
            else:
                built = _vae_encoder(self._pkg(component))  # type: ignore[arg-type]
            self._built[component] = built
        return self._built[component]
