"""Eq. 5 (model.rotate_pairs) as one op, so that it can be one fused kernel where that pays:
bf16 in and out with float32 only inside, and a backward that keeps only the rotation.

`fused(reference)` wraps the reference function (model.py applies it as a decorator): eagerly
on the CPU the reference runs as it is; elsewhere it runs as a torch.library custom op whose
body is the reference, whose CUDA kernel is the real-valued form below compiled by Inductor on
first use (Inductor generates no code for complex numbers), whose fake implementation lets the
meta device and torch.compile see its shapes, and whose backward is the opposite rotation.
Compiling is lazy: importing the package never starts torch.compile.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

Rotate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _rotate_pairs_real(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """The reference's product written on real numbers: reads x once and writes the result once,
    float32 only in registers once compiled."""
    cos, sin = torch.view_as_real(rotation)[:, None].unbind(-1)
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2).to(x.dtype)


@functools.cache
def _compiled_real_form() -> Rotate:
    return torch.compile(_rotate_pairs_real, dynamic=True)


def fused(reference: Rotate) -> Rotate:
    op = torch.library.custom_op("yarn_minimal::rotate_pairs", reference, mutates_args=())
    op.register_fake(lambda x, rotation: torch.empty_like(x))
    op.register_kernel("cuda")(lambda x, rotation: _compiled_real_form()(x, rotation))

    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # a rotation's adjoint is the opposite rotation: multiply by the conjugate
        rotation, = ctx.saved_tensors
        return op(grad, torch.conj_physical(rotation)), None

    def save_rotation(ctx, inputs: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
        ctx.save_for_backward(inputs[1])

    op.register_autograd(backward, setup_context=save_rotation)

    @functools.wraps(reference)
    def rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        if x.is_cpu and not torch.compiler.is_compiling():  # eager CPU: the op's dispatch would cost more than it saves
            return reference(x, rotation)
        return op(x, rotation)

    rotate.op = op
    return rotate
