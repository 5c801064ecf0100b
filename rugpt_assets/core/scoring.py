"""Only-target perplexity and KL divergence from next-token log-probabilities, as plain arrays.

Whatever computes the log-probs (the streamed GGML evaluation in `evaluate`, or another
runtime's logits after a log-softmax), the numbers come from here: `Scores` takes them chunk
by chunk, `(tokens, vocab)` log-probs with the `(tokens,)` target ids, in eval-set order, so
the full-vocabulary log-probs of all tokens never need to be in memory at once.

**The evaluation set** (`EvalSet`) is the validation chats tokenized exactly as for training
(`chat_template.tokenize_chat`, the adapter's system prompt): perplexity is exp of the mean
negative log-likelihood of the bot tokens, i.e. the training eval loss of the same chats. It is
pinned by content: `EvalSet.sha256` hashes the exact token ids and labels, so two numbers are
compared only when they were measured on the same tokens.

**The KL reference** (`Reference`). KL(f16 ‖ file) needs f16's whole next-token distribution
at every target token — 201 KB per token at ruGPT-3.5's vocabulary. The reference keeps, per
token, the k most likely tokens of f16 with their log-probs and the log of the probability of
all the others together (the tail), and the KL is computed over those k + 1 outcomes:

    KL_k = Σ_{i in top k} p_i log(p_i / q_i) + p_T log(p_T / q_T),   q_T = 1 - Σ_{top k} q_i

Merging outcomes never increases a divergence (log-sum inequality), so KL_k ≤ KL, growing
with k, and the gap is exactly p_T · KL(p restricted to the tail ‖ q restricted to the tail):
the reference's tail mass times how differently the two models spread it. It is zero when k
covers the vocabulary. `Scores.reference_tail_mass` (mean p_T) gives its scale: on the demo
GPT-2 the relative gap measured 1–5× the mean tail mass for every quantization type
(docs/PERFORMANCE.md). A 13B chat model puts most of its mass on few tokens; k = 1024 of 50272
costs 8 KB per target token on disk, in exact float32, instead of the vocabulary's 201 KB.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rugpt_assets.core.chat_template import IGNORE_INDEX, tokenize_chat

ChatTokens = tuple[tuple[int, ...], tuple[int, ...]]  # (input_ids, labels)


@dataclass(frozen=True)
class EvalSet:
    """The tokenized chats every file is scored on (see the module docstring)."""

    chats: tuple[ChatTokens, ...]
    sha256: str  # of the token ids and labels: the content every number is pinned to
    system_prompt: str  # what chats without their own system message were given (also in the tokens)

    @classmethod
    def of(cls, chats: Iterable[ChatTokens], system_prompt: str) -> EvalSet:
        chats = tuple((tuple(ids), tuple(labels)) for ids, labels in chats)
        encoded = json.dumps([[list(ids), list(labels)] for ids, labels in chats], separators=(",", ":"))
        return cls(chats, hashlib.sha256(encoded.encode()).hexdigest(), system_prompt)

    def targets(self, chat: int) -> tuple[list[int], list[int]]:
        """(positions, next-token ids) of one chat: a position predicts the labelled token after it."""
        labels = self.chats[chat][1]
        positions = [p for p in range(len(labels) - 1) if labels[p + 1] != IGNORE_INDEX]
        return positions, [labels[p + 1] for p in positions]

    @property
    def target_tokens(self) -> int:
        return sum(len(self.targets(i)[0]) for i in range(len(self.chats)))


def build_eval_set(chats: Iterable[dict], tokenizer: Any, max_tokens: int, system_prompt: str, limit: int) -> EvalSet:
    """The first `limit` chats (rows with `messages`) as training tokenizes them, those with a bot
    token within `max_tokens` kept."""
    tokenized, seen = [], 0
    for chat in chats:
        if seen == limit:
            break
        seen += 1
        ids, labels = tokenize_chat(chat["messages"], tokenizer, max_tokens, system_prompt)
        if any(label != IGNORE_INDEX for label in labels[1:]):
            tokenized.append((ids, labels))
    if not tokenized:
        raise ValueError(f"none of the {seen} evaluation chats has a bot message within {max_tokens} tokens")
    return EvalSet.of(tokenized, system_prompt)


@dataclass(frozen=True)
class Reference:
    """What KL to a reference model needs of its distributions, per target token (module docstring)."""

    eval_set_sha256: str
    top_ids: np.ndarray  # (tokens, k) int32: the reference's k most likely next tokens
    top_logprobs: np.ndarray  # (tokens, k) float32: their log-probs
    tail_logprobs: np.ndarray  # (tokens,) float32: log-prob of all other tokens together (-inf: none)
    source: dict = field(default_factory=dict)  # what it was computed from (file identity)

    def __len__(self) -> int:
        return len(self.tail_logprobs)

    def save(self, path: Path) -> None:
        buffer = io.BytesIO()
        info = {"eval_set_sha256": self.eval_set_sha256, "source": self.source}
        np.savez(buffer, top_ids=self.top_ids, top_logprobs=self.top_logprobs, tail_logprobs=self.tail_logprobs,
                 info=np.array(json.dumps(info)))  # fmt: skip
        Path(path).write_bytes(buffer.getvalue())  # into the set its file is published with

    @classmethod
    def load(cls, path: Path) -> Reference:
        with np.load(path, allow_pickle=False) as data:
            info = json.loads(str(data["info"]))
            return cls(info["eval_set_sha256"], data["top_ids"], data["top_logprobs"], data["tail_logprobs"], info["source"])


def _outside(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per row, the log of the probability of every token not in `ids` (exact, not 1 - Σ)."""
    return logprobs.scatter(1, ids, float("-inf")).logsumexp(-1)


