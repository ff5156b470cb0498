"""Does the pools' layout or the pages' order cost the decode kernel read rate? One GPU run.

    python -m benchmarks.decode_layout [--tag T]   # -> results/decode-layout-<date>[-T].json

The same K/V bytes, the same tiles of 8,192 keys and 5 q rows each, read several ways, in
turn, two rounds, with cuDNN (which reads the contiguous cache) beside each
(``benchmarks.decode.run_case``, GPU time from the profiler):

* 32 sequences over 8 KV heads (Scout's; a page's rows of one head are 256 B every 2 KiB),
  16-token pages each anywhere in the pool (``benchmarks.decode.PAGE_ORDERS``' "pages");
* the same with each 128-key block's pages together, the blocks anywhere (the engine's order
  since session 55: ``serve.block_manager``), and with each sequence's pages in order (a
  fresh pool's): what scattered 4 KiB reads cost against cuDNN's contiguous cache (a block's
  consecutive pages are one TMA copy, the default ``DecodeConfig.merge_pages``), with each
  page its own copy beside them (``run_case``'s page-by-page column);
* the same with 128-token pages in order: one TMA copy for K and one for V per 128-key block
  instead of eight each.

(Session 53-54's runs also had 256 sequences over 1 KV head, a page of one head one 4 KiB
piece: the same time as 8 heads, so the pools' token-major layout costs nothing.)
"""

from __future__ import annotations

import argparse
import datetime

import jax

from benchmarks import decode as bench
from benchmarks.common import time_kernels_alone, write_json

# (query heads, KV heads, batch, page size, page order): equal bytes and tiles, two rounds.
FORMS = [(40, 8, 32, 16, "pages"), (40, 8, 32, 16, "blocks"), (40, 8, 32, 16, "in-order"),
         (40, 8, 32, 128, "in-order")] * 2


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", default="", help="suffix of the result file")
    args = ap.parse_args(argv)
    time_kernels_alone(False)
    res = {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
           "ceilings": bench.ceilings(), "cases": []}
    for hq, hkv, batch, page, order in FORMS:
        bench.HQ, bench.HKV = hq, hkv  # run_case's shapes are the module's
        row = bench.run_case(batch, 8192, res["ceilings"], profile=True, page_size=page,
                             order=order)
        row = {k: v for k, v in row.items() if not k.endswith("_kernels")} | {"hq": hq,
                                                                               "hkv": hkv}
        res["cases"].append(row)
        apart = (f", page by page {1e3 * row['jaxattn_page_by_page_device_ms']:.1f} µs"
                 if "jaxattn_page_by_page_device_ms" in row else "")
        print(f"{hkv} KV heads, {batch} x 8192, {page}-token pages, order {order}: layer "
              f"{1e3 * row['jaxattn_device_ms']:.1f} µs{apart}, cuDNN "
              f"{1e3 * row['cudnn_device_ms']:.1f} µs", flush=True)
    write_json(f"decode-layout-{res['date']}{'-' + args.tag if args.tag else ''}.json", res)


if __name__ == "__main__":
    main()
