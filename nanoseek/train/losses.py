"""Training losses as small pure functions: pretraining (CE, MTP, balance, bias update) and RL.

Each takes tensors and returns tensors; none touches a model, an optimizer or a process group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


# --- pretraining losses
def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy over the labels that are not `ignore_index`.

    logits (..., V), labels (...). Computed in fp32 (bf16 log-softmax over a large vocabulary loses
    about two digits). A batch with every label ignored gives 0, not NaN.
    """
    labels = labels.reshape(-1)
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels,
                            ignore_index=ignore_index, reduction="sum")
    return total / (labels != ignore_index).sum().clamp(min=1)


def mtp_loss(mtp_logits: list[torch.Tensor], labels: torch.Tensor, weight: float,
             ignore_index: int = -100) -> torch.Tensor:
    """L_MTP = (lambda / D) * sum_k CE_k (DeepSeek-V3 eq. 25).

    labels (B, T) are the main model's targets: labels[:, i] = token i+1. Depth k predicts token
    i+k+1 from position i, so its targets are labels[:, k:], and its logits are (B, T-k, V).
    """
    D = len(mtp_logits)
    if D == 0:
        return labels.new_zeros((), dtype=torch.float32)
    total = sum(cross_entropy(lg, labels[:, k:], ignore_index) for k, lg in enumerate(mtp_logits, start=1))
    return weight / D * total


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, batch: int, alpha: float) -> torch.Tensor:
    """V3's complementary sequence-wise balance loss for one MoE layer (eq. 17-20).

    scores (B*T, E): unbiased gate scores (sigmoid for V3); indices (B*T, K): chosen experts.
    Per sequence: f_i = E / (K*T) * #tokens routed to i, P_i = mean over t of s_i,t / sum_j s_j,t;
    L = alpha * sum_i f_i P_i, averaged over the B sequences. f carries no gradient (counts);
    the loss trains the router through P. Perfect balance gives alpha.
    """
    N, E = scores.shape
    K = indices.shape[1]
    T = N // batch
    s = scores.float().view(batch, T, E)                               # (B, T, E)
    P = (s / s.sum(dim=-1, keepdim=True)).mean(dim=1)                  # (B, E)
    counts = F.one_hot(indices.view(batch, T * K), E).sum(dim=1)       # (B, E)
    f = counts.to(P.dtype) * (E / (K * T))                             # (B, E)
    return alpha * (f * P).sum(dim=-1).mean()


def expert_counts(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert: indices (N, K) -> (E,) float32 counts (to all-reduce and sum)."""
    return torch.bincount(indices.reshape(-1), minlength=n_experts).float()


@torch.no_grad()
def bias_update(counts: torch.Tensor, gamma: float) -> torch.Tensor:
    """Aux-loss-free balancing step (DeepSeek-V3 section 2.1.2): delta_i = gamma * sign(mean(c) - c_i).

    counts (E,): tokens per expert over the whole global batch. Add the result to the gate's
    selection bias after the optimizer step; overloaded experts get pushed down, idle ones up.
    No gradient and no mean subtraction (torchtitan also centers it; the paper does not).
    """
    counts = counts.float()
    return gamma * torch.sign(counts.mean() - counts)
