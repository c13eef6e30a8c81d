"""KV-cache value types: the layout every backend is configured with, block handles and where
a block is."""

# Annotations here are evaluated (no postponed annotations): a NamedTuple of annotation
# strings compiles each one when the class is made, at every start-up.
from typing import ClassVar, NamedTuple, NewType

from sagellm_backend.dtypes import DType, coerce
from sagellm_backend.errors import InvalidArgumentError
from sagellm_backend.frozen import Frozen

__all__ = ["KVBlock", "KVBlockInfo", "KVLayout"]


class KVLayout(Frozen):
    """Shape of one KV page: K and V for ``tokens_per_block`` tokens in every layer.

    One layer's cache (``kv_cache(layer)``) is a tensor of :meth:`cache_shape`, its dimensions
    named by :attr:`CACHE_DIMS`: ``[page, kv, token, kv_head, head_dim]``, K at index
    :attr:`KEY` and V at index :attr:`VALUE` of the ``kv`` dimension, so one page of one layer
    is contiguous, as paged-attention kernels read it. A *slot* is one token's place:
    ``page * tokens_per_block + offset`` (:meth:`slot`). ``dtype`` is the pool's element type
    where the pool has one; None means each block may use any dtype the backend supports (the
    mock).
    """

    CACHE_DIMS: ClassVar[tuple[str, ...]] = ("page", "kv", "token", "kv_head", "head_dim")
    KEY: ClassVar[int] = 0
    VALUE: ClassVar[int] = 1

    num_layers: int = 2
    num_kv_heads: int = 2
    head_size: int = 64
    tokens_per_block: int = 16
    dtype: DType | None = None

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_size", "tokens_per_block"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidArgumentError(
                    f"KV layout {name} must be a positive int, got {value!r}",
                    hint=f"set {name} from the model config (an int of at least 1)",
                )
        if self.dtype is not None:
            object.__setattr__(self, "dtype", coerce(DType, self.dtype, "KV dtype"))

    @property
    def elements_per_page(self) -> int:
        """Elements of one page over all layers (K and V)."""
        return 2 * self.num_layers * self.tokens_per_block * self.num_kv_heads * self.head_size

    def page_bytes(self, dtype: DType | str) -> int:
        """Bytes of one page over all layers in ``dtype``."""
        return self.elements_per_page * coerce(DType, dtype, "dtype").bits // 8

    def cache_shape(self, num_pages: int) -> tuple[int, int, int, int, int]:
        """Shape of one layer's cache of ``num_pages`` pages, in :attr:`CACHE_DIMS` order."""
        return (num_pages, 2, self.tokens_per_block, self.num_kv_heads, self.head_size)

    def slot(self, pages: tuple[int, ...], token: int) -> int:
        """The slot of token ``token`` of a block whose pages are ``pages``."""
        page, offset = divmod(token, self.tokens_per_block)
        return pages[page] * self.tokens_per_block + offset

    def pages_for(self, num_tokens: int) -> int:
        """Pages a block of ``num_tokens`` tokens occupies: ceil(num_tokens / tokens_per_block)."""
        return -(-num_tokens // self.tokens_per_block)  # exact for any int


KVBlock = NewType("KVBlock", int)
"""Handle to a live KV block of one provider: an int, so hashable, picklable and cheap.

A provider numbers its handles above a tag of its own and never reuses one, so a stale handle
(freed or migrated away) and another provider's handle are told apart from a live one. Where
the block is (device, dtype, pages) is :class:`KVBlockInfo`, from ``kv_block_info``.
"""


class KVBlockInfo(NamedTuple):
    """Where a live KV block is: its device, dtype and pages (indices into that device's
    cache, as ``kv_cache(layer, device)`` is indexed)."""

    block: KVBlock
    device: str
    dtype: DType
    pages: tuple[int, ...]

    @property
    def num_pages(self) -> int:
        return len(self.pages)
