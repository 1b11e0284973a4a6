"""The shipped real-model recipes, built unchanged through ``sdkiln build`` against a loopback Hub that
serves their repos under the real ids and layouts at tiny size (``tests/support/real_repos.py``). The
``real_hub`` and ``real_build`` fixtures live in ``tests/conftest.py`` (the ONNX consumer tests run these
bundles too)."""

import pytest

pytest.importorskip("torch", reason="building the recipes needs the build extra (torch, diffusers)")
