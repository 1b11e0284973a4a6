"""Names and folders of the contract: artifact kinds, bundle files and sections, and the file layout of
each kind (a diffusers PIPELINE folder, an optimum/diffusers ONNX folder, a Core ML resources folder in
the names of Apple's Swift ``StableDiffusion`` package).

Component keys are the contract's names for models: ``text_encoder``, ``text_encoder_2``, ``unet``,
``controlnet.<type>`` (``controlnet.scribble``), ``vae_encoder``, ``vae_decoder``, ``taesd_encoder``,
``taesd_decoder``.
"""

from __future__ import annotations


class Kind:
    """Artifact kinds: what a step produces and what the next step may consume."""

    PIPELINE = "pipeline"  # a diffusers pipeline folder, safetensors only
    TORCH_QUANTIZED = "torch_quantized"  # optimum-quanto quantized weights + quantization maps
    ONNX = "onnx"  # an optimum/diffusers ONNX pipeline folder
    OPENVINO = "openvino"  # OpenVINO IR (.xml + .bin) per component, in the ONNX folder layout
    COREML = "coreml"  # Core ML packages in the layout of Apple's StableDiffusion Swift package
    TENSORRT = "tensorrt"  # TensorRT-ready ONNX plus shape profiles (engines are built per GPU)
    TENSORRT_ENGINE = "tensorrt_engine"  # serialized engines for one GPU generation + TensorRT version
    REPORT = "report"  # measurements only (parity, benchmarks)
    PUBLISHED = "published"  # a record of what was pushed where
    DATA = "data"  # anything else (test stages)


# -- bundle files ----------------------------------------------------------------------------------
MANIFEST = "manifest.json"
LOCK_FILE = "build.lock.json"
RECIPE_FILE = "recipe.yaml"
README = "README.md"
BUNDLE_METADATA = (RECIPE_FILE, LOCK_FILE)

# -- which backend runs which kind, and the section it prefers -------------------------------------
BACKEND_KINDS: dict[str, str] = {
    "onnx": Kind.ONNX,
    "torch": Kind.PIPELINE,
    "coreml": Kind.COREML,
    "tensorrt": Kind.TENSORRT,  # TensorRT-ready ONNX, plus the engine sections built from it
    "torch_cuda": Kind.PIPELINE,
    "openvino": Kind.OPENVINO,  # OpenVINO IR on the CPU
}
PREFERRED_SECTIONS: dict[str, str] = {
    "onnx": "onnx/fp32",
    "torch": "torch/fused",
    "coreml": "coreml/split_einsum",
    "tensorrt": "tensorrt/onnx-fp16",
    "torch_cuda": "torch/fused",
    "openvino": "openvino/fp32",
}

# -- PIPELINE (diffusers folder) -------------------------------------------------------------------
CONTROLNET_DIR = "controlnet"  # controlnet/<type>/ : a ControlNetModel folder per type
VAE_TINY_DIR = "vae_tiny"  # AutoencoderTiny (TAESD)
# The folder of a PIPELINE artifact whose config.json describes each component kind.
PIPELINE_CONFIG_DIRS: dict[str, str] = {
    "text_encoder": "text_encoder",
    "text_encoder_2": "text_encoder_2",
    "unet": "unet",
    "vae_encoder": "vae",
    "vae_decoder": "vae",
    "taesd_encoder": VAE_TINY_DIR,
    "taesd_decoder": VAE_TINY_DIR,
}

# -- ONNX (optimum/diffusers layout + sdkiln extras) -----------------------------------------------
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_FILE = "model.onnx_data"  # one deterministic name (the optimum/diffusers convention)
# Graphs whose folder name and model_index entry follow diffusers' ONNX pipelines (OnnxRuntimeModel).
ONNX_INDEXED = ("text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder")
# Non-model folders of a pipeline that an ONNX folder carries over unchanged.
ONNX_COPIED = ("tokenizer", "tokenizer_2", "scheduler", "feature_extractor")
# Components that are autoencoders: they may stay fp32 in an fp16 build (SD VAEs overflow in fp16).
VAE_KINDS = ("vae_encoder", "vae_decoder", "taesd_encoder", "taesd_decoder")


def onnx_folder(component: str) -> str:
    """The folder of a component's graph in an ONNX artifact: ``unet``, ``controlnet/scribble``, ..."""
    if component.startswith("controlnet."):
        return f"{CONTROLNET_DIR}/{component.split('.', 1)[1]}"
    return component


def onnx_path(component: str) -> str:
    return f"{onnx_folder(component)}/{MODEL_FILE}"


# -- OpenVINO IR (the ONNX folder layout, one IR per component folder) ------------------------------
OPENVINO_XML = "model.xml"
OPENVINO_BIN = "model.bin"


def openvino_path(component: str) -> str:
    """Where a component's IR lives in an OPENVINO artifact: ``unet/model.xml``, ..."""
    return f"{onnx_folder(component)}/{OPENVINO_XML}"


# -- Core ML (Apple's Swift StableDiffusion resources) --------------------------------------------
PACKAGES_DIR = "packages"
# Our component keys -> the model names Apple's Swift StableDiffusion package loads
# (StableDiffusionPipeline+Resources.swift, StableDiffusionXL+Resources.swift).
APPLE_NAMES: dict[str, str] = {
    "text_encoder": "TextEncoder",
    "text_encoder_2": "TextEncoder2",
    "unet": "Unet",
    "controlled_unet": "ControlledUnet",
    "vae_decoder": "VAEDecoder",
    "vae_encoder": "VAEEncoder",
}
UNET_KEYS = ("unet", "controlled_unet")


def apple_name(key: str) -> str:
    """The package name (without ``.mlpackage``) of a component key: ``unet`` -> ``Unet``,
    ``controlnet.scribble`` -> ``controlnet/scribble``."""
    if key.startswith("controlnet."):
        return f"{CONTROLNET_DIR}/{key.split('.', 1)[1]}"
    return APPLE_NAMES[key]


def package_relpath(key: str) -> str:
    """Where a component's package lives inside a COREML artifact."""
    return f"{PACKAGES_DIR}/{apple_name(key)}.mlpackage"


def chunk_relpaths(key: str) -> list[str]:
    """The two chunk packages of a chunked UNet (``UnetChunk1``/``UnetChunk2``, or the Controlled ones)."""
    if key not in UNET_KEYS:
        raise ValueError(f"only UNets are chunked, not {key!r}")
    return [f"{PACKAGES_DIR}/{APPLE_NAMES[key]}Chunk{i}.mlpackage" for i in (1, 2)]
