"""What a build ran on, recorded in every manifest (not part of any key)."""

from __future__ import annotations

import platform
from typing import Any

from sdkiln.stages.engine.plan import package_versions


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "sdkiln": package_versions(["sdkiln"])["sdkiln"],
    }
