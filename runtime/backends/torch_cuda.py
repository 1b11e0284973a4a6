"""PyTorch on an NVIDIA GPU, no TensorRT needed: the fused weights the build produced, made fast.

    pipe = sdkiln.runtime.load("artifacts/tiny", backend="torch_cuda", compile="max-autotune-no-cudagraphs")
    pipe = sdkiln.runtime.load("artifacts/tiny", backend="torch_cuda", cuda_graphs=True)   # reduce-overhead

The components and their calls are the PyTorch reference backend's (``torch_ref.TorchBackend``: same
I/O spec, same input checks, same diffusers calls), on the GPU and prepared once per module:

- UNet, ControlNets and text encoders in fp16 (or bf16); the VAE in fp32 unless its config says it
  does not overflow in fp16 (``force_upcast: false``, as the fp16-fix VAEs do);
- convolutional modules (UNet, ControlNets, VAE halves) in ``channels_last`` memory format;
- ``torch.compile`` with static shapes (``dynamic=False``: one graph per image size and batch, which is
  what CUDA graphs need), mode ``max-autotune-no-cudagraphs`` or, with ``cuda_graphs=True``,
  ``reduce-overhead`` (Inductor replays each compiled call as a CUDA graph); the VAE halves are compiled
  through their ``encoder``/``decoder`` submodules, which is where ``encode``/``decode`` spend their time.

``device="cpu"`` exists so the compiled graphs can be checked on a machine without a GPU (tests).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sdkiln.runtime.contract.errors import UserError

logger = logging.getLogger(__name__)

COMPILE_MODES = ("none", "default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")
_CONV_MODULES = ("unet", "vae", "vae_tiny")  # plus controlnet.*


def require_cuda() -> Any:
    """torch with CUDA and a visible GPU, or a UserError saying which is missing."""
    from sdkiln.runtime.backends.torch_io import imports

    torch, _, _ = imports()
    if torch.version.cuda is None:
        raise UserError(
            f"the torch_cuda backend needs a CUDA build of PyTorch; this one is torch {torch.__version__} "
            "(CPU only). Install PyTorch for your CUDA version (pytorch.org), on a machine with an NVIDIA GPU"
        )
    if not torch.cuda.is_available():
        raise UserError(
            f"the torch_cuda backend needs an NVIDIA GPU; torch {torch.__version__} (CUDA {torch.version.cuda}) "
            "sees none (check `nvidia-smi` and CUDA_VISIBLE_DEVICES)"
        )
    return torch


def compile_options(compile: str, cuda_graphs: bool) -> dict[str, Any] | None:
    """The ``torch.compile`` keyword arguments for a mode (None: eager). Pure; raises on bad combinations."""
    if compile not in COMPILE_MODES:
        raise UserError(f"compile must be one of {', '.join(COMPILE_MODES)} (got {compile!r})")
    if cuda_graphs:
        if compile in ("max-autotune-no-cudagraphs", "default"):
            raise UserError(f"cuda_graphs needs compile reduce-overhead or max-autotune, not {compile!r}")
        compile = "reduce-overhead" if compile == "none" else compile
    if compile == "none":
        return None
    return {"mode": compile, "dynamic": False, "fullgraph": False}


class TorchCudaBackend:
    """The reference backend's components on a GPU, in half precision, channels-last and compiled."""

    name = "torch_cuda"

    def __init__(
        self,
        folder: Path,
        family: str,
        controlnets: list[str],
        taesd: bool,
        dtype: str = "float16",
        *,
        compile: str = "none",
        cuda_graphs: bool = False,
        channels_last: bool = True,
        device: str = "cuda",
        compile_backend: str = "inductor",
    ):
        from sdkiln.runtime.backends.torch_ref import TorchBackend

        if device != "cpu":
            torch = require_cuda()
        else:
            from sdkiln.runtime.backends.torch_io import imports

            torch = imports()[0]
        if dtype not in ("float16", "bfloat16", "float32"):
            raise UserError(f"torch_cuda dtype must be float16, bfloat16 or float32 (got {dtype!r})")
        self._torch = torch
        self._compile = compile_options(compile, cuda_graphs)
        self._compile_backend = compile_backend
        self._channels_last = channels_last
        self.compiled: list[str] = []
        self._ref = TorchBackend(
            folder, family, controlnets, taesd, dtype=dtype, device=device, prepare=self._prepare
        )
        where = torch.cuda.get_device_name(0) if device != "cpu" else "CPU"
        mode = "eager" if self._compile is None else f"torch.compile {self._compile['mode']}"
        self.description = (
            f"torch {torch.__version__} on {where} ({dtype}, {mode}"
            f"{', channels_last' if channels_last else ''}{', CUDA graphs' if cuda_graphs else ''})"
        )

    def _prepare(self, key: str, module: Any) -> Any:
        torch = self._torch
        conv = key in _CONV_MODULES or key.startswith("controlnet.")
        if self._channels_last and conv:
            module = module.to(memory_format=torch.channels_last)
        if self._compile is None:
            return module
        opts = dict(self._compile, backend=self._compile_backend)
        if self._compile_backend != "inductor":
            opts.pop("mode")  # modes are Inductor's
        if key in ("vae", "vae_tiny"):
            # encode()/decode() are methods, not forward(): compile the halves they call.
            for half in ("encoder", "decoder"):
                if hasattr(module, half):
                    setattr(module, half, torch.compile(getattr(module, half), **opts))
            self.compiled.append(key)
            return module
        self.compiled.append(key)
        return torch.compile(module, **opts)

    def has(self, component: str) -> bool:
        return self._ref.has(component)

    def component(self, component: str) -> Any:
        return self._ref.component(component)
