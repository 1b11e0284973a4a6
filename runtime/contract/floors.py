"""Every parity floor in one place, each next to the measurement that justifies it.

A gate compares an artifact's outputs with the PyTorch reference's (``metrics.compare``):
- an fp32 export must match by max-abs and cosine (same maths, other kernels);
- a lossy artifact (fp16, int8, 6-bit, quanto) must keep its SQNR (tensors) or PSNR (images) above a
  floor for its precision.

The tiny presets' weights are random: quantization noise does not average out there as it does in a
trained model, so floors measured on them are conservative for real weights. Each floor below sits
under the worst value measured on a correct artifact and above what a realistically broken one gives
(``tests/stages/test_floors_bite.py`` shows each gate failing on a broken artifact). Where fp16 or int8
noise hides a broken layer from every output floor, the weights are gated instead
(``stages/common/onnx/weights.py``: each lossy weight against its fp32 source).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Tolerance:
    """Floors of one component against its PyTorch fp32 reference.

    ``fp32_max_abs``/``fp32_min_cosine``/``fp32_min_sqnr_db``: an fp32 export (ONNX, OpenVINO, TensorRT
    fp32) vs PyTorch. The SQNR floor is what catches a wrong layer: on the tiny UNet a correct graph
    measures 120.1 dB, one layer 1 % off 70.1 dB (2 %: 64.1 dB) while its max-abs, 8e-4, stays under
    the 2e-3 bound; the real-size SD 1.5 graphs measured 104.7-110.4 dB end to end (sdkiln bench).
    ``lora_fuse_max_abs``/``lora_fuse_min_cosine``: fused weights vs the unfused model with adapters.
    ``min_sqnr_db``: SQNR floors of lossy outputs, per precision (fp16, int8, qint8, ...).
    ``coreml_min_psnr_db``: Core ML output PSNR floor on real weights (Apple's ml-stable-diffusion gate).
    """

    fp32_max_abs: float = 1e-3
    fp32_min_cosine: float = 0.99999
    fp32_min_sqnr_db: float = 80.0
    lora_fuse_max_abs: float = 5e-3
    lora_fuse_min_cosine: float = 0.99999
    min_sqnr_db: dict[str, float] = field(default_factory=dict)
    coreml_min_psnr_db: float = 35.0


# Text encoders. fp32 ONNX measured max-abs ~1e-6 (tiny SD 1.5/SDXL, 2 batch sizes x 2 sizes); fp16
# 51-62 dB SQNR; dynamic int8 MatMuls 19-31 dB over all graphs.
TEXT_ENCODER = Tolerance(fp32_max_abs=1e-3, min_sqnr_db={"fp16": 30.0, "int8": 20.0})

# UNet and ControlNet. fp32 ONNX max-abs ~1e-6 tiny, 4.4e-6 on the real-size SD 1.5 UNet; LoRA fusion
# 2.4e-6 (SD 1.5) / 2.2e-6 (SDXL) vs adapters active. quanto on tiny presets: qint8 36.9-37.5 dB,
# qfloat8 21.6 dB, qint4 13.3 dB. Dynamic int8 MatMuls 19-31 dB.
UNET = Tolerance(
    fp32_max_abs=2e-3,
    fp32_min_cosine=0.99999,
    lora_fuse_max_abs=5e-3,
    lora_fuse_min_cosine=0.99999,
    min_sqnr_db={"fp16": 30.0, "int8": 18.0, "qint8": 25.0, "qfloat8": 15.0, "qint4": 8.0},
    coreml_min_psnr_db=35.0,
)

# Autoencoders (VAE and TAESD halves). fp32 ONNX max-abs <= 1.6e-5 (VAE decoder, the largest); the VAE
# decoder in dynamic int8 measured 17.6-18.4 dB, so it is kept fp32 by the int8 recipes.
VAE = Tolerance(fp32_max_abs=3e-3, min_sqnr_db={"fp16": 28.0, "int8": 18.0})

# Component kind -> its tolerance.
TOLERANCES: dict[str, Tolerance] = {
    "text_encoder": TEXT_ENCODER,
    "text_encoder_2": TEXT_ENCODER,
    "unet": UNET,
    "controlnet": UNET,
    "vae_encoder": VAE,
    "vae_decoder": VAE,
    "taesd_encoder": VAE,
    "taesd_decoder": VAE,
}

# Core ML on the tiny presets (export_coreml, palettize_coreml): fp16 weights read back, fp32 compute,
# measured 71-81 dB on tiny-sd15/sdxl; 6-bit k-means palettes measured 38-46 dB (ControlNet lowest,
# UNet highest). The real SD 1.5 UNet measured 75.9 dB (fp16) and 38.5 dB (6-bit, split_einsum).
COREML_TINY_MIN_PSNR_DB: dict[str, float] = {"fp16": 50.0, "palettized": 25.0}

# End-to-end image PSNR floors (dB) against the PyTorch fp32 reference, by candidate precision (the
# parity stage, `sdkiln verify --parity`, the demo). fp32 ONNX measured 131.0 dB (text) and 131.7 dB
# (sketch) on the tiny bundle, and the real-size SD 1.5 graphs 104.7-110.4 dB SQNR on the final latents;
# the same fp32 graphs under the wrong scheduler measured 43.4 dB and with the canny ControlNet fed the
# scribble 27.9 dB, so the fp32 floor (60) rejects a bundle whose scheduler or ControlNets are wired
# wrong. Lossy candidates share that wiring with the fp32 section and are gated on their noise: dynamic
# int8 measured 37-54 dB on the tiny bundle.
E2E_PSNR_DB: dict[str, float] = {
    "fp32": 60.0,
    "fp16": 28.0,
    "int8": 18.0,
    "6bit": 20.0,
    "palettized": 20.0,
}


def component_kind(component: str) -> str:
    """``controlnet.scribble`` -> ``controlnet``; other keys are their kind already."""
    return component.split(".", 1)[0]


def tolerance(component: str) -> Tolerance:
    """The tolerance of a component key (``unet``, ``controlnet.canny``, ``vae_decoder``, ...)."""
    try:
        return TOLERANCES[component_kind(component)]
    except KeyError:
        raise KeyError(f"no tolerance for component {component!r}; known: {', '.join(TOLERANCES)}") from None


def e2e_floor(precision: str | None, components: Iterable[str] = ()) -> float:
    """The end-to-end PSNR floor for a candidate's precision (unknown precisions get the INT8 floor).
    A ``mixed`` candidate gets the lowest floor of its ``components``' precisions."""
    if precision == "mixed" and components:
        return min(e2e_floor(c) for c in components)
    return E2E_PSNR_DB.get(precision or "fp32", E2E_PSNR_DB["int8"])


@dataclass(frozen=True)
class Gate:
    """Pass criteria of one component: fp32 outputs by max-abs and cosine, lossy ones by SQNR."""

    max_abs: float | None = None
    min_cosine: float | None = None
    min_sqnr_db: float | None = None

    def failures(self, m: Mapping[str, float | None]) -> list[str]:
        """Which criteria ``m`` (from ``metrics.compare``) misses; NaN or None misses every one."""
        out = []
        if self.max_abs is not None and not _le(m.get("max_abs"), self.max_abs):
            out.append(f"max_abs {_g(m.get('max_abs'))} > {self.max_abs:.3g}")
        if self.min_cosine is not None and not _ge(m.get("cosine"), self.min_cosine):
            out.append(f"cosine {_g(m.get('cosine'), '.6f')} < {self.min_cosine}")
        if self.min_sqnr_db is not None and not _ge(m.get("sqnr_db"), self.min_sqnr_db):
            out.append(f"SQNR {_g(m.get('sqnr_db'), '.2f')} dB < {self.min_sqnr_db} dB")
        return out

    def passes(self, m: Mapping[str, float | None]) -> bool:
        return not self.failures(m)

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _le(v: float | None, limit: float) -> bool:
    return v is not None and v <= limit


def _ge(v: float | None, limit: float) -> bool:
    return v is not None and v >= limit


def _g(v: float | None, fmt: str = ".3g") -> str:
    return "n/a" if v is None else format(v, fmt)


# Precisions that share a floor: bf16/bf32 keep fp16's (fewer mantissa bits, same use); every int8
# scheme (dynamic, static QDQ, weight-only) takes int8's.
_FLOOR_ALIASES = {"bf16": "fp16", "bf32": "fp16"}


def gate(component: str, precision: str) -> Gate:
    """The gate of a component at a precision: ``fp32`` by max-abs, cosine and SQNR, anything else by the SQNR
    floor for it. ``KeyError`` when the table has no floor for that precision."""
    tol = tolerance(component)
    if precision == "fp32":
        return Gate(
            max_abs=tol.fp32_max_abs, min_cosine=tol.fp32_min_cosine, min_sqnr_db=tol.fp32_min_sqnr_db
        )
    key = _FLOOR_ALIASES.get(precision, "int8" if precision.startswith("int8") else precision)
    floor = tol.min_sqnr_db.get(key)
    if floor is None:
        raise KeyError(f"no SQNR floor for {component} at precision {precision!r}")
    return Gate(min_sqnr_db=floor)
