"""Host-side owner of the KV cache pages: allocation, reference counts, prefix sharing.

A sequence owns a *page table* per KV kind: the pages holding its tokens in order
(logical page ``i`` holds tokens ``[i * page_size, (i + 1) * page_size)``). Each kind
has its own :class:`PagePool`; a page's reference count is the number of tables
holding it, and a page is in its pool's free list exactly when its count is 0.

Two kinds (the hybrid cache, issue 21):

* **global** pages hold the KV of the global (NoPE) layers: every token, for the
  sequence's whole life.
* **chunked** pages hold the KV of the chunked-local layers (Llama 4's RoPE layers:
  a query at position ``p`` reads keys ``[floor(p / C) * C, p]``). Once a sequence has
  computed ``n`` tokens, every query it will ever run sits at a position ``>= n``, so
  no key before ``floor(n / C) * C`` is read again: :meth:`BlockManager.slide` returns
  those pages to the pool and leaves :data:`NULL_PAGE` in their table entries (vLLM's
  ``ChunkedLocalAttentionManager`` does the same with its null block). The planner
  starts every chunked-layer work item at its chunk's start, so the kernels never read
  a ``NULL_PAGE`` entry (``tests/test_planner.py`` and ``tests/test_hybrid_cache.py``
  check it). A model without chunked layers has no chunked pool.

Page budget of one sequence on the chunked pool (``C`` chunk, ``T`` tokens per
step, ``ps`` page size): the scheduler slides every running sequence to its
``num_computed = n`` before it grows any, so a sequence holds logical pages
``[floor(w / ps), ceil((n + q) / ps))`` with ``w = floor(n / C) * C``, i.e. at most
``ceil((C - 1 + q) / ps)`` pages for its ``q <= T`` new tokens when ``C`` is a multiple of
``ps`` (a few more when it is not: the page holding ``w`` starts before it;
:attr:`jaxattn.Bounds.chunk_pages_per_seq` has the general bound). Summed over running
sequences: ``<= S * C / ps + ceil(T / ps) + S`` (each unscheduled sequence holds
``ceil((n - w) / ps) <= C / ps``; :meth:`jaxattn.Bounds.chunked_pages_for`).

Prefix sharing: once every token of a page is computed (its KV written), the
page is registered under a hash of *all* tokens up to its end (a chain:
hash(parent hash, page tokens)), in its own pool's registry. A new sequence whose
prompt starts with the same tokens takes those pages instead of computing them. A
hit of ``P`` tokens needs the global pages of ``[0, P)`` and the chunked pages of the
live chunk ``[floor(P / C) * C, P)`` (the pages before it are never read again); a hit
at a chunk boundary needs no chunked page, so the hit is at least the global hit
rounded down to a chunk. Only full pages are shared, and a full page is never
written again, so no copy-on-write is needed. A freed page keeps its hash while it
sits in the free pool (so a preempted or repeated prompt finds it again) and loses
it when the pool hands it out for new tokens; the pool gives out the least recently
freed page first (by whole groups of pages: page order, below).

Page order: the kernels copy a KV block (``block_kv`` keys) whose pages follow one another
in the pool in one TMA copy, else page by page. A fresh pool hands out pages in order, but
least-recently-freed order scatters them once sequences of many lengths come and go (and
decode steps grow side by side a page at a time). So each pool is cut into aligned groups of
``block_kv / page_size`` pages: a block's first page starts a wholly free group and its next
pages follow it; with no such group left, the least recently freed page
(``benchmarks/page_runs.py`` measures what share of blocks stays in one run).

Running out of pages (of either kind) is a normal event (the scheduler preempts):
``can_grow`` says whether a request fits and ``grow`` raises :class:`OutOfPages`
instead of corrupting state.
"""

from __future__ import annotations

import collections
import hashlib
import struct
from typing import Sequence

# A chunked-layer table entry whose page went back to the pool (before the live chunk).
NULL_PAGE = -1


class OutOfPages(RuntimeError):
    """Not enough free pages for a request (the state is unchanged)."""


def _page_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    # A cryptographic hash of the whole chain: a collision would silently hand a sequence
    # another prompt's KV, so Python's hash() is not good enough.
    return hashlib.blake2b(parent + struct.pack(f"<{len(tokens)}q", *tokens), digest_size=16).digest()


