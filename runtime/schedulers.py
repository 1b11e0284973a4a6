"""Noise schedulers in numpy: LCM, DDIM, Euler, Euler-ancestral and DPM-Solver++ (2M).

(One module on purpose: each scheduler is a small class mirroring its diffusers namesake, and they share
the beta/sigma schedule helpers at the top; ~600 lines read in one sitting.)

Each reads a diffusers ``scheduler_config.json`` and reproduces the diffusers scheduler of the same name
step for step (``tests/runtime/test_schedulers.py`` compares them), without importing torch::

    sched = scheduler_from_config(json.loads(Path("scheduler/scheduler_config.json").read_text()))
    sched.set_timesteps(4)
    latents = rng.standard_normal(shape).astype(np.float32) * sched.init_noise_sigma
    for i, t in enumerate(sched.timesteps):
        eps = unet(sched.scale_model_input(latents, i), t)
        latents = sched.step(eps, i, latents, rng).prev_sample

Unlike diffusers, ``step`` and ``scale_model_input`` take the index into ``timesteps`` rather than the
timestep value: the loop always knows it, and looking it up again is where img2img schedules go wrong.

A config of a scheduler class not implemented here (PNDM, as shipped with plain SD 1.5) gets DPM-Solver++
2M with the same noise schedule, the usual fast replacement, and a warning naming both; the scheduler's
``substituted_for`` says so (``Result.settings`` carries it). Options that change the maths and are not
implemented are refused with a clear error instead of being ignored.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from sdkiln.runtime.contract.errors import UserError

logger = logging.getLogger(__name__)

__all__ = [
    "DDIM",
    "DPMSolverMultistep",
    "EulerAncestralDiscrete",
    "EulerDiscrete",
    "LCM",
    "NoiseSource",
    "Scheduler",
    "StepOutput",
    "scheduler_from_config",
]


class NoiseSource(Protocol):
    """Where stochastic steps draw their noise: a ``numpy.random.Generator`` in the runtime."""

    def standard_normal(self, size: Any = None, dtype: Any = ..., out: Any = None) -> Any: ...


@dataclass(frozen=True)
class StepOutput:
    prev_sample: np.ndarray
    denoised: np.ndarray  # the predicted clean latents x0 at this step


class Scheduler(Protocol):
    """What the denoising loop needs from a scheduler."""

    name: str
    prediction_type: str
    timesteps: np.ndarray  # float32, the schedule of the current run (img2img: already truncated)

    @property
    def init_noise_sigma(self) -> float: ...

    def set_timesteps(self, num_inference_steps: int, strength: float = 1.0) -> None: ...

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray: ...

    def step(
        self, model_output: np.ndarray, index: int, sample: np.ndarray, rng: NoiseSource
    ) -> StepOutput: ...

    def add_noise(self, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """Noise clean latents to the level of the first timestep of the current schedule (img2img)."""
        ...


# ---------------------------------------------------------------------------------------------------
# The noise schedule shared by all of them


@dataclass(frozen=True)
class _Betas:
    num_train_timesteps: int
    alphas_cumprod: np.ndarray  # float64, (num_train_timesteps,)


def _betas_for_alpha_bar(n: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)])


def _noise_schedule(cfg: dict[str, Any], defaults: dict[str, Any]) -> _Betas:
    n = int(cfg.get("num_train_timesteps", defaults["num_train_timesteps"]))
    start = float(cfg.get("beta_start", defaults["beta_start"]))
    end = float(cfg.get("beta_end", defaults["beta_end"]))
    kind = cfg.get("beta_schedule", defaults["beta_schedule"])
    trained = cfg.get("trained_betas")
    # diffusers builds the betas in float32; doing the same keeps the schedules equal to ~1 ulp.
    if trained is not None:
        betas = np.asarray(trained, dtype=np.float32)
    elif kind == "linear":
        betas = np.linspace(start, end, n, dtype=np.float32)
    elif kind == "scaled_linear":
        betas = np.linspace(start**0.5, end**0.5, n, dtype=np.float32) ** 2
    elif kind == "squaredcos_cap_v2":
        betas = _betas_for_alpha_bar(n).astype(np.float32)
    else:
        raise UserError(f"scheduler config: beta_schedule {kind!r} is not supported by the sdkiln runtime")
    alphas_cumprod = np.cumprod(1.0 - betas.astype(np.float32), dtype=np.float32).astype(np.float64)
    return _Betas(n, alphas_cumprod)


def _refuse(cfg: dict[str, Any], scheduler: str, **defaults: Any) -> None:
    """Refuse options that change the maths and are not implemented here (never silently ignore them)."""
    for key, default in defaults.items():
        value = cfg.get(key, default)
        if value is not None and value != default:
            raise UserError(
                f"scheduler config: {scheduler} with {key}={value!r} is not supported by the sdkiln runtime "
                f"(supported: {default!r})"
            )


def _prediction_type(cfg: dict[str, Any], allowed: tuple[str, ...], scheduler: str) -> str:
    kind = cfg.get("prediction_type", "epsilon")
    if kind not in allowed:
        raise UserError(
            f"scheduler config: {scheduler} does not support prediction_type {kind!r} ({allowed})"
        )
    return kind


def _spaced_timesteps(spacing: str, n_train: int, steps: int, offset: int) -> np.ndarray:
    """The Euler family's timestep spacing (float32, descending), as in diffusers."""
    if spacing == "linspace":
        return np.linspace(0, n_train - 1, steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = n_train // steps
        return (np.arange(0, steps) * ratio).round()[::-1].astype(np.float32) + offset
    if spacing == "trailing":
        ratio = n_train / steps
        return np.arange(n_train, 0, -ratio).round().astype(np.float32) - 1
    raise UserError(
        f"scheduler config: timestep_spacing {spacing!r} is not one of linspace, leading, trailing"
    )


def _karras(sigmas: np.ndarray, steps: int, cfg: dict[str, Any]) -> np.ndarray:
    """Karras et al. (2022) sigmas between the schedule's (or the config's) extremes, rho = 7."""
    sigma_min = cfg.get("sigma_min") or float(sigmas[-1])
    sigma_max = cfg.get("sigma_max") or float(sigmas[0])
    rho = 7.0
    ramp = np.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
    """The (fractional) training timestep whose sigma is ``sigma``: linear interpolation in log sigma."""
    log_sigma = np.log(max(sigma, 1e-10))
    dists = log_sigma - log_sigmas
    low = int(np.clip(np.cumsum(dists >= 0).argmax(), 0, len(log_sigmas) - 2))
    w = (log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])
    w = float(np.clip(w, 0, 1))
    return (1 - w) * low + w * (low + 1)


