"""One sequence's KV cache, and the packed attention that reads and writes it.

The batched engine runs one forward pass per iteration over every scheduled sequence *packed*
into a single row: the prefill chunks of new or resumed sequences and the one-token decodes of
running ones, concatenated (vLLM's layout). The linear layers (projections, MLP, LM head), where
nearly all the arithmetic is, then run once over all of them; only attention is per sequence,
each query chunk against its own sequence's keys and values.

Each sequence owns a :class:`SequenceKV`: one tensor ``(layers, 2, kv_heads, capacity,
head_dim)`` holding keys and values for its positions ``[0, length)``. Capacity grows by doubling
up to the sequence's most tokens (prompt + ``max_tokens``, at most the context window), so a
sequence of n tokens copies O(n) positions over its life, and the scheduler's KV budget counts
exactly what is allocated (:func:`invoker.engine.scheduler.capacity_for`).

:func:`packed_attention` is registered with transformers as the attention implementation
:data:`ATTENTION` (:func:`enable`). Given a :class:`PackedBatch` in the forward's keyword
arguments it writes each sequence's new keys and values at its positions and attends each chunk
causally to its sequence; without one (a single sequence on a ``DynamicCache``: the migration's
prefill, the warm-up) it is transformers' SDPA attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from invoker.engine.scheduler import capacity_for

ATTENTION = "sllm_packed"
"""The name of :func:`packed_attention` among transformers' attention implementations."""


