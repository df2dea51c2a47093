"""Rotary position embeddings and every context-extension method of the YaRN paper.

Read beside Sections 2-3 of "YaRN: Efficient Context Window Extension of Large Language
Models" (Peng et al., arXiv 2309.00071). Notation follows the paper:

    |D|  head_dim (rotary dimension)     b   base (10000 for Llama 2)
    L    original_length (4096)          s   scale = L'/L (Eq. 11)
    d    frequency-pair index, counted from 0 here (0..|D|/2-1; the paper's Eq. 5 counts from 1)
    theta_d = b^(-2d/|D|) (Eq. 5)        h(theta_d)  the frequencies a method uses: `inv_freq`
    sqrt(1/t)  `attention_factor`        l'  the current length: `seq_len` (Sec. 3.3)

Every method is a function h(theta_d) that returns the frequencies actually used (Eq. 12),
plus an attention factor sqrt(1/t) that multiplies cos and sin (Sec. 3.4). One function,
`rope_tables`, turns them into the float32 cos/sin tables the model uses; the model never
knows which method made them. This module imports nothing from the rest of the package;
`python -m yarn_minimal rope` prints what it computes, dimension by dimension.
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

METHODS = ("none", "pi", "ntk", "ntk-by-parts", "yarn")
RAMPS = ("code", "paper")


def is_number(value) -> bool:
    """A finite int or float: not a bool, a string, NaN or inf (what a config file may hold instead)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclass(frozen=True)
class RopeConfig:
    """Which extension method to apply, and its parameters.

    method          "none" | "pi" | "ntk" | "ntk-by-parts" | "yarn"
    scale           s (Eq. 11). With dynamic=True it is the floor s0 of the dynamic scale:
                    s = max(scale, l'/L) (1 for a model that was never fine-tuned).
    original_length L, the context the model was pre-trained at.
    base            b, the RoPE base (rope_theta in Hugging Face configs).
    dynamic         Sec. 3.3 Dynamic Scaling: s follows the current sequence length.
    alpha, beta     Eq. 18 ramp bounds (in rotations over L); the public code calls them
                    beta_slow and beta_fast.
    ramp            "code": linear in the pair index between floor/ceil correction dims (what
                    the released YaRN checkpoints, transformers, vLLM and llama.cpp use);
                    "paper": Eq. 18, linear in r.
    attention_factor sqrt(1/t). None means Eq. 22 (c ln(s) + 1) for "yarn", 1 otherwise.
    attention_coefficient
                    c in Eq. 22: 0.1 as the paper fits it for Llama 2. The released
                    Yarn-Mistral checkpoints were trained with 0.07 (see yarn_attention_factor).
    truncate        ramp="code" only: round the correction dims to integers (HF's `truncate`).
    extended_length L' (Eq. 11), the context a static setting is for, where a checkpoint states
                    it apart from s L: Llama 3.1 says max_position_embeddings 131072 with s = 8 and
                    L = 8192 (transformers, vLLM and llama.cpp all take 131072). None: L' = s L.

    Llama 3.1's rope_type "llama3" is not a method of its own: it is NTK-by-parts (Eq. 17 to Eq. 20)
    with the paper's ramp (Eq. 18, linear in r = L/lambda), alpha = low_freq_factor,
    beta = high_freq_factor, L = original_max_position_embeddings, s = factor and no
    temperature, i.e. RopeConfig(method="ntk-by-parts", ramp="paper", alpha=1, beta=4, scale=8,
    original_length=8192, base=500000) for Llama 3.1 (tests/test_real_configs.py checks it
    against transformers' own llama3 init).
    """

    method: str = "none"
    scale: float = 1.0
    original_length: int = 4096
    base: float = 10000.0
    dynamic: bool = False
    alpha: float = 1.0
    beta: float = 32.0
    ramp: str = "code"
    attention_factor: Optional[float] = None
    attention_coefficient: float = 0.1
    truncate: bool = True
    extended_length: Optional[int] = None

    def __post_init__(self) -> None:
        # every value is checked for its type too: a config file or a flag can hold "big", inf or NaN
        if self.method not in METHODS:
            raise ValueError(f"RopeConfig.method: unknown method {self.method!r}; allowed: {', '.join(METHODS)}")
        if self.ramp not in RAMPS:
            raise ValueError(f"RopeConfig.ramp: unknown ramp {self.ramp!r}; allowed: {', '.join(RAMPS)}")
        if not (is_number(self.scale) and self.scale >= 1.0):
            raise ValueError(f"RopeConfig.scale: expected a finite number >= 1 (the scale s = L'/L, Eq. 11), got {self.scale!r}")
        if not isinstance(self.dynamic, bool):
            raise ValueError(f"RopeConfig.dynamic: expected true or false, got {self.dynamic!r}")
        if self.method == "none" and (self.scale != 1.0 or self.dynamic):  # otherwise `window` would claim s L
            raise ValueError(f"RopeConfig: method 'none' (plain RoPE) has no scale and no Dynamic Scaling; got "
                             f"scale={self.scale:g}, dynamic={self.dynamic}")
        if not (is_int(self.original_length) and self.original_length > 0):
            raise ValueError(f"RopeConfig.original_length: expected a positive integer, got {self.original_length!r}")
        if not math.isfinite(self.scale * self.original_length):  # e.g. a config's factor 1e308
            raise ValueError(f"RopeConfig.scale: s L = {self.scale:g} x {self.original_length} is not a finite number of "
                             "tokens; expected a finite number >= 1 small enough for s L to be finite")
        if self.extended_length is not None and not (
                is_int(self.extended_length) and self.extended_length >= self.original_length and not self.dynamic):
            raise ValueError(f"RopeConfig.extended_length: expected an integer >= original_length "
                             f"({self.original_length}) for a static setting, got {self.extended_length!r}"
                             + (" with dynamic=True" if self.dynamic else ""))
        if not (is_number(self.base) and self.base > 1.0):
            raise ValueError(f"RopeConfig.base: must be > 1 and finite, got {self.base!r}")
        if not (is_number(self.alpha) and is_number(self.beta) and 0 < self.alpha < self.beta):
            raise ValueError(f"RopeConfig.alpha/beta: need finite numbers 0 < alpha < beta, got alpha={self.alpha!r}, "
                             f"beta={self.beta!r}")
        if self.attention_factor is not None and not (is_number(self.attention_factor) and self.attention_factor > 0):
            raise ValueError(f"RopeConfig.attention_factor: expected a finite number > 0, got {self.attention_factor!r}")
        if not (is_number(self.attention_coefficient) and self.attention_coefficient >= 0):
            raise ValueError(f"RopeConfig.attention_coefficient: expected a finite number >= 0 (c in Eq. 22), got "
                             f"{self.attention_coefficient!r}")
        if not isinstance(self.truncate, bool):
            raise ValueError(f"RopeConfig.truncate: expected true or false, got {self.truncate!r}")

    @property
    def window(self) -> Optional[int]:
        """L' = s L (Eq. 11), the context a static setting is meant for (or the extended_length
        the checkpoint states); None under Dynamic Scaling, where s grows with the sequence and
        there is no fixed window."""
        if self.dynamic:
            return None
        return self.extended_length or int(round(self.original_length * self.scale))

    def describe(self) -> str:
        name = {"none": "RoPE", "pi": "PI", "ntk": "NTK-aware", "ntk-by-parts": "NTK-by-parts", "yarn": "YaRN"}[self.method]
        if self.method == "none":
            return name
        if self.dynamic:  # s is not one number: name the rule, not its floor (Sec. 3.3)
            return f"Dynamic-{name} (s=max({self.scale:g}, l/L), L={self.original_length})"
        return f"{name} (s={self.scale:g}, L={self.original_length})"


