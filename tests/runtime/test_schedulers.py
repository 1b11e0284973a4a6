"""The numpy schedulers against diffusers' schedulers, step for step (timesteps, init sigma, every sample)."""

from __future__ import annotations

import numpy as np
import pytest

from sdkiln.runtime import schedulers as S
from sdkiln.runtime.contract.errors import UserError

torch = pytest.importorskip("torch", reason="the reference schedulers come from diffusers (build extra)")
diffusers = pytest.importorskip(
    "diffusers", reason="the reference schedulers come from diffusers (build extra)"
)

SD15 = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
}
# The config SD 1.5 ships with (PNDM): the runtime replaces it by DPM-Solver++ on the same noise schedule.
SD15_PNDM = {
    "_class_name": "PNDMScheduler",
    **SD15,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
    "prediction_type": "epsilon",
}
LCM_CFG = {
    "_class_name": "LCMScheduler",
    **SD15,
    "original_inference_steps": 50,
    "timestep_scaling": 10.0,
    "set_alpha_to_one": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
TURBO = {
    "_class_name": "EulerDiscreteScheduler",
    **SD15,
    "timestep_spacing": "trailing",
    "prediction_type": "epsilon",
}


class TorchNoise:
    """Feeds the numpy scheduler the exact noise diffusers draws from a seeded torch.Generator."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def standard_normal(self, size, dtype=np.float32):
        return torch.randn(tuple(size), generator=self.g, dtype=torch.float32).numpy()


def _reference(cfg: dict):
    cls = getattr(diffusers, cfg["_class_name"])
    if cfg["_class_name"] not in S._BY_CLASS:
        cls = diffusers.DPMSolverMultistepScheduler
    return cls.from_config(cfg)


def _fake_unet(sample: np.ndarray, t: float) -> np.ndarray:
    """A smooth, timestep-dependent stand-in for the UNet, so multistep history matters."""
    return (0.3 * np.tanh(sample) + 0.05 * np.cos(sample * (1 + t / 500.0))).astype(np.float32)


def _run_both(cfg: dict, steps: int, strength: float = 1.0, seed: int = 0):
    ours = S.scheduler_from_config(cfg)
    ref = _reference(cfg)
    ours.set_timesteps(steps, strength=strength)
    lcm = cfg["_class_name"] == "LCMScheduler"
    if lcm:
        ref.set_timesteps(steps, strength=strength)
        ref_ts = ref.timesteps
    else:
        ref.set_timesteps(steps)
        init = min(int(steps * strength), steps)
        t_start = max(steps - init, 0) * ref.order
        ref_ts = ref.timesteps[t_start:]
        if hasattr(ref, "set_begin_index"):  # DDIM indexes by timestep value, not position
            ref.set_begin_index(t_start)
    np.testing.assert_allclose(ours.timesteps, ref_ts.numpy().astype(np.float32), rtol=1e-5, atol=1e-4)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    if strength < 1.0:
        noise = rng.standard_normal(x.shape).astype(np.float32)
        a = ours.add_noise(x, noise)
        b = ref.add_noise(torch.from_numpy(x), torch.from_numpy(noise), ref_ts[:1]).numpy()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        x = a
    else:
        np.testing.assert_allclose(ours.init_noise_sigma, float(ref.init_noise_sigma), rtol=1e-5)
        x = x * np.float32(ours.init_noise_sigma)
    ours_x, ref_x = x.copy(), torch.from_numpy(x.copy())
    noise_ours, gen = TorchNoise(seed + 1), torch.Generator().manual_seed(seed + 1)
    for i, t in enumerate(ours.timesteps):
        a_in = ours.scale_model_input(ours_x, i)
        b_in = ref.scale_model_input(ref_x, ref_ts[i]).numpy()
        np.testing.assert_allclose(a_in, b_in, rtol=1e-5, atol=1e-5, err_msg=f"scale_model_input step {i}")
        eps = _fake_unet(a_in, float(t))
        out = ours.step(eps, i, ours_x, noise_ours)
        ref_out = ref.step(torch.from_numpy(eps), ref_ts[i], ref_x, generator=gen)
        ref_x = ref_out.prev_sample
        np.testing.assert_allclose(
            out.prev_sample, ref_x.numpy(), rtol=1e-4, atol=2e-5, err_msg=f"{cfg['_class_name']} step {i}"
        )
        ours_x = out.prev_sample
    return ours_x


CASES = {
    "lcm-4": (LCM_CFG, 4, 1.0),
    "lcm-1": (LCM_CFG, 1, 1.0),
    "lcm-8": (LCM_CFG, 8, 1.0),
    "lcm-img2img": (LCM_CFG, 4, 0.6),
    "lcm-v": ({**LCM_CFG, "prediction_type": "v_prediction"}, 3, 1.0),
    "turbo-1": (TURBO, 1, 1.0),
    "turbo-4": (TURBO, 4, 1.0),
    "turbo-img2img": (TURBO, 2, 0.5),
    "euler-linspace": ({**TURBO, "timestep_spacing": "linspace"}, 6, 1.0),
    "euler-leading": ({**TURBO, "timestep_spacing": "leading", "steps_offset": 1}, 5, 1.0),
    "euler-karras": ({**TURBO, "timestep_spacing": "leading", "use_karras_sigmas": True}, 7, 1.0),
    "euler-v": ({**TURBO, "prediction_type": "v_prediction"}, 3, 1.0),
    "euler-a": ({**TURBO, "_class_name": "EulerAncestralDiscreteScheduler"}, 4, 1.0),
    "euler-a-leading": (
        {
            **TURBO,
            "_class_name": "EulerAncestralDiscreteScheduler",
            "timestep_spacing": "leading",
            "steps_offset": 1,
        },
        5,
        1.0,
    ),
    "euler-a-img2img": ({**TURBO, "_class_name": "EulerAncestralDiscreteScheduler"}, 4, 0.5),
    "ddim-leading": ({**SD15_PNDM, "_class_name": "DDIMScheduler"}, 10, 1.0),
    "ddim-clip-default": ({"_class_name": "DDIMScheduler", **SD15}, 6, 1.0),
    "ddim-trailing-v": (
        {
            "_class_name": "DDIMScheduler",
            **SD15,
            "timestep_spacing": "trailing",
            "prediction_type": "v_prediction",
        },
        4,
        1.0,
    ),
    "ddim-img2img": ({**SD15_PNDM, "_class_name": "DDIMScheduler"}, 10, 0.6),
    "dpm-from-pndm-25": (SD15_PNDM, 25, 1.0),
    "dpm-from-pndm-6": (SD15_PNDM, 6, 1.0),
    "dpm-img2img": (SD15_PNDM, 10, 0.6),
    "dpm-karras": (
        {"_class_name": "DPMSolverMultistepScheduler", **SD15, "use_karras_sigmas": True},
        12,
        1.0,
    ),
    "dpm-heun": ({"_class_name": "DPMSolverMultistepScheduler", **SD15, "solver_type": "heun"}, 8, 1.0),
    "dpm-order1": ({"_class_name": "DPMSolverMultistepScheduler", **SD15, "solver_order": 1}, 5, 1.0),
    "dpm-sigma-min": (
        {"_class_name": "DPMSolverMultistepScheduler", **SD15, "final_sigmas_type": "sigma_min"},
        6,
        1.0,
    ),
    "dpm-v-trailing": (
        {
            "_class_name": "DPMSolverMultistepScheduler",
            **SD15,
            "prediction_type": "v_prediction",
            "timestep_spacing": "trailing",
        },
        5,
        1.0,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers_step_for_step(case: str) -> None:
    cfg, steps, strength = CASES[case]
    out = _run_both(cfg, steps, strength)
    assert np.isfinite(out).all()


def test_a_substitution_is_a_warning_that_names_both(caplog) -> None:
    with caplog.at_level("WARNING", logger="sdkiln.runtime.schedulers"):
        sched = S.scheduler_from_config(SD15_PNDM)
    assert sched.substituted_for == "PNDMScheduler" and isinstance(sched, S.DPMSolverMultistep)
    assert "does not implement PNDMScheduler; sampling with DPMSolverMultistepScheduler" in caplog.text
    assert S.scheduler_from_config({**SD15_PNDM, "_class_name": "DDIMScheduler"}).name == "DDIMScheduler"


def test_stochastic_steps_follow_the_generator() -> None:
    """LCM draws noise between steps: same generator seed, same result; another seed, another one."""

    def run(seed: int) -> np.ndarray:
        s = S.scheduler_from_config(LCM_CFG)
        s.set_timesteps(4)
        rng = np.random.default_rng(seed)
        x = np.ones((1, 4, 4, 4), np.float32)
        for i, t in enumerate(s.timesteps):
            x = s.step(_fake_unet(x, float(t)), i, x, rng).prev_sample
        return x

    np.testing.assert_array_equal(run(1), run(1))
    assert not np.allclose(run(1), run(2))


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({**LCM_CFG, "thresholding": True}, "thresholding=True is not supported"),
        ({**TURBO, "use_exponential_sigmas": True}, "use_exponential_sigmas"),
        (
            {"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"},
            "algorithm_type",
        ),
        ({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}, "solver_order=3"),
        ({**TURBO, "beta_schedule": "cubic"}, "beta_schedule 'cubic'"),
        ({**TURBO, "prediction_type": "flow"}, "prediction_type 'flow'"),
    ],
)
def test_unsupported_options_are_refused(cfg: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        S.scheduler_from_config(cfg).set_timesteps(2)


@pytest.mark.parametrize(
    ("steps", "strength", "message"),
    [
        (0, 1.0, "steps must be at least 1"),
        (4, 0.0, r"strength must be in \(0, 1\]"),
        (4, 1.5, r"strength must be in \(0, 1\]"),
    ],
)
def test_bad_steps_and_strength(steps: int, strength: float, message: str) -> None:
    for cfg in (LCM_CFG, TURBO, SD15_PNDM):
        with pytest.raises(UserError, match=message):
            S.scheduler_from_config(cfg).set_timesteps(steps, strength=strength)
