"""Does the pools' token-major layout cost the decode kernel read rate? One GPU run.

    python -m benchmarks.decode_layout     # -> results/decode-layout-<date>.json

The same K/V bytes, the same tiles of 8,192 keys and 5 q rows each, read two ways: 32
sequences over 8 KV heads (Scout's; a page's rows of one head are 256 B every 2 KiB) and 256
sequences over 1 KV head (a page of one head is one 4 KiB piece), in turn, two rounds, with
cuDNN beside each (``benchmarks.decode.run_case``, GPU time from the profiler).
"""

from __future__ import annotations

import datetime
import json

import jax

from benchmarks import decode as bench
from benchmarks.common import time_kernels_alone

# (query heads, KV heads, batch): equal bytes and tiles, two rounds.
FORMS = [(40, 8, 32), (5, 1, 256)] * 2


def main():
    time_kernels_alone(False)
    res = {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
           "ceilings": bench.ceilings(), "cases": []}
    for hq, hkv, batch in FORMS:
        bench.HQ, bench.HKV = hq, hkv  # run_case's shapes are the module's
        row = bench.run_case(batch, 8192, res["ceilings"], profile=True)
        row = {k: v for k, v in row.items() if not k.endswith("_kernels")} | {"hq": hq,
                                                                               "hkv": hkv}
        res["cases"].append(row)
        print(f"{hkv} KV heads, {batch} x 8192: layer {1e3 * row['jaxattn_device_ms']:.1f} µs, "
              f"cuDNN {1e3 * row['cudnn_device_ms']:.1f} µs", flush=True)
    bench.RESULTS.mkdir(parents=True, exist_ok=True)
    (bench.RESULTS / f"decode-layout-{res['date']}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
