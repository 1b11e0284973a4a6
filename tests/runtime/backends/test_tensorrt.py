"""The TensorRT backend's own logic, against a stand-in for TensorRT and the CUDA runtime.

No GPU here, so what these check is sdkiln's code, not TensorRT: buffers per input shape, the shared
device-memory pool (sized to the largest engine, rebinding contexts when it grows), profile checks before
anything runs, CUDA-graph capture after one plain run (the stand-in replays captured copies and kernels
with the addresses baked in, as CUDA does), outputs that do not alias the next call's buffers, and where
an engine comes from (bundle, cache, build). The real thing is ``test_gpu.py`` (``-m gpu``).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from sdkiln.runtime.backends import nvidia
from sdkiln.runtime.backends.cuda_rt import DeviceBuffer
from sdkiln.runtime.contract.errors import InputSpecError, UserError
from sdkiln.runtime.contract.specs import ComponentIO

PLAN = b"stand-in plan"


class FakeRuntime:
    """Device memory as numpy byte arrays; captured work is a list of closures replayed on launch."""

    compute_capability = (9, 0)
    name = "Stand-in GPU"

    def __init__(self) -> None:
        self.mem: dict[int, np.ndarray] = {}
        self._next = 4096
        self.capturing: list[Any] | None = None
        self.launches = 0
        self.mallocs = 0

    def _do(self, op: Any) -> None:
        if self.capturing is not None:
            self.capturing.append(op)
        else:
            op()

    def malloc(self, nbytes: int) -> DeviceBuffer:
        ptr, self._next = self._next, self._next + nbytes + 256
        self.mem[ptr] = np.zeros(max(nbytes, 1), np.uint8)
        self.mallocs += 1
        return DeviceBuffer(ptr, nbytes)

    def free(self, buf: DeviceBuffer) -> None:
        del self.mem[buf.ptr]

    def pinned(self, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, dtype)

    def htod(self, dst: int, src: np.ndarray, stream: int) -> None:
        self._do(lambda: self.mem[dst].__setitem__(slice(0, src.nbytes), src.reshape(-1).view(np.uint8)))

    def dtoh(self, dst: np.ndarray, src: int, stream: int) -> None:
        self._do(lambda: dst.reshape(-1).view(np.uint8).__setitem__(slice(None), self.mem[src][: dst.nbytes]))

    def stream(self) -> int:
        return 7

    def sync(self, stream: int) -> None:
        assert self.capturing is None, "synchronised inside a capture"

    def begin_capture(self, stream: int) -> None:
        self.capturing = []

    def end_capture(self, stream: int) -> list[Any]:
        graph, self.capturing = self.capturing, None
        return graph

    def launch(self, graph: list[Any], stream: int) -> None:
        self.launches += 1
        for op in graph:
            op()

    def destroy_graph(self, graph: Any) -> None:
        pass


class FakeContext:
    """y = 2 * x + the first float of the scratch memory (so a context without memory would fail)."""

    def __init__(self, rt: FakeRuntime) -> None:
        self.rt = rt
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.memory: tuple[int, int] | None = None
        self.enqueues = 0

    def set_device_memory(self, ptr: int, size: int) -> None:
        self.memory = (ptr, size)

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shapes[name] = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shapes["x"] if name == "y" else self.shapes[name]

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream: int) -> bool:
        assert self.memory is not None, "no device memory bound"
        rt, x_ptr, y_ptr, shape = self.rt, self.addresses["x"], self.addresses["y"], self.shapes["x"]
        n = int(np.prod(shape)) * 4
        scratch = self.memory[0]
        self.enqueues += 1

        def kernel() -> None:
            x = rt.mem[x_ptr][:n].view(np.float32)
            bias = rt.mem[scratch][:4].view(np.float32)[0]
            rt.mem[y_ptr][:n] = (2 * x + bias).astype(np.float32).view(np.uint8)

        rt._do(kernel)
        return True


class FakeEngine:
    def __init__(self, rt: FakeRuntime, memory: int) -> None:
        self.rt = rt
        self.num_io_tensors = 2
        self.device_memory_size_v2 = memory
        self.contexts: list[FakeContext] = []

    def get_tensor_name(self, i: int) -> str:
        return ("x", "y")[i]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name == "x" else "OUTPUT"

    def get_tensor_dtype(self, name: str) -> str:
        return "FLOAT"

    def create_execution_context(self, strategy: str) -> FakeContext:
        assert strategy == "USER_MANAGED"
        ctx = FakeContext(self.rt)
        self.contexts.append(ctx)
        return ctx


def fake_trt(rt: FakeRuntime) -> Any:
    class ILogger:
        def __init__(self) -> None:
            pass

    def runtime(logger: Any) -> Any:
        return SimpleNamespace(
            deserialize_cuda_engine=lambda data: (
                FakeEngine(rt, len(data) * 100) if data.startswith(PLAN) else None
            )
        )

    return SimpleNamespace(
        __version__="10.8.0.43",
        ExecutionContextAllocationStrategy=SimpleNamespace(USER_MANAGED="USER_MANAGED"),
        TensorIOMode=SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"),
        nptype=lambda dtype: np.float32,
        Runtime=runtime,
        ILogger=ILogger,
    )


IO = ComponentIO.from_manifest(
    {
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 4]}],
    }
)
PROFILE = {"x": {"min": [1, 4], "opt": [2, 4], "max": [4, 4]}}


@pytest.fixture
def rt(monkeypatch: pytest.MonkeyPatch) -> FakeRuntime:
    from sdkiln.runtime.backends import cuda_rt

    fake = FakeRuntime()
    monkeypatch.setattr(nvidia, "require_tensorrt", lambda: fake_trt(fake))
    monkeypatch.setattr(cuda_rt.CudaRuntime, "open", classmethod(lambda cls, device=0: fake))
    return fake


def _host(cuda_graphs: bool = False) -> Any:
    from sdkiln.runtime.backends.tensorrt import EngineHost

    return EngineHost(cuda_graphs=cuda_graphs)


def test_runs_and_checks_shapes_against_the_profile(rt: FakeRuntime) -> None:
    host = _host()
    assert host.tag == "sm90-trt10.8.0.43"
    comp = host.open("unet", host.deserialize(PLAN, "unet"), IO, PROFILE)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(comp(x=x)["y"], 2 * x)
    x1 = np.ones((1, 4), np.float32)
    np.testing.assert_array_equal(comp(x=x1)["y"], 2 * x1)  # a second shape: its own buffers
    np.testing.assert_array_equal(comp(x=x)["y"], 2 * x)  # back to the first: rebound, same buffers
    assert rt.mallocs == 1 + 2 * 2  # the pool, then x and y for each of the two shapes
    with pytest.raises(InputSpecError, match=r"outside the engine's profile \[1, 4\]\.\.\[4, 4\]"):
        comp(x=np.zeros((5, 4), np.float32))
    with pytest.raises(InputSpecError, match="dtype float64"):
        comp(x=np.zeros((1, 4)))
    with pytest.raises(UserError, match="cannot load this engine"):
        host.deserialize(b"something else", "vae")


def test_one_memory_pool_sized_to_the_largest_engine(rt: FakeRuntime) -> None:
    host = _host()
    small = host.open("text_encoder", host.deserialize(PLAN, "te"), IO, PROFILE)
    x = np.ones((1, 4), np.float32)
    small(x=x)
    first = host.pool.buffer
    big = host.open("unet", host.deserialize(PLAN + b"-" * 100, "unet"), IO, PROFILE)
    assert host.pool.buffer.nbytes == big.device_memory > small.device_memory
    assert host.pool.buffer.ptr != first.ptr and first.ptr not in rt.mem  # grown: the old one is freed
    small(x=x)  # the small engine's context is rebound to the new pool before it runs
    assert small.context.memory == (host.pool.buffer.ptr, host.pool.buffer.nbytes)
    big(x=x)
    assert big.context.memory == small.context.memory  # shared, not one allocation per engine


def test_cuda_graphs_capture_after_one_plain_run(rt: FakeRuntime) -> None:
    host = _host(cuda_graphs=True)
    comp = host.open("unet", host.deserialize(PLAN, "unet"), IO, PROFILE)
    outs = []
    for i in range(4):
        x = np.full((2, 4), float(i), np.float32)
        outs.append(comp(x=x)["y"])
        np.testing.assert_array_equal(outs[-1], 2 * x)  # each replay reads this call's inputs
    assert comp.context.enqueues == 2  # the plain warm-up run and the one captured
    assert rt.launches == 3  # calls 2, 3 and 4 ran the captured graph
    assert outs[0][0, 0] == 0.0  # returned arrays are copies, not the reused pinned buffers
    comp(x=np.ones((1, 4), np.float32))  # a new shape: a plain run first, then its own graph
    assert comp.context.enqueues == 3


def test_engine_source_bundle_cache_or_build(
    rt: FakeRuntime, nvidia_bundle: Path, nvidia_manifest: Any, tmp_path: Path
) -> None:
    from sdkiln.runtime.backends.tensorrt import TensorrtBackend, component_files
    from sdkiln.runtime.backends.tensorrt_build import BuildSettings
    from sdkiln.runtime.contract.manifest import Section

    section = "tensorrt/onnx-fp16"
    entry = nvidia_manifest.sections[section]
    unet_rel = entry.components["unet"].path
    files = component_files(nvidia_manifest.files, section, unet_rel)
    settings = BuildSettings(profile=entry.details["profiles"]["unet"])
    from dataclasses import asdict

    engines = tmp_path / "engines"
    engine_entry = Section(
        kind="tensorrt_engine",
        details={
            "target": {"tag": "sm90-trt10.8.0.43"},
            "engines": {
                "unet": {
                    "path": "sm90-trt10.8.0.43/unet.plan",
                    "source_files": files,
                    "settings": asdict(settings),
                }
            },
        },
    )
    args = (nvidia_bundle / section, entry, nvidia_manifest.files, section)
    be = TensorrtBackend(*args, [(engines, engine_entry)], cache_dir=tmp_path / "cache")
    src = be.source("unet")
    assert (src.origin, src.plan) == ("bundle", engines / "sm90-trt10.8.0.43" / "unet.plan")
    build = be.source("vae_decoder")
    assert build.origin == "build" and build.plan is None
    assert build.settings.profile == entry.details["profiles"]["vae_decoder"]
    # Once built, the same graph + GPU + TensorRT + settings is found in the user's cache.
    cached = nvidia.cached_engine_dir(tmp_path / "cache", build.graph_key, be.tag, build.settings.digest())
    cached.mkdir(parents=True)
    (cached / "vae_decoder.plan").write_bytes(PLAN)
    assert be.source("vae_decoder").origin == "cache"
    # Another GPU's engines are not used; without building on first use, the message says what exists.
    other = engine_entry.model_copy(deep=True)
    other.details["target"]["tag"] = "sm89-trt10.8.0.43"
    strict = TensorrtBackend(*args, [(engines, other)], cache_dir=tmp_path / "empty", build=False)
    with pytest.raises(
        UserError, match=r"no TensorRT engine for this GPU.*sm90-trt10\.8\.0\.43.*it has: sm89"
    ):
        strict.source("unet")
