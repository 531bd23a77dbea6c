"""Pieces of decode heads that several segmentors share (pyramid pooling, ASPP, FPN, self-attention, context)."""
