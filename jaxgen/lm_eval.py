"""jaxgen as an lm-evaluation-harness backend: `import jaxgen.lm_eval` registers the model "jaxgen".

    lm_eval --model jaxgen --model_args model=DIR,max_length=2048 --tasks hellaswag
    jaxgen eval --model jaxgen --tasks hellaswag          # the same command line, backend registered
    lm_eval.simple_evaluate(model="jaxgen", model_args="model=DIR", tasks=[...])

model_args: `model` (a jaxgen model directory; default: the default model, converted on first
use), `device` ("cpu", "cuda", "cuda:1", "tpu", "auto"), `compute_type`, `tensor_parallel`,
`max_batch_size` (rows scored / decoded together; lm-eval's `--batch_size` sets it too),
`max_length` (context window in tokens; default: the model's `max_position_embeddings`),
`max_gen_toks` (default 256), `add_bos_token` (default: as the model's tokenizer does),
`seed` (sampling seed, default 0), `prefix_cache` (default true: shared contexts computed once).

Requests are handled as lm-eval's backends handle them:
- loglikelihood: each request is tokenized as context + continuation (lm-eval's `_encode_pair`),
  sorted by decreasing context length with a context's continuations side by side, and scored
  `max_batch_size` at a time with `Generator.score_batch` (`is_greedy` from `return_greedy`),
  which returns the continuations' log-probs only (per-row offsets); a context shared by several
  requests (its continuations, and the few-shot examples every item repeats) is computed once
  and kept in the Generator's prefix cache (model_args `prefix_cache=false` turns that off). A
  request longer than max_length + 1 tokens keeps its last max_length + 1 tokens (the HF
  backend's left truncation).
- loglikelihood_rolling: lm-eval's disjoint rolling windows of max_length tokens, scored the same way.
- generate_until: requests grouped by generation kwargs, sorted by decreasing context length, each
  group decoded in one `generate_batch` call (the slot scheduler keeps `max_batch_size` rows busy);
  `until` becomes `stop_strings` (decided in the decoding loop) and the text is cut at the first
  one; `max_gen_toks`; greedy, or sampling with `temperature`, `top_k`, `top_p`; contexts keep
  their last max_length - max_gen_toks tokens (the HF backend's truncation).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Tuple

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

log = logging.getLogger(__name__)

DEFAULT_BATCH = 32
_GREEDY_ONLY = ("do_sample", "temperature", "top_k", "top_p", "seed", "repetition_penalty")


def _as_bool(value) -> bool:
    if isinstance(value, str):
        if value.lower() in ("true", "1", "yes"):
            return True
        if value.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    return bool(value)


def _device(device: Optional[str]) -> Tuple[str, int]:
    """lm-eval's device string ("cuda:1", "cpu", None) -> (jaxgen device, index)."""
    if device is None:
        return "cpu", 0
    name, _, index = str(device).partition(":")
    if name == "mps":
        raise ValueError("jaxgen runs on cpu, cuda (gpu), tpu or auto, not mps")
    if name in ("cuda", "gpu"):
        import jax

        if jax.default_backend() != "gpu":  # lm-eval's CLI defaults to cuda; its hf backend falls back too
            log.warning("jaxgen: no GPU visible to JAX, running on the CPU instead of %s", device)
            return "cpu", 0
    return name, int(index) if index else 0


