"""A constructed long-context retrieval head: a needle planted deep in a long context.

One attention head that copies the token after a matching key (an induction / lookup
head), with weights set by hand instead of trained: token ``t`` at position ``i`` has the
key ``a_i * E[t]`` and the value ``E[t_{i+1}]`` (E: random unit embeddings in the first
``D - 8`` dimensions). The query of a sequence is ``beta * E[needle]``, the needle token
planted once at some depth; the head's output is then ~``E[token after the needle]``,
read out as ``argmax(E @ out)``.

The key magnitudes ``a_i`` vary (e^-2..1), and a few *outlier* tokens have keys ~1e5
times larger along the last dimensions, which no embedding uses (so they do not change
which key matches): Llama 4's global NoPE layers do not L2-normalise their keys, so
nothing bounds their range. A per-token scale keeps every key's precision; one scale for
the whole cache is set by the outliers and flushes ordinary keys (the needle's too) below
e4m3's smallest subnormal: the control that shows the test can fail. (e4m3 spans
448 / 2^-9 ~ 2.3e5 from its largest value to its smallest subnormal.)
"""

import dataclasses

import numpy as np

import jaxattn


@dataclasses.dataclass
class NeedleCase:
    bounds: jaxattn.Bounds
    q: np.ndarray  # [S, Hq, D] f32: one decode query per sequence
    k_pages: np.ndarray  # [P, page_size, 1, D] f32
    v_pages: np.ndarray
    page_table: np.ndarray
    cu_q_lens: np.ndarray
    kv_lens: np.ndarray
    num_seqs: int
    embed: np.ndarray  # [V, D]
    answers: np.ndarray  # [S]: the token after each sequence's needle

    def args(self):
        return (self.page_table, self.cu_q_lens, self.kv_lens, np.int32(self.num_seqs))

    def read_out(self, out) -> np.ndarray:
        """The token each sequence's head output points at (first query head)."""
        return (np.asarray(out, np.float32)[:self.num_seqs, 0] @ self.embed.T).argmax(-1)


def make_needle_case(context: int, depths, *, head_dim=128, num_q_heads=1, page_size=32,
                     vocab=512, beta=30.0, outliers=8, seed=0, block_kv=64) -> NeedleCase:
    rng = np.random.default_rng(seed)
    d, s = head_dim, len(depths)
    e = rng.standard_normal((vocab, d)).astype(np.float32)
    e[:, d - 8:] = 0  # the outliers' dimensions
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    pages_per_seq = context // page_size
    bounds = jaxattn.Bounds(max_num_seqs=s, max_num_batched_tokens=max(16, s),
                            max_model_len=context, page_size=page_size,
                            num_q_heads=num_q_heads, num_kv_heads=1, head_dim=d,
                            block_kv=block_kv)
    k = np.zeros((s * pages_per_seq, page_size, 1, d), np.float32)
    v = np.zeros_like(k)
    q = np.zeros((bounds.max_num_batched_tokens, num_q_heads, d), np.float32)
    answers = np.zeros(s, np.int64)
    table = np.arange(s * pages_per_seq, dtype=np.int32).reshape(s, pages_per_seq)
    for i, depth in enumerate(depths):
        # Token 0 is the needle: it occurs once, at `depth`; the others never equal it.
        toks = rng.integers(1, vocab, context + 1)
        pos = int(depth * (context - 1))
        toks[pos] = 0
        answers[i] = toks[pos + 1]
        mag = np.exp(rng.uniform(-2, 0, context)).astype(np.float32)
        mag[pos] = 1.0  # a match is the strongest key (as a trained lookup head makes it)
        keys = e[toks[:context]] * mag[:, None]
        out_pos = rng.choice(np.setdiff1d(np.arange(context), [pos]), outliers, replace=False)
        keys[out_pos, d - 8:] = 1e5 * rng.standard_normal((outliers, 8))
        vals = e[toks[1:context + 1]]
        rows = table[i].repeat(page_size) * page_size + np.tile(np.arange(page_size),
                                                                 pages_per_seq)
        k.reshape(-1, 1, d)[rows, 0] = keys
        v.reshape(-1, 1, d)[rows, 0] = vals
        q[i] = beta * e[0]
    cu = np.arange(s + 1, dtype=np.int32)
    return NeedleCase(bounds, q, k, v, table, cu, np.full(s, context, np.int32), s, e, answers)


def per_tensor_fp8(x):
    """The control: one scale for the whole pool (what a per-tensor FP8 cache would do)."""
    import jax.numpy as jnp

    s = np.abs(x).max() / 448.0
    return np.asarray(jnp.asarray(x / s).astype(jnp.float8_e4m3fn).astype(jnp.float32)) * s
