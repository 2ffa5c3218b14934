"""The batches the training loop feeds to a model: the contract between `batches` (data) and `model` (megatron).

Shape legend: B sequences in the batch, S tokens per sequence (Ss source, St target).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class LMBatch:
    """Packed decoder-only LM batch: `labels` are `tokens` shifted by one; documents are separated by EOS."""

    tokens: torch.Tensor  # [B, S] int64
    labels: torch.Tensor  # [B, S] int64
    loss_mask: torch.Tensor  # [B, S] float32: 1 where the label counts in the loss

    def to(self, device: torch.device | str) -> LMBatch:
        return LMBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum().item())


@dataclass
class MTBatch:
    """Source -> target pairs, padded with PAD_ID to the longest in the batch (batches are bucketed by length)."""

    src: torch.Tensor  # [B, Ss] int64: source ids + EOS
    tgt_in: torch.Tensor  # [B, St] int64: BOS + target ids (teacher forcing)
    labels: torch.Tensor  # [B, St] int64: target ids + EOS
    loss_mask: torch.Tensor  # [B, St] float32: 1 at real (non-pad) label positions
    src_pad: torch.Tensor  # [B, Ss] bool: True at padding
    tgt_pad: torch.Tensor  # [B, St] bool: True at padding

    def to(self, device: torch.device | str) -> MTBatch:
        return MTBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def num_tokens(self) -> int:
        return int(self.loss_mask.sum().item())


Batch = LMBatch | MTBatch
