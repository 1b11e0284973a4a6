"""The build engine: recipes, plans, the content-addressed cache, builds and bundles.

    from sdkiln.stages import STAGES
    from sdkiln.stages.engine import build, plan, registry
    result = build(Path("recipes/tiny.yaml"), Path("artifacts"), stages=registry(STAGES))

The engine never imports a stage module: the stages it runs are passed in (the CLI passes the built-in
``STAGES`` plus any plugins), so stage modules may use the engine without a cycle.
"""

from sdkiln.stages.engine.build import BuildResult, artifact_of, build, execute, folder_artifact, gc
from sdkiln.stages.engine.bundle import BundlePart, referenced_keys, write_bundle_tree
from sdkiln.stages.engine.plan import StepResult, plan
from sdkiln.stages.engine.plugins import registry

__all__ = [
    "BuildResult",
    "BundlePart",
    "artifact_of",
    "folder_artifact",
    "StepResult",
    "build",
    "execute",
    "gc",
    "plan",
    "referenced_keys",
    "registry",
    "write_bundle_tree",
]
