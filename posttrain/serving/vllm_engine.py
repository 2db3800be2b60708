"""The vLLM engine: the same protocol answered by vLLM, with LoRA adapters as runtime ``LoRARequest`` s.

Picked where vLLM is installed and a GPU is present (``POSTTRAIN_SERVE_ENGINE=auto``), or by name
(``vllm``; vLLM's CPU build runs it too, which is how the tests check it). vLLM batches and
schedules; this module keeps everything a client sees identical to the transformers engine: the
prompt is tokenized here with the checkpoint's own tokenizer and chat template (``prompts``), vLLM
gets token ids and gives token ids back (``skip_tokenizer_init``), and each choice's text, stop
strings, EOS and finish reason go through the same ``loop.send_token``. Each choice is its own vLLM
request (seed = request seed + index, as in the transformers engine), so a choice that reaches a
stop string is aborted alone.

One base is loaded at a time (a vLLM engine serves one model): a request for another base waits
until the running requests end, then the base is swapped. A loaded base runs one warm-up token
first, so a model vLLM cannot run (an attention shape its kernels lack) is refused as unloadable
instead of failing later. Adapters vLLM does not serve (DoRA, ``modules_to_save``, LoRA bias, a
rank above ``max_lora_rank``) are refused by name; the transformers engine serves them.
"""

from __future__ import annotations

import gc
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.domain.serving import BAD_REQUEST, StartedEvent, TokenEvent
from posttrain.serving.batch import row_seed
from posttrain.serving.loop import EngineLoop, Ticket, finish_choice, send_token
from posttrain.serving.models import ModelUnloadable, folder_weight_bytes, max_positions
from posttrain.serving.prompts import RequestRefused, Tokenizers, TokenizerUnloadable, check_fits, prompt_ids
from posttrain.serving.text import TextStream

log = logging.getLogger("posttrain.serving")

#: The engine thread drives vLLM itself; its engine core runs in this process, not a child of its own.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@dataclass
class VllmChoice:
    """One choice of a ticket: one vLLM request."""

    ticket: Ticket
    index: int
    text: TextStream
    eos_ids: frozenset[int]
    max_tokens: int
    adapter_path: str | None
    generated: int = 0