class Scores:
    """Running only-target perplexity, KL(reference ‖ scored) and, with `top_k`, a new reference,
    from chunks of next-token log-probs in eval-set order."""

    def __init__(self, reference: Reference | None = None, top_k: int = 0):
        self._reference = reference
        self._top_k = top_k
        self.tokens = 0
        self._nll = 0.0
        self._kl = 0.0
        self._tail_mass = 0.0
        self._kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, logprobs: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor) -> None:
        logprobs = torch.as_tensor(logprobs, dtype=torch.float32)
        targets = torch.as_tensor(targets, dtype=torch.long)
        n = len(targets)
        if logprobs.ndim != 2 or logprobs.shape[0] != n:
            raise ValueError(f"log-probs of shape {tuple(logprobs.shape)} for {n} target tokens")
        self._nll -= logprobs.gather(1, targets[:, None]).double().sum().item()
        if self._reference is not None:
            self._add_kl(logprobs, slice(self.tokens, self.tokens + n))
        if self._top_k:
            top, ids = logprobs.topk(min(self._top_k, logprobs.shape[1]), dim=-1)
            self._kept.append((ids.int(), top, _outside(logprobs, ids)))
        self.tokens += n

    def _required_reference(self) -> Reference:
        if self._reference is None:
            raise ValueError("scored without a reference: there is no KL to f16")
        return self._reference

    def _add_kl(self, logprobs: torch.Tensor, rows: slice) -> None:
        ref = self._required_reference()
        if rows.stop > len(ref):
            raise ValueError(f"more target tokens than the reference's {len(ref)}: not the same evaluation set")
        ids = torch.from_numpy(ref.top_ids[rows]).long()
        p_top = torch.from_numpy(ref.top_logprobs[rows]).double()
        p_tail = torch.from_numpy(ref.tail_logprobs[rows]).double()
        q_top = logprobs.gather(1, ids).double()
        q_tail = _outside(logprobs, ids).double()
        tail = torch.where(p_tail > float("-inf"), p_tail.exp() * (p_tail - q_tail), 0.0)
        self._kl += ((p_top.exp() * (p_top - q_top)).sum(-1) + tail).sum().item()
        self._tail_mass += p_tail.exp().sum().item()

    @property
    def has_reference(self) -> bool:
        return self._reference is not None

    @property
    def perplexity(self) -> float:
        return float(np.exp(self._nll / self.tokens))

    def _check_complete(self) -> None:
        reference = self._required_reference()
        if self.tokens != len(reference):
            raise ValueError(f"scored {self.tokens} target tokens, the reference has {len(reference)}")

    @property
    def kl(self) -> float:
        """Mean KL(reference ‖ scored) per target token, in nats (over top k + tail, see above)."""
        self._check_complete()
        return self._kl / self.tokens

    @property
    def reference_tail_mass(self) -> float:
        """Mean probability the reference puts outside its stored top k: the KL's relative error scale."""
        self._check_complete()
        return self._tail_mass / self.tokens

    def as_reference(self, eval_set: EvalSet, source: dict) -> Reference:
        """The scored model as a reference for others (needs `top_k`)."""
        if self.tokens != eval_set.target_tokens:
            raise ValueError(f"scored {self.tokens} target tokens, the evaluation set has {eval_set.target_tokens}")
        ids, top, tail = (torch.cat(parts).numpy() for parts in zip(*self._kept))
        return Reference(eval_set.sha256, ids, top, tail, source)
