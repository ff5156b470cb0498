import collections, sys
sys.path.insert(0, ".devscripts")
import jax, jax.extend
from jax._src import source_info_util
exec(open(".devscripts/count_meta.py").read().split("txt = jax.jit")[0])
jp = jax.make_jaxpr(both)(*args)
# DCE: keep only what outputs need
from jax._src.interpreters import partial_eval as pe
closed = jp
heavy = {"sort", "scatter", "scatter-add", "cumsum", "reduce_sum", "reduce_max", "reduce_min", "argmin", "argmax", "cumlogsumexp", "cummax", "reduce_or", "reduce_and"}
rows = collections.Counter()
def walk(j):
    for e in j.eqns:
        name = e.primitive.name
        if name in heavy:
            fr = source_info_util.user_frame(e.source_info.traceback)
            rows[(name, f"{fr.file_name.split('/')[-1]}:{fr.start_line}" if fr else "?", tuple(e.outvars[0].aval.shape))] += 1
        for p in e.params.values():
            if isinstance(p, jax.extend.core.ClosedJaxpr): walk(p.jaxpr)
            elif isinstance(p, jax.extend.core.Jaxpr): walk(p)
walk(jp.jaxpr)
for k, v in sorted(rows.items(), key=lambda kv: kv[0][1]): print(v, *k)
print(sum(rows.values()))