class VllmEngine(EngineLoop):
    """One vLLM engine for the loaded base; its adapters are loaded into it by path, least recently used first out."""

    name = "vllm"

    def __init__(self, *, memory_bytes: int, max_batch: int = 32, max_waiting: int = 1024, device: str = "cpu",
                 kv_cache_bytes: int = 1024**3, max_lora_rank: int = 64, max_loras: int = 8) -> None:
        super().__init__(max_batch=max_batch, max_waiting=max_waiting)
        self.budget = memory_bytes
        self.device = device
        self.kv_cache_bytes = kv_cache_bytes
        self.max_lora_rank = max_lora_rank
        self.max_loras = max_loras
        self._llm: Any = None  #: vllm.LLM of the loaded base
        self._base: str | None = None
        self._base_bytes = 0
        self._positions: int | None = None
        self._base_eos: frozenset[int] = frozenset()
        self._loads: dict[str, int] = {}
        self.base_loads_total = 0
        self._adapters: OrderedDict[str, tuple[Any, int]] = OrderedDict()  #: path -> (LoRARequest, bytes)
        self._next_lora_id = 1
        self._choices: dict[str, VllmChoice] = {}  #: vLLM request id -> its choice
        self._next_request = 0
        self._tokenizers = Tokenizers()

    # -- the loop's hooks -----------------------------------------------------------------------
    def _busy(self) -> bool:
        return bool(self._choices)

    def _running_tickets(self) -> list[Ticket]:
        return list({id(c.ticket): c.ticket for c in self._choices.values()}.values())

    def _drop_running(self) -> None:
        if self._llm is not None and self._choices:
            self._llm.llm_engine.abort_request(list(self._choices))
        self._choices.clear()

    def _in_use(self, path: str) -> bool:
        return any(path in (c.ticket.request.model.base_path, c.adapter_path) for c in self._choices.values())

    def _release(self, path: str) -> bool:
        self._tokenizers.forget(path)
        if path == self._base:
            self._unload_base()
            return True
        if path in self._adapters:
            self._remove_adapter(path)
            return True
        return False

    def _model_stats(self) -> dict[str, Any]:
        bases = [] if self._base is None else [{"path": self._base, "bytes": self._base_bytes,
                                                "loads": self._loads[self._base], "stack_bytes": 0}]
        adapters = [{"path": path, "base_path": self._base, "bytes": size}
                    for path, (_, size) in self._adapters.items()]
        return {"bases": bases, "adapters": adapters, "base_loads_total": self.base_loads_total,
                "memory_bytes": self._used_bytes(), "memory_budget": self.budget,
                "kv_cache_bytes": self.kv_cache_bytes}

    def _active_rows(self) -> int:
        return len(self._choices)

    def _close(self) -> None:
        self._unload_base()

    # -- admission ------------------------------------------------------------------------------
    def _admit(self) -> None:
        while self._waiting:
            ticket = self._waiting[0]
            if ticket.cancelled:
                self._waiting.popleft()
                ticket.end()
                continue
            request = ticket.request
            if request.model.base_path != self._base and self._choices:
                break  # another base's turn comes when the running requests end
            if self._choices and len(self._choices) + request.sampling.n > self.max_batch:
                break
            try:
                if request.model.base_path != self._base:
                    self._load_base(request.model.base_path)
                lora = self._adapter(request.model.adapter_path)
                tokenizer = self._tokenizer(request.model.tokenizer_path)
                ids = prompt_ids(tokenizer, request)
                check_fits(ids, request.sampling.max_tokens, self._positions)
                self._add_choices(ticket, ids, lora, tokenizer)
            except Exception as exc:  # noqa: BLE001 - unloadable, refused or unforeseen: it alone fails
                self._refuse_first(exc)
                continue
            self._waiting.popleft()
            ticket.rows_left = request.sampling.n
            self._mark_admitted(ticket)
            ticket.emit(StartedEvent(prompt_tokens=len(ids)))

    def _tokenizer(self, path: str) -> Any:
        try:
            return self._tokenizers.get(path)
        except TokenizerUnloadable as exc:
            raise ModelUnloadable(str(exc)) from exc

    def _add_choices(self, ticket: Ticket, ids: list[int], lora: Any, tokenizer: Any) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        sampling = ticket.request.sampling
        eos = set(self._base_eos)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)

        def decode(token_ids: Any) -> str:
            return str(tokenizer.decode(token_ids, skip_special_tokens=True))

        added: list[str] = []
        try:
            for index in range(sampling.n):
                params = SamplingParams(
                    n=1, max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                    seed=row_seed(sampling.seed, index), stop_token_ids=sorted(eos), detokenize=False,
                    logprobs=sampling.top_logprobs if sampling.logprobs else None,
                    output_kind=RequestOutputKind.DELTA)
                request_id = f"r{self._next_request}"
                self._next_request += 1
                self._llm.llm_engine.add_request(request_id, TokensPrompt(prompt_token_ids=ids), params,
                                                 lora_request=lora)
                added.append(request_id)
                self._choices[request_id] = VllmChoice(
                    ticket=ticket, index=index, text=TextStream(decode, sampling.stop), eos_ids=frozenset(eos),
                    max_tokens=sampling.max_tokens, adapter_path=ticket.request.model.adapter_path)
        except (ValueError, TypeError) as exc:  # vLLM's own checks of the request
            if added:
                self._llm.llm_engine.abort_request(added)
            for request_id in added:
                self._choices.pop(request_id, None)
            raise RequestRefused(BAD_REQUEST, f"vLLM refused the request: {exc}") from exc

    # -- generation -----------------------------------------------------------------------------
    def _step(self) -> None:
        self._abort_cancelled()
        if not self._choices:
            return
        assert self._base is not None
        self._count_mix(self._base, [c.adapter_path for c in self._choices.values()])
        for output in self._llm.llm_engine.step():
            choice = self._choices.get(output.request_id)
            if choice is None:
                continue
            if not self._take(choice, output):
                self._choices.pop(output.request_id, None)
                if not output.finished:  # a stop string, which vLLM did not see
                    self._llm.llm_engine.abort_request([output.request_id])

    def _take(self, choice: VllmChoice, output: Any) -> bool:
        """Send the tokens one step of vLLM added to ``choice``; False when the choice is finished."""
        for completion in output.outputs:
            logprobs = completion.logprobs or []
            for position, token in enumerate(completion.token_ids):
                choice.generated += 1
                logprob, top = self._logprobs(choice, token, logprobs[position] if position < len(logprobs) else None)
                if not send_token(choice, token, logprob, top):
                    return False
            if completion.finish_reason is not None:  # vLLM ended it without a token send_token ends on
                rest = choice.text.flush()
                if rest and completion.token_ids:
                    choice.ticket.emit(TokenEvent(index=choice.index, text=rest, token_id=completion.token_ids[-1]))
                finish_choice(choice, "length" if completion.finish_reason == "length" else "stop")
                return False
        return not output.finished

    def _logprobs(self, choice: VllmChoice, token: int, entry: Any) -> tuple[float | None, Any]:
        if entry is None or not choice.ticket.request.sampling.logprobs:
            return None, None
        chosen = entry.get(token)
        logprob = float(chosen.logprob) if chosen is not None else None
        count = choice.ticket.request.sampling.top_logprobs
        if not count:
            return logprob, None
        tokenizer = self._tokenizer(choice.ticket.request.model.tokenizer_path)
        ranked = sorted(((value.rank, token_id, value.logprob) for token_id, value in entry.items()
                         if value.rank is not None and value.rank <= count))
        return logprob, tuple((str(tokenizer.decode([token_id])), float(value)) for _, token_id, value in ranked)

    def _abort_cancelled(self) -> None:
        gone = [request_id for request_id, c in self._choices.items() if c.ticket.cancelled]
        if not gone:
            return
        self._llm.llm_engine.abort_request(gone)
        for request_id in gone:
            choice = self._choices.pop(request_id)
            self.cancelled_rows_total += 1
            choice.ticket.end()

    # -- models ---------------------------------------------------------------------------------
    def _used_bytes(self) -> int:
        return self._base_bytes + sum(size for _, size in self._adapters.values())

    def _load_base(self, path: str) -> None:
        size = folder_weight_bytes(path)
        if size > self.budget:
            raise ModelUnloadable(f"the model at {path} takes {size} bytes, more than the serving memory budget "
                                  f"({self.budget} bytes, POSTTRAIN_SERVE_MEMORY_BYTES)")
        self._unload_base()
        from transformers import AutoConfig, GenerationConfig
        from vllm import LLM

        try:
            config = AutoConfig.from_pretrained(path)
            llm = LLM(model=path, skip_tokenizer_init=True, enable_lora=True, max_lora_rank=self.max_lora_rank,
                      max_loras=self.max_loras, max_num_seqs=self.max_batch, kv_cache_memory_bytes=self.kv_cache_bytes,
                      enforce_eager=self.device == "cpu", dtype=_checkpoint_dtype(config), seed=0,
                      trust_remote_code=False)
        except Exception as exc:  # the folder's fault, or a model vLLM does not know
            raise ModelUnloadable(f"vLLM cannot load the model at {path}: {exc}") from exc
        self._llm, self._base, self._base_bytes = llm, path, size
        self._positions = max_positions(config)
        try:
            generation = GenerationConfig.from_pretrained(path)
            eos = generation.eos_token_id
        except OSError:  # no generation_config.json
            eos = getattr(config, "eos_token_id", None)
        self._base_eos = frozenset([eos] if isinstance(eos, int) else (eos or []))
        try:
            self._warm_up()
        except Exception as exc:  # vLLM loaded it but cannot run it
            self._unload_base()
            raise ModelUnloadable(f"vLLM cannot run the model at {path}: {exc}") from exc
        self._loads[path] = self._loads.get(path, 0) + 1
        self.base_loads_total += 1
        log.info("base loaded", extra={"action": "serve_base_loaded", "path": path, "bytes": size, "engine": "vllm"})

    def _warm_up(self) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        engine = self._llm.llm_engine
        engine.add_request("warm-up", TokensPrompt(prompt_token_ids=[0]), SamplingParams(max_tokens=1, detokenize=False))
        while engine.has_unfinished_requests():
            engine.step()

    def _unload_base(self) -> None:
        if self._llm is None:
            return
        llm, self._llm = self._llm, None
        self._base, self._base_bytes, self._positions = None, 0, None
        self._adapters.clear()
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # already down
            log.warning("vLLM engine shutdown failed", exc_info=True)
        del llm
        gc.collect()
        if self.device == "cuda":
            import torch

            torch.cuda.empty_cache()

    def _adapter(self, path: str | None) -> Any:
        """The adapter's LoRARequest, loaded into the engine on first use (unused ones evicted past the budget)."""
        if path is None:
            return None
        known = self._adapters.get(path)
        if known is not None:
            self._adapters.move_to_end(path)
            return known[0]
        self._check_adapter(path)
        size = folder_weight_bytes(path)
        in_use = {c.adapter_path for c in self._choices.values()}
        for old in [p for p in self._adapters if p not in in_use]:
            if self._used_bytes() + size <= self.budget:
                break
            self._remove_adapter(old)
        if self._used_bytes() + size > self.budget:
            raise ModelUnloadable(f"the adapter at {path} ({size} bytes) does not fit beside its base in the serving "
                                  f"memory budget ({self.budget} bytes, POSTTRAIN_SERVE_MEMORY_BYTES)")
        from vllm.lora.request import LoRARequest

        lora = LoRARequest(lora_name=f"adapter-{self._next_lora_id}", lora_int_id=self._next_lora_id, lora_path=path)
        self._next_lora_id += 1
        try:
            self._llm.llm_engine.add_lora(lora)
        except Exception as exc:  # a broken adapter folder, or one that does not match the base
            raise ModelUnloadable(f"vLLM cannot load the adapter at {path}: {exc}") from exc
        self._adapters[path] = (lora, size)
        return lora

    def _check_adapter(self, path: str) -> None:
        try:
            config = json.loads((Path(path) / "adapter_config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ModelUnloadable(f"no readable adapter_config.json at {path}: {exc}") from exc
        unserved = [what for what, present in (
            ("DoRA", config.get("use_dora")), ("modules_to_save", config.get("modules_to_save")),
            ("LoRA bias", config.get("bias", "none") != "none")) if present]
        rank = config.get("r", 0)
        rank = max([rank, *(config.get("rank_pattern") or {}).values()])
        if rank > self.max_lora_rank:
            unserved.append(f"rank {rank} > max_lora_rank {self.max_lora_rank} (POSTTRAIN_SERVE_MAX_LORA_RANK)")
        if unserved:
            raise ModelUnloadable(f"the vLLM engine does not serve this adapter ({', '.join(unserved)}); "
                                  "the transformers engine (POSTTRAIN_SERVE_ENGINE=transformers) does")

    def _remove_adapter(self, path: str) -> None:
        lora, _ = self._adapters.pop(path)
        if self._llm is not None:
            self._llm.llm_engine.remove_lora(lora.lora_int_id)


def _checkpoint_dtype(config: Any) -> str:
    """The dtype the checkpoint was saved in, which the transformers engine computes in too (vLLM's "auto"
    would turn float32 into bfloat16 on a CPU, and its answers would differ from the other engine's)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).removeprefix("torch.") if dtype is not None else ""
    return name if name in ("float32", "float16", "bfloat16") else "auto"
