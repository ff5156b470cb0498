"""Shared attention test cases and a float64 NumPy oracle.

Every implementation (reference, plan executor, interpret-mode and GPU
kernels) is checked against :func:`naive_ragged` on the same cases.
"""

import contextlib
import dataclasses
from unittest import mock

import jax.numpy as jnp
import numpy as np

import jaxattn
from jaxattn import kv_quant, planner


def naive_mask(q_pos, k_pos, kv_len, causal, chunk):
    ok = (k_pos < kv_len) & (q_pos > -1)  # broadcast to [q, k]
    if chunk is not None:
        ok = ok & (k_pos >= (q_pos // chunk) * chunk)
        if not causal:
            ok &= k_pos < (q_pos // chunk + 1) * chunk
    if causal:
        ok = ok & (k_pos <= q_pos)
    return ok


def naive_attention(q, k, v, kv_len, scale, causal, chunk):
    """One sequence: q [Lq, Hq, D] (the last Lq of kv_len positions), k, v [>=kv_len, Hkv, D]."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    lq, hq, d = q.shape
    g = hq // k.shape[1]
    k, v = np.repeat(k[:kv_len], g, axis=1), np.repeat(v[:kv_len], g, axis=1)
    s = np.einsum("qhd,khd->hqk", q, k) * scale
    q_pos = kv_len - lq + np.arange(lq)
    mask = naive_mask(q_pos[:, None], np.arange(kv_len)[None, :], kv_len, causal, chunk)
    s = np.where(mask[None], s, -np.inf)
    m = s.max(-1, keepdims=True)
    seen = np.isfinite(m)
    p = np.exp(s - np.where(seen, m, 0))
    l = p.sum(-1, keepdims=True)
    o = np.einsum("hqk,khd->qhd", p / np.where(seen, l, 1), v)
    lse = np.where(seen, m + np.log(np.where(seen, l, 1)), -np.inf)[..., 0].T
    return o, lse


def naive_ragged(q, k_pages, v_pages, page_table, cu_q_lens, kv_lens, num_seqs, scale,
                 causal=True, chunk=None):
    q = np.asarray(q, np.float64)
    out = np.zeros(q.shape)
    lse = np.full(q.shape[:2], -np.inf)
    ps = k_pages.shape[1]
    kp, vp, pt = np.asarray(k_pages, np.float64), np.asarray(v_pages, np.float64), np.asarray(page_table)
    for s in range(int(num_seqs)):
        a, b, L = int(cu_q_lens[s]), int(cu_q_lens[s + 1]), int(kv_lens[s])
        pos = np.arange(L)
        k, v = kp[pt[s, pos // ps], pos % ps], vp[pt[s, pos // ps], pos % ps]
        out[a:b], lse[a:b] = naive_attention(q[a:b], k, v, L, scale, causal, chunk)
    return out, lse


@dataclasses.dataclass
class RaggedCase:
    bounds: jaxattn.Bounds
    q: np.ndarray
    k_pages: np.ndarray
    v_pages: np.ndarray
    page_table: np.ndarray
    cu_q_lens: np.ndarray
    kv_lens: np.ndarray
    num_seqs: int

    def args(self):
        return (self.q, self.k_pages, self.v_pages, self.page_table, self.cu_q_lens,
                self.kv_lens, np.int32(self.num_seqs))


def make_ragged_case(bounds: jaxattn.Bounds, q_lens, kv_lens, *, dtype=np.float32, seed=0,
                     num_tokens=None, in_runs=False) -> RaggedCase:
    """Random q/K/V for the given lengths; pages are shuffled so the page table matters.
    ``in_runs``: the sequences' pages follow one another in the pool instead (as a fresh
    engine hands them out), from an odd first page, except two swapped pages per sequence
    (so some KV tiles' pages are consecutive and some are not).

    The pool always has every page the bounds allow (plus one), so every case of one bounds
    has the same shapes: the tests' eager calls reuse each other's compilations instead of
    compiling again for each pool size, and the pages no sequence owns hold noise too.
    """
    rng = np.random.default_rng(seed)
    n = len(q_lens)
    s_max = bounds.max_num_seqs
    q_lens = np.asarray(q_lens, np.int32)
    cu = np.zeros(s_max + 1, np.int32)
    cu[1:n + 1] = np.cumsum(q_lens)
    cu[n + 1:] = cu[n]
    kv = np.zeros(s_max, np.int32)
    kv[:n] = kv_lens
    t = num_tokens or bounds.max_num_batched_tokens
    pps = bounds.pages_per_seq
    used = [-(-int(x) // bounds.page_size) for x in kv[:n]]
    num_pages = s_max * pps + 1
    perm = rng.permutation(num_pages)
    if in_runs:
        perm = np.roll(np.arange(num_pages), -3)
        for i in np.cumsum([0] + used[:-1]) + 1:  # swap each sequence's 2nd and 3rd page
            perm[[i, i + 1]] = perm[[i + 1, i]]
    table = np.zeros((s_max, pps), np.int32)
    off = 0
    for s, u in enumerate(used):
        table[s, :u] = perm[off:off + u]
        off += u
    hq, hkv, d = bounds.num_q_heads, bounds.num_kv_heads, bounds.head_dim
    mk = lambda *shape: rng.standard_normal(shape).astype(dtype)
    return RaggedCase(bounds, mk(t, hq, d), mk(num_pages, bounds.page_size, hkv, d),
                      mk(num_pages, bounds.page_size, hkv, d), table, cu, kv, n)


class Fp8PvCase:
    """A prefill case for ``PrefillConfig.fp8_pv``: normed keys and values each under one
    power-of-two scale (a Llama 4 layer's FP8 cache), V also transposed per page ([P, Hkv,
    D, page_size]: ``vt8``), the plan's prefill items."""

    def __init__(self, bounds, q_lens, kv_lens, *, interpret, chunk=None, seed=5):
        from jaxattn import kernels

        rc = make_ragged_case(bounds, q_lens, kv_lens, seed=seed, num_tokens=sum(q_lens))
        self.rc, self.bounds, self.interpret, self.chunk = rc, bounds, interpret, chunk
        k = rc.k_pages / np.sqrt((rc.k_pages ** 2).mean(-1, keepdims=True))
        self.fk = kv_quant.normed_k_scale(bounds.head_dim)
        self.fv = kv_quant.power_of_two_scale(float(np.abs(rc.v_pages).max()))
        self.k8, self.ks = kv_quant.quantize_pages(jnp.asarray(k, jnp.bfloat16), self.fk)
        self.v8, self.vs = kv_quant.quantize_pages(jnp.asarray(rc.v_pages), self.fv)
        self.vt8 = jnp.transpose(self.v8, (0, 2, 3, 1))
        self.q = jnp.asarray(rc.q, jnp.bfloat16)
        plan = planner.plan(bounds, rc.cu_q_lens, rc.kv_lens, rc.num_seqs, chunk_size=chunk)
        self.kplan = kernels.prepare(plan, bounds=bounds, num_tokens=self.q.shape[0])
        self.rows = sum(q_lens)

    def run(self, pv8: bool, v_pages=None):
        """The prefill's output rows [rows, Hq, D] f32: ``fp8_pv`` over ``vt8`` (or
        ``v_pages``), or the default form over ``v8``."""
        from jaxattn.kernels import prefill

        config = prefill.pick_config(self.bounds, self.q.dtype, self.k8.dtype, fp8_pv=pv8)
        out, _ = prefill.prefill_attention(
            self.q, self.k8, (self.vt8 if pv8 else self.v8) if v_pages is None else v_pages,
            jnp.asarray(self.rc.page_table), self.kplan.plan.prefill, self.kplan.zero,
            config=config, scale=0.08, causal=True,
            num_workers=2 if self.interpret else self.bounds.num_workers,
            interpret=self.interpret, k_scale=self.ks, v_scale=self.vs, fixed_k_scale=self.fk,
            fixed_v_scale=self.fv)
        return np.asarray(out, np.float32)[:self.rows]

    def oracle(self):
        """The float64 oracle over the dequantised pages, q quantised per row as the FP8 QK
        takes it: [rows, Hq, D]."""
        kd, vd = (np.asarray(kv_quant.dequantize_pages(x8, sc), np.float32)
                  for x8, sc in ((self.k8, self.ks), (self.v8, self.vs)))
        q8, q_scale = kv_quant.quantize(jnp.asarray(self.q, jnp.float32))
        rc = self.rc
        want, _ = naive_ragged(np.asarray(kv_quant.dequantize(q8, q_scale)), kd, vd,
                               rc.page_table, rc.cu_q_lens, rc.kv_lens, rc.num_seqs, 0.08,
                               causal=True, chunk=self.chunk)
        return want[:self.rows]


@contextlib.contextmanager
def prefill_picked_with(**form):
    """The kernels' prefill with ``pick_config``'s keyword arguments set to ``form`` (e.g.
    ``producer_dequant=True``) wherever the kernels pick a config."""
    from jaxattn.kernels import prefill

    pick = prefill.pick_config
    with mock.patch.object(prefill, "pick_config", lambda *a, **k: pick(*a, **{**k, **form})):
        yield


def prefill_dequantising_k():
    """The kernels' prefill over an FP8 cache in its ``PrefillConfig(fp8_qk=False)`` form
    (K and V dequantised to bf16 tiles, Q in bf16: the bf16 kernel's numbers over the
    dequantised pages) instead of the default ``S = Q8 K8^T``."""
    return prefill_picked_with(fp8_qk=False)


@contextlib.contextmanager
def decode_tiles_as_fp8():
    """The decode kernel over a bf16 cache in the form it takes over an FP8 cache (tile form,
    block size, consumers: what sets the order of the sums; ring depth: the folded combine's
    merge takes the ring's memory, and its shape follows that), and over an FP8 cache with bf16
    tiles (``f16_dequant=False``), so that the FP8 kernel's rows equal the bf16 kernel's over
    the dequantised pages bit for bit. (The default f16 tiles are tested against the
    reference: :func:`decode_dequantising_to`.)"""
    from jaxattn.kernels import decode

    default = decode.default_config

    def as_fp8(interpret=False, fp8=False, fixed_scales=False):
        form = dataclasses.replace(default(interpret, fp8=True, fixed_scales=fixed_scales),
                                   f16_dequant=False)
        return form if fp8 else dataclasses.replace(
            default(interpret), narrow_tiles=form.narrow_tiles, block_kv=form.block_kv,
            num_stages=form.num_stages, consumers=form.consumers)

    with mock.patch.object(decode, "default_config", as_fp8):
        yield


@contextlib.contextmanager
def decode_with(**fields):
    """The decode kernel with its default configs' ``fields`` replaced (e.g.
    ``f16_dequant=False``) wherever the kernels pick one."""
    from jaxattn.kernels import decode

    default = decode.default_config

    def form(interpret=False, fp8=False, fixed_scales=False):
        return dataclasses.replace(default(interpret, fp8, fixed_scales), **fields)

    with mock.patch.object(decode, "default_config", form):
        yield


def decode_dequantising_to(f16: bool):
    """The decode kernel over an FP8 cache with ``f16_dequant=f16`` (True: K/V dequantised
    in f16 arithmetic, P and q as f16, the default; False: bf16 tiles)."""
    return decode_with(f16_dequant=f16)


def assert_fp8_pools_close(got, want, exact_fraction=1.0):
    """Two writes of the same K (or V) rows into FP8 cache pools, each (values [P, page_size,
    Hkv, D] e4m3, scales [P, Hkv, page_size] f32): equal (``exact_fraction`` 1), or, where
    the rows' bf16 inputs differed in last bits (XLA's fusions on the GPU keep excess
    precision), each dequantised value within one e4m3 step (2^-3 of it, 2^-9 of its scale
    among e4m3's subnormals; plus the scale's own bf16 steps) and at least ``exact_fraction``
    of the values equal. A row whose largest element moved by a bf16 step moves every
    value by 2^-8 of itself, which flips ~1 in 16 of their e4m3 roundings."""
    (g8, gs), (w8, ws) = ((np.asarray(v, np.float32), np.asarray(s, np.float32))
                          for v, s in (got, want))
    assert g8.shape == w8.shape and gs.shape == ws.shape
    if exact_fraction == 1.0:
        np.testing.assert_array_equal(g8, w8)
        np.testing.assert_array_equal(gs, ws)
        return
    np.testing.assert_allclose(gs, ws, rtol=2**-6)  # a bf16 step or two of the row's largest
    row_scale = np.swapaxes(ws, 1, 2)[..., None]  # [P, page_size, Hkv, 1]
    g, w = g8 * np.swapaxes(gs, 1, 2)[..., None], w8 * row_scale
    assert (np.abs(g - w) <= (2**-3 + 2**-5) * np.abs(w) + 2**-9 * row_scale).all()
    assert (g8 == w8).mean() >= exact_fraction
