"""The next-token loss, cross-entropy of output(h) against the targets, in chunks of tokens, so
that no (T, vocab) float32 tensor exists at long context (Llama 2 at 64k tokens: 8 GiB of
logits). Training (`cross_entropy`, through Transformer.forward) and evaluation (`token_nll`)
both use it, with one chunk size.

The reference is F.cross_entropy on the full logits; tests/test_loss.py checks both functions
and the gradients against it. With gradients wanted, `_LinearCrossEntropy` makes each chunk's
gradients while its logits exist, so that backward recomputes nothing and keeps nothing but
dL/dh and dL/dW.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

IGNORE_INDEX = -100   # targets that take no part in the loss (F.cross_entropy's default)
LOSS_CHUNK = 2048     # tokens per chunk of logits: 2048 x 32000 float32 is 262 MB


def _chunk_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-log p(target) of each token of one chunk of logits (N, vocab), 0 where the target is
    ignored, and log p itself (float32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    return -torch.where(targets != IGNORE_INDEX, picked, 0.0), logp


def _chunk_gradient(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d(-log p(target)) / d logits = softmax(logits) - onehot(target), built in place over logp;
    rows whose target is ignored get no gradient. Masks rather than boolean indexing, so that no
    shape depends on the data (no GPU sync; runs on the meta device)."""
    index = targets.clamp(min=0).unsqueeze(1)
    grad = logp.exp_()
    grad.scatter_add_(1, index, grad.new_full(index.shape, -1.0))
    return grad.masked_fill_((targets == IGNORE_INDEX).unsqueeze(1), 0.0)


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of the logits h W^T (h: N x dim, W: vocab x dim) against targets (N,),
    chunk by chunk, with its gradients made in the same pass.

    While a chunk's logits exist, forward turns them into their gradient (_chunk_gradient) and
    multiplies it into the chunk's share of dL/dh and dL/dW. Backward only scales those by the
    incoming gradient: nothing is recomputed, and one chunk's float32 logits is the most the loss
    holds at a time. (torch.utils.checkpoint per chunk would run the output projection and the
    softmax twice; keeping every chunk's logits would hold N x vocab floats.)"""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for a in range(0, h.shape[0], chunk_size):
            total += _LinearCrossEntropy.chunk(h[a:a + chunk_size], weight, targets[a:a + chunk_size],
                                               None if grad_h is None else grad_h[a:a + chunk_size], grad_weight)
        ctx.save_for_backward(grad_h, grad_weight)
        return total

    @staticmethod
    def chunk(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, grad_h: Optional[torch.Tensor],
              grad_weight: Optional[torch.Tensor]) -> torch.Tensor:
        """One chunk's summed loss; writes its dL/dh into grad_h, adds its dL/dW to grad_weight."""
        nll, logp = _chunk_nll(h @ weight.t(), targets)
        nll = nll.sum()
        grad = _chunk_gradient(logp, targets).to(weight.dtype)
        if grad_h is not None:
            grad_h.copy_(grad @ weight)
        if grad_weight is not None:
            # not addmm_: in-place ops escape autocast, and this product must run in bf16 like
            # every other matmul of a bf16 step (autocast keeps float32 masters and grad_weight)
            grad_weight += grad.t() @ h
        return nll

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], None, None]:
        # scaled in place: a copy would add an N x dim tensor at the peak of training (all
        # activations alive). A second backward through the loss is then refused by autograd's
        # check on modified saved tensors.
        grad_h, grad_weight = ctx.saved_tensors
        return (None if grad_h is None else grad_h.mul_(grad_total.to(grad_h.dtype)),
                None if grad_weight is None else grad_weight.mul_(grad_total.to(grad_weight.dtype)), None, None)


def cross_entropy(output: nn.Linear, h: torch.Tensor, targets: torch.Tensor,
                  chunk_size: int = LOSS_CHUNK) -> torch.Tensor:
    """Mean cross-entropy of output(h) (B, T, vocab) against targets (B, T), targets == -100 ignored.

    The B x T tokens are flattened and cut into chunks of chunk_size tokens, so that one chunk's
    logits (chunk_size x vocab, float32) is the most that exists at a time, whatever B and T.
    With gradients wanted, each chunk's gradients are made while its logits exist
    (_LinearCrossEntropy); nothing is kept for, or recomputed in, backward."""
    h, targets = h.flatten(0, 1), targets.flatten()
    count = (targets != IGNORE_INDEX).sum().clamp(min=1)
    if torch.is_grad_enabled() and (h.requires_grad or output.weight.requires_grad):
        total = _LinearCrossEntropy.apply(h, output.weight, targets, chunk_size)
    else:
        total = sum(_chunk_nll(output(h_chunk), t_chunk)[0].sum()
                    for h_chunk, t_chunk in zip(h.split(chunk_size), targets.split(chunk_size)))
    return total / count


def token_nll(output: nn.Linear, h: torch.Tensor, targets: torch.Tensor, chunk_size: int = LOSS_CHUNK) -> torch.Tensor:
    """-log p(target) of every token, float32 (N,), from hidden states h (N, dim): evaluation's
    per-token scores, chunk by chunk like `cross_entropy` (no gradients)."""
    return torch.cat([_chunk_nll(output(h_chunk), t_chunk)[0]
                      for h_chunk, t_chunk in zip(h.split(chunk_size), targets.split(chunk_size))])
