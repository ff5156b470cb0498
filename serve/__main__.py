"""``python -m jaxattn.serve``: the OpenAI-compatible HTTP server."""

import argparse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxattn.serve",
                                description="Serve a Llama 4 model over an OpenAI-compatible HTTP API.")
    p.add_argument("--model", default=None, help="Hugging Face Llama 4 directory (default: a tiny "
                   "random-weight model built offline)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--kv-cache-memory", default=None,
                   help="KV cache budget: bytes (e.g. 4GiB) or a fraction of free device memory")
    return p


def main(argv=None) -> int:
    build_parser().parse_args(argv)
    raise SystemExit("the server is not built yet (see the serving issue)")


if __name__ == "__main__":
    main()