@register_model("jaxgen")
class JaxgenLM(TemplateLM):
    """An lm-eval model over `jaxgen.Generator` (see the module docstring)."""

    def __init__(self, model: Optional[str] = None, device: Optional[str] = None, compute_type: str = "default",
                 tensor_parallel=False, max_batch_size: Optional[int] = None, max_length: Optional[int] = None,
                 batch_size=None, max_gen_toks: int = 256, add_bos_token=None, seed: int = 0, prefix_cache=True,
                 **kwargs):
        super().__init__()
        from jaxgen.generator import Generator
        from jaxgen.tokenizer import load_tokenizer

        if kwargs:
            log.warning("jaxgen: ignoring model_args %s", sorted(kwargs))
        if model is None:
            from jaxgen.default_model import default_model_path

            model = default_model_path()
        name, index = _device(device)
        self.generator = Generator(str(model), device=name, device_index=index, compute_type=compute_type,
                                   tensor_parallel=_as_bool(tensor_parallel), prefix_cache=_as_bool(prefix_cache))
        self.jaxgen_tokenizer = load_tokenizer(str(model))
        config = self.generator.config
        self._max_length = int(max_length) if max_length else int(config.max_position_embeddings)
        if self._max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self._max_length}")
        if batch_size not in (None, "auto") and not str(batch_size).startswith("auto"):
            self.batch = int(batch_size)
        else:
            self.batch = int(max_batch_size) if max_batch_size else DEFAULT_BATCH
        if self.batch < 1:
            raise ValueError(f"the batch size must be >= 1, got {self.batch}")
        self._max_gen_toks = int(max_gen_toks)
        tok = self.jaxgen_tokenizer
        self.add_bos_token = tok.add_bos_token if add_bos_token is None else _as_bool(add_bos_token)
        vocab = self.generator.vocabulary
        self._eos_id = vocab.id_of(tok.eos_token) if tok.eos_token in vocab else None
        self._bos_id = vocab.id_of(tok.bos_token) if tok.bos_token and tok.bos_token in vocab else None
        self.seed = int(seed)

    # ------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self._eos_id

    @property
    def prefix_token_id(self) -> int:
        return self._bos_id if self._bos_id is not None else self._eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
        """Token ids of `string`; BOS first when the model's tokenizer adds one (or `add_special_tokens`),
        unless the text already starts with the BOS token's text."""
        tok = self.jaxgen_tokenizer
        bos = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        if add_special_tokens is None and tok.bos_token and string.startswith(tok.bos_token):
            bos = False
        ids = tok.encode_ids(string)
        return ([self._bos_id] + ids) if bos and self._bos_id is not None else ids

    def tok_decode(self, tokens: List[int], skip_special_tokens: bool = True) -> str:
        return self.jaxgen_tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[Tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids) ->
        (sum of the continuation's log-probs, whether every continuation token is the greedy choice)."""
        def order(req):  # a context's continuations side by side: the context's state is computed once
            return -len(req[1]), tuple(req[1]), -len(req[2]), tuple(req[2])

        collator = Collator(requests, sort_fn=order)
        out = []
        for chunk in collator.get_batched(n=self.batch, batch_fn=None):
            inputs = []
            for _, context, continuation in chunk:
                if not continuation:
                    raise ValueError("lm-eval request with an empty continuation")
                if len(continuation) > self._max_length:
                    raise ValueError(f"continuation of {len(continuation)} tokens is longer than max_length "
                                     f"({self._max_length})")
                inputs.append((context + continuation)[-(self._max_length + 1):])
            # Only the continuations' log-probs are returned (one offset per row).
            offsets = [len(x) - 1 - len(c) for x, (_, _, c) in zip(inputs, chunk)]
            scored = self.generator.score_batch(inputs, max_batch_size=self.batch, max_input_length=0,
                                                return_greedy=True, offset=offsets)
            for (key, _, continuation), result in zip(chunk, scored):
                n = len(continuation)
                answer = (float(sum(result.log_probs[-n:])), bool(all(result.greedy[-n:])))
                if key is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
                out.append(answer)
        return collator.get_original(out)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self._max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[owner] += log_prob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", tuple(req.args), total)
        return totals

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        eos_text = self.jaxgen_tokenizer.eos_token
        args = [req.args for req in requests]
        encoded = {i: self.tok_encode(context) for i, (context, _) in enumerate(args)}
        order = sorted(range(len(args)), key=lambda i: (-len(encoded[i]), args[i][0]))
        groups: Dict[str, List[int]] = {}
        for i in order:
            groups.setdefault(repr(sorted(args[i][1].items())) if isinstance(args[i][1], dict) else "", []).append(i)
        results: List[Optional[str]] = [None] * len(args)
        for members in groups.values():
            gen_kwargs = args[members[0]][1]
            if not isinstance(gen_kwargs, dict):
                raise TypeError(f"generation kwargs must be a dict, got {type(gen_kwargs).__name__}")
            options, until, max_gen_toks = self._generation_options(gen_kwargs, eos_text)
            keep = self._max_length - max_gen_toks
            if keep < 1:
                raise ValueError(f"max_gen_toks ({max_gen_toks}) must be less than max_length ({self._max_length})")
            vocab = self.generator.vocabulary
            prompts = [vocab.to_tokens(encoded[i][-keep:]) for i in members]
            stops = [s for s in until if s and s != eos_text]
            outputs = self.generator.generate_batch(
                prompts, max_batch_size=self.batch, max_length=max_gen_toks, include_prompt_in_result=False,
                stop_strings=stops or None, **options)
            for i, result in zip(members, outputs):
                text = postprocess_generated_text(self.tok_decode(result.sequences_ids[0]), until, None)
                self.cache_hook.add_partial("generate_until", args[i], text)
                results[i] = text
        return results

    def _generation_options(self, gen_kwargs: dict, eos_text: Optional[str]):
        """lm-eval generation kwargs -> (generate_batch options, until, max_gen_toks)."""
        kwargs = normalize_gen_kwargs(dict(gen_kwargs), self._max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        max_gen_toks = int(kwargs.pop("max_gen_toks"))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        options = {}
        if do_sample and temperature > 0:
            top_k = kwargs.pop("top_k", None)
            top_p = kwargs.pop("top_p", None)
            options.update(sampling_topk=int(top_k) if top_k else 0, sampling_topp=float(top_p) if top_p else 1.0,
                           sampling_temperature=temperature, random_seed=int(kwargs.pop("seed", self.seed)))
        if "repetition_penalty" in kwargs:
            options["repetition_penalty"] = float(kwargs.pop("repetition_penalty"))
        ignored = sorted(k for k in kwargs if k not in _GREEDY_ONLY)
        if ignored:
            log.warning("jaxgen: ignoring generation kwargs %s", ignored)
        return options, until, max_gen_toks
