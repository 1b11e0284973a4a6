"""The values the runtime passes around: what the loop needs to know about a model (``ModelInfo``), a
generation request (``Request``, with optional ControlNet guidance ``Control``) and its ``Result``.

Plain frozen dataclasses in their own module, so the tasks (which build requests) and the pipeline
(which runs them) depend on these and not on each other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

Progress = Callable[[Iterable[Any], str, int], Iterable[Any]]


@dataclass(frozen=True)
class ModelInfo:
    """What the loop needs to know about the model besides its components (read from the bundle)."""

    family: str
    lcm: bool
    scheduler_config: dict[str, Any]
    tokenizer_dirs: tuple[Path, ...]  # one per text encoder, in order
    pad_tokens: tuple[str, ...]  # the family's pad token per tokenizer, when its folder does not say
    vae_scaling_factor: float
    vae_shift_factor: float | None
    taesd_scaling_factor: float
    default_size: tuple[int, int]  # (height, width) in pixels
    vae_scale_factor: int = 8
    time_cond_proj_dim: int | None = None
    controlnets: tuple[str, ...] = ()
    taesd: bool = False
    force_zeros_for_empty_prompt: bool = True
    section: str = ""


@dataclass(frozen=True)
class Control:
    """ControlNet guidance: which net, its conditioning image (1, 3, H, W) in [0, 1], and how strongly."""

    kind: str  # "scribble", "canny"
    image: np.ndarray
    scale: float = 1.0
    start: float = 0.0  # fraction of the steps before which the ControlNet is off
    end: float = 1.0  # fraction after which it is off


@dataclass(frozen=True)
class Request:
    prompts: list[str]
    negative_prompts: list[str] | None = None
    steps: int | None = None  # None: the family default
    guidance: float | None = None  # None: the family default
    seed: int = 0
    height: int | None = None
    width: int | None = None
    init_image: np.ndarray | None = None  # (1, 3, H, W) in [-1, 1]: img2img
    strength: float = 1.0
    control: Control | None = None


@dataclass
class Result:
    images: list[Image.Image]
    pixels: np.ndarray  # float32 (B, H, W, 3) in [0, 1]
    timings: dict[str, float]  # seconds per stage
    steps: int  # denoising steps actually run
    guidance: float
    cfg: bool
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)
    latents: np.ndarray | None = None  # the final latents the decoder got (before VAE scaling)
