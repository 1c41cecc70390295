"""The `transformers` backend: a LlavaGuard-style checkpoint run in-process with HF transformers.

    policy-engine assess photo.jpg -b transformers -m AIML-TUDA/LlavaGuard-v1.2-0.5B-OV-hf

Any image-text-to-text checkpoint loads through the Auto classes (LlavaGuard v1.2 `-hf` is
Llava-OneVision, v1.0/v1.1 `-hf` is Llava, QwenGuard is Qwen2.5-VL), by hub id or local path.
The user turn is the image, then the compiled policy, rendered by the checkpoint's own chat
template; the layout's answer prefix (`{\\n    "rating": "`) is appended after the generation
prompt, so the first generated token is the rating.

Modes:
- `full` and `verdict` generate under the answer grammar (`policy_engine.grammar`, compiled by
  llguidance once per policy, mode and tokenizer), so every answer is a valid verdict in the
  layout the checkpoint was trained on. P(Unsafe) comes free from the rating step's logits.
- `score` runs one forward pass over prompt + prefix and reads P(Unsafe) from the logits at the
  rating position; with `category_scores` (default on) it then scores each category label after
  "Unsafe" from the KV cache: one more forward pass per branching point of the labels' tokens.

`-m tiny-random` (and `tiny-random-llava`, `tiny-random-qwen`) builds a tiny random-weight model
locally and loads it through the same code: for trying the pipeline without hub access. Its
verdicts are random.

Construction only validates options; `load()` imports torch and transformers.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from policy_engine import (
    Backend,
    BackendError,
    BackendUnavailableError,
    Batch,
    Capabilities,
    CliFlag,
    CompiledPolicy,
    Generation,
    Mode,
    Register,
    hookimpl,
)

from .tiny import TINY_MODELS

DEFAULT_MODEL = "AIML-TUDA/LlavaGuard-v1.2-0.5B-OV-hf"
log = logging.getLogger(__name__)
INSTALL_HINT = "pip install 'policy-engine[transformers]'"
RANDOM_WEIGHTS_WARNING = (
    "model {name!r} has RANDOM weights: its verdicts are meaningless "
    "(it exists to try the pipeline offline)"
)


class TransformersOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        default=DEFAULT_MODEL,
        description="Hub id, local checkpoint directory, or tiny-random[-llava|-qwen] (random).",
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag, commit).")
    local_files_only: bool = Field(default=False, description="Never contact the hub.")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto: bfloat16 on CUDA, float32 on CPU."
    )
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = None
    greedy: bool = Field(
        default=True,
        description="Greedy decoding (the default): the same verdict every run. false: "
        "sample with temperature/top_p/top_k, LlavaGuard's published settings by default.",
    )
    temperature: float = Field(default=0.2, gt=0.0, description="Sampling only (greedy=false).")
    top_p: float = Field(default=0.95, gt=0.0, le=1.0, description="Sampling only.")
    top_k: int = Field(default=50, ge=0, description="Sampling only; 0: off.")
    seed: int | None = Field(default=None, description="Seed torch before each batch.")
    max_new_tokens: int | None = Field(
        default=None, ge=1, description="Token budget; default: the policy's (500)."
    )
    constrained: bool = Field(
        default=True, description="Decode under the answer grammar (off only to measure it)."
    )
    category_scores: bool = Field(
        default=True, description="In score mode, also score the categories after 'Unsafe'."
    )
    trust_remote_code: bool = False


class TransformersBackend(Backend):
    name = "transformers"
    description = "HF transformers in-process, grammar-constrained (LlavaGuard, QwenGuard)"
    Options = TransformersOptions
    capabilities = Capabilities(
        images=True, json_schema=True, scores=True, batching=True, max_batch_size=8
    )
    install_hint = INSTALL_HINT
    cli_flags = (
        CliFlag(
            "--model",
            "model",
            short="-m",
            help="Model: hub id, local checkpoint directory, or tiny-random (random weights, "
            "offline).",
        ),
    )
    options: TransformersOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.model: Any = None
        self.processor: Any = None
        self.tokenizer: Any = None
        self.guided: Any = None
        self.device = "cpu"
        self.model_name = self.options.model
        self.tokens_generated = 0  # decode steps over all rows, for benchmarks
        self._prompts: dict[str, str] = {}
        self._rating_tokens: dict[str, tuple[int, int]] = {}
        self._label_tries: dict[str, _Trie] = {}
        self._raised: set[tuple[str, str]] = set()  # (policy hash, mode) whose budget was raised
        self._lock = threading.Lock()

    # -- loading ---------------------------------------------------------------------------
    def load(self) -> None:
        try:
            import torch
            import transformers
        except ImportError as err:
            raise BackendUnavailableError(
                f"the transformers backend needs torch and transformers ({err.name} is missing): "
                f"{INSTALL_HINT}"
            ) from None
        opts = self.options
        source = self._resolve_source()
        if opts.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        elif opts.device == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError("device 'cuda' was asked for, but torch sees no GPU")
        else:
            self.device = opts.device
        dtype = opts.dtype
        if dtype == "auto":
            dtype = "bfloat16" if self.device == "cuda" else "float32"
        offline = opts.local_files_only or _env_true("HF_HUB_OFFLINE")
        if not offline and not Path(source).exists() and not hub_reachable():
            # huggingface_hub would retry for minutes; the local cache is all there is
            log.warning("the hub is unreachable; looking for %r in the local cache", source)
            offline = True
        hub = {
            "revision": opts.revision,
            "local_files_only": offline,
            "trust_remote_code": opts.trust_remote_code,
        }
        log.info("loading %s", source)
        bars = transformers.utils.logging
        showing = bars.is_progress_bar_enabled()
        bars.disable_progress_bar()  # its bar on stderr would break our output's lines
        try:
            self.processor = transformers.AutoProcessor.from_pretrained(source, **hub)
            model_kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype), **hub}
            if opts.attn_implementation:
                model_kwargs["attn_implementation"] = opts.attn_implementation
            model = transformers.AutoModelForImageTextToText.from_pretrained(source, **model_kwargs)
        except (OSError, ValueError, KeyError) as err:
            raise BackendUnavailableError(_load_error(self.options.model, source, err)) from None
        finally:
            if showing:
                bars.enable_progress_bar()
        self.model = model.to(self.device).eval()
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.tokenizer is None or not getattr(self.tokenizer, "is_fast", False):
            raise BackendUnavailableError(
                f"model {opts.model!r}: its processor has no fast tokenizer, which "
                "constrained decoding needs"
            )
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if opts.constrained:
            from . import guidance

            vocab = int(self.model.get_output_embeddings().weight.shape[0])
            self.guided = guidance.guided_tokenizer(self.tokenizer, vocab, self._eos_ids())

    def _resolve_source(self) -> str:
        name = self.options.model
        if name in TINY_MODELS:
            from .tiny import tiny_model_path

            log.warning(RANDOM_WEIGHTS_WARNING.format(name=name))
            self.model_name = f"{name} (random weights)"
            return str(tiny_model_path(name))
        path = Path(name).expanduser()
        looks_local = name.startswith((".", "/", "~")) or path.exists()
        if looks_local and not (path / "config.json").is_file():
            raise BackendUnavailableError(
                f"model {name!r}: no checkpoint there (expected a directory with config.json)"
            )
        return str(path) if looks_local else name

    def _eos_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        ids = eos if isinstance(eos, list) else [eos]
        return [int(i) for i in ids if i is not None]

    def release(self) -> None:
        self.model = self.processor = self.tokenizer = self.guided = None

    # -- prompts ---------------------------------------------------------------------------
    def prompt_text(self, compiled: CompiledPolicy, mode: Mode = "full") -> str:
        """The exact text the model gets (image placeholder unexpanded), prefix included."""
        key = f"{compiled.hash}:{mode}"
        if key not in self._prompts:
            conversation = [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": compiled.prompt}],
                }
            ]
            text = self.processor.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=False
            )
            self._prompts[key] = text + compiled.layout_for(mode).prefix()
        return self._prompts[key]

    def rating_tokens(self, compiled: CompiledPolicy) -> tuple[int, int]:
        """The first token of "Safe" and of "Unsafe" where the model writes the rating."""
        if compiled.hash not in self._rating_tokens:
            firsts = []
            for rating in ("Safe", "Unsafe"):
                text = compiled.continuation(rating)
                firsts.append(self.tokenizer.encode(text, add_special_tokens=False)[0])
            self._rating_tokens[compiled.hash] = (firsts[0], firsts[1])
        return self._rating_tokens[compiled.hash]

    def _inputs(self, batch: Batch, mode: Mode) -> Any:
        import torch

        texts = [self.prompt_text(batch.compiled, mode)] * len(batch)
        images = [image.image for image in batch.images]
        inputs = self.processor(images=images, text=texts, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs and self.model.dtype != torch.float32:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def decoding(self) -> dict[str, Any]:
        """How answers are decoded, as verdicts record it."""
        opts = self.options
        if opts.greedy:
            return {"method": "greedy"}
        found: dict[str, Any] = {"method": "sampling", "temperature": opts.temperature}
        found |= {"top_p": opts.top_p, "top_k": opts.top_k, "seed": opts.seed}
        return found

    # -- generation ------------------------------------------------------------------------
    def generate(self, batch: Batch) -> list[Generation]:
        if not batch.images:
            return []
        if self.model is None:
            raise BackendError("the transformers backend was used before load()")
        with self._lock:  # one model, one batch at a time (also under aassess_many)
            if batch.mode == "score":
                return self._score(batch)
            return self._decode(batch, batch.mode)

    def _decode(self, batch: Batch, mode: Mode) -> list[Generation]:
        import torch
        from transformers import LogitsProcessorList

        from . import guidance

        opts = self.options
        compiled = batch.compiled
        budget = opts.max_new_tokens or batch.budget
        if self.guided is not None:
            floor = guidance.minimum_budget(compiled, mode)
            if budget < floor and (compiled.hash, mode) not in self._raised:
                self._raised.add((compiled.hash, mode))
                log.warning(
                    "token budget %d raised to %d for mode %s: a complete answer of policy "
                    "%r can need that many",
                    budget,
                    floor,
                    mode,
                    compiled.policy.id,
                )
            budget = max(budget, floor)
        started = time.perf_counter()
        try:
            inputs = self._inputs(batch, mode)
        except (ValueError, RuntimeError, TypeError) as err:
            if len(batch) > 1:  # one image the processor refuses must not fail its batch
                return [g for image in batch for g in self._decode(batch.subset([image]), mode)]
            return [Generation(error=f"processor failed: {err}", model=self.model_name)]
        matchers: list[Any] = [
            guidance.matcher_for(compiled, mode, self.guided) if self.guided else None
            for _ in batch.images
        ]
        processor = guidance.GrammarProcessor(
            matchers, self.guided, self.rating_tokens(compiled), budget
        )
        sampling: dict[str, Any] = {"do_sample": False}
        if not opts.greedy:
            sampling = {
                "do_sample": True,
                "temperature": opts.temperature,
                "top_p": opts.top_p,
                "top_k": opts.top_k,
            }
        if opts.seed is not None:
            torch.manual_seed(opts.seed)
        prompt_length = inputs["input_ids"].shape[1]
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                logits_processor=LogitsProcessorList([processor]),
                max_new_tokens=budget,
                num_beams=1,
                eos_token_id=self._eos_ids(),
                pad_token_id=self.tokenizer.pad_token_id,
                **sampling,
            )
        self.tokens_generated += processor.steps * len(batch)
        seconds = time.perf_counter() - started
        prefix = compiled.layout_for(mode).prefix()
        results = []
        for row in range(len(batch)):
            new = output[row, prompt_length:].tolist()
            text = prefix + self.tokenizer.decode(new, skip_special_tokens=True)
            error = processor.errors[row]
            results.append(
                Generation(
                    text=text,
                    p_unsafe=processor.p_unsafe[row],
                    model=self.model_name,
                    error=error,
                    decoding=self.decoding(),
                    timings={"model": seconds / len(batch)},
                )
            )
        return results

    def _score(self, batch: Batch) -> list[Generation]:
        """One image at a time (no padding): prompt + prefix, then the labels from the cache."""
        import torch

        results = []
        compiled = batch.compiled
        for image in batch:
            started = time.perf_counter()
            safe, unsafe = self.rating_tokens(compiled)
            try:
                inputs = self._inputs(batch.subset([image]), "score")
            except (ValueError, RuntimeError, TypeError) as err:
                results.append(Generation(error=f"processor failed: {err}", model=self.model_name))
                continue
            want_categories = self.options.category_scores
            with torch.inference_mode():
                out = self.model(**inputs, use_cache=want_categories, logits_to_keep=1)
                logits = out.logits[0, -1].float()
                p_unsafe = float(torch.softmax(logits[[safe, unsafe]], dim=-1)[1])
                scores = None
                if want_categories:
                    trie = self._label_trie(compiled)
                    scores = trie.score(self.model, _cache_of(out), logits)
            results.append(
                Generation(
                    p_unsafe=p_unsafe,
                    category_scores=scores,
                    model=self.model_name,
                    decoding={"score": "one forward pass, temperature 1"},
                    timings={"model": time.perf_counter() - started},
                )
            )
        return results

    def _label_trie(self, compiled: CompiledPolicy) -> _Trie:
        if compiled.hash not in self._label_tries:
            trie = _Trie()
            for label in compiled.unsafe_labels:  # after "Unsafe", only a violated category
                category_id = compiled.labels[label]
                text = compiled.continuation("Unsafe", label)
                trie.add(self.tokenizer.encode(text, add_special_tokens=False), category_id)
            self._label_tries[compiled.hash] = trie
        return self._label_tries[compiled.hash]


class _Trie:
    """Token sequences of 'Unsafe", "category": "<label>"' continuations, shared prefixes merged.

    Scoring walks it over the prompt's KV cache: only nodes where the labels branch need logits,
    and a chain of forced tokens up to the next branch is one forward pass.
    """

    def __init__(self) -> None:
        self.children: dict[int, _Trie] = {}
        self.label: str | None = None
        self.count = 0

    def add(self, tokens: list[int], label: str) -> None:
        node = self
        node.count += 1
        for token in tokens:
            node = node.children.setdefault(token, _Trie())
            node.count += 1
        node.label = label

    def labels(self) -> list[str]:
        found = [self.label] if self.label is not None else []
        for child in self.children.values():
            found.extend(child.labels())
        return found

    def score(self, model: Any, cache: Any, logits: Any) -> dict[str, float]:
        result: dict[str, float] = {}
        self._walk(model, cache, logits, 1.0, result)
        return result

    def _walk(
        self, model: Any, cache: Any, logits: Any, prob: float, out: dict[str, float]
    ) -> None:
        import torch

        tokens = list(self.children)
        probs = torch.softmax(logits[tokens].float(), dim=-1).tolist() if len(tokens) > 1 else [1.0]
        for token, p in zip(tokens, probs, strict=True):
            child = self.children[token]
            if child.count == 1:  # one label below: the rest of its tokens are forced
                (label,) = child.labels()
                out[label] = prob * p
                continue
            chain = [token]
            node = child
            while len(node.children) == 1 and node.label is None:
                (next_token,) = node.children
                chain.append(next_token)
                node = node.children[next_token]
            length = cache.get_seq_length()
            step = model(
                input_ids=torch.tensor([chain], device=model.device),
                use_cache=True,
                logits_to_keep=1,
                **{_cache_argument(model): cache},
            )
            node._walk(model, _cache_of(step), step.logits[0, -1], prob * p, out)
            added = cache.get_seq_length() - length
            if added:
                cache.crop(-added)  # transformers 5: a negative count removes that many tokens


def _cache_argument(model: Any) -> str:
    """The KV-cache keyword of the model's forward: `cache` from transformers 5.25 on (which
    deprecates `past_key_values` with a warning on every call), `past_key_values` before."""
    import inspect

    forward = type(model).forward
    if forward not in _CACHE_ARGUMENTS:
        names = inspect.signature(forward).parameters
        _CACHE_ARGUMENTS[forward] = "cache" if "cache" in names else "past_key_values"
    return _CACHE_ARGUMENTS[forward]


_CACHE_ARGUMENTS: dict[Any, str] = {}


def _cache_of(output: Any) -> Any:
    """The KV cache of a model output, under either name (see `_cache_argument`)."""
    found = getattr(output, "cache", None)
    return found if found is not None else output.past_key_values


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the hub ($HF_ENDPOINT, default huggingface.co) opens within
    `timeout` seconds. With a proxy configured we cannot tell, and say yes."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout).close()
    except OSError:
        return False
    return True


def _load_error(name: str, source: str, err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if Path(source).exists():
        return f"cannot load model {name!r} from {source}: {first}"
    return (
        f"cannot load model {name!r}: not in the local cache and the hub is unreachable or "
        f"has no such model ({first}). Pass a local checkpoint directory with --model PATH, "
        "or --model tiny-random to try the pipeline offline (random weights)"
    )


@hookimpl
def register_backends(register: Register[type[Backend]]) -> None:
    register(TransformersBackend)
