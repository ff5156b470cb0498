"""Count the XLA ops the decode-only step's metadata lowers to (Scout TP=1 bounds)."""
import collections, re, sys
import jax, jax.numpy as jnp
import jaxattn
from jaxattn import planner, kernels
from jaxattn.serve import batch as batch_lib

def bounds(seqs=8):
    return jaxattn.Bounds(max_num_seqs=seqs, max_num_batched_tokens=8192, max_model_len=8256,
                          page_size=16, num_q_heads=40, num_kv_heads=8, head_dim=128,
                          chunk_size=8192, block_kv=128, num_workers=132)

def meta(b, t, cu, kv, n, pt, cpt, chunk):
    p = planner.plan(b, cu, kv, n, chunk_size=chunk)
    kp = kernels.prepare(p, bounds=b, num_tokens=t, page_table=pt if chunk is None else cpt)
    # decode-only steps read: plan.decode (items), dec_meta
    return kp.plan.decode, kp.dec_meta

b = bounds()
t = 16
S = b.max_num_seqs
args = (jnp.zeros(S + 1, jnp.int32), jnp.zeros(S, jnp.int32), jnp.int32(1),
        jnp.zeros((S, b.pages_per_seq), jnp.int32), jnp.zeros((S, b.chunk_pages_per_seq), jnp.int32))
def both(cu, kv, n, pt, cpt):
    return [meta(b, t, cu, kv, n, pt, cpt, c) for c in (None, b.chunk_size)]
txt = jax.jit(both).lower(*args).as_text()
ops = collections.Counter(re.findall(r"stablehlo\.([a-z_]+)", txt))
interesting = ["sort", "scatter", "gather", "reduce", "reduce_window", "dynamic_slice", "while", "iota", "concatenate", "dynamic_update_slice", "select", "compare"]
print({k: ops[k] for k in interesting}, "total", sum(ops.values()))
jp = jax.make_jaxpr(both)(*args)
prims = collections.Counter()
def walk(j):
    for e in j.eqns:
        prims[e.primitive.name] += 1
        for sub in jax.core.jaxprs_in_params(e.params) if hasattr(jax.core, "jaxprs_in_params") else []:
            walk(sub)
walk(jp.jaxpr)
print(sorted(prims.items(), key=lambda x: -x[1])[:30])

def entry_ops(fn, *a):
    hlo = jax.jit(fn).lower(*a).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    body = entry[:entry.index("\n}")]
    kinds = collections.Counter()
    for line in body.splitlines()[1:]:
        m = re.search(r"= \S+ ([a-z\-]+)\(", line)
        if m:
            op = m.group(1)
            if op == "fusion":
                op += ":" + re.search(r"kind=(k\w+)", line).group(1)
            kinds[op] += 1
    return kinds
k = entry_ops(both, *args)
skip = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "copy-start", "copy-done"}
print("CPU entry ops:", sum(v for op, v in k.items() if op not in skip), dict(k))
