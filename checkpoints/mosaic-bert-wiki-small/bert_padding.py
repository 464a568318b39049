"""Moving between padded (batch, seqlen, ...) tensors and unpadded (total_tokens, ...) ones.

The unpadded layout concatenates the real tokens of every sequence in batch order. Sequence `b` occupies rows
`cu_seqlens[b]:cu_seqlens[b + 1]`; `indices` maps each row back to its flat position `b * seqlen + s` in the padded
tensor. Both directions are plain gathers and scatters, so autograd gives their exact gradients.
"""

import torch
import torch.nn.functional as F


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, lengths: tuple[int, int] | None = None):
    """Drops the padded positions of a batch.

    Args:
        hidden_states: (batch, seqlen, ...) values to unpad (token ids, embeddings, labels, ...).
        attention_mask: (batch, seqlen), 1 for real tokens and 0 for padding, anywhere in the row.
        lengths: (total real tokens, longest sequence) when the caller already has them on the host; otherwise they
            are read from the mask in one host synchronisation (the only one here: the gather uses the known count).

    Returns:
        unpadded: (total_tokens, ...) the real tokens, sequence after sequence, in their original order.
        indices: (total_tokens,) int64 flat positions of those tokens in (batch * seqlen).
        cu_seqlens: (batch + 1,) int32 cumulative sequence lengths, starting at 0.
        max_seqlen: python int, the longest sequence in the batch.
    """
    seqlens = attention_mask.sum(dim=-1, dtype=torch.int32)
    if lengths is None:
        lengths = tuple(torch.stack([seqlens.sum(), seqlens.max()]).tolist()) if seqlens.numel() else (0, 0)
    total_tokens, max_seqlen = lengths
    indices = true_positions(attention_mask.flatten(), total_tokens)
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    return index_first_axis(hidden_states, indices), indices, cu_seqlens, int(max_seqlen)


def true_positions(flags: torch.Tensor, count: int) -> torch.Tensor:
    """(count,) int64 positions of the nonzero entries of the 1-D `flags`, which must hold exactly `count` of them.
    Knowing the count lets CPU and CUDA skip the host synchronisation `torch.nonzero` needs."""
    if flags.device.type in ("cpu", "cuda"):
        return torch.nonzero_static(flags, size=count).flatten()
    return torch.nonzero(flags).flatten()


def index_first_axis(padded: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Gathers rows `indices` of `padded` viewed as (batch * seqlen, ...): returns (len(indices), ...)."""
    return padded.flatten(0, 1)[indices]


def pad_input(unpadded: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Scatters (total_tokens, ...) rows back to (batch, seqlen, ...), with zeros at the padded positions."""
    padded = unpadded.new_zeros((batch * seqlen, *unpadded.shape[1:]))
    padded = padded.index_copy(0, indices, unpadded)
    return padded.view(batch, seqlen, *unpadded.shape[1:])


__all__ = ["unpad_input", "pad_input", "index_first_axis", "true_positions"]