# ---------------------------------------------------------------------------------------
# Section 2.1: plain RoPE
# ---------------------------------------------------------------------------------------

def rope_frequencies(head_dim: int, base: float) -> torch.Tensor:
    """Eq. 5: theta_d = b^(-2d/|D|) for d = 0..|D|/2-1 (float64 for exact tables)."""
    check_head_dim(head_dim)
    d = torch.arange(head_dim // 2, dtype=torch.float64)
    return base ** (-2.0 * d / head_dim)


def wavelength(theta: torch.Tensor) -> torch.Tensor:
    """Eq. 13: lambda_d = 2 pi / theta_d, tokens per full rotation of pair d."""
    return 2 * math.pi / theta


def check_head_dim(head_dim: int) -> None:
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim: RoPE rotates pairs of dimensions, so it must be a positive even number, got {head_dim}")


# ---------------------------------------------------------------------------------------
# Section 2.2: Position Interpolation
# ---------------------------------------------------------------------------------------

def pi_frequencies(theta: torch.Tensor, scale: float) -> torch.Tensor:
    """Eq. 10: g(m) = m/s. Rotating position m/s by theta equals rotating m by theta/s,
    so PI is written here as h(theta_d) = theta_d / s and positions stay integers."""
    return theta / scale


# ---------------------------------------------------------------------------------------
# Section 3.1: "NTK-aware" interpolation
# ---------------------------------------------------------------------------------------

def ntk_aware_base(base: float, scale: float, head_dim: int) -> float:
    """Eq. 16 (derived in A.1, Eq. 23 and Eq. 24): b' = b * s^(|D|/(|D|-2)).
    Chosen so the lowest frequency d = |D|/2-1 is divided by exactly s."""
    return base * scale ** (head_dim / (head_dim - 2))


def ntk_aware_frequencies(head_dim: int, base: float, scale: float) -> torch.Tensor:
    """Eq. 14 and Eq. 15: g(m) = m, h(theta_d) = b'^(-2d/|D|)."""
    return rope_frequencies(head_dim, ntk_aware_base(base, scale, head_dim))


# ---------------------------------------------------------------------------------------
# Section 3.2: "NTK-by-parts" interpolation
# ---------------------------------------------------------------------------------------

def wavelength_ratio(theta: torch.Tensor, original_length: int) -> torch.Tensor:
    """Eq. 17: r(d) = L / lambda_d, how many full rotations pair d makes over L.
    The paper writes b' in Eq. 17; with the NTK-by-parts method there is no base change, and
    every public implementation (and this one) uses the original b, i.e. the model's theta_d."""
    return original_length / wavelength(theta)


def ramp_paper(r: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Eq. 18: gamma(r) = 0 if r < alpha, 1 if r > beta, (r - alpha)/(beta - alpha) between."""
    return ((r - alpha) / (beta - alpha)).clamp(0.0, 1.0)


def correction_dim(rotations: float, head_dim: int, base: float, original_length: int) -> float:
    """The (fractional) pair index d at which r(d) equals `rotations`: solve
    L / (2 pi b^(2d/|D|)) = n for d. Used by the public code's form of the ramp."""
    return head_dim * math.log(original_length / (rotations * 2 * math.pi)) / (2 * math.log(base))


def ramp_code(head_dim: int, base: float, original_length: int, alpha: float, beta: float,
              truncate: bool = True) -> torch.Tensor:
    """gamma as the released YaRN code computes it: linear in the pair index d (not in r),
    from d(beta) (floored) where gamma = 1 to d(alpha) (ceiled) where gamma = 0.

    This differs from Eq. 18 inside the ramp: for Llama 2 at L = 4096 it spans pairs 20..46,
    and at pair 33 (r = 5.65) it gives gamma = 0.50 where Eq. 18 gives 0.15. The released
    Yarn-Llama-2 checkpoints were trained with this form, so it is the default."""
    low = correction_dim(beta, head_dim, base, original_length)    # high frequencies end here
    high = correction_dim(alpha, head_dim, base, original_length)  # low frequencies start here
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    d = torch.arange(head_dim // 2, dtype=torch.float64)
    return 1.0 - ((d - low) / (high - low)).clamp(0.0, 1.0)


def ntk_by_parts_frequencies(theta: torch.Tensor, scale: float, gamma: torch.Tensor) -> torch.Tensor:
    """Eq. 19 and Eq. 20: g(m) = m, h(theta_d) = (1 - gamma) theta_d / s + gamma theta_d.
    gamma = 1 keeps high-frequency pairs untouched, gamma = 0 interpolates like PI."""
    return (1.0 - gamma) * theta / scale + gamma * theta


def ntk_by_parts_ramp(cfg: RopeConfig, head_dim: int) -> torch.Tensor:
    """gamma(r(d)) for every pair, in the form cfg.ramp selects."""
    if cfg.ramp == "paper":
        theta = rope_frequencies(head_dim, cfg.base)
        return ramp_paper(wavelength_ratio(theta, cfg.original_length), cfg.alpha, cfg.beta)
    return ramp_code(head_dim, cfg.base, cfg.original_length, cfg.alpha, cfg.beta, cfg.truncate)


# ---------------------------------------------------------------------------------------
# Section 3.3: Dynamic Scaling
# ---------------------------------------------------------------------------------------

def effective_scale(cfg: RopeConfig, seq_len: int) -> float:
    """Sec. 3.3: with dynamic scaling, every forward pass uses s = max(1, l'/L) where l' is
    the current sequence length; without it, s is fixed.

    For a model already fine-tuned at s0 = cfg.scale we use s = max(s0, l'/L): the paper's
    formula when s0 = 1, and what the authors' evaluation code does for fine-tuned models
    (their `finetuned` flag), so that dynamic scaling never undoes the fine-tuned scale."""
    if not cfg.dynamic:
        return float(cfg.scale)
    return max(float(cfg.scale), seq_len / cfg.original_length)


def warn_beyond_window(cfg: RopeConfig, length: int, what: str, stacklevel: int = 2) -> bool:
    """Warn when a sequence of `length` tokens goes past L' = s L (Eq. 11), the window a static
    setting supports; True if it does. A warning, not an error: the model still runs there, and
    the breakdown is a legitimate measurement (Table 2's "> 10^2" entries). Generation and
    evaluation both say it this way. `what` names the length, e.g. "window"."""
    if cfg.window is None or length <= cfg.window:
        return False
    stated = "" if cfg.extended_length is None else " the checkpoint states (its L x s is smaller)"
    warnings.warn(f"{what} {length} exceeds the window {cfg.describe()} supports, "
                  f"{'L x s = ' if not stated else ''}{cfg.window} tokens{stated}; "
                  f"expect perplexity to rise and output to degrade past it. Use --dynamic, or a --yarn-scale of "
                  f"at least {length / cfg.original_length:.3g}.", stacklevel=stacklevel + 1)
    return True


# ---------------------------------------------------------------------------------------
# Section 3.4: YaRN
# ---------------------------------------------------------------------------------------

def yarn_attention_factor(scale: float, coefficient: float = 0.1) -> float:
    """Eq. 22: sqrt(1/t) = c ln(s) + 1 with the paper's c = 0.1 (Eq. 25: s = 8 gives 1.208).
    1 when s <= 1, since there is nothing to correct when the context is not extended.

    c is a fitted constant, not a law: the authors' Mistral code uses c = 0.07
    (jquesnelle/yarn, scaled_rope/modeling_mistral_yarn.py, `_yarn_get_mscale`), and
    DeepSeek's mscale multiplies c by a per-model factor. This is the only place Eq. 22 is written."""
    return coefficient * math.log(scale) + 1.0 if scale > 1 else 1.0


# ---------------------------------------------------------------------------------------
# One code path from a config to the frequencies and the cos/sin tables
# ---------------------------------------------------------------------------------------

def frequencies(cfg: RopeConfig, head_dim: int, scale: float) -> tuple[torch.Tensor, float]:
    """h(theta_d) for d = 0..|D|/2-1 (float64) and the attention factor sqrt(1/t), at scale s."""
    theta = rope_frequencies(head_dim, cfg.base)
    if cfg.method == "none":
        inv_freq = theta
    elif cfg.method == "pi":
        inv_freq = pi_frequencies(theta, scale)
    elif cfg.method == "ntk":
        inv_freq = ntk_aware_frequencies(head_dim, cfg.base, scale)
    else:  # "ntk-by-parts" and "yarn" share Eq. 17 to Eq. 20
        inv_freq = ntk_by_parts_frequencies(theta, scale, ntk_by_parts_ramp(cfg, head_dim))
    return inv_freq, attention_factor(cfg, scale)


def attention_factor(cfg: RopeConfig, scale: float) -> float:
    """sqrt(1/t) at scale s (Sec. 3.4): YaRN's Eq. 22, or the value the config fixes; 1 for
    every other method, which has no temperature."""
    if cfg.method != "yarn":
        return 1.0
    if cfg.attention_factor is not None:
        return float(cfg.attention_factor)
    return yarn_attention_factor(scale, cfg.attention_coefficient)


def rope_tables(cfg: RopeConfig, head_dim: int, positions: torch.Tensor, scale: float,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of m * h(theta_d) for the given positions m, each (len(positions), |D|/2),
    multiplied by sqrt(1/t): the "length scaling" trick of Sec. 3.4 scales both q and k by
    sqrt(1/t), so q.k is scaled by 1/t (Eq. 21) without touching the attention code.

    Always float32 whatever the model dtype: at 128k positions a bf16 angle is off by
    hundreds of radians. The angles m * h(theta_d) themselves are formed in float64 (a float32
    angle at m = 131072 is off by ~0.01 rad); the table is small, so this costs nothing."""
    inv_freq, factor = frequencies(cfg, head_dim, scale)
    device = positions.device if device is None else torch.device(device)
    angles = torch.outer(positions.to(device, torch.float64), inv_freq.to(device))
    return (angles.cos() * factor).float(), (angles.sin() * factor).float()


# ---------------------------------------------------------------------------------------
# The per-dimension table (`python -m yarn_minimal rope` prints it)
# ---------------------------------------------------------------------------------------

def dimension_table(cfg: RopeConfig, head_dim: int, scale: float) -> list[dict]:
    """One row per frequency pair: what each method does to it."""
    theta = rope_frequencies(head_dim, cfg.base)
    inv_freq, _ = frequencies(cfg, head_dim, scale)
    r = wavelength_ratio(theta, cfg.original_length)
    gamma = ntk_by_parts_ramp(cfg, head_dim)
    lam = wavelength(theta)
    return [dict(d=d, theta=theta[d].item(), wavelength=lam[d].item(), r=r[d].item(),
                 gamma=gamma[d].item(), h=inv_freq[d].item(), h_over_theta=(inv_freq[d] / theta[d]).item())
            for d in range(head_dim // 2)]


if __name__ == "__main__":  # the command's old name: `python -m yarn_minimal.rope ...`
    import sys

    from yarn_minimal.__main__ import command

    command(["rope", *sys.argv[1:]])
