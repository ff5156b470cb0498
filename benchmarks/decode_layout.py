"""Does the pools' layout or the pages' order cost the decode kernel read rate? One GPU run.

    python -m benchmarks.decode_layout [--tag T]   # -> results/decode-layout-<date>[-T].json

The same K/V bytes, the same tiles of 8,192 keys and 5 q rows each, read several ways, in
turn, two rounds, with cuDNN (which reads the contiguous cache) beside each
(``benchmarks.decode.run_case``, GPU time from the profiler):

* 32 sequences over 8 KV heads (Scout's; a page's rows of one head are 256 B every 2 KiB) and
  256 sequences over 1 KV head (a page of one head is one 4 KiB piece), 16-token pages
  shuffled, as the benchmarks' pools are;
* 32 x 8 heads with the pages in order (a sequence's pages one after another, as a fresh
  server's pool hands them out): what the shuffle's scattered 4 KiB reads cost against
  cuDNN's contiguous cache (a block's consecutive pages in one TMA copy, the default
  ``DecodeConfig.merge_pages``), with each page its own copy beside it (``run_case``'s
  page-by-page column);
* the same with 128-token pages in order: one TMA copy for K and one for V per 128-key block
  instead of eight each.
"""

from __future__ import annotations

import argparse
import datetime

import jax

from benchmarks import decode as bench
from benchmarks.common import time_kernels_alone, write_json

# (query heads, KV heads, batch, page size, pages shuffled): equal bytes and tiles, two rounds.
# (Session 54's run also had the 1-KV-head form: 369.1 / 373.5 µs.)
FORMS = [(40, 8, 32, 16, True), (40, 8, 32, 16, False), (40, 8, 32, 128, False)] * 2


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", default="", help="suffix of the result file")
    args = ap.parse_args(argv)
    time_kernels_alone(False)
    res = {"date": datetime.date.today().isoformat(), "device": jax.devices()[0].device_kind,
           "ceilings": bench.ceilings(), "cases": []}
    for hq, hkv, batch, page, shuffle in FORMS:
        bench.HQ, bench.HKV = hq, hkv  # run_case's shapes are the module's
        row = bench.run_case(batch, 8192, res["ceilings"], profile=True, page_size=page,
                             shuffle=shuffle)
        row = {k: v for k, v in row.items() if not k.endswith("_kernels")} | {"hq": hq,
                                                                               "hkv": hkv}
        res["cases"].append(row)
        apart = (f", page by page {1e3 * row['jaxattn_page_by_page_device_ms']:.1f} µs"
                 if "jaxattn_page_by_page_device_ms" in row else "")
        print(f"{hkv} KV heads, {batch} x 8192, {page}-token pages "
              f"{'shuffled' if shuffle else 'in order'}: layer "
              f"{1e3 * row['jaxattn_device_ms']:.1f} µs{apart}, cuDNN "
              f"{1e3 * row['cudnn_device_ms']:.1f} µs", flush=True)
    write_json(f"decode-layout-{res['date']}{'-' + args.tag if args.tag else ''}.json", res)


if __name__ == "__main__":
    main()