class SequenceKV:
    """The keys and values of one sequence's positions ``[0, length)``; nothing is allocated
    until the first :meth:`reserve`.

    Args:
        shape: ``(layers, kv_heads, head_dim)`` (:attr:`invoker.instance.ModelInstance.kv_shape`).
        limit: the most positions it will ever hold (tokens).
        dtype, device: of the model.
    """

    def __init__(self, shape: tuple[int, int, int], limit: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.shape = shape
        self.limit = limit
        self.dtype = dtype
        self.device = device
        self.length = 0
        self.data: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        """Positions allocated (tokens)."""
        return 0 if self.data is None else self.data.shape[3]

    def reserve(self, length: int) -> None:
        """Make room for positions ``[0, length)``, keeping those held; the capacity grows as
        :func:`invoker.engine.scheduler.capacity_for` says, the rule the KV budget counts by.

        Raises:
            ValueError: ``length`` exceeds ``limit``.
        """
        if length > self.limit:
            raise ValueError(f"{length} positions exceed the sequence's limit of {self.limit}")
        capacity = capacity_for(self.capacity, length, self.limit)
        if capacity > self.capacity:
            layers, heads, head_dim = self.shape
            grown = torch.empty((layers, 2, heads, capacity, head_dim), dtype=self.dtype,
                                device=self.device)
            if self.data is not None and self.length:
                grown[:, :, :, : self.length] = self.data[:, :, :, : self.length]
            self.data = grown

    def drop(self) -> None:
        """Free the cache: every position must be computed again."""
        self.data = None
        self.length = 0

    def copy_from(self, cache: transformers.DynamicCache, positions: int) -> None:
        """Take the first ``positions`` positions of a single-sequence ``DynamicCache`` (one
        a migration's destination prepared)."""
        self.reserve(positions)
        assert self.data is not None
        for i, layer in enumerate(cache.layers):
            self.data[i, 0, :, :positions] = layer.keys[0, :, :positions]
            self.data[i, 1, :, :positions] = layer.values[0, :, :positions]
        self.length = positions

    def copy_prefix(self, other: SequenceKV, positions: int) -> None:
        """Take the first ``positions`` positions of ``other``'s cache (a sibling of the same
        prompt: the prefill they share).

        Raises:
            ValueError: ``other`` holds fewer positions, or this cache cannot hold them.
        """
        if other.data is None or other.length < positions:
            raise ValueError(f"the other cache holds {other.length} positions, not {positions}")
        self.reserve(positions)
        assert self.data is not None
        self.data[:, :, :, :positions] = other.data[:, :, :, :positions]
        self.length = positions


@dataclass
class PackedBatch:
    """One iteration's sequences as the forward pass sees them: ``kv[i]`` gets ``counts[i]``
    new positions from ``kv[i].length`` on; their queries are the packed row's
    ``[offsets[i], offsets[i] + counts[i])``. Lengths advance by :meth:`commit`, after the
    forward pass."""

    kv: Sequence[SequenceKV]
    counts: Sequence[int]

    def __post_init__(self) -> None:
        self.offsets = [0]
        for n in self.counts[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        for kv, n in zip(self.kv, self.counts, strict=True):
            kv.reserve(kv.length + n)

    def position_ids(self, device: torch.device) -> torch.Tensor:
        """Shape (1, total tokens): each token's position in its own sequence."""
        return torch.cat([torch.arange(kv.length, kv.length + n, device=device)
                          for kv, n in zip(self.kv, self.counts, strict=True)]).unsqueeze(0)

    def commit(self) -> None:
        for kv, n in zip(self.kv, self.counts, strict=True):
            kv.length += n


def packed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                     value: torch.Tensor, attention_mask: torch.Tensor | None, *,
                     scaling: float | None = None, dropout: float = 0.0,
                     sllm_batch: PackedBatch | None = None, **kwargs: Any
                     ) -> tuple[torch.Tensor, None]:
    """Attention over a packed batch (module docstring), as transformers calls it.

    Args:
        module: the attention layer (its ``layer_idx`` picks the cache layer).
        query: (1, heads, total tokens, head_dim); ``key``, ``value``: (1, kv_heads, total
            tokens, head_dim), rotary embeddings applied.
        attention_mask: ignored with ``sllm_batch`` (each chunk is causal in its sequence).
        sllm_batch: the iteration's sequences; None falls back to SDPA attention.

    Returns:
        ``(output, None)``, output of shape (1, total tokens, heads, head_dim).
    """
    if sllm_batch is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    layer = module.layer_idx
    outputs = []
    for kv, start, n in zip(sllm_batch.kv, sllm_batch.offsets, sllm_batch.counts, strict=True):
        end = kv.length + n
        data = kv.data
        assert data is not None  # reserved by PackedBatch
        data[layer, 0, :, kv.length:end] = key[0, :, start:start + n]
        data[layer, 1, :, kv.length:end] = value[0, :, start:start + n]
        q = query[:, :, start:start + n]
        k = data[layer, 0, None, :, :end]
        v = data[layer, 1, None, :, :end]
        mask = None
        if n > 1:  # a chunk: query j sees the cached positions and its chunk up to itself
            mask = torch.ones((n, end), dtype=torch.bool, device=q.device).tril(kv.length)
        outputs.append(torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scaling, enable_gqa=k.shape[1] != q.shape[1]))
    return torch.cat(outputs, dim=2).transpose(1, 2), None


AttentionInterface.register(ATTENTION, packed_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # the masks of the SDPA fallback


def enable(model: transformers.PreTrainedModel) -> None:
    """Make ``model`` use :func:`packed_attention` (an SDPA model is unchanged without a
    :class:`PackedBatch`)."""
    model.set_attn_implementation(ATTENTION)


def forward_packed(model: transformers.PreTrainedModel, ids: Sequence[int], batch: PackedBatch,
                   keep: Sequence[int]) -> torch.Tensor:
    """One forward pass of ``model`` (:func:`enable`\\ d) over a packed batch: ``ids`` are
    every sequence's new tokens, concatenated in ``batch``'s order. Call under
    ``torch.inference_mode()``; the lengths advance.

    Args:
        keep: indexes (into the packed row) of the positions whose logits are wanted.

    Returns:
        The logits of those positions, shape (len(keep), vocab).
    """
    device = batch.kv[0].device
    input_ids = torch.tensor([list(ids)], dtype=torch.long, device=device)
    out = model(input_ids=input_ids, position_ids=batch.position_ids(device), use_cache=False,
                logits_to_keep=torch.tensor(list(keep), dtype=torch.long, device=device),
                sllm_batch=batch)
    batch.commit()
    return out.logits[0]
