"""Cross-entropy through a frozen output layer, in reused buffers.

Gemma 3's output layer has 262k words: one batch's answer tokens make float32 logits of hundreds
of MB, and `F.cross_entropy(head(h).float(), y)` allocates the logits, their float copy, their
log-softmax and two gradients afresh on every step; on a CPU each allocation that size is a new
mmap that the kernel faults in and zeroes page by page. Here the logits go into two buffers kept
for the process, are turned in place into their gradient (softmax minus one-hot) and multiplied
back through the weight: the same float32 arithmetic, no large allocation after the first step,
and only the hidden states' gradient kept for backward. Valid only for a frozen weight (LoRA),
whose gradient is never formed. The softmax is ATen's fused kernel written over its own input (three
passes over the logits where max, subtract, exp, sum and divide took five), and the loss is read
off it as -log p(target); a row whose target probability underflows float32 takes its exact
log-sum-exp from the bf16 logits instead.

`grad_filter` (Cut Cross-Entropy's gradient filtering, Wijmans et al. 2024): the gradient matmul
(softmax minus one-hot) x weight is half the layer's FLOPs, yet after softmax almost every word's
probability is negligible. Columns below `grad_filter` in every row of a chunk (targets always
kept) are left out of that matmul; the loss stays exact. Filtering per column over all rows of the
chunk is stricter than CCE's per-tile filter, so the error is no larger than theirs at the same
threshold.
"""

from __future__ import annotations

import torch

from finetune.model import adapter_autocast, base_model

ROWS_BYTES = 256 << 20  # float32 logits per chunk of rows: enough rows that the weight is read rarely
_TINY = 1e-30  # float32's normal range ends at 1.2e-38
_scratch: dict[tuple, torch.Tensor] = {}


def _buffer(name: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (name, dtype, device)
    n = shape[0] * shape[1]
    if key not in _scratch or _scratch[key].numel() < n:
        _scratch[key] = torch.empty(n, dtype=dtype, device=device)
    return _scratch[key][:n].view(shape)


def _soft_capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Gemma's logit soft-cap, out of place (the chunk loop below applies it in place, in buffers)."""
    return torch.tanh(logits / softcap) * softcap if softcap else logits


class _FrozenLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, softcap, rows, grad_filter):
        n, vocab = hidden.shape[0], weight.shape[0]
        grad = torch.empty(hidden.shape, dtype=weight.dtype, device=hidden.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, n, rows):
            h, y = hidden[s : s + rows].to(weight.dtype), target[s : s + rows]
            low = _buffer("low", (len(h), vocab), weight.dtype, h.device)
            z = _buffer("float", (len(h), vocab), torch.float32, h.device)
            torch.mm(h, weight.t(), out=low)
            z.copy_(low)
            if softcap:
                squashed = _buffer("squashed", (len(h), vocab), torch.float32, h.device)
                squashed.copy_(z).div_(softcap).tanh_()
                z.copy_(squashed).mul_(softcap)
            at = torch.arange(len(y), device=z.device), y
            picked = z[at]
            torch.ops.aten._softmax.out(z, 1, False, out=z)  # in place: row max, exp and sum, scale
            p = z[at]
            tiny = p < _TINY  # -log(p) loses its digits (or is inf) there: the exact log-sum-exp instead
            loss -= p[~tiny].log().sum()
            if tiny.any():
                rows_z = _soft_capped(low[tiny].float(), softcap)
                loss += (rows_z.logsumexp(dim=1) - picked[tiny]).sum()
            z[at] -= 1
            if softcap:
                z.mul_(squashed.square_().neg_().add_(1))
            if grad_filter:
                keep = z.amax(dim=0) >= grad_filter
                keep[y] = True
                cols = keep.nonzero().squeeze(1)
                torch.mm(z.index_select(1, cols).to(weight.dtype), weight.index_select(0, cols), out=grad[s : s + rows])
            else:
                low.copy_(z)
                torch.mm(low, weight, out=grad[s : s + rows])
        ctx.save_for_backward(grad.to(hidden.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, head: torch.nn.Module, target: torch.Tensor, softcap: float | None = None,
                         rows: int | None = None, grad_filter: float = 0.0) -> torch.Tensor:
    """sum(cross_entropy(head(hidden).float() [soft-capped], target)), as F.cross_entropy with
    reduction='sum' computes it. A head with a trainable weight or a bias takes the plain path
    (exact, `grad_filter` unused)."""
    weight = head.weight
    if weight.requires_grad or getattr(head, "bias", None) is not None or not torch.is_grad_enabled():
        return torch.nn.functional.cross_entropy(_soft_capped(head(hidden).float(), softcap), target, reduction="sum")
    rows = rows or max(1, ROWS_BYTES // (4 * weight.shape[0]))
    with torch.autocast(hidden.device.type, enabled=False):  # the dtypes are chosen here, in place
        return _FrozenLinearCrossEntropy.apply(hidden.contiguous(), weight, target, softcap, rows, grad_filter)


def answer_only_loss(model, batch, num_items: int | None = None, grad_filter: float = 0.0) -> torch.Tensor:
    """Cross-entropy on the answer tokens, projecting only their hidden states through the output layer.

    A causal LM's forward computes logits for every position; for Gemma 3 270M the 262k-word output
    layer is 168M of its 268M parameters, and only the answer tokens need it.
    """
    labels = batch["labels"]
    hf = base_model(model)
    if hf.config.is_encoder_decoder:
        with adapter_autocast(model):
            return model(**batch).loss
    backbone = getattr(hf, hf.base_model_prefix)
    with adapter_autocast(model):
        hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    target = labels[:, 1:]
    mask = target != -100
    cap = getattr(hf.config, "final_logit_softcapping", None)
    loss = linear_cross_entropy(hidden[:, :-1][mask], hf.get_output_embeddings(), target[mask], cap, grad_filter=grad_filter)
    return loss / (num_items if num_items else mask.sum().clamp(min=1))
