"""The sampler's vocabulary-wide work (``serve/sampling.py``) against the sorts it replaced.

    python -m benchmarks.sampling            # Scout's 202,048-token vocabulary, one GPU

Two calls a decode step may make over ``[rows, vocab]`` f32 logits, at the batch sizes a
server runs: the top-p mask (``filter_mask``: a threshold search, as a batch without top-k
runs it and as one with top-k does (a search more), against the sort of (value, id) pairs,
cumulative sum and scatter back it replaced) and the top-20 logprobs
(``top_k``: blocks, against ``lax.top_k``). For the mask, a candidate search runs beside
them (``bins_filter_mask``: each round one pass over the row into 16 bins, where the
sampler's compares every entry with 15 thresholds, which rereads the row 15 times). They run
alternately for ``--rounds`` rounds; each round's time is the call's GPU kernel time (CUPTI)
and the compiled kernel count is reported beside it. JSON to
benchmarks/results/sampling-DATE.json; a table on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys

VOCAB = 202_048  # Scout's
ROWS = (1, 16, 64, 256)


def sort_filter_mask(x, top_k, top_p):
    """The sort-based top-k / top-p mask the sampler used up to session 47 (its semantics
    but for ties at the threshold, which it kept in the sort's order)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    s, v = x.shape
    order = jnp.broadcast_to(jnp.arange(v, dtype=jnp.int32), x.shape)
    neg, ids = lax.sort_key_val(-x, order, dimension=-1)  # descending values
    rank = jnp.arange(v)[None, :]
    keep = (top_k[:, None] == 0) | (rank < top_k[:, None])
    probs = jax.nn.softmax(jnp.where(keep, -neg, -jnp.inf), axis=-1)
    keep &= jnp.cumsum(probs, axis=-1) - probs < top_p[:, None]
    return jnp.zeros_like(keep).at[jnp.arange(s)[:, None], ids].set(keep)


def bins_filter_mask(x, top_k, top_p):
    """``sampling.filter_mask`` with each search round one pass over the row: the entries
    whose keys share the prefix found so far go into 16 bins by their next 4 bits, and the
    mass at or above each bin is the mass above the prefix plus a suffix sum of the bins.
    The same thresholds but for f32 rounding of the sums."""
    from jaxattn.serve import sampling

    return sampling.filter_mask(x, top_k, top_p, search=_bins_largest_key)


def _bins_largest_key(keys, weights, target):
    import jax.numpy as jnp

    base = jnp.zeros(keys.shape[:-1], jnp.uint32)
    above = jnp.zeros(keys.shape[:-1], jnp.float32)  # mass past the prefix's range
    bins = jnp.arange(16, dtype=jnp.uint32)
    for shift in range(28, -1, -4):
        digit = (keys >> shift) & 15
        same = (keys >> (shift + 4)) == (base >> (shift + 4))[:, None] if shift < 28 else True
        hit = jnp.asarray(same)[..., None] & (digit[..., None] == bins)  # [S, V, 16]
        mass = jnp.sum(jnp.where(hit, weights[..., None], 0.0), axis=-2)  # [S, 16]
        at_or_above = jnp.cumsum(mass[:, ::-1], axis=-1)[:, ::-1] + above[:, None]
        held = jnp.sum(at_or_above[:, 1:] >= target[:, None], axis=-1)  # 0 holds already
        nxt = jnp.take_along_axis(at_or_above, jnp.minimum(held + 1, 15)[:, None], -1)[:, 0]
        above = jnp.where(held < 15, nxt, above)
        base = base | (held.astype(jnp.uint32) << shift)
    return base


def cases(rows: int) -> dict:
    import jax
    import jax.numpy as jnp

    from jaxattn.serve import sampling
    from jaxattn.serve.sampling_params import MAX_LOGPROBS

    # Logits as a model's: a few likely tokens over a long tail (temperature 0.6 applied).
    x = jax.random.normal(jax.random.key(0), (rows, VOCAB)) * 3 / 0.6
    top_k = jnp.zeros((rows,), jnp.int32)
    top_p = jnp.full((rows,), 0.9)  # Scout's generation_config.json default
    lp = jax.nn.log_softmax(x, axis=-1)
    return {
        # top-k off in every row: the engine's "top_p" mode, one search (None); "with top-k":
        # its "filtered" mode, which searches for the top-k threshold first.
        "top-p 0.9 mask": ({"jaxattn": lambda x, k, p: sampling.filter_mask(x, None, p),
                            "with top-k": sampling.filter_mask, "sort": sort_filter_mask,
                            "bins": lambda x, k, p: bins_filter_mask(x, None, p)},
                           (x, top_k, top_p)),
        f"top-{MAX_LOGPROBS} logprobs": (
            {"jaxattn": lambda a: sampling.top_k(a, MAX_LOGPROBS),
             "lax.top_k": lambda a: jax.lax.top_k(a, MAX_LOGPROBS)}, (lp,)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--rows", default=",".join(map(str, ROWS)))
    args = p.parse_args(argv)
    import jax

    from benchmarks.common import gpu_ms, time_kernels_alone, write_json
    from benchmarks.fp8_rows import kernel_count

    time_kernels_alone()
    out = []
    for rows in map(int, args.rows.split(",")):
        for name, (impls, fargs) in cases(rows).items():
            fns = {impl: jax.jit(f) for impl, f in impls.items()}
            times = {impl: [] for impl in fns}
            for _ in range(args.rounds):  # alternately, so drift hits both
                for impl, f in fns.items():
                    times[impl].append(gpu_ms(f, *fargs, reps=args.reps) * 1e3)
            us = {impl: statistics.median(t) for impl, t in times.items()}
            kernels = {impl: kernel_count(f, fargs) for impl, f in fns.items()}
            out.append({"call": name, "rows": rows, "us": us, "kernels": kernels})
            print(f"{name:18} x {rows:3} rows: " + ", ".join(
                f"{impl} {t:8.1f} us ({kernels[impl]} kernels, {t / us['jaxattn']:4.2f}x)"
                for impl, t in us.items()), flush=True)
    date = datetime.date.today().isoformat()
    res = {"date": date, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
           "vocab": VOCAB, "rows": out}
    print("wrote", write_json(f"sampling-{date}.json", res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
