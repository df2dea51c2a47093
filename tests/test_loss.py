"""The chunked loss (loss.py: cross_entropy) against the plain full cross-entropy, which
builds every logit at once and lets autograd differentiate it: the loss and the gradients of h and
of the output weight must be equal, and no tokens x vocab float32 tensor may exist beyond a chunk."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from yarn_minimal.loss import cross_entropy
from yarn_minimal.model import ModelArgs, Transformer

B, T, DIM, VOCAB = 3, 11, 16, 50


def problem(seed=0, ignored=True):
    g = torch.Generator().manual_seed(seed)
    output = torch.nn.Linear(DIM, VOCAB, bias=False)
    with torch.no_grad():
        output.weight.copy_(torch.randn(VOCAB, DIM, generator=g))
    h = torch.randn(B, T, DIM, generator=g)
    targets = torch.randint(0, VOCAB, (B, T), generator=g)
    if ignored:
        targets[0, :4] = -100   # a run of ignored targets that spans chunk boundaries
        targets[2, -1] = -100
    return output, h, targets


def full_loss_and_grads(output, h, targets, scale=1.0):
    """Brute force: every logit at once, F.cross_entropy's mean over the non-ignored targets."""
    h = h.clone().requires_grad_()
    output.weight.grad = None
    loss = F.cross_entropy(output(h).flatten(0, 1), targets.flatten(), ignore_index=-100)
    (loss * scale).backward()
    return loss.detach(), h.grad, output.weight.grad


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 13, 33, 64])  # 33 = B*T; 7 and 13 leave a short last chunk
def test_loss_and_gradients_equal_full_cross_entropy(chunk_size):
    output, h, targets = problem()
    ref_loss, ref_dh, ref_dw = full_loss_and_grads(output, h, targets, scale=0.25)
    h = h.clone().requires_grad_()
    output.weight.grad = None
    loss = cross_entropy(output, h, targets, chunk_size=chunk_size)
    (loss * 0.25).backward()  # an upstream gradient other than 1 (train.py divides by accumulation steps)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(h.grad, ref_dh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(output.weight.grad, ref_dw, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the path without gradients
        torch.testing.assert_close(cross_entropy(output, h, targets, chunk_size), ref_loss, rtol=1e-6, atol=0)


def test_gradient_of_one_input_only():
    output, h, targets = problem(seed=1)
    _, ref_dh, ref_dw = full_loss_and_grads(output, h, targets)
    output.weight.requires_grad_(False)  # frozen output projection: only dL/dh
    h1 = h.clone().requires_grad_()
    cross_entropy(output, h1, targets, chunk_size=5).backward()
    torch.testing.assert_close(h1.grad, ref_dh, rtol=1e-5, atol=1e-6)
    output.weight.requires_grad_(True)
    output.weight.grad = None
    cross_entropy(output, h, targets, chunk_size=5).backward()  # h without grad: only dL/dW
    torch.testing.assert_close(output.weight.grad, ref_dw, rtol=1e-5, atol=1e-6)


def test_all_targets_ignored_gives_zero_loss_and_gradients():
    output, h, targets = problem()
    h.requires_grad_()
    loss = cross_entropy(output, h, torch.full_like(targets, -100), chunk_size=4)
    loss.backward()
    assert loss.item() == 0.0 and not h.grad.any() and not output.weight.grad.any()


def test_model_gradients_equal_full_logits():
    """Through the whole model, B > 1: every parameter's gradient equals that of F.cross_entropy
    on model(tokens)'s full logits."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=VOCAB, multiple_of=16)).train()
    tokens = torch.randint(0, VOCAB, (B, T))
    targets = torch.randint(0, VOCAB, (B, T))
    targets[1, 3:9] = -100
    F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), ignore_index=-100).backward()
    ref = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model(tokens, targets=targets).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_autocast_bfloat16_matches_float32():
    """train.py on one device with --dtype bfloat16: float32 weights, bf16 matmuls under autocast."""
    output, h, targets = problem()
    _, ref_dh, ref_dw = full_loss_and_grads(output, h, targets)
    ref = F.cross_entropy(output(h).flatten(0, 1), targets.flatten(), ignore_index=-100)
    h.requires_grad_()
    output.weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cross_entropy(output, h, targets, chunk_size=7)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == output.weight.grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref.detach(), rtol=2e-2, atol=0)
    torch.testing.assert_close(h.grad, ref_dh, rtol=0.05, atol=5e-3)
    torch.testing.assert_close(output.weight.grad, ref_dw, rtol=0.05, atol=5e-3)


class LargestFloat32(TorchDispatchMode):
    """The most elements of any float32 tensor an op produced (forward and backward)."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def largest_float32(loss_fn, tokens, vocab, dim=8, batch=2):
    """Forward + backward on the meta device (shapes only, nothing computed)."""
    output = torch.nn.Linear(dim, vocab, bias=False, device="meta", dtype=torch.bfloat16)
    h = torch.empty(batch, tokens, dim, device="meta", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.zeros(batch, tokens, dtype=torch.long, device="meta")
    with LargestFloat32() as mode:
        loss_fn(output, h, targets).backward()
    return mode.largest


def test_no_tokens_x_vocab_float32_tensor_beyond_a_chunk():
    tokens, vocab, chunk = 16384, 1000, 512
    full = lambda o, h, t: F.cross_entropy(o(h).float().flatten(0, 1), t.flatten())
    assert largest_float32(full, tokens, vocab) == 2 * tokens * vocab  # the mode sees what a plain loss builds
    assert largest_float32(lambda o, h, t: cross_entropy(o, h, t, chunk), tokens, vocab) == chunk * vocab
