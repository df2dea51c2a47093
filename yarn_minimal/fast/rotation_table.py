"""model.rotation_table in two factors, for the table that Dynamic Scaling rebuilds at every
decoding step (Sec. 3.3: s, and with it every theta_d, changes with the length).

e^{i m h} = e^{i 64a h} e^{i r h} for m = 64a + r: cos/sin of end/64 + 64 positions and one
complex product instead of cos/sin of every position. Equal to model.rotation_table within
float32 rounding of the two factors (4e-7; tests/test_model.py), and used only where a cached
forward pass (a decoding step, or a prefill chunk) runs past L s0 under Dynamic Scaling
(Transformer.rotation); everything else uses the plain form.
"""
from __future__ import annotations

import torch

from ..rope import RopeConfig, attention_factor, rope_tables


def rotation_table(rope: RopeConfig, head_dim: int, end: int, scale: float,
                   device: torch.device | str | None = None) -> torch.Tensor:
    n_coarse = (end + 63) // 64
    positions = torch.cat([torch.arange(0, end, 64), torch.arange(64)])  # one call: h(theta_d) made once
    table = torch.complex(*rope_tables(rope, head_dim, positions, scale, device=device))
    # rope_tables multiplies cos and sin by sqrt(1/t) (Eq. 22); the product of two rows would
    # carry it twice, so the fine factor has it divided back out
    coarse, fine = table[:n_coarse], table[n_coarse:] / attention_factor(rope, scale)
    return (coarse[:, None] * fine).flatten(0, 1)[:end]
