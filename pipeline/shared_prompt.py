"""Each pair's prompt once per micro-batch, read by all its completions: attention over a shared prompt.

The G completions of a pair share their prompt (text and images). Laid out one sequence per row, the
learner runs the prompt's tokens through every layer G times; at the `bench.e2e` mid workload prompts are
45% of the tokens (96 of 215 per sequence), and with real images (hundreds of tokens each) far more. Here a
micro-batch is ONE row of segments: each prompt once, then the completions that read it, back to back,
nothing padded:

    row:  [ prompt A | A's completion 1 | A's completion 2 | prompt B | B's completion 1 | ... ]

Attention (`shared_prompt_attention`, registered with transformers as `SHARED_PROMPT_ATTENTION` and set on
the text model only) keeps every token to what it would see in a row of its own: a prompt token attends
causally within its prompt; a completion token attends to its whole prompt and causally within itself,
never to another completion. Positions (and Qwen2.5-VL's mrope positions) of a completion continue its
prompt's, as in its own sequence. So the logprobs and gradients are those of the one-sequence-per-row
layout (up to float rounding: the tests compare both), and the prompt's activations get the sum of its
completions' gradients, as they would from G separate copies.

Cost: the linear layers run P + sum(C) tokens instead of G (P + C). Attention runs as two batched SDPA
calls per layer, prompts [U, P, P] and completions [S, C, P + C], each padded only to the longest prompt /
completion of the micro-batch inside the attention (gathered by index, scattered back), so no [N, N] mask
over the whole row is ever built or computed.

    layout = SharedPromptLayout.from_spans(prompt_spans=[(0, 3)], completion_spans=[(3, 2, 0), (5, 1, 0)])
    # row of 6 positions: prompt 0-2; completion 0 at 3-4 and completion 1 at 5, both reading prompt 0
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

SHARED_PROMPT_ATTENTION = "listener_grpo_shared_prompt"


@dataclass(frozen=True)
class SharedPromptLayout:
    """Where each prompt (U of them) and each completion (S) sits in the micro-batch's one row, and the
    attention masks that follow (True: may attend). P / C: the longest prompt / completion."""

    prompt_index_UP: torch.Tensor  # [U, P] int64 row positions of each prompt's tokens (0 past its end)
    prompt_valid_UP: torch.Tensor  # [U, P] bool
    completion_index_SC: torch.Tensor  # [S, C] int64 row positions of each completion's tokens (0 past its end)
    completion_valid_SC: torch.Tensor  # [S, C] bool
    completion_prompt_S: torch.Tensor  # [S] int64: the prompt each completion reads
    prompt_mask_U1PP: torch.Tensor  # [U, 1, P, P] causal within the prompt
    completion_mask_S1CK: torch.Tensor  # [S, 1, C, P + C]: its whole prompt, then causal within itself
    row_of_valid_V: torch.Tensor  # [N] row position of each valid prompt slot, then each valid completion slot
    positions: int  # N, the row's length

    @classmethod
    def from_spans(cls, prompt_spans: Sequence[tuple[int, int]],
                   completion_spans: Sequence[tuple[int, int, int]]) -> "SharedPromptLayout":
        """`prompt_spans`: (start, length) of each prompt; `completion_spans`: (start, length, prompt) of each
        completion. Together they must cover the row 0..N-1 exactly once."""
        prompt_index_UP, prompt_valid_UP = _span_index(prompt_spans)
        completion_index_SC, completion_valid_SC = _span_index([(s, n) for s, n, _ in completion_spans])
        completion_prompt_S = torch.tensor([u for _, _, u in completion_spans], dtype=torch.int64)
        positions = sum(n for _, n in prompt_spans) + sum(n for _, n, _ in completion_spans)
        row_of_valid_V = torch.cat([prompt_index_UP[prompt_valid_UP], completion_index_SC[completion_valid_SC]])
        if not torch.equal(row_of_valid_V.sort().values, torch.arange(positions)):
            raise ValueError("prompt and completion spans must cover the row 0..N-1 exactly once")
        P, C = prompt_index_UP.shape[1], completion_index_SC.shape[1]
        causal_PP = torch.ones(P, P, dtype=torch.bool).tril()
        causal_CC = torch.ones(C, C, dtype=torch.bool).tril()
        prompt_mask_UPP = causal_PP[None] & prompt_valid_UP[:, None, :]
        reads_prompt_SCP = prompt_valid_UP[completion_prompt_S][:, None, :].expand(-1, C, -1)
        own_SCC = causal_CC[None] & completion_valid_SC[:, None, :]
        return cls(prompt_index_UP, prompt_valid_UP, completion_index_SC, completion_valid_SC, completion_prompt_S,
                   prompt_mask_UPP[:, None], torch.cat([reads_prompt_SCP, own_SCC], dim=2)[:, None], row_of_valid_V,
                   positions)

    def to(self, device: torch.device | str) -> "SharedPromptLayout":
        return SharedPromptLayout(**{f.name: _moved(getattr(self, f.name), device) for f in fields(self)})


def _moved(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _span_index(spans: Sequence[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """([X, longest] positions, [X, longest] valid) of `spans` (start, length), each padded with position 0."""
    longest = max((n for _, n in spans), default=0)
    offsets = torch.arange(longest)
    lengths = torch.tensor([n for _, n in spans], dtype=torch.int64)
    starts = torch.tensor([s for s, _ in spans], dtype=torch.int64)
    valid = offsets[None] < lengths[:, None]
    return torch.where(valid, starts[:, None] + offsets[None], 0), valid


def layout_attention(query_HND: torch.Tensor, key_HND: torch.Tensor, value_HND: torch.Tensor,
                     layout: SharedPromptLayout, scaling: float | None) -> torch.Tensor:
    """[N, H, D] attention output of one row laid out by `layout` (keys and values already have H heads)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def gather(x_HND: torch.Tensor, index_XY: torch.Tensor) -> torch.Tensor:
        return x_HND[:, index_XY].transpose(0, 1)  # [X, H, Y, D]

    key_UHPD = gather(key_HND, layout.prompt_index_UP)
    value_UHPD = gather(value_HND, layout.prompt_index_UP)
    prompt_UHPD = sdpa(gather(query_HND, layout.prompt_index_UP), key_UHPD, value_UHPD,
                       attn_mask=layout.prompt_mask_U1PP, scale=scaling)
    reads = layout.completion_prompt_S
    key_SHKD = torch.cat([key_UHPD[reads], gather(key_HND, layout.completion_index_SC)], dim=2)
    value_SHKD = torch.cat([value_UHPD[reads], gather(value_HND, layout.completion_index_SC)], dim=2)
    completion_SHCD = sdpa(gather(query_HND, layout.completion_index_SC), key_SHKD, value_SHKD,
                           attn_mask=layout.completion_mask_S1CK, scale=scaling)
    # Back to row order; the padded query slots (past a prompt's or completion's end) are dropped.
    values = torch.cat([prompt_UHPD.transpose(1, 2)[layout.prompt_valid_UP],
                        completion_SHCD.transpose(1, 2)[layout.completion_valid_SC]])
    return values.new_zeros((layout.positions, *values.shape[1:])).index_copy(0, layout.row_of_valid_V, values)


