"""sdkiln.stages: the build side. One module per stage; this dict is the registry.

    from sdkiln.stages import STAGES
    STAGES["export_onnx"].params      # the stage's params model

The engine (``stages/engine/``), shared helpers (``stages/common/``) and tools (``stages/tools/``: bench,
publish) live in sub-packages; stage modules import nothing heavy at module level, so importing this
package is cheap.
"""

from sdkiln.stages import (
    build_tensorrt,
    check_parity,
    export_coreml,
    export_onnx,
    export_openvino,
    fuse_lora,
    load_pipeline,
    optimize_onnx,
    palettize_coreml,
    prepare_tensorrt,
    publish_hub,
    quantize_onnx,
    quantize_torch,
)
from sdkiln.stages.engine.core import Stage

STAGES: dict[str, Stage] = {
    "load_pipeline": load_pipeline.STAGE,
    "fuse_lora": fuse_lora.STAGE,
    "quantize_torch": quantize_torch.STAGE,
    "export_onnx": export_onnx.STAGE,
    "optimize_onnx": optimize_onnx.STAGE,
    "quantize_onnx": quantize_onnx.STAGE,
    "export_openvino": export_openvino.STAGE,
    "prepare_tensorrt": prepare_tensorrt.STAGE,
    "build_tensorrt": build_tensorrt.STAGE,
    "export_coreml": export_coreml.STAGE,
    "palettize_coreml": palettize_coreml.STAGE,
    "parity": check_parity.STAGE,
    "publish_hub": publish_hub.STAGE,
}

__all__ = ["STAGES"]
