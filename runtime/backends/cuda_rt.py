"""The few CUDA runtime calls the TensorRT backend makes, through NVIDIA's ``cuda-bindings`` (cuda-python).

Device buffers, pinned host buffers, one stream, async copies, CUDA graphs (stream capture) and events.
Every call checks its ``cudaError_t`` and raises ``CudaError`` naming the call; a machine without a
driver or GPU raises a UserError that says so instead. Import is lazy: importing this module imports no
CUDA library.

    rt = CudaRuntime.open()            # UserError without cuda-bindings, a driver or a GPU
    buf = rt.malloc(1 << 20)
    host = rt.pinned(np.float32, (4, 64, 64))
    rt.htod(buf, host, stream)
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from sdkiln.runtime.contract.errors import SdkilnError, UserError

logger = logging.getLogger(__name__)

INSTALL_CUDA_BINDINGS = "install NVIDIA's CUDA Python bindings: pip install 'sdkiln[nvidia]' (cuda-bindings)"

# cudaError_t values that mean "this machine cannot run CUDA at all" rather than "a call went wrong".
_NO_DEVICE_ERRORS = {
    "cudaErrorNoDevice",
    "cudaErrorInsufficientDriver",
    "cudaErrorNotPermitted",
    "cudaErrorDevicesUnavailable",
    "cudaErrorSystemDriverMismatch",
    "cudaErrorCompatNotSupportedOnDevice",
}


class CudaError(SdkilnError):
    """A CUDA runtime call failed on a machine that has a GPU. Exit code 1."""

    exit_code = 1


def _import_cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart  # cuda-bindings >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError as e:
            raise UserError(f"the CUDA runtime bindings are not installed; {INSTALL_CUDA_BINDINGS}") from e
    return cudart


@dataclass
class DeviceBuffer:
    """A device allocation: its address and size in bytes."""

    ptr: int
    nbytes: int


class CudaRuntime:
    """Checked wrappers over ``cudart``. One instance per process is enough (``open`` caches it)."""

    _instance: CudaRuntime | None = None

    def __init__(self, cudart: Any, device: int = 0):
        self.cudart = cudart
        self.device = device
        count = self._check(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
        if count == 0:
            raise UserError("CUDA sees no GPU on this machine (cudaGetDeviceCount() = 0)")
        if device >= count:
            raise UserError(f"GPU {device} does not exist; CUDA sees {count}")
        self._check(cudart.cudaSetDevice(device), "cudaSetDevice")
        props = self._check(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
        self.compute_capability = (int(props.major), int(props.minor))
        name = props.name
        self.name = (name.decode(errors="replace") if isinstance(name, bytes) else str(name)).rstrip("\x00")
        self.total_memory = int(props.totalGlobalMem)

    @classmethod
    def open(cls, device: int = 0) -> CudaRuntime:
        if cls._instance is None or cls._instance.device != device:
            cls._instance = cls(_import_cudart(), device)
        return cls._instance

    # -- error handling ------------------------------------------------------------------------------

    def _check(self, result: Any, what: str) -> Any:
        """cuda-bindings returns ``(err, value...)``; raise on error, return the value(s)."""
        if isinstance(result, tuple):
            err, rest = result[0], result[1:]
        else:
            err, rest = result, ()
        if int(err) != 0:
            name = getattr(err, "name", str(err))
            try:
                detail = self.cudart.cudaGetErrorString(err)[1]
                detail = detail.decode() if isinstance(detail, bytes) else str(detail)
            except Exception:
                detail = ""
            if name in _NO_DEVICE_ERRORS:
                raise UserError(
                    f"CUDA cannot run on this machine: {what} returned {name} ({detail}); it needs an "
                    "NVIDIA GPU with a driver as new as the CUDA runtime (`nvidia-smi` must list it)"
                )
            raise CudaError(f"{what} failed: {name} ({detail})")
        if not rest:
            return None
        return rest[0] if len(rest) == 1 else rest

    # -- memory --------------------------------------------------------------------------------------

    def malloc(self, nbytes: int) -> DeviceBuffer:
        ptr = self._check(self.cudart.cudaMalloc(max(int(nbytes), 1)), f"cudaMalloc({nbytes})")
        return DeviceBuffer(int(ptr), int(nbytes))

    def free(self, buf: DeviceBuffer) -> None:
        if buf.ptr:
            self._check(self.cudart.cudaFree(buf.ptr), "cudaFree")
            buf.ptr = 0

    def pinned(self, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        """A numpy array in page-locked host memory (fast, async-capable copies). Freed with ``free_pinned``."""
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        nbytes = max(count * dt.itemsize, 1)
        ptr = int(self._check(self.cudart.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes})"))
        raw = (ctypes.c_byte * nbytes).from_address(ptr)
        return np.frombuffer(raw, dtype=dt, count=count).reshape(shape)

    def free_pinned(self, arr: np.ndarray) -> None:
        self._check(self.cudart.cudaFreeHost(arr.ctypes.data), "cudaFreeHost")

    def htod(self, dst: int, src: np.ndarray, stream: int) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.cudart.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, kind, stream), "H2D copy")

    def dtoh(self, dst: np.ndarray, src: int, stream: int) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.cudart.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, kind, stream), "D2H copy")

    def dtod(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        kind = self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        self._check(self.cudart.cudaMemcpyAsync(dst, src, nbytes, kind, stream), "D2D copy")

    def mem_info(self) -> tuple[int, int]:
        """(free, total) device memory in bytes."""
        free, total = self._check(self.cudart.cudaMemGetInfo(), "cudaMemGetInfo")
        return int(free), int(total)

    # -- streams, graphs, events ---------------------------------------------------------------------

    def stream(self) -> int:
        flags = self.cudart.cudaStreamNonBlocking
        return int(self._check(self.cudart.cudaStreamCreateWithFlags(flags), "cudaStreamCreate"))

    def sync(self, stream: int) -> None:
        self._check(self.cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def begin_capture(self, stream: int) -> None:
        mode = self.cudart.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal
        self._check(self.cudart.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")

    def end_capture(self, stream: int) -> Any:
        """Finish a capture; returns an instantiated, launchable graph."""
        graph = self._check(self.cudart.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
        try:
            return self._check(self.cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        finally:
            self._check(self.cudart.cudaGraphDestroy(graph), "cudaGraphDestroy")

    def launch(self, graph_exec: Any, stream: int) -> None:
        self._check(self.cudart.cudaGraphLaunch(graph_exec, stream), "cudaGraphLaunch")

    def destroy_graph(self, graph_exec: Any) -> None:
        self._check(self.cudart.cudaGraphExecDestroy(graph_exec), "cudaGraphExecDestroy")

    def event(self) -> Any:
        return self._check(self.cudart.cudaEventCreate(), "cudaEventCreate")

    def record(self, event: Any, stream: int) -> None:
        self._check(self.cudart.cudaEventRecord(event, stream), "cudaEventRecord")

    def elapsed_ms(self, start: Any, end: Any) -> float:
        self._check(self.cudart.cudaEventSynchronize(end), "cudaEventSynchronize")
        return float(self._check(self.cudart.cudaEventElapsedTime(start, end), "cudaEventElapsedTime"))
