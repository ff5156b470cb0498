"""An evaluation harness no one here wrote, run against the server the way its users run it:
EleutherAI's lm-eval with its ``local-completions`` model on a log-likelihood task (the
server's prompt logprobs, ``echo`` + ``logprobs``) and ``local-chat-completions`` on a
generation task. No hub: the tasks are YAML files over local JSON data, and lm-eval reads the
tokenizer from the server itself (/tokenizer_info and /tokenize, as it does with vLLM)."""

import json
import math

import jax
import numpy as np
import pytest

from jaxattn.serve.engine import LLMEngine

from server_util import LiveServer

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.models.openai_completions import LocalChatCompletion, LocalCompletionsAPI  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

MAX_LEN = 256

QUESTIONS = [
    {"question": "The capital of France is", "choices": [" Paris", " Rome", " a small dog"],
     "answer": 0},
    {"question": "Two plus two equals", "choices": [" four", " five"], "answer": 0},
    {"question": "The sky on a clear day is", "choices": [" blue", " green", " loud"],
     "answer": 0},
    {"question": "Water freezes at zero degrees", "choices": [" Celsius", " Kelvin"], "answer": 0},
]

LL_TASK = """task: jaxattn_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""

GEN_TASK = """task: jaxattn_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def server(make_runner, tokenizer):
    runner = make_runner(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=MAX_LEN,
                         num_pages=64)
    engine = LLMEngine(runner, tokenizer)
    engine.warmup(progress=False)
    with LiveServer(engine) as s:
        yield s


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    data = d / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (d / "jaxattn_ll.yaml").write_text(LL_TASK.format(data=data))
    (d / "jaxattn_gen.yaml").write_text(GEN_TASK.format(data=data))
    return TaskManager(include_path=str(d), include_defaults=False)


def test_log_likelihood_task_local_completions(server, tasks):
    lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model="test-model",
                             max_length=MAX_LEN, num_concurrent=2, max_retries=1)
    assert type(lm.tokenizer).__name__ == "RemoteTokenizer"  # found /tokenizer_info, /tokenize
    out = lm_eval.simple_evaluate(model=lm, tasks=["jaxattn_ll"], task_manager=tasks,
                                  log_samples=True, limit=4)
    acc = out["results"]["jaxattn_ll"]["acc,none"]
    assert 0 <= acc <= 1
    samples = out["samples"]["jaxattn_ll"]
    assert len(samples) == 4
    model = server.engine.runner.model
    checked = 0
    for s in samples:
        for (context, continuation), resp in zip(s["arguments"], s["resps"]):
            (ll, greedy) = resp[0]
            ctx, cont = lm._encode_pair(context, continuation)
            ids = ctx + cont
            lp = np.asarray(jax.nn.log_softmax(model(np.asarray(ids)[None])[0], axis=-1))
            want = sum(lp[len(ctx) + i - 1, t] for i, t in enumerate(cont))
            assert math.isclose(ll, want, rel_tol=1e-4, abs_tol=1e-4), (context, continuation)
            assert greedy == all(lp[len(ctx) + i - 1].argmax() == t for i, t in enumerate(cont))
            checked += 1
    assert checked == sum(len(q["choices"]) for q in QUESTIONS)


def test_generation_task_local_chat_completions(server, tasks):
    lm = LocalChatCompletion(base_url=server.url + "/v1/chat/completions", model="test-model",
                             max_length=MAX_LEN, max_retries=1)
    out = lm_eval.simple_evaluate(model=lm, tasks=["jaxattn_gen"], task_manager=tasks,
                                  apply_chat_template=True, log_samples=True, limit=3)
    assert 0 <= out["results"]["jaxattn_gen"]["exact_match,none"] <= 1
    samples = out["samples"]["jaxattn_gen"]
    assert len(samples) == 3 and all(isinstance(s["resps"][0][0], str) for s in samples)
