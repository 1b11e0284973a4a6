"""The PyTorch reference backend: the diffusers models of a PIPELINE bundle section behind the same
component interface as ONNX Runtime (contract I/O names, numpy in and out).

It exists for parity: the runtime's one denoising loop runs over these components exactly as over the
ONNX ones, so any difference in the final image comes from the export, not from the loop. Every module
is loaded and called through ``torch_io`` (the one PyTorch reference). Needs the build extra (torch,
diffusers, transformers); importing this module imports none of them.

The I/O spec comes from ``families.component_specs`` filled in from the section's own configs, and
inputs are checked against it like any other backend's. ``dtype="float16"``/``"bfloat16"`` runs the
text encoder, UNet and ControlNets in that dtype; the VAE stays in float32 when its config says
``force_upcast`` (the SD 1.5 and SDXL VAEs overflow in fp16).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sdkiln.runtime.backends import torch_io
from sdkiln.runtime.contract.errors import UserError
from sdkiln.runtime.contract.families import component_specs, get_family
from sdkiln.runtime.contract.layout import VAE_KINDS, VAE_TINY_DIR
from sdkiln.runtime.contract.specs import ComponentIO, check_inputs

logger = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")


def read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise UserError(f"{path}: missing (is this a diffusers pipeline folder?)") from e
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable config ({e})") from e


class TorchComponent:
    """Numpy in, numpy out, around one contract call of a diffusers/transformers module."""

    def __init__(self, name: str, io: ComponentIO, model: Any, dtype: Any, device: str = "cpu"):
        self.name = name
        self.io = io
        self.model = model
        self._dtype = dtype
        self._device = device
        self._outputs = list(io.outputs)

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        check_inputs(self.name, self.io, inputs)
        tensors = {
            k: torch.from_numpy(np.ascontiguousarray(v)).to(
                self._device, self._dtype if v.dtype.kind == "f" else torch.long
            )
            for k, v in inputs.items()
        }
        with torch.inference_mode():
            out = torch_io.call(self.name, self.model, tensors, self._outputs)
        return {k: v.float().cpu().numpy() for k, v in out.items() if k in self.io.outputs}


class TorchBackend:
    """diffusers models loaded from a pipeline folder (``torch/fused`` or any PIPELINE section)."""

    name = "torch"

    def __init__(
        self,
        folder: Path,
        family: str,
        controlnets: list[str],
        taesd: bool,
        dtype: str = "float32",
        *,
        device: str = "cpu",
        prepare: Callable[[str, Any], Any] | None = None,
    ):
        """``device``/``prepare`` serve backends built on this one (``torch_cuda``): where the modules
        live, and a hook ``prepare(key, module) -> module`` run once on each module after it loads
        (memory format, ``torch.compile``); ``key`` is the component, or ``vae``/``vae_tiny`` for both
        halves of an autoencoder."""
        torch, diffusers, _ = torch_io.imports()
        if dtype not in DTYPES:
            raise UserError(f"torch dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
        self._dt = dtype
        fam = get_family(family)
        configs = {
            "unet": read_config(folder / "unet" / "config.json"),
            "vae": read_config(folder / "vae" / "config.json"),
        }
        for te in fam.text_encoders:
            configs[te] = read_config(folder / te / "config.json")
        if taesd:
            configs[VAE_TINY_DIR] = read_config(folder / VAE_TINY_DIR / "config.json")
        specs = component_specs(
            fam, configs, controlnets=controlnets, taesd=taesd, unet_residual_inputs=bool(controlnets)
        )
        self._io = {k: ComponentIO.from_manifest(v) for k, v in specs.items()}
        self._folder = folder
        self._vae_dt = "float32" if configs["vae"].get("force_upcast", True) else dtype
        self._modules: dict[str, Any] = {}
        self._components: dict[str, TorchComponent] = {}
        self._device = device
        self._prepare = prepare
        where = "CPU" if device == "cpu" else device
        self.description = f"torch {torch.__version__} + diffusers {diffusers.__version__} ({dtype}, {where})"

    def _dtype_of(self, component: str) -> str:
        return self._vae_dt if component in VAE_KINDS else self._dt

    def _module(self, component: str) -> Any:
        # Both halves of an autoencoder are one module, loaded once.
        key = torch_io.module_folder(component) if component in VAE_KINDS else component
        if key not in self._modules:
            m = torch_io.load_module(self._folder, component, self._dtype_of(component))
            if self._device != "cpu":
                m = m.to(self._device)
            if self._prepare is not None:
                m = self._prepare(key, m)
            self._modules[key] = m
        return self._modules[key]

    def has(self, component: str) -> bool:
        return component in self._io

    def component(self, component: str) -> TorchComponent:
        if component not in self._io:
            raise UserError(f"this bundle section has no {component} (it has: {', '.join(sorted(self._io))})")
        if component not in self._components:
            import torch

            dtype = getattr(torch, self._dtype_of(component))
            self._components[component] = TorchComponent(
                component, self._io[component], self._module(component), dtype, self._device
            )
        return self._components[component]
