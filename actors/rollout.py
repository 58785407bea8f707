"""RolloutWorker: the reasoner's vLLM engine; samples G completions per pair and loads new weights in place.

A plain class; the driver makes it a Ray actor (`ray.remote(RolloutWorker).options(...)`, in
`pipeline/placement.py`). Token-in, token-out: each `RolloutGroup` carries the exact prompt token ids the
engine sampled from (image placeholders expanded), and the run of image placeholders of each image is
checked against the checkpoint's own image processor, so the learner recomputes logprobs on the same
tokens (a mismatch raises; it is never truncated silently).

Logprobs are those of the distribution actually sampled from (vLLM `processed_logprobs`: after the
vision-token ban, temperature and top-p), so with `temperature != 1` or `top_p < 1` the learner must score
with the same temperature; the ban itself shifts them by log(1 - p(vision tokens)), negligible for a
trained model.

Weights: `load_weights(bucket)` any number of times, then `finish_weight_update(version)`; buckets are
subsets of the parameters under their `model.safetensors` names, and may split a fused layer (see
`actors/engine.py`). Generating between the two is refused (the model is half-updated).

Integration test: `pytest -m integration tests/integration/test_rollout.py`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from actors.engine import WEIGHT_UPDATE_EXTENSION, build_engine
from pipeline.config import EngineConfig
from pipeline.prompts import IMAGE_PAD, VISION_TOKENS, listener_p_image_1, reasoner_prompt
from pipeline.types import Completion, PreferencePair, RolloutGroup


class RolloutWorker:
    """One reasoner engine at policy version `policy_version()`."""

    def __init__(self, model_path: str, engine: EngineConfig, seed: int = 0, num_threads: int = 1,
                 mm_processor_kwargs: dict | None = None, trust_remote_code: bool = False,
                 weight_transfer: str = "") -> None:
        from transformers import AutoImageProcessor

        # in_process: the Ray-actor-side transports load buckets into the engine core of this process.
        # weight_transfer 'nccl': vLLM's own receiver in each vLLM worker (actors/weight_sync_nccl.py).
        self._llm = build_engine(model_path, engine, seed, num_threads=num_threads,
                                 mm_processor_kwargs=mm_processor_kwargs, trust_remote_code=trust_remote_code,
                                 in_process=True, weight_transfer=weight_transfer,
                                 logprobs_mode="processed_logprobs", worker_extension_cls=WEIGHT_UPDATE_EXTENSION)
        self._image_processor = AutoImageProcessor.from_pretrained(
            model_path, trust_remote_code=trust_remote_code, **(mm_processor_kwargs or {}))
        self._tokenizer = self._llm.get_tokenizer()
        self._image_pad_id = self._tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        # Never sample vision tokens (see prompts.VISION_TOKENS); -100 leaves them ~e^-100 of the mass.
        self._no_vision_tokens = {int(self._tokenizer.convert_tokens_to_ids(t)): -100.0 for t in VISION_TOKENS}
        self._version = 0
        self._updating = False
        self._vllm_session = False  # the open update is vLLM's own (nccl transport), not the extension's
        self._transfer_joined = False  # in a vLLM weight-transfer group (nccl transport)

    def ready(self) -> bool:
        return True

    def policy_version(self) -> int:
        return self._version

    def generate(self, pairs: list[PreferencePair], group_size: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, min_new_tokens: int = 0) -> list[RolloutGroup]:
        """One `RolloutGroup` of `group_size` completions per pair, in the order of `pairs`.

        `min_new_tokens` suppresses the end of sequence before that many tokens (benchmarks set it to
        `max_new_tokens` for an exact token count).
        """
        from vllm import SamplingParams

        if self._updating:
            raise RuntimeError("a weight update is in progress: call finish_weight_update(version) first")
        if not pairs:
            return []
        # vLLM refuses n > 1 with greedy decoding; the G greedy completions are one, repeated.
        n = 1 if temperature == 0 else group_size
        params = SamplingParams(n=n, max_tokens=max_new_tokens, min_tokens=min_new_tokens,
                                temperature=temperature, top_p=top_p, logprobs=0, flat_logprobs=True, detokenize=False,
                                logit_bias=self._no_vision_tokens)
        requests = [reasoner_request(p) for p in pairs]
        outputs = self._llm.generate(requests, params, use_tqdm=False)
        return [self._group(pair, output, group_size) for pair, output in zip(pairs, outputs, strict=True)]

    def _group(self, pair: PreferencePair, output: Any, group_size: int) -> RolloutGroup:
        prompt_ids = np.asarray(output.prompt_token_ids, dtype=np.int64)
        self._check_image_tokens(pair, prompt_ids)
        samples = output.outputs * (group_size // len(output.outputs))
        completions = tuple(self._completion(pair.pair_id, index, sample) for index, sample in enumerate(samples))
        return RolloutGroup(pair=pair, prompt_token_ids=prompt_ids, completions=completions,
                            policy_version=self._version)

    def _completion(self, pair_id: str, index: int, sample: Any) -> Completion:
        token_ids = np.asarray(sample.token_ids, dtype=np.int64)
        logprobs = sampled_logprobs(sample.token_ids, sample.logprobs)
        # Decoded here, whole: vLLM's streaming detokenizer holds back a trailing partial UTF-8 character.
        text = self._tokenizer.decode(sample.token_ids, skip_special_tokens=True)
        return Completion(pair_id=pair_id, completion_index=index, policy_version=self._version,
                          token_ids=token_ids, logprobs=logprobs, text=text,
                          finish_reason=str(sample.finish_reason))

    def _check_image_tokens(self, pair: PreferencePair, prompt_ids: np.ndarray) -> None:
        """Each image's run of placeholder tokens must be exactly what the processor makes of it."""
        grid_thw = self._image_processor(images=[pair.image_1, pair.image_2], return_tensors="np")["image_grid_thw"]
        expected = [int(np.prod(thw)) // self._image_processor.merge_size ** 2 for thw in grid_thw]
        found = placeholder_runs(prompt_ids, self._image_pad_id)
        if found != expected:
            raise ValueError(f"pair {pair.pair_id}: image placeholder tokens per image {found} != the "
                             f"processor's {expected} (engine and processor disagree on image size)")

    def answer_p_image_1(self, pairs: list[PreferencePair], prefixes: list[str]) -> list[float]:
        """p(image 1) at the answer position: the reasoner prompt plus `prefixes[i]` (a completion up to its
        answer digit), then one step reading both answer tokens' logprobs, renormalised over the two
        (`prompts.listener_p_image_1`, the listener's rule). `evaluate --anchor` ranks images by it."""
        from vllm import SamplingParams

        from actors.listener import answer_token_ids

        ids = answer_token_ids(self._tokenizer)
        # temperature 1, no bias: the processed logprobs are the model's own distribution
        params = SamplingParams(max_tokens=1, temperature=1.0, logprob_token_ids=list(ids), detokenize=False)
        requests = [{**reasoner_request(pair), "prompt": reasoner_request(pair)["prompt"] + prefix}
                    for pair, prefix in zip(pairs, prefixes, strict=True)]
        outputs = self._llm.generate(requests, params, use_tqdm=False) if requests else []
        first = [output.outputs[0].logprobs[0] for output in outputs]  # token id -> Logprob, first position
        return [listener_p_image_1(step[ids[0]].logprob, step[ids[1]].logprob) for step in first]

    # ---- weights ---------------------------------------------------------------------------------
    # The transports of actors/weight_sync.py call `load_bucket_arrays` (object store),
    # `load_shared_bucket` (shared memory) or `init_weight_group` + `receive_weight_bucket` (collective);
    # each returns the seconds the engine spent loading, and all go through `load_weights`. The nccl
    # transport calls `init_weight_transfer` + `receive_weight_transfer`: vLLM's own session and receiver.

    def init_weight_transfer(self, init_info: dict) -> None:
        """Join vLLM's weight-transfer NCCL group (every vLLM worker of this engine; the nccl transport),
        leaving the previous one first (a new group forms after a rollout worker restarted)."""
        if self._transfer_joined:
            self._llm.shutdown_weight_transfer_engine()
        self._llm.init_weight_transfer_engine({"init_info": init_info})
        self._transfer_joined = True

    def receive_weight_transfer(self, update_info: dict) -> float:
        """Receive one bucket through vLLM's weight-transfer engine and load it; seconds from the call to
        the bucket loaded (it includes waiting for learner rank 0's broadcast)."""
        import time

        start = time.perf_counter()
        if not self._updating:
            self._llm.start_weight_update()  # vLLM's layer-wise reload session, closed by finish_weight_update
            self._updating = self._vllm_session = True
        self._llm.update_weights({"update_info": update_info})
        return time.perf_counter() - start

    def init_weight_group(self, host: str, port: int, rank: int, world_size: int, backend: str) -> None:
        """Join the weight-sync process group of learner rank 0 (group rank 0) and the rollout workers."""
        from actors.weight_group import CollectiveReceiver

        self._weight_receiver = CollectiveReceiver(host, port, rank, world_size, backend)

    def receive_weight_bucket(self, meta: Any) -> float:
        """Receive one broadcast bucket (`WeightBucketMeta` says what it holds) and load it; engine seconds."""
        return self._timed_load(self._weight_receiver.receive(meta))

    def load_bucket_arrays(self, meta: Any, arrays: list[Any]) -> float:
        """Load one bucket sent as a byte array per tensor (the object store's, read in place); engine seconds."""
        from actors.weight_buckets import from_byte_arrays

        return self._timed_load(from_byte_arrays(meta, arrays))

    def load_shared_bucket(self, path: str, meta: Any) -> tuple[float, bool]:
        """Load one bucket from a shared-memory staging file, read in place; (engine seconds, whether the
        engine still holds views into the file afterwards: a fused layer waiting for its other parts)."""
        import torch

        from actors.weight_buckets import read_shared_bucket

        named = read_shared_bucket(path, meta)
        storage = named[0][1].untyped_storage() if named else None
        seconds = self._timed_load(named)
        if storage is None:
            return seconds, False
        weak = storage._weak_ref()
        del named, storage
        pinned = not torch.UntypedStorage._expired(weak)
        torch.UntypedStorage._free_weak_ref(weak)
        return seconds, pinned

    def _timed_load(self, named_tensors: list[tuple[str, Any]]) -> float:
        import time

        start = time.perf_counter()
        self.load_weights(named_tensors)
        return time.perf_counter() - start

    def load_weights(self, named_tensors: list[tuple[str, Any]]) -> int:
        """Load one bucket (checkpoint names) in place; returns the bytes loaded. Call again for more."""
        if not self._updating:
            self._llm.collective_rpc("lgrpo_begin_update")
            self._updating = True
        return int(sum(self._llm.collective_rpc("lgrpo_load_bucket", args=(list(named_tensors),))))

    def finish_weight_update(self, version: int) -> None:
        """Close the update: reset the encoder and prefix caches, then serve as `version`."""
        if not self._updating:
            self._llm.collective_rpc("lgrpo_begin_update")  # an empty update still resets the caches
        try:
            self._close_update()
        finally:
            self._updating = self._vllm_session = False
            # Cached vision embeddings and KV blocks were computed by the old weights.
            self._llm.llm_engine.reset_encoder_cache()
            self._llm.reset_prefix_cache()
        self._version = int(version)

    def abort_weight_update(self) -> None:
        """Close an update a failed sync left open; the model keeps its last complete weights and version."""
        if not self._updating:
            return
        try:
            self._close_update()
        except Exception:  # half-loaded layers raise and keep their old weights: what an abort wants
            pass
        finally:
            self._updating = self._vllm_session = False
            self._llm.llm_engine.reset_encoder_cache()
            self._llm.reset_prefix_cache()

    def _close_update(self) -> None:
        if self._vllm_session:
            self._llm.finish_weight_update()
            self._llm.collective_rpc("lgrpo_reset_caches")
        else:
            self._llm.collective_rpc("lgrpo_finish_update")

    def update_weights(self, named_tensors: list[tuple[str, Any]], version: int) -> int:
        """`load_weights` and `finish_weight_update` in one call; returns the bytes loaded."""
        num_bytes = self.load_weights(named_tensors)
        self.finish_weight_update(version)
        return num_bytes


def reasoner_request(pair: PreferencePair) -> dict:
    """The vLLM request for one pair: the reasoner prompt and the two images, in prompt order."""
    return {"prompt": reasoner_prompt(pair.prompt), "multi_modal_data": {"image": [pair.image_1, pair.image_2]}}


def sampled_logprobs(token_ids: list[int], logprobs: Any) -> np.ndarray:
    """Per-token logprob of each sampled token, from vLLM's sample logprobs with `logprobs=0`.

    `flat_logprobs=True` returns one flat list (one entry per position when only the sampled token is asked
    for), read at once: no Logprob object and dict per token (32k of them per 256 x 128-token rollout).
    Any other layout is read position by position.
    """
    flat_ids, flat_values = getattr(logprobs, "token_ids", None), getattr(logprobs, "logprobs", None)
    if flat_ids is not None and list(flat_ids) == list(token_ids):
        return np.asarray(flat_values, dtype=np.float32)
    return np.asarray([step[token].logprob for token, step in zip(token_ids, logprobs, strict=True)],
                      dtype=np.float32)


def placeholder_runs(token_ids: np.ndarray, pad_id: int) -> list[int]:
    """Lengths of the maximal runs of `pad_id` in `token_ids` ([P] -> one length per image)."""
    is_pad = np.concatenate([[False], np.asarray(token_ids) == pad_id, [False]])
    edges = np.flatnonzero(np.diff(is_pad.astype(np.int8)))  # starts and ends, alternating
    return [int(end - start) for start, end in zip(edges[::2], edges[1::2])]