class PagePool:
    """The pages of one KV kind: free list (least recently freed first), counts, prefix hashes.

    ``run`` > 1: the pool is cut into aligned groups of ``run`` pages (a kernel KV block's
    worth), and :meth:`fresh_at` hands a table's block-starting page out of a wholly free
    group and the block's next pages right after it, so a block's pages stay consecutive
    (one TMA copy in the kernels) after the pool has been churned, where least-recently-freed
    order alone scatters them.
    """

    def __init__(self, num_pages: int, run: int = 1):
        self.num_pages = num_pages
        self.run = run
        self.ref = [0] * num_pages
        self.free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(
            range(num_pages))
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        # Free pages per group, and the wholly free groups, longest wholly free first (a
        # group's last page to come free sets its place: least recently freed, by groups).
        self.group_free = [min(run, num_pages - g * run) for g in range(-(-num_pages // run))]
        self.free_groups: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(
            g for g, n in enumerate(self.group_free) if n == run)

    def _unfree(self, page: int) -> None:
        del self.free[page]
        g = page // self.run
        if self.group_free[g] == self.run:
            del self.free_groups[g]
        self.group_free[g] -= 1

    def take(self, page: int) -> None:
        """One more table holds ``page`` (a cached page, possibly sitting in the free list)."""
        if self.ref[page] == 0:
            self._unfree(page)
        self.ref[page] += 1

    def fresh(self, page: int | None = None) -> int:
        """A page for new tokens, forgetting what it held: ``page`` (free), or else the least
        recently freed one."""
        if page is None:
            page = next(iter(self.free))
        self._unfree(page)
        h = self.hash_of.pop(page, None)
        if h is not None:
            del self.by_hash[h]
        self.ref[page] = 1
        return page

    def fresh_at(self, index: int, prev: int | None) -> int:
        """A fresh page for a table's logical page ``index``, whose page before is ``prev``
        (None: none, or returned): a block's first page starts a wholly free group, the
        block's other pages follow ``prev`` while the page after it is free, and otherwise
        (or with ``run`` 1) the least recently freed page."""
        if self.run > 1:
            if index % self.run == 0 and self.free_groups:
                return self.fresh(next(iter(self.free_groups)) * self.run)
            if (index % self.run and prev is not None and prev + 1 < self.num_pages
                    and self.ref[prev + 1] == 0):
                return self.fresh(prev + 1)
        return self.fresh()

    def release(self, page: int) -> None:
        self.ref[page] -= 1
        assert self.ref[page] >= 0, f"page {page} freed twice"
        if self.ref[page] == 0:
            self.free[page] = None
            g = page // self.run
            self.group_free[g] += 1
            if self.group_free[g] == self.run:
                self.free_groups[g] = None

    def register(self, page: int, h: bytes) -> None:
        # Another sequence may have registered the same tokens first: keep that page as
        # the shared one (this one stays private). A page holds one hash only.
        if h not in self.by_hash and page not in self.hash_of:
            self.by_hash[h] = page
            self.hash_of[page] = h

    def reset(self) -> None:
        self.by_hash.clear()
        self.hash_of.clear()

    def check(self, tables) -> None:
        counts = collections.Counter(p for t in tables for p in t if p != NULL_PAGE)
        for page in range(self.num_pages):
            assert self.ref[page] == counts.get(page, 0), (page, self.ref[page], counts.get(page))
            assert (self.ref[page] == 0) == (page in self.free), page
        for table in tables:
            live = [p for p in table if p != NULL_PAGE]
            assert len(set(live)) == len(live), f"a page twice in one table: {table}"
        for h, page in self.by_hash.items():
            assert self.hash_of[page] == h
        assert len(self.by_hash) == len(self.hash_of)
        for g, n in enumerate(self.group_free):
            pages = range(g * self.run, min((g + 1) * self.run, self.num_pages))
            assert n == sum(p in self.free for p in pages), g
            assert (g in self.free_groups) == (n == self.run), g


def blocks_in_runs(table: Sequence[int], run: int) -> tuple[int, int]:
    """(whole blocks of ``run`` logical pages of ``table`` whose pages are consecutive in the
    pool, whole blocks): what the page groups keep (the kernels copy such a block at once).
    Blocks holding a returned chunked page (``NULL_PAGE``) are left out."""
    blocks = [list(table[i:i + run]) for i in range(0, len(table) - run + 1, run)]
    blocks = [b for b in blocks if NULL_PAGE not in b]
    return sum(b == list(range(b[0], b[0] + run)) for b in blocks), len(blocks)


def _extend(pool: PagePool, table: list[int], n: int) -> None:
    """Append ``n`` fresh pages of ``pool`` to ``table``: with ``pool.run`` > 1 a kernel
    block's pages one after another (:meth:`PagePool.fresh_at`); else the least recently freed
    in ascending order, so pages freed together (tail first, or by several sequences) follow
    one another in the pool again."""
    if pool.run == 1:
        table.extend(sorted(pool.fresh() for _ in range(n)))
        return
    for _ in range(n):
        prev = table[-1] if table and table[-1] != NULL_PAGE else None
        table.append(pool.fresh_at(len(table), prev))


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, *, enable_prefix_caching: bool = True,
                 num_chunked_pages: int = 0, chunk_size: int | None = None,
                 run_pages: int = 1):
        """``num_pages`` global pages of ``page_size`` tokens. ``num_chunked_pages`` > 0: a
        second pool for the chunked-local layers, whose pages before the live chunk are
        returned (:meth:`slide`) when ``chunk_size`` is given; ``chunk_size=None`` keeps them
        all (the non-hybrid cache: what tests compare the hybrid one against).
        ``run_pages``: pages of a kernel KV block (``block_kv / page_size``), which the pools
        keep consecutive where they can (:class:`PagePool`); 1 hands out least recently
        freed pages only."""
        if num_pages < 1 or page_size < 1 or num_chunked_pages < 0 or run_pages < 1:
            raise ValueError(f"need num_pages >= 1, page_size >= 1, num_chunked_pages >= 0 and "
                             f"run_pages >= 1, got {num_pages}, {page_size}, {num_chunked_pages}, "
                             f"{run_pages}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size} must be positive")
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.chunk_size = chunk_size if num_chunked_pages else None
        self.glob = PagePool(num_pages, run_pages)
        self.chunked = PagePool(num_chunked_pages, run_pages) if num_chunked_pages else None
        self._tables: dict[int, list[int]] = {}
        self._ctables: dict[int, list[int]] = {}  # chunked pool; NULL_PAGE before the live chunk
        self._chain: dict[int, list[bytes]] = {}  # per sequence: hashes of its full computed pages
        self.prefix_hits = 0  # tokens served from shared pages (a running total, for metrics)

    def _pools(self):
        return (self.glob,) if self.chunked is None else (self.glob, self.chunked)

    # Queries -------------------------------------------------------------------------
    @property
    def num_pages(self) -> int:
        """Pages of both kinds (what the metrics' used/total ratio counts)."""
        return sum(p.num_pages for p in self._pools())

    @property
    def num_free_pages(self) -> int:
        return sum(len(p.free) for p in self._pools())

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - self.num_free_pages

    @property
    def num_used_chunked_pages(self) -> int:
        return 0 if self.chunked is None else self.chunked.num_pages - len(self.chunked.free)

    def pages(self, seq_id: int) -> list[int]:
        """The global table."""
        return self._tables[seq_id]

    def chunked_pages(self, seq_id: int) -> list[int] | None:
        """The chunked-layer table (``NULL_PAGE`` before the live chunk); None without that pool."""
        return None if self.chunked is None else self._ctables[seq_id]

    def has(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def pages_needed(self, seq_id: int, num_tokens: int) -> tuple[int, int]:
        """Free (global, chunked) pages that ``grow(seq_id, num_tokens)`` would take."""
        want = -(-num_tokens // self.page_size)
        g = max(0, want - len(self._tables.get(seq_id, ())))
        c = 0 if self.chunked is None else max(0, want - len(self._ctables.get(seq_id, ())))
        return g, c

    def can_grow(self, seq_id: int, num_tokens: int) -> bool:
        return self.can_grow_all([(seq_id, num_tokens)])

    def can_grow_all(self, wants: Sequence[tuple[int, int]]) -> bool:
        """Whether ``grow(seq_id, num_tokens)`` for every (seq_id, num_tokens) of ``wants``
        (distinct sequences) fits the free pages together."""
        need = [self.pages_needed(seq_id, n) for seq_id, n in wants]
        g, c = sum(x for x, _ in need), sum(x for _, x in need)
        return g <= len(self.glob.free) and (c == 0 or c <= len(self.chunked.free))

    def _window_page(self, num_computed: int) -> int:
        """First logical page a sequence with ``num_computed`` tokens computed still reads
        on the chunked layers."""
        if self.chunk_size is None:
            return 0
        return num_computed // self.chunk_size * self.chunk_size // self.page_size

    # Updates -------------------------------------------------------------------------
    def allocate(self, seq_id: int, tokens: Sequence[int], *, use_cache: bool = True) -> int:
        """Open the tables of a new sequence, taking the shared pages of its longest cached prefix.

        Returns the number of leading tokens already in the cache (a multiple of
        the page size). At least one token is always left to compute, since the
        step that computes it gives the logits of the next token. ``use_cache=False``:
        take nothing from the cache (a sequence that must compute every position, e.g.
        to score its prompt); its pages are still offered to later sequences.
        """
        if seq_id in self._tables:
            raise ValueError(f"sequence {seq_id} already has pages")
        table, chain, ctable = [], [], []
        if self.enable_prefix_caching and use_cache:
            parent = b""
            for start in range(0, len(tokens) - 1 - self.page_size + 1, self.page_size):
                h = _page_hash(parent, tokens[start:start + self.page_size])
                page = self.glob.by_hash.get(h)
                if page is None:
                    break
                table.append(page)
                chain.append(h)
                parent = h
            if self.chunked is not None:
                # The chunked pages of the live chunk must be cached too: keep the longest
                # run of them from the chunk's start (possibly none: a chunk-aligned hit).
                # A shorter hit has an earlier live chunk; when pages do not divide the
                # chunk its first page can lie before the run's, so look again from there.
                n = len(table)
                while True:
                    first = self._window_page(n * self.page_size)
                    ctable = []
                    for h in chain[first:n]:
                        page = self.chunked.by_hash.get(h)
                        if page is None:
                            break
                        ctable.append(page)
                    if first + len(ctable) == n:
                        break
                    n = first + len(ctable)
                del table[n:], chain[n:]
                ctable = [NULL_PAGE] * first + ctable
        for page in table:
            self.glob.take(page)
        for page in ctable:
            if page != NULL_PAGE:
                self.chunked.take(page)
        self._tables[seq_id] = table
        self._chain[seq_id] = chain
        if self.chunked is not None:
            self._ctables[seq_id] = ctable
        cached = len(table) * self.page_size
        self.prefix_hits += cached
        return cached

    def slide(self, seq_id: int, num_computed: int) -> int:
        """Return the chunked pages no query of this sequence reads again: those before
        ``floor(num_computed / C) * C``. Returns how many went back to the pool."""
        if self.chunk_size is None or seq_id not in self._ctables:
            return 0
        ctable, freed = self._ctables[seq_id], 0
        for i in range(min(self._window_page(num_computed), len(ctable)) - 1, -1, -1):
            if ctable[i] == NULL_PAGE:  # everything before was returned already
                break
            self.chunked.release(ctable[i])
            ctable[i] = NULL_PAGE
            freed += 1
        return freed

    def grow(self, seq_id: int, num_tokens: int) -> None:
        """Make the tables cover ``num_tokens`` tokens with fresh pages; OutOfPages if they cannot."""
        g, c = self.pages_needed(seq_id, num_tokens)
        if not self.can_grow(seq_id, num_tokens):
            free_c = "" if self.chunked is None else f" and {c} chunked ({len(self.chunked.free)} free)"
            raise OutOfPages(f"sequence {seq_id} needs {g} more global pages "
                             f"({len(self.glob.free)} free){free_c}")
        _extend(self.glob, self._tables[seq_id], g)
        if c:
            _extend(self.chunked, self._ctables[seq_id], c)

    def commit(self, seq_id: int, tokens: Sequence[int], num_computed: int) -> None:
        """Register the pages that ``num_computed`` now fills completely (their KV is written).

        ``tokens`` are the sequence's tokens from position 0 (at least ``num_computed``).
        A chunked page returned already (NULL_PAGE) is not registered: nothing reads it.
        """
        if not self.enable_prefix_caching:
            return
        table, chain = self._tables[seq_id], self._chain[seq_id]
        ctable = self._ctables.get(seq_id)
        full = min(num_computed // self.page_size, len(table))
        for i in range(len(chain), full):
            h = _page_hash(chain[-1] if chain else b"",
                           tokens[i * self.page_size:(i + 1) * self.page_size])
            chain.append(h)
            self.glob.register(table[i], h)
            if ctable is not None and i < len(ctable) and ctable[i] != NULL_PAGE:
                self.chunked.register(ctable[i], h)

    def free(self, seq_id: int) -> None:
        """Release a sequence's pages (no-op for an unknown id, so every abort path may call it)."""
        table = self._tables.pop(seq_id, None)
        self._chain.pop(seq_id, None)
        ctable = self._ctables.pop(seq_id, None)
        if table is None:
            return
        # Tail first: the pool hands out the oldest-freed page first, so a prompt's leading
        # pages, the ones most likely shared again, stay cached longest.
        for page in reversed(table):
            self.glob.release(page)
        for page in reversed(ctable or ()):
            if page != NULL_PAGE:
                self.chunked.release(page)

    def reset_prefix_cache(self) -> None:
        """Forget every registered page hash (pages in use stay where they are)."""
        for pool in self._pools():
            pool.reset()

    def check(self) -> None:
        """Assert the invariants (tests and debugging): counts match tables, pool = unreferenced
        pages, a chunked table's returned entries are a prefix of it."""
        self.glob.check(list(self._tables.values()))
        if self.chunked is not None:
            self.chunked.check(list(self._ctables.values()))
            for sid, ctable in self._ctables.items():
                live = [p != NULL_PAGE for p in ctable]
                assert live == sorted(live), f"sequence {sid}: a returned page after a live one"
                assert len(ctable) == len(self._tables[sid])
