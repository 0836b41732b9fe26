"""Python twin of the skb->mark helpers in bpf/lib/common.h (`mark_encode_identity`,
`mark_decode_identity`): the L7 proxy sets SO_MARK on its upstream socket to the encoded
source identity, so the destination's policy judges the real client, not the host."""

from __future__ import annotations

#: `MARK_MAGIC_MASK` / `MARK_MAGIC_IDENTITY` / `MARK_MAGIC_DRYRUN` in bpf/lib/common.h
MARK_MAGIC_MASK = 0x0F00
MARK_MAGIC_IDENTITY = 0x0F00
MARK_MAGIC_DRYRUN = 0x0D00


def mark_encode_identity(identity: int) -> int:
    """`mark_encode_identity()`: identity bits 0-15 go to mark bits 16-31, bits 16-23 to
    mark bits 0-7, and the magic nibble marks the mark as carrying an identity."""
    identity &= 0xFFFFFFFF
    return (((identity & 0xFFFF) << 16) | ((identity >> 16) & 0xFF) | MARK_MAGIC_IDENTITY) \
        & 0xFFFFFFFF


def mark_decode_identity(mark: int) -> int:
    """`mark_decode_identity()`: the inverse for identities below 2**24."""
    mark &= 0xFFFFFFFF
    return (mark >> 16) | ((mark & 0xFF) << 16)


def mark_carries_identity(mark: int) -> bool:
    return (mark & MARK_MAGIC_MASK) == MARK_MAGIC_IDENTITY
