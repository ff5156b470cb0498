"""Offline batch generation: ``jaxattn.LLM(...).generate(prompts, SamplingParams(...))``.

The same engine as the server, driven in the caller's thread: every prompt
is queued at once and continuous batching packs them; results come back in
prompt order, shaped like vLLM's (``out.outputs[0].text``,
``out.outputs[0].token_ids``).
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Iterator, Sequence

from jaxattn.serve.config import EngineConfig
from jaxattn.serve.engine import LLMEngine
from jaxattn.serve.outputs import CompletionOutput, RequestOutput
from jaxattn.serve.sampling_params import SamplingParams

Prompt = str | Sequence[int] | dict


class LLM:
    """A model ready to generate.

    ``model``: a Hugging Face Llama 4 directory; None: the embedded tiny model with
    random weights. Every other keyword is an :class:`~jaxattn.serve.config.EngineConfig`
    field, the same settings as ``python -m jaxattn.serve``'s flags (``max_model_len=``,
    ``tensor_parallel_size=``, ``attention_impl=``, ...). ``config``: a whole
    EngineConfig instead. ``engine``: an already built
    :class:`~jaxattn.serve.engine.LLMEngine` (then nothing else is used).
    """

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None,
                 warmup: bool = True, engine: LLMEngine | None = None, **engine_args):
        if engine is None:
            if config is None:
                known = {f.name for f in dataclasses.fields(EngineConfig)}
                unknown = sorted(set(engine_args) - known)
                if unknown:
                    raise TypeError(f"LLM() got unknown engine arguments {unknown}; the engine "
                                    f"takes {sorted(known)}")
                config = EngineConfig(model=model, **engine_args)
            from jaxattn import compile_cache

            compile_cache.enable(config.compilation_cache_dir)  # as the servers do
            engine = LLMEngine.from_config(config)
            if warmup:
                engine.warmup()
        self.engine = engine
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """SamplingParams with the model's ``generation_config.json`` defaults (temperature,
        top_p, top_k where it sets them): what ``generate`` uses when given none."""
        return SamplingParams(**getattr(self.engine, "generation_defaults", {}))

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """One finished :class:`RequestOutput` per prompt, in order. Prompts are strings, token
        id lists or ``{"prompt": ...}`` / ``{"prompt_token_ids": [...]}`` dicts.
        ``sampling_params=None``: :meth:`get_default_sampling_params` (the model's
        ``generation_config.json`` over SamplingParams' defaults); a SamplingParams given is
        used as it is."""
        prompts = _as_list(prompts)
        results: list[RequestOutput | None] = [None] * len(prompts)
        for i, out in self.iter_generate(prompts, sampling_params, use_tqdm=use_tqdm):
            results[i] = out
        return results

    def chat(self, messages, sampling_params=None, *, use_tqdm: bool = True) -> list[RequestOutput]:
        """Chat conversations (a list of {"role", "content"} dicts, or a list of such lists)."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.engine.tokenizer
        return self.generate([{"prompt_token_ids": tok.encode_chat(c)} for c in convs],
                             sampling_params, use_tqdm=use_tqdm)

    def iter_generate(self, prompts: Sequence[Prompt], sampling_params=None, *,
                      use_tqdm: bool = True) -> Iterator[tuple[int, RequestOutput]]:
        """Yield ``(prompt index, RequestOutput)`` as each request finishes (any order).

        Every prompt is checked before any runs (ValueError naming the prompt).
        """
        from tqdm.auto import tqdm

        prompts = list(prompts)
        params = _params_list(sampling_params or self.get_default_sampling_params(),
                              len(prompts))
        encoded = [self._encode(p) for p in prompts]
        for i, ((_, ids), sp) in enumerate(zip(encoded, params)):
            try:
                self.engine.validate(ids, sp)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        engine = self.engine
        pending: dict[str, tuple[int, RequestOutput]] = {}
        for i, ((text, ids), sp) in enumerate(zip(encoded, params)):
            rid = f"offline-{next(self._ids)}"
            pending[rid] = (i, RequestOutput(rid, text, list(ids), [
                CompletionOutput(j, "", []) for j in range(sp.n)]))
            engine.add_request(rid, ids, sp)
        bar = tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not use_tqdm)
        t0, generated = time.perf_counter(), 0
        try:
            while pending:
                for d in engine.step():
                    entry = pending.get(d.request_id)
                    if entry is None:
                        continue
                    i, out = entry
                    out.add(d)
                    generated += len(d.token_ids)
                    if d.error is not None:
                        raise RuntimeError(f"prompt {i} failed: {d.error}")
                    if out.finished:
                        del pending[d.request_id]
                        bar.update(1)
                        bar.set_postfix_str(f"{generated / (time.perf_counter() - t0):.0f} tok/s",
                                            refresh=False)
                        yield i, out
                if pending and not engine.has_unfinished():
                    raise RuntimeError("the engine went idle with requests pending")
        finally:
            bar.close()
            for rid in pending:  # interrupted (exception, generator closed): free their pages
                engine.abort(rid)

    def _encode(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            return prompt, self.engine.tokenizer.encode(prompt)
        return None, [int(t) for t in prompt]


def _as_list(prompts) -> list:
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):  # one prompt of token ids
        return [prompts]
    return prompts


def _params_list(sp, n: int) -> list[SamplingParams]:
    if sp is None:
        return [SamplingParams()] * n
    if isinstance(sp, SamplingParams):
        return [sp] * n
    sp = list(sp)
    if len(sp) != n:
        raise ValueError(f"{len(sp)} sampling params for {n} prompts")
    return sp
