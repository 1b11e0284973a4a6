"""The shipped real-model recipes, built unchanged through ``sdkiln build`` against a loopback Hub that
serves their repos under the real ids and layouts at tiny size (``tests/support/real_repos.py``).

- ``real_hub``: the server, seeded once per session.
- ``real_build(name)``: builds ``recipes/<name>.yaml`` once per session (all recipes share one artifact
  root; each has its own Hugging Face cache, so its request log shows everything it downloaded) and
  returns a ``RecipeBuild``. Treat what it returns as read-only.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from testkit import RECIPES

pytest.importorskip("torch", reason="building the recipes needs the build extra (torch, diffusers)")


@dataclass(frozen=True)
class RecipeBuild:
    name: str
    rc: int
    bundle: Path
    requests: list[tuple[str, str]]  # the loopback Hub's request log while this recipe built
    seconds: float
    log: str


@pytest.fixture(scope="session")
def real_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A loopback Hub serving every repo the shipped recipes name (tiny weights, real layouts)."""
    import hub_server
    from real_repos import real_repos

    repos = real_repos(tmp_path_factory.mktemp("real-repos"))
    server = hub_server.HubServer().start()
    for repo_id, files in repos.items():
        server.state.seed_repo(repo_id, files)
    server.repos = repos  # what each repo holds, for the request-log checks
    try:
        yield server
    finally:
        server.stop()
    assert server.state.server_errors == [], "the loopback Hub hit a bug of its own"


@pytest.fixture(scope="session")
def real_build(real_hub: Any, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], RecipeBuild]:
    """``real_build("sd15-lcm-scribble")``: that recipe built as shipped, once per session."""
    from huggingface_hub import constants

    from sdkiln.stages.cli import main

    root = tmp_path_factory.mktemp("real-recipes")
    built: dict[str, RecipeBuild] = {}

    def build(name: str) -> RecipeBuild:
        if name in built:
            return built[name]
        saved = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "HF_TOKEN", "TQDM_DISABLE")}
        cache = constants.HF_HUB_CACHE
        os.environ["HF_ENDPOINT"] = real_hub.endpoint
        os.environ["TQDM_DISABLE"] = "1"  # converter progress bars would bury the log's step lines
        os.environ.pop("HF_HUB_OFFLINE", None)
        os.environ.pop("HF_TOKEN", None)
        constants.HF_HUB_CACHE = str(root / f"hf-cache-{name}")
        first = len(real_hub.state.requests)
        t0 = time.perf_counter()
        log = root / f"{name}.log"
        try:
            with pytest.MonkeyPatch.context() as mp, log.open("w") as fh:
                mp.setattr("sys.stderr", fh)
                rc = main(["--artifacts", str(root / "artifacts"), "build", str(RECIPES / f"{name}.yaml")])
        finally:
            constants.HF_HUB_CACHE = cache
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        with real_hub.state.lock:
            requests = list(real_hub.state.requests[first:])
        built[name] = RecipeBuild(
            name, rc, root / "artifacts" / name, requests, time.perf_counter() - t0, log.read_text()
        )
        return built[name]

    return build
