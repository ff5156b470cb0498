"""Multi-host: ``python -m jaxattn.generate --distributed -tp 8`` as two processes of 4 CPU
devices each (jax.distributed on localhost, gloo collectives), one mesh over both.

Every process runs the same input (each step is one program over all 8 devices); process 0
writes the results, which must equal the single-device ones.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from jaxattn.serve.llm import LLM
from jaxattn.models import llama4
from jaxattn.serve import default_model
from jaxattn.serve.sampling_params import SamplingParams

from sharded.sharded_cases import BASE

FLAGS = ["--max-model-len", "256", "--max-num-seqs", "4", "--max-num-batched-tokens", "32",
         "--page-size", "8"]
LENGTHS = (5, 100, 33, 70)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_generate_over_two_processes(tmp_path):
    model = str(tmp_path / "model")
    vocab = default_model.build_tokenizer(model)
    llama4.save(llama4.init_random(llama4.Llama4Config.from_hf_dict(dict(BASE, vocab_size=vocab)),
                                   seed=5), model)
    prompts = [list(range(6, 6 + n)) for n in LENGTHS]
    with open(tmp_path / "in.jsonl", "w") as f:
        for i, p in enumerate(prompts):
            f.write(json.dumps({"id": i, "prompt_token_ids": p, "max_tokens": 6}) + "\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jaxattn.generate", "--model", model, *FLAGS,
         "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / f"out{pid}.jsonl"),
         "--temperature", "0",
         "--tensor-parallel-size", "8", "--distributed", "--coordinator-address",
         f"localhost:{port}", "--num-processes", "2", "--process-id", str(pid)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for pid in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(x[-3000:] for x in logs)
    assert not (tmp_path / "out1.jsonl").exists()  # only process 0 writes
    with open(tmp_path / "out0.jsonl") as f:
        got = [r["token_ids"] for r in sorted(map(json.loads, f), key=lambda r: r["id"])]
    llm = LLM(model, max_model_len=256, max_num_seqs=4, max_num_batched_tokens=32, page_size=8)
    want = [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=6),
        use_tqdm=False)]
    assert got == want
