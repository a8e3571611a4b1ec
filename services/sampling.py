"""Diffusion maths in NumPy: the noise schedule, and the DDIM / ancestral DDPM updates.

Training (``models/diffusion.py``) and serving share this module, so the schedule a model
was trained with is the one it is sampled with: the manifest records
:meth:`NoiseSchedule.to_config`, and :meth:`NoiseSchedule.from_config` rebuilds it.

Notation follows Ho et al. (2020) and Song et al. (2021): ``alpha_bar[t]`` is the fraction
of signal variance left at step ``t``; ``x_t = sqrt(alpha_bar[t]) x_0 + sqrt(1 - alpha_bar[t]) eps``.
The network predicts ``eps`` from ``(x_t, t, label)``.

Samplers walk a descending sub-sequence of the training steps. Each update needs the
network's noise prediction for the current ``x_t``; with classifier-free guidance that
is ``eps_uncond + w (eps_cond - eps_uncond)`` (Ho & Salimans, 2022). The update itself:

- DDIM (eta = 0): deterministic given the starting noise.
- DDPM (eta = 1): ancestral sampling with fresh noise each step; over all ``T`` steps it
  is exactly Ho et al.'s sampler, over fewer it is its strided generalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SAMPLERS = {"ddim": 0.0, "ddpm": 1.0}  # sampler -> eta


def cosine_alpha_bar(timesteps: int, offset: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Nichol & Dhariwal's (2021) cosine schedule: alpha_bar follows cos^2 from 1 to ~0.

    Returns:
        ``alpha_bar`` for t = 0..T-1 (float64), derived from betas clipped at ``max_beta``.
    """
    f = np.cos((np.arange(timesteps + 1) / timesteps + offset) / (1 + offset) * np.pi / 2) ** 2
    betas = np.clip(1.0 - f[1:] / f[:-1], 0.0, max_beta)
    return np.cumprod(1.0 - betas)


def linear_alpha_bar(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Ho et al.'s (2020) linear beta schedule (their values are for T = 1000)."""
    return np.cumprod(1.0 - np.linspace(beta_start, beta_end, timesteps))


_SCHEDULES = {"cosine": cosine_alpha_bar, "linear": linear_alpha_bar}


@dataclass(frozen=True)
class NoiseSchedule:
    """A variance schedule over ``timesteps`` training steps."""

    name: str
    timesteps: int
    alpha_bar: np.ndarray  # (T,) float64, decreasing from ~1 to ~0

    @classmethod
    def create(cls, name: str = "cosine", timesteps: int = 1000) -> "NoiseSchedule":
        if name not in _SCHEDULES:
            raise ValueError(f"unknown noise schedule '{name}'; known: {sorted(_SCHEDULES)}")
        return cls(name, timesteps, _SCHEDULES[name](timesteps))

    @classmethod
    def from_config(cls, config: dict) -> "NoiseSchedule":
        return cls.create(config["name"], int(config["timesteps"]))

    def to_config(self) -> dict:
        return {"name": self.name, "timesteps": self.timesteps}

    def sampling_steps(self, steps: int) -> np.ndarray:
        """``steps`` training steps, evenly spaced, descending, ending at t = 0."""
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"steps must be in 1..{self.timesteps}, got {steps}")
        return np.round(np.linspace(self.timesteps - 1, 0, steps)).astype(np.int64)

    def alpha_bar_at(self, t: int) -> float:
        """``alpha_bar[t]``, with ``alpha_bar[-1] = 1`` (the clean image after the last step)."""
        return 1.0 if t < 0 else float(self.alpha_bar[t])


def guided_noise(eps_cond: np.ndarray, eps_uncond: np.ndarray | None, guidance: float) -> np.ndarray:
    """Classifier-free guidance: 0 = unconditional, 1 = conditional, > 1 = sharper classes."""
    if eps_uncond is None:
        return eps_cond
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def predict_x0(schedule: NoiseSchedule, x_t: np.ndarray, t: int, eps: np.ndarray) -> np.ndarray:
    """The clean image implied by ``x_t`` and the predicted noise, clipped to [-1, 1]."""
    a = schedule.alpha_bar_at(t)
    return np.clip((x_t - np.sqrt(1.0 - a) * eps) / np.sqrt(a), -1.0, 1.0)


def denoise_step(
    schedule: NoiseSchedule,
    x_t: np.ndarray,
    t: int,
    t_prev: int,
    eps: np.ndarray,
    eta: float,
    noise: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """One update from step ``t`` to ``t_prev`` (``-1`` = the final, clean image).

    Args:
        x_t: the current samples, (B, C, H, W), float64.
        eps: the (guided) noise prediction for ``x_t``.
        eta: 0 for DDIM, 1 for ancestral DDPM.
        noise: standard normal draws shaped like ``x_t``; needed when ``eta > 0``.

    Returns:
        ``(x_prev, x0)``: the samples at ``t_prev``, and the predicted clean image (a
        cheap preview of where the sample is heading).
    """
    a_t, a_prev = schedule.alpha_bar_at(t), schedule.alpha_bar_at(t_prev)
    x0 = predict_x0(schedule, x_t, t, eps)
    eps = (x_t - np.sqrt(a_t) * x0) / np.sqrt(1.0 - a_t)  # consistent with the clipped x0
    if t_prev < 0:
        return x0, x0
    sigma = eta * np.sqrt((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev))
    x_prev = np.sqrt(a_prev) * x0 + np.sqrt(max(1.0 - a_prev - sigma**2, 0.0)) * eps
    if sigma > 0:
        x_prev = x_prev + sigma * noise
    return x_prev, x0
