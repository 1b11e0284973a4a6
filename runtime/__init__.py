"""sdkiln.runtime: run sdkiln bundles with ONNX Runtime, Core ML, or the PyTorch reference.

    import sdkiln.runtime
    pipe = sdkiln.runtime.load("artifacts/sd15-lcm-scribble", backend="onnx")
    img = pipe.sketch("car.png", "a red sports car, studio light", steps=4, seed=42)
    img = pipe.text("a lighthouse at dusk", steps=1, seed=7)
    img = pipe.edit("photo.jpg", "a red bird on a branch", strength=0.6, control="canny", seed=42)

Importing this package (and running the ONNX or Core ML backend) imports no torch, diffusers or build
toolchain: scheduler maths, tokenization and image processing are numpy, ``tokenizers`` and PIL.
"""

from sdkiln.runtime.load import load, resolve_source
from sdkiln.runtime.pipeline import Pipeline
from sdkiln.runtime.types import Request, Result

__all__ = ["Pipeline", "Request", "Result", "load", "resolve_source"]
