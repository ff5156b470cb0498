"""``python -m jaxattn.serve``: the OpenAI-compatible HTTP server.

With no ``--model`` it serves the embedded tiny Llama 4 with random weights
(built offline on first use), so it runs on a fresh CPU machine.
"""

import argparse
import logging
import os
import signal
import sys

from jaxattn.serve import cli

log = logging.getLogger("jaxattn.serve")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxattn.serve",
                                description="Serve a Llama 4 model over an OpenAI-compatible HTTP API.")
    cli.add_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: loopback only; any other address without "
                   "--api-key is open to everyone who can reach it, and the server warns)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the directory's name)")
    p.add_argument("--api-key", default=os.environ.get("JAXATTN_API_KEY") or None,
                   metavar="KEY", help="every route but /health and /metrics needs the header "
                   "`Authorization: Bearer KEY` (default: $JAXATTN_API_KEY; none: no check)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--max-request-body-bytes", type=_byte_count, default=None, metavar="BYTES",
                   help="larger request bodies get a 413 before they are read (e.g. 32MiB; "
                   "default: 8MiB or 16 bytes per token of --max-model-len, whichever is more)")
    return p


def _byte_count(text: str) -> int:
    from jaxattn.serve.kv_cache import parse_budget

    try:  # the same units as --kv-cache-memory; a bare number is bytes here, never a fraction
        return parse_budget(text if text.strip()[-1:].isalpha() else int(float(text)))
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a byte count (e.g. 33554432 or 32MiB)") from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.distributed and not args.plan_memory:
        # Every process of a multi-host mesh must issue the same steps in the same order;
        # requests reaching one process's HTTP server would not. Offline generation runs the
        # same input on every process, so it can.
        raise SystemExit("error: --distributed serving is not supported: run one server per "
                         "host (--data-parallel-size within it), or python -m jaxattn.generate "
                         "--distributed with the same input on every process")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("jax").setLevel(logging.WARNING)  # its backend probing is noise here
    import uvicorn

    from jaxattn.serve.api_server import build_app
    from jaxattn.serve.async_engine import AsyncEngine
    from jaxattn.serve.metrics import EngineMetrics

    name = args.served_model_name or (os.path.basename(os.path.normpath(args.model))
                                      if args.model else "jaxattn-tiny-llama4-random")
    if not args.api_key and not _loopback(args.host):
        log.warning("serving on %s without --api-key: anyone who can reach this address can use "
                    "the model (set --api-key or JAXATTN_API_KEY)", args.host)
    metrics = EngineMetrics(name)
    engine = cli.start_engine(args, metrics=metrics)
    b = engine.bounds
    print(f"jaxattn: serving {name!r} ({engine.model_dir}) on http://{args.host}:{args.port} — "
          f"max_model_len={b.max_model_len}, max_num_seqs={b.max_num_seqs}, "
          f"max_num_batched_tokens={b.max_num_batched_tokens}, {engine.runner.num_pages} KV pages "
          f"of {b.page_size} tokens", file=sys.stderr, flush=True)
    app = build_app(AsyncEngine(engine), model_name=name, metrics=metrics,
                    max_request_body_bytes=args.max_request_body_bytes, api_key=args.api_key)
    # uvicorn drains in-flight requests on SIGTERM/SIGINT, stops the engine (the app's
    # lifespan), then re-raises the signal to the handler it found. Finding this one, a server
    # that shut down cleanly exits with status 0 instead of dying by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=30)
    return 0


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _exit_cleanly(signum, frame):
    raise SystemExit(0)


if __name__ == "__main__":
    sys.exit(main())
