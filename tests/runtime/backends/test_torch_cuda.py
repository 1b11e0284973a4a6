"""The compiled PyTorch backend's graphs, checked on the CPU (``device="cpu"``): what ``torch_cuda`` compiles
is one graph per component (no graph breaks, which would also stop CUDA-graph capture), and it computes
what the reference backend computes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sdkiln.runtime.backends.torch_cuda import COMPILE_MODES, compile_options
from sdkiln.runtime.contract.errors import UserError

torch = pytest.importorskip("torch", reason="the torch backends need the build extra")


def test_compile_options() -> None:
    assert compile_options("none", False) is None
    assert compile_options("none", True) == {"mode": "reduce-overhead", "dynamic": False, "fullgraph": False}
    assert compile_options("max-autotune-no-cudagraphs", False)["dynamic"] is False  # static shapes
    with pytest.raises(UserError, match="cuda_graphs needs compile reduce-overhead"):
        compile_options("max-autotune-no-cudagraphs", True)
    with pytest.raises(UserError, match="compile must be one of"):
        compile_options("turbo", False)
    assert "reduce-overhead" in COMPILE_MODES


def test_cuda_backend_refuses_a_cpu_torch() -> None:
    from sdkiln.runtime.backends.torch_cuda import require_cuda

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match="CUDA build of PyTorch|needs an NVIDIA GPU"):
        require_cuda()


class _Counter:
    """A torch.compile backend that runs the captured graphs eagerly and counts them."""

    def __init__(self) -> None:
        self.graphs: list[int] = []

    def __call__(self, gm, example_inputs):  # noqa: ANN001 - torch's backend signature
        self.graphs.append(len(gm.graph.nodes))
        return gm.forward


def _feeds(comp, batch: int = 1, size: int = 64) -> dict[str, np.ndarray]:
    from sdkiln.stages.common.onnx.io import spec_feeds as random_feeds

    axes = {
        "batch": batch,
        "latent_height": size // 8,
        "latent_width": size // 8,
        "height": size,
        "width": size,
    }
    spec = [{"name": n, "dtype": t.dtype, "shape": list(t.shape)} for n, t in comp.io.inputs.items()]
    return random_feeds(spec, {n: list(comp.io.resolve(n, axes)) for n in comp.io.inputs}, seed=0)


def test_compiled_components_are_single_graphs_and_match_the_reference(nvidia_bundle: Path) -> None:
    from sdkiln.runtime.backends.torch_cuda import TorchCudaBackend
    from sdkiln.runtime.backends.torch_ref import TorchBackend

    torch._dynamo.reset()
    folder = nvidia_bundle / "torch/fused"
    counter = _Counter()
    args = (folder, "sd15", ["scribble", "canny"], True)
    compiled = TorchCudaBackend(
        *args, dtype="float32", compile="default", device="cpu", compile_backend=counter
    )
    reference = TorchBackend(*args)
    assert "torch.compile default" in compiled.description and "channels_last" in compiled.description
    for name in ("unet", "controlnet.scribble", "vae_decoder"):
        before = len(counter.graphs)
        feeds = _feeds(compiled.component(name))
        got = compiled.component(name)(**feeds)
        want = reference.component(name)(**feeds)
        # One graph each (the VAE decoder through its compiled ``decoder``): nothing breaks tracing, which
        # would split the module and stop CUDA-graph capture of it.
        assert len(counter.graphs) - before == 1, (name, counter.graphs[before:])
        for out, ref in want.items():
            np.testing.assert_allclose(got[out], ref, rtol=1e-4, atol=1e-4, err_msg=f"{name}.{out}")
    assert set(compiled.compiled) >= {"unet", "controlnet.scribble", "vae"}
    assert counter.graphs[0] > 100  # the whole UNet, not a fragment


@pytest.mark.slow
def test_inductor_compiles_the_tiny_unet_on_cpu(nvidia_bundle: Path) -> None:
    """The real compiler (Inductor, C++ on the CPU): ~1 minute for the tiny UNet here, hence slow."""
    from sdkiln.runtime.backends.torch_cuda import TorchCudaBackend
    from sdkiln.runtime.backends.torch_ref import TorchBackend

    torch._dynamo.reset()
    args = (nvidia_bundle / "torch/fused", "sd15", ["scribble", "canny"], True)
    compiled = TorchCudaBackend(*args, dtype="float32", compile="default", device="cpu")
    feeds = _feeds(compiled.component("unet"))
    got = compiled.component("unet")(**feeds)["out_sample"]
    want = TorchBackend(*args).component("unet")(**feeds)["out_sample"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
