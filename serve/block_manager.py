"""Host-side owner of the KV cache pages: allocation, reference counts, prefix sharing.

A sequence owns a *page table*: the pages holding its tokens in order. Pages
are handed out from one free pool; a page's reference count is the number of
tables holding it, and a page is in the free pool exactly when its count is 0.

Prefix sharing: once every token of a page is computed (its KV written), the
page is registered under a hash of *all* tokens up to its end (a chain:
hash(parent hash, page tokens)). A new sequence whose prompt starts with the
same tokens takes those pages instead of computing them. Only full pages are
shared, and a full page is never written again, so no copy-on-write is
needed. A freed page keeps its hash while it sits in the free pool (so a
preempted or repeated prompt finds it again) and loses it when the pool hands
it out for new tokens; the pool gives out the least recently freed page first.

Running out of pages is a normal event (the scheduler preempts): ``can_grow``
says whether a request fits and ``grow`` raises :class:`OutOfPages` instead of
corrupting state.
"""

from __future__ import annotations

import collections
import hashlib
import struct
from typing import Sequence


class OutOfPages(RuntimeError):
    """Not enough free pages for a request (the state is unchanged)."""


def _page_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    # A cryptographic hash of the whole chain: a collision would silently hand a sequence
    # another prompt's KV, so Python's hash() is not good enough.
    return hashlib.blake2b(parent + struct.pack(f"<{len(tokens)}q", *tokens), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, *, enable_prefix_caching: bool = True):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need num_pages >= 1 and page_size >= 1, got {num_pages}, {page_size}")
        self.num_pages, self.page_size = num_pages, page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref = [0] * num_pages
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(num_pages))
        self._tables: dict[int, list[int]] = {}
        self._chain: dict[int, list[bytes]] = {}  # per sequence: hashes of its full computed pages
        self._by_hash: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self.prefix_hits = 0  # tokens served from shared pages (a running total, for metrics)

    # Queries -------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - len(self._free)

    def pages(self, seq_id: int) -> list[int]:
        return self._tables[seq_id]

    def has(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def pages_needed(self, seq_id: int, num_tokens: int) -> int:
        """Free pages that ``grow(seq_id, num_tokens)`` would take."""
        have = len(self._tables.get(seq_id, ()))
        return max(0, -(-num_tokens // self.page_size) - have)

    def can_grow(self, seq_id: int, num_tokens: int) -> bool:
        return self.pages_needed(seq_id, num_tokens) <= len(self._free)

    # Updates -------------------------------------------------------------------------
    def allocate(self, seq_id: int, tokens: Sequence[int]) -> int:
        """Open a table for a new sequence, taking the shared pages of its longest cached prefix.

        Returns the number of leading tokens already in the cache (a multiple of
        the page size). At least one token is always left to compute, since the
        step that computes it gives the logits of the next token.
        """
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already has pages")
        table, chain = [], []
        if self.enable_prefix_caching:
            parent = b""
            for start in range(0, len(tokens) - 1 - self.page_size + 1, self.page_size):
                h = _page_hash(parent, tokens[start:start + self.page_size])
                page = self._by_hash.get(h)
                if page is None:
                    break
                table.append(page)
                chain.append(h)
                parent = h
        for page in table:
            if self._ref[page] == 0:
                del self._free[page]
            self._ref[page] += 1
        self._tables[seq_id] = table
        self._chain[seq_id] = chain
        cached = len(table) * self.page_size
        self.prefix_hits += cached
        return cached

    def grow(self, seq_id: int, num_tokens: int) -> None:
        """Make the table cover ``num_tokens`` tokens with fresh pages; OutOfPages if it cannot."""
        need = self.pages_needed(seq_id, num_tokens)
        if need > len(self._free):
            raise OutOfPages(f"sequence {seq_id} needs {need} more pages, {len(self._free)} are free")
        table = self._tables[seq_id]
        for _ in range(need):
            page, _ = self._free.popitem(last=False)
            h = self._hash_of.pop(page, None)
            if h is not None:  # the page is reused for other tokens: forget what it held
                del self._by_hash[h]
            self._ref[page] = 1
            table.append(page)

    def commit(self, seq_id: int, tokens: Sequence[int], num_computed: int) -> None:
        """Register the pages that ``num_computed`` now fills completely (their KV is written).

        ``tokens`` are the sequence's tokens from position 0 (at least ``num_computed``).
        """
        if not self.enable_prefix_caching:
            return
        table, chain = self._tables[seq_id], self._chain[seq_id]
        full = min(num_computed // self.page_size, len(table))
        for i in range(len(chain), full):
            h = _page_hash(chain[-1] if chain else b"",
                           tokens[i * self.page_size:(i + 1) * self.page_size])
            chain.append(h)
            page = table[i]
            # Another sequence may have registered the same tokens first: keep that page as
            # the shared one (this one stays private). A page holds one hash only.
            if h not in self._by_hash and page not in self._hash_of:
                self._by_hash[h] = page
                self._hash_of[page] = h

    def free(self, seq_id: int) -> None:
        """Release a sequence's pages (no-op for an unknown id, so every abort path may call it)."""
        table = self._tables.pop(seq_id, None)
        self._chain.pop(seq_id, None)
        if table is None:
            return
        # Tail first: the pool hands out the oldest-freed page first, so a prompt's leading
        # pages, the ones most likely shared again, stay cached longest.
        for page in reversed(table):
            self._ref[page] -= 1
            assert self._ref[page] >= 0, f"page {page} freed twice"
            if self._ref[page] == 0:
                self._free[page] = None

    def reset_prefix_cache(self) -> None:
        """Forget every registered page hash (pages in use stay where they are)."""
        self._by_hash.clear()
        self._hash_of.clear()

    def check(self) -> None:
        """Assert the invariants (tests and debugging): counts match tables, pool = unreferenced pages."""
        counts = collections.Counter(p for t in self._tables.values() for p in t)
        for page in range(self.num_pages):
            assert self._ref[page] == counts.get(page, 0), (page, self._ref[page], counts.get(page))
            assert (self._ref[page] == 0) == (page in self._free), page
        for table in self._tables.values():
            assert len(set(table)) == len(table), f"a page twice in one table: {table}"
        for h, page in self._by_hash.items():
            assert self._hash_of[page] == h
        assert len(self._by_hash) == len(self._hash_of)
