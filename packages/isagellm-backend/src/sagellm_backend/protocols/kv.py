"""KV blocks, the KV cache tensors and a batch's metadata.

A block is ``ceil(num_tokens / tokens_per_block)`` pages of the provider's
:class:`~sagellm_backend.kv.KVLayout`. Token ``t`` of a block lives in page ``pages[t //
tokens_per_block]`` at offset ``t % tokens_per_block``: its *slot* is ``page * tokens_per_block
+ offset``, the index that ``kv_cache_write`` and the attention ops read and write.

Page reuse is stream-ordered: a freed page is handed out again only after the device work that
the provider queued on it has run, on whichever stream it was queued. Work an engine queues
itself on the cache tensors, on a stream of its own, is declared with ``after=``: the pages are
reused only once that event is reached.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar, runtime_checkable

from sagellm_backend.dtypes import DType
from sagellm_backend.kv import KVBlock, KVBlockInfo, KVLayout
from sagellm_backend.protocols.streams import Event, Stream

__all__ = ["BatchMetadata", "KVBlockManager", "KVCacheAccess"]

T_co = TypeVar("T_co", covariant=True)


@runtime_checkable
class KVBlockManager(Protocol):
    """KV blocks: ceil(num_tokens / tokens_per_block) pages of the provider's KV layout.

    A block is an int handle (:data:`~sagellm_backend.kv.KVBlock`); :meth:`kv_block_info` says
    where it is. Batched forms do all or nothing: if one item is invalid, none is applied.
    """

    @property
    def kv_layout(self) -> KVLayout: ...

    def kv_block_alloc(self, num_tokens: int, dtype: DType | str) -> KVBlock: ...

    def kv_block_free(self, block: KVBlock, *, after: Event | None = None) -> None:
        """Release ``block``; its pages are reused only after ``after`` (if given) is reached."""

    def kv_block_info(self, block: KVBlock) -> KVBlockInfo:
        """Where the live ``block`` is: device, dtype and pages."""
        ...

    def kv_block_copy(self, src: KVBlock, dst: KVBlock) -> None:
        """Copy every page of ``src`` into ``dst`` (same page count and dtype), on the stream."""

    def kv_block_migrate(self, block: KVBlock, target_device: str) -> KVBlock:
        """Move ``block`` to ``target_device`` (a device of this provider, or "host").

        Returns the new handle; the source block is released.
        """
        ...

    def kv_block_grow(self, block: KVBlock, num_tokens: int) -> KVBlock:
        """``block`` grown to hold ``num_tokens`` tokens (capability op ``kv_grow``).

        Pages are appended, never copied: the block keeps its handle and its pages, the new
        pages listed after them, and the same handle is returned. A block that already holds
        ``num_tokens`` tokens is left as it is.
        """
        ...

    def kv_blocks_alloc(self, num_tokens: Sequence[int], dtype: DType | str) -> list[KVBlock]: ...

    def kv_blocks_free(self, blocks: Iterable[KVBlock], *, after: Event | None = None) -> None:
        """Release every block; pages are reused only after ``after`` (if given) is reached."""

    def kv_blocks_copy(
        self, pairs: Iterable[tuple[KVBlock, KVBlock]], *, stream: Stream | None = None
    ) -> Event:
        """Copy many (src, dst) pairs as one operation on ``stream``; returns its completion."""
        ...

    def kv_blocks_migrate(
        self, blocks: Iterable[KVBlock], target_device: str, *, stream: Stream | None = None
    ) -> tuple[list[KVBlock], Event]:
        """Move many blocks as one operation on ``stream``; returns new handles and completion."""
        ...

    def kv_blocks_grow(self, blocks: Sequence[KVBlock], num_tokens: Sequence[int]) -> list[KVBlock]:
        """Grow each block to hold ``num_tokens[i]`` tokens, all or none; returns the handles."""
        ...

    def kv_block_write(self, block: KVBlock, data: bytes) -> None:
        """Fill ``block`` with ``data`` (exactly its size in bytes), queued on the stream."""

    def kv_block_read(self, block: KVBlock) -> bytes:
        """The block's bytes, once the current stream's work before this call has run."""
        ...


@runtime_checkable
class BatchMetadata(Protocol[T_co]):
    """One batch's metadata in persistent device buffers, planned on the host once per step.

    The buffers are allocated once, at their maximum sizes, and :meth:`plan` updates them in
    place, so a graph captured over them replays with each step's values. The properties are
    views of the planned part of each buffer (the same memory every step):

    - ``block_tables``: int32 ``[num_seqs, max_pages_per_seq]``, row ``i`` the pages of
      sequence ``i``'s block; entries past its pages are unspecified and never read;
    - ``seq_lens``: int32 ``[num_seqs]``, tokens in the cache after this step's writes;
    - ``query_start_loc``: int32 ``[num_seqs + 1]``, where each sequence's new tokens start;
    - ``positions``: int64 ``[num_tokens]``, the position of each new token;
    - ``slot_mapping``: int64 ``[num_tokens]``, the cache slot of each new token;
    - ``last_token_indices``: int64 ``[num_seqs]``, each sequence's last new token.
    """

    @property
    def max_seqs(self) -> int: ...

    @property
    def max_tokens(self) -> int: ...

    @property
    def max_pages_per_seq(self) -> int: ...

    @property
    def num_seqs(self) -> int: ...

    @property
    def num_tokens(self) -> int: ...

    @property
    def max_query_len(self) -> int: ...

    @property
    def block_tables(self) -> T_co: ...

    @property
    def seq_lens(self) -> T_co: ...

    @property
    def query_start_loc(self) -> T_co: ...

    @property
    def positions(self) -> T_co: ...

    @property
    def slot_mapping(self) -> T_co: ...

    @property
    def last_token_indices(self) -> T_co: ...

    def plan(
        self,
        blocks: Sequence[KVBlock],
        seq_lens: Sequence[int],
        query_lens: Sequence[int] | None = None,
    ) -> None:
        """Fill the buffers for a step: sequence ``i`` is ``blocks[i]`` holding ``seq_lens[i]``
        tokens after this step, the last ``query_lens[i]`` of them new (default 1: decode).

        Host-side: validates everything first (live blocks of this provider, lengths within
        each block's pages and the buffers' sizes) and changes nothing on a refusal; the copy
        to the device is queued on the current stream, before the kernels that read it.
        """


@runtime_checkable
class KVCacheAccess(Protocol[T_co]):
    """The KV cache tensors and batch metadata (capability ops ``kv_cache``, ``batch_metadata``)."""

    def kv_cache(self, layer: int, device: str | None = None) -> T_co:
        """Layer ``layer``'s pages on ``device`` (default: the provider's device), a view shaped
        ``kv_layout.cache_shape(num_pages)``: ``[pages, 2, tokens_per_block, kv_heads,
        head_size]``, K at index 0 of dimension 1 and V at index 1."""
        ...

    def create_batch_metadata(
        self, max_seqs: int, max_tokens: int, max_pages_per_seq: int
    ) -> BatchMetadata[T_co]:
        """Persistent metadata buffers for batches of up to ``max_seqs`` sequences,
        ``max_tokens`` new tokens and ``max_pages_per_seq`` pages per sequence."""
        ...