def _img2img_start(steps: int, strength: float) -> int:
    """Index of the first step that an img2img run of ``strength`` executes (diffusers' get_timesteps)."""
    init = min(int(steps * strength), steps)
    return max(steps - init, 0)


def _check_steps(steps: int, strength: float) -> None:
    if steps < 1:
        raise UserError(f"steps must be at least 1 (got {steps})")
    if not 0.0 < strength <= 1.0:
        raise UserError(f"strength must be in (0, 1] (got {strength})")


# ---------------------------------------------------------------------------------------------------
# LCM


class LCM:
    """Latent Consistency Model multistep sampling (diffusers ``LCMScheduler``)."""

    name = "LCMScheduler"

    def __init__(self, cfg: dict[str, Any]):
        _refuse(cfg, self.name, thresholding=False, clip_sample=False, rescale_betas_zero_snr=False)
        self._betas = _noise_schedule(
            cfg,
            {
                "num_train_timesteps": 1000,
                "beta_start": 0.00085,
                "beta_end": 0.012,
                "beta_schedule": "scaled_linear",
            },
        )
        self.prediction_type = _prediction_type(cfg, ("epsilon", "sample", "v_prediction"), self.name)
        self.original_inference_steps = int(cfg.get("original_inference_steps", 50))
        self.timestep_scaling = float(cfg.get("timestep_scaling", 10.0))
        acp = self._betas.alphas_cumprod
        self._final_alpha_cumprod = 1.0 if cfg.get("set_alpha_to_one", True) else float(acp[0])
        self.timesteps = np.zeros(0, dtype=np.float32)
        self._steps = 0

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def set_timesteps(self, num_inference_steps: int, strength: float = 1.0) -> None:
        """LCM spreads the steps over the distillation schedule; strength shortens that schedule itself."""
        _check_steps(num_inference_steps, strength)
        n_train = self._betas.num_train_timesteps
        original = self.original_inference_steps
        k = n_train // original
        origin = np.arange(1, int(original * strength) + 1) * k - 1
        if num_inference_steps > original:
            raise UserError(
                f"steps={num_inference_steps} is more than this LCM model's {original} distillation steps"
            )
        if len(origin) // num_inference_steps < 1:
            raise UserError(
                f"steps={num_inference_steps} with strength={strength} leaves fewer than one LCM step; "
                f"raise strength to at least {num_inference_steps / original:.2f} or lower steps"
            )
        origin = origin[::-1].copy()
        idx = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
        self.timesteps = origin[idx].astype(np.float32)
        self._steps = num_inference_steps

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        return sample

    def _boundary(self, t: int) -> tuple[float, float]:
        sigma_data = 0.5
        scaled = t * self.timestep_scaling
        c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
        c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
        return c_skip, c_out

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, rng: NoiseSource) -> StepOutput:
        t = int(self.timesteps[index])
        acp = self._betas.alphas_cumprod
        prev_t = int(self.timesteps[index + 1]) if index + 1 < len(self.timesteps) else t
        a_t = float(acp[t])
        a_prev = float(acp[prev_t]) if prev_t >= 0 else self._final_alpha_cumprod
        b_t, b_prev = 1 - a_t, 1 - a_prev
        c_skip, c_out = self._boundary(t)
        if self.prediction_type == "epsilon":
            x0 = (sample - b_t**0.5 * model_output) / a_t**0.5
        elif self.prediction_type == "sample":
            x0 = model_output
        else:  # v_prediction
            x0 = a_t**0.5 * sample - b_t**0.5 * model_output
        denoised = (c_out * x0 + c_skip * sample).astype(np.float32)
        # The last step returns the clean estimate; earlier ones re-noise it to the next timestep.
        if index != self._steps - 1:
            noise = rng.standard_normal(model_output.shape, dtype=np.float32)
            prev = a_prev**0.5 * denoised + b_prev**0.5 * noise
        else:
            prev = denoised
        return StepOutput(prev.astype(np.float32), denoised)

    def add_noise(self, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
        a = float(self._betas.alphas_cumprod[int(self.timesteps[0])])
        return (a**0.5 * original + (1 - a) ** 0.5 * noise).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# DDIM (deterministic, eta = 0, as diffusers' pipelines call it)


class DDIM:
    """Denoising diffusion implicit models, eta = 0 (diffusers ``DDIMScheduler``)."""

    name = "DDIMScheduler"

    def __init__(self, cfg: dict[str, Any]):
        _refuse(cfg, self.name, thresholding=False, rescale_betas_zero_snr=False)
        self._betas = _noise_schedule(
            cfg,
            {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"},
        )
        self.prediction_type = _prediction_type(cfg, ("epsilon", "sample", "v_prediction"), self.name)
        self.spacing = cfg.get("timestep_spacing", "leading")
        self.offset = int(cfg.get("steps_offset", 0))
        self.clip = bool(cfg.get("clip_sample", True))
        self.clip_range = float(cfg.get("clip_sample_range", 1.0))
        acp = self._betas.alphas_cumprod
        self._final = 1.0 if cfg.get("set_alpha_to_one", True) else float(acp[0])
        self.timesteps = np.zeros(0, dtype=np.float32)
        self._ratio = 1

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def set_timesteps(self, num_inference_steps: int, strength: float = 1.0) -> None:
        _check_steps(num_inference_steps, strength)
        n_train = self._betas.num_train_timesteps
        if num_inference_steps > n_train:
            raise UserError(f"steps={num_inference_steps} is more than the {n_train} training timesteps")
        if self.spacing == "linspace":
            ts = np.linspace(0, n_train - 1, num_inference_steps).round()[::-1]
        elif self.spacing == "leading":
            ts = (np.arange(0, num_inference_steps) * (n_train // num_inference_steps)).round()[
                ::-1
            ] + self.offset
        elif self.spacing == "trailing":
            ts = np.round(np.arange(n_train, 0, -n_train / num_inference_steps)) - 1
        else:
            raise UserError(
                f"scheduler config: timestep_spacing {self.spacing!r} is not one of linspace, leading, trailing"
            )
        # diffusers steps from t to t - n_train // steps whatever the spacing.
        self._ratio = n_train // num_inference_steps
        self.timesteps = ts.astype(np.int64)[_img2img_start(num_inference_steps, strength) :].astype(
            np.float32
        )

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        return sample

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, rng: NoiseSource) -> StepOutput:
        t = int(self.timesteps[index])
        acp = self._betas.alphas_cumprod
        prev_t = t - self._ratio
        a_t = float(acp[t])
        a_prev = float(acp[prev_t]) if prev_t >= 0 else self._final
        b_t = 1 - a_t
        if self.prediction_type == "epsilon":
            x0 = (sample - b_t**0.5 * model_output) / a_t**0.5
            eps = model_output
        elif self.prediction_type == "sample":
            x0 = model_output
            eps = (sample - a_t**0.5 * x0) / b_t**0.5
        else:  # v_prediction
            x0 = a_t**0.5 * sample - b_t**0.5 * model_output
            eps = a_t**0.5 * model_output + b_t**0.5 * sample
        if self.clip:
            x0 = np.clip(x0, -self.clip_range, self.clip_range)
        prev = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        return StepOutput(np.asarray(prev, dtype=np.float32), np.asarray(x0, dtype=np.float32))

    def add_noise(self, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
        a = float(self._betas.alphas_cumprod[int(self.timesteps[0])])
        return (a**0.5 * original + (1 - a) ** 0.5 * noise).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Euler (deterministic) and Euler ancestral


class _SigmaSchedule:
    """The Euler family's sigma schedule; composed into both Euler schedulers (no shared base class)."""

    def __init__(self, cfg: dict[str, Any], name: str, karras_allowed: bool):
        _refuse(
            cfg,
            name,
            rescale_betas_zero_snr=False,
            use_exponential_sigmas=False,
            use_beta_sigmas=False,
            interpolation_type="linear",
            timestep_type="discrete",
        )
        if not karras_allowed:
            _refuse(cfg, name, use_karras_sigmas=False)
        self.betas = _noise_schedule(
            cfg,
            {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"},
        )
        self.spacing = cfg.get("timestep_spacing", "linspace")
        self.offset = int(cfg.get("steps_offset", 0))
        self.karras = bool(cfg.get("use_karras_sigmas") or False)
        self.final = cfg.get("final_sigmas_type", "zero")
        if self.final not in ("zero", "sigma_min"):
            raise UserError(
                f"scheduler config: final_sigmas_type {self.final!r} is not one of zero, sigma_min"
            )
        self.cfg = cfg
        acp = self.betas.alphas_cumprod
        self.train_sigmas = ((1 - acp) / acp) ** 0.5

    def make(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(timesteps float32 (steps,), sigmas float32 (steps + 1,)) for a full run of ``steps``."""
        timesteps = _spaced_timesteps(self.spacing, self.betas.num_train_timesteps, steps, self.offset)
        sigmas = np.interp(timesteps, np.arange(len(self.train_sigmas)), self.train_sigmas)
        if self.karras:
            log_sigmas = np.log(self.train_sigmas)
            sigmas = _karras(sigmas, steps, self.cfg)
            timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
        last = self.train_sigmas[0] if self.final == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        return timesteps.astype(np.float32), sigmas

    def init_noise_sigma(self, sigmas: np.ndarray) -> float:
        max_sigma = float(sigmas.max()) if len(sigmas) else float(self.train_sigmas.max())
        if self.spacing in ("linspace", "trailing"):
            return max_sigma
        return (max_sigma**2 + 1) ** 0.5


class EulerDiscrete:
    """Euler method on the probability-flow ODE (diffusers ``EulerDiscreteScheduler``, s_churn = 0)."""

    name = "EulerDiscreteScheduler"

    def __init__(self, cfg: dict[str, Any]):
        self._sched = _SigmaSchedule(cfg, self.name, karras_allowed=True)
        self.prediction_type = _prediction_type(cfg, ("epsilon", "v_prediction", "sample"), self.name)
        self.timesteps = np.zeros(0, dtype=np.float32)
        self._sigmas = np.zeros(0, dtype=np.float32)
        self._begin = 0

    @property
    def init_noise_sigma(self) -> float:
        return self._sched.init_noise_sigma(self._sigmas)

    def set_timesteps(self, num_inference_steps: int, strength: float = 1.0) -> None:
        _check_steps(num_inference_steps, strength)
        timesteps, self._sigmas = self._sched.make(num_inference_steps)
        self._begin = _img2img_start(num_inference_steps, strength)
        self.timesteps = timesteps[self._begin :]

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        sigma = float(self._sigmas[self._begin + index])
        return (sample / (sigma**2 + 1) ** 0.5).astype(np.float32)

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, rng: NoiseSource) -> StepOutput:
        i = self._begin + index
        sigma, sigma_next = float(self._sigmas[i]), float(self._sigmas[i + 1])
        x0 = _x0_from_sigma(self.prediction_type, model_output, sample, sigma)
        derivative = (sample - x0) / sigma
        prev = sample + derivative * (sigma_next - sigma)
        return StepOutput(prev.astype(np.float32), x0.astype(np.float32))

    def add_noise(self, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return (original + noise * float(self._sigmas[self._begin])).astype(np.float32)


class EulerAncestralDiscrete:
    """Ancestral Euler sampling (diffusers ``EulerAncestralDiscreteScheduler``): fresh noise every step."""

    name = "EulerAncestralDiscreteScheduler"

    def __init__(self, cfg: dict[str, Any]):
        self._sched = _SigmaSchedule(cfg, self.name, karras_allowed=False)
        self.prediction_type = _prediction_type(cfg, ("epsilon", "v_prediction"), self.name)
        self.timesteps = np.zeros(0, dtype=np.float32)
        self._sigmas = np.zeros(0, dtype=np.float32)
        self._begin = 0

    @property
    def init_noise_sigma(self) -> float:
        return self._sched.init_noise_sigma(self._sigmas)

    def set_timesteps(self, num_inference_steps: int, strength: float = 1.0) -> None:
        _check_steps(num_inference_steps, strength)
        timesteps, self._sigmas = self._sched.make(num_inference_steps)
        self._begin = _img2img_start(num_inference_steps, strength)
        self.timesteps = timesteps[self._begin :]

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        sigma = float(self._sigmas[self._begin + index])
        return (sample / (sigma**2 + 1) ** 0.5).astype(np.float32)

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, rng: NoiseSource) -> StepOutput:
        i = self._begin + index
        sigma_from, sigma_to = float(self._sigmas[i]), float(self._sigmas[i + 1])
        x0 = _x0_from_sigma(self.prediction_type, model_output, sample, sigma_from)
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        derivative = (sample - x0) / sigma_from
        prev = sample + derivative * (sigma_down - sigma_from)
        # Drawn on the last step too (sigma_up = 0 there), as diffusers does, so the noise stream lines up.
        noise = rng.standard_normal(model_output.shape, dtype=np.float32)
        prev = prev + noise * sigma_up
        return StepOutput(prev.astype(np.float32), x0.astype(np.float32))

    def add_noise(self, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return (original + noise * float(self._sigmas[self._begin])).astype(np.float32)


def _x0_from_sigma(
    prediction_type: str, model_output: np.ndarray, sample: np.ndarray, sigma: float
) -> np.ndarray:
    if prediction_type == "epsilon":
        return sample - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    return model_output


# ---------------------------------------------------------------------------------------------------
# DPM-Solver++ (multistep, order 1 or 2)


class DPMSolverMultistep:
    """DPM-Solver++ multistep (diffusers ``DPMSolverMultistepScheduler``, algorithm dpmsolver++, order <= 2)."""

    name = "DPMSolverMultistepScheduler"
    substituted_for: str | None = None  # the config's own class when this replaces an unimplemented one

    def __init__(self, cfg: dict[str, Any]):
        _refuse(
            cfg,
            self.name,
            algorithm_type="dpmsolver++",
            thresholding=False,
            rescale_betas_zero_snr=False,
            use_exponential_sigmas=False,
            use_beta_sigmas=False,
            use_lu_lambdas=False,
            use_flow_sigmas=False,
            variance_type=None,
            euler_at_final=False,
        )
        order = int(cfg.get("solver_order", 2))
        if order not in (1, 2):
            raise UserError(f"scheduler config: {self.name} solver_order={order} is not supported (1 or 2)")
        if cfg.get("lambda_min_clipped", -math.inf) not in (-math.inf, None):
            raise UserError(f"scheduler config: {self.name} lambda_min_clipped is not supported")
        self.solver_order = order
        self.solver_type = cfg.get("solver_type", "midpoint")
        if self.solver_type not in ("midpoint", "heun"):
            raise UserError(
                f"scheduler config: {self.name} solver_type {self.solver_type!r} is not supported"
            )
        self._betas = _noise_schedule(
            cfg,
            {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"},
        )
        self.prediction_type = _prediction_type(cfg, ("epsilon", "sample", "v_prediction"), self.name)
        self.spacing = cfg.get("timestep_spacing", "linspace")
        self.offset = int(cfg.get("steps_offset", 0))
        self.karras = bool(cfg.get("use_karras_sigmas") or False)
        self.lower_order_final = bool(cfg.get("lower_order_final", True))
        self.final = cfg.get("final_sigmas_type", "zero")
        if self.final not in ("zero", "sigma_min"):
            raise UserError(
                f"scheduler config: final_sigmas_type {self.final!r} is not one of zero, sigma_min"
            )
        self._beta_schedule = cfg.get("beta_schedule", "linear")
        self._cfg = cfg
        acp = self._betas.alphas_cumprod
        self._train_sigmas = ((1 - acp) / acp) ** 0.5
        self.timesteps = np.zeros(0, dtype=np.float32)
        self._sigmas = np.zeros(0, dtype=np.float32)
        self._begin = 0
        self._history: list[np.ndarray] = []

    @property
    def init_noise_sigma(self) -> float:
        return 1.0

    def _full_schedule(self, steps: int) -> tuple[np.ndarray, np.ndarray]:
        n_train = self._betas.num_train_timesteps
        if self.spacing == "linspace":
            timesteps = np.linspace(0, n_train - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
        elif self.spacing == "leading":
            ratio = n_train // (steps + 1)
            timesteps = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].astype(np.int64) + self.offset
        elif self.spacing == "trailing":
            ratio = n_train / steps
            timesteps = np.arange(n_train, 0, -ratio).round().astype(np.int64) - 1
        else:
            raise UserError(
                f"scheduler config: timestep_spacing {self.spacing!r} is not one of linspace, leading, trailing"
            )
        sigmas = self._train_sigmas
        if self.karras:
            log_sigmas = np.log(sigmas)
            sigmas = _karras(np.flip(sigmas), steps, self._cfg)
            timesteps = np.array([_sigma_to_t(s, log_sigmas) for s in sigmas])
            if self._beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
            timesteps = timesteps.astype(np.int64)
        else:
            sigmas = np.interp(timesteps, np.arange(len(sigmas)), sigmas)
        last = self._train_sigmas[0] if self.final == "sigma_min" else 0.0
        return timesteps, np.concatenate([sigmas, [last]]).astype(np.float32)

    def set_timesteps(self, num_inference_steps: int, strength: float = 1.0) -> None:
        _check_steps(num_inference_steps, strength)
        timesteps, self._sigmas = self._full_schedule(num_inference_steps)
        self._begin = _img2img_start(len(timesteps), strength)
        self._all_timesteps = timesteps
        self.timesteps = timesteps[self._begin :].astype(np.float32)
        self._history = []

    def scale_model_input(self, sample: np.ndarray, index: int) -> np.ndarray:
        return sample

    @staticmethod
    def _alpha_sigma(sigma: float) -> tuple[float, float]:
        alpha = 1 / (sigma**2 + 1) ** 0.5
        return alpha, sigma * alpha

    @staticmethod
    def _lambda(alpha: float, sigma: float) -> float:
        return math.inf if sigma == 0 else math.log(alpha) - math.log(sigma)

    def step(self, model_output: np.ndarray, index: int, sample: np.ndarray, rng: NoiseSource) -> StepOutput:
        i = self._begin + index
        n = len(self._all_timesteps)
        lower_order_final = i == n - 1 and ((self.lower_order_final and n < 15) or self.final == "zero")
        alpha_s0, sigma_s0 = self._alpha_sigma(float(self._sigmas[i]))
        if self.prediction_type == "epsilon":
            x0 = (sample - sigma_s0 * model_output) / alpha_s0
        elif self.prediction_type == "v_prediction":
            x0 = alpha_s0 * sample - sigma_s0 * model_output
        else:
            x0 = model_output
        x0 = x0.astype(np.float32)
        self._history = [*self._history[-(self.solver_order - 1) :], x0] if self.solver_order > 1 else [x0]
        alpha_t, sigma_t = self._alpha_sigma(float(self._sigmas[i + 1]))
        lambda_t, lambda_s0 = self._lambda(alpha_t, sigma_t), self._lambda(alpha_s0, sigma_s0)
        # First order for the first step (no history yet) and, as in diffusers, for the final step.
        first_order = self.solver_order == 1 or len(self._history) < 2 or lower_order_final
        if math.isinf(lambda_t):
            # Final sigma 0 (only reached on the first-order final step): exp(-h) = 0, sigma_t / sigma_s = 0.
            prev = alpha_t * x0
        else:
            h = lambda_t - lambda_s0
            if first_order:
                prev = (sigma_t / sigma_s0) * sample - (alpha_t * (math.exp(-h) - 1.0)) * x0
            else:
                alpha_s1, sigma_s1 = self._alpha_sigma(float(self._sigmas[i - 1]))
                lambda_s1 = self._lambda(alpha_s1, sigma_s1)
                m0, m1 = self._history[-1], self._history[-2]
                r0 = (lambda_s0 - lambda_s1) / h
                d1 = (1.0 / r0) * (m0 - m1)
                if self.solver_type == "midpoint":
                    prev = (
                        (sigma_t / sigma_s0) * sample
                        - (alpha_t * (math.exp(-h) - 1.0)) * m0
                        - 0.5 * (alpha_t * (math.exp(-h) - 1.0)) * d1
                    )
                else:
                    prev = (
                        (sigma_t / sigma_s0) * sample
                        - (alpha_t * (math.exp(-h) - 1.0)) * m0
                        + (alpha_t * ((math.exp(-h) - 1.0) / h + 1.0)) * d1
                    )
        return StepOutput(np.asarray(prev, dtype=np.float32), x0)

    def add_noise(self, original: np.ndarray, noise: np.ndarray) -> np.ndarray:
        alpha, sigma = self._alpha_sigma(float(self._sigmas[self._begin]))
        return (alpha * original + sigma * noise).astype(np.float32)


# ---------------------------------------------------------------------------------------------------

_BY_CLASS: dict[str, type] = {
    "LCMScheduler": LCM,
    "DDIMScheduler": DDIM,
    "EulerDiscreteScheduler": EulerDiscrete,
    "EulerAncestralDiscreteScheduler": EulerAncestralDiscrete,
    "DPMSolverMultistepScheduler": DPMSolverMultistep,
}

# The noise-schedule keys a DPM-Solver++ replacement takes over from another class's config.
_SCHEDULE_KEYS = (
    "prediction_type",
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "timestep_spacing",
    "steps_offset",
)


def scheduler_from_config(config: dict[str, Any]) -> Scheduler:
    """The numpy scheduler for a diffusers scheduler config (the dict of ``scheduler_config.json``).

    Classes not implemented here get DPM-Solver++ 2M on the same noise schedule, as diffusers'
    ``DPMSolverMultistepScheduler.from_config(config)`` would build it.
    """
    cls_name = config.get("_class_name", "")
    cls = _BY_CLASS.get(cls_name)
    if cls is not None:
        return cls(config)
    # Keep only the noise-schedule keys: options of the original class mean nothing to DPM-Solver++.
    logger.warning(
        "the runtime does not implement %s; sampling with DPMSolverMultistepScheduler (2M) on the same noise "
        "schedule instead",
        cls_name or "the scheduler of this config",
    )
    sched = DPMSolverMultistep({k: v for k, v in config.items() if k in _SCHEDULE_KEYS})
    sched.substituted_for = cls_name or "unknown"
    return sched