def shared_prompt_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            shared_prompts: SharedPromptLayout | None = None, **kwargs):
    """transformers attention function: query [1, H, N, D], key/value [1, H_kv, N, D] -> ([1, N, H, D], None).
    Without a `shared_prompts` layout (a forward that did not ask for one) it is transformers' SDPA."""
    if shared_prompts is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1 or query.shape[2] != shared_prompts.positions:
        raise ValueError(f"a shared-prompt layout of {shared_prompts.positions} positions got a query of shape "
                         f"{tuple(query.shape)} (one row expected)")
    if dropout:
        raise ValueError("shared-prompt attention has no dropout (the learner trains without it)")
    heads_per_kv = query.shape[1] // key.shape[1]
    key_HND = key[0].repeat_interleave(heads_per_kv, dim=0)
    value_HND = value[0].repeat_interleave(heads_per_kv, dim=0)
    return layout_attention(query[0], key_HND, value_HND, shared_prompts, scaling)[None], None


def register() -> str:
    """Make `SHARED_PROMPT_ATTENTION` known to transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(SHARED_PROMPT_ATTENTION, shared_prompt_attention)
    return SHARED_PROMPT_ATTENTION


def use_shared_prompt_attention(model) -> None:
    """Set the attention of `model`'s text model to `shared_prompt_attention` (its vision tower keeps its own)."""
    model.set_attn_implementation({"text_config": register()})
