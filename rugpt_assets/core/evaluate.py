"""What a GGML file is worth: load time and speed in llm-rs, perplexity and KL to f16, greedy
agreement with HF.

llm-rs exposes no logits, so quality is measured on the file's own weights, dequantized to
float32, in a GPT-2 forward pass written here (`target_logprobs`). It captures the weight
rounding of each type — the quality cost of quantization — though not ggml's own arithmetic
(8-bit activations in quantized matmuls), which the greedy check against llm-rs covers for f16.

The pass is streamed so that a 13B file evaluates on an ordinary CPU node: embedding → each
block → ln_f → lm_head, with the hidden states of all evaluation chats kept between layers and
each layer's weights read from the file, dequantized, used and freed. Peak memory is one layer
in float32 (12·n_embd² floats: 1.26 GB at 13B) or the lm_head (n_vocab·n_embd: 1.03 GB), plus
the hidden states (tokens·n_embd) and one chunk of log-probs (256 tokens·n_vocab), whatever
the depth; only the embedding rows of tokens that occur are read. A whole float32 model would
be 52 GB at 13B. The numbers — perplexity, KL, the f16 reference — come from `scoring`.

The same pass over the merged model's safetensors (`CheckpointWeights`) checks the greedy
tokens of the f16 file in llm-rs (`greedy_agreement`), so that check needs no whole model in
memory either.

The f16 file is evaluated once per materialization: its perplexity goes to its `.eval.json`,
what KL needs of its distributions to its `.reference.npz` (`scoring.Reference`). Every
quantized file is compared with those, on the same evaluation set (same content hash), or not
at all (`read_reference`).
"""

from __future__ import annotations

import codecs
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from llm_rs import GenerationConfig as LlmRsGenerationConfig
from llm_rs import Gpt2, SessionConfig
from safetensors import safe_open

from rugpt_assets.core import ggml
from rugpt_assets.core.chat_template import render_prompt
from rugpt_assets.core.configs import TRAIN_CONFIG_FILE, ExportConfig, GenerationConfig, from_dict, to_dict
from rugpt_assets.core.scoring import EvalSet, Reference, Scores


def load_llm_rs(path: Path, threads: int) -> tuple[Gpt2, float]:
    """The file in llm-rs with its BPE tokenizer sidecar; returns (model, load seconds).

    Threads are always set: llm-rs's default oversubscribes small machines (docs/ARCHITECTURE.md, "GGML files"). The
    context is the model's own n_ctx: llm-rs would otherwise allow 2048 positions and read
    past a smaller position table.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"GGML file {path} does not exist")
    path = Path(path).resolve()  # the file and its sidecar from one published version
    tokenizer = ggml.tokenizer_sidecar(path)
    if not tokenizer.is_file():
        raise FileNotFoundError(f"{tokenizer} is missing; write GGML files with ggml.write_ggml_f16 / quantize_ggml")
    contents = ggml.read_ggml(path)
    if problems := ggml.llm_rs_load_problems(contents):
        raise ValueError(f"llm-rs 0.2.15 cannot load {path}: " + "; ".join(problems))
    session = SessionConfig(threads=threads, context_length=contents.hparams.n_ctx)
    start = time.perf_counter()
    model = Gpt2(str(path), session, str(tokenizer))
    return model, time.perf_counter() - start


class TokenText:
    """Text from llm-rs's generated pieces: each is one token's byte-level string (the
    sidecar's `Fuse` decoder), turned back into bytes and decoded as UTF-8 across tokens."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, piece: str) -> str:
        return self._utf8.decode(bytes(ggml.BYTE_OF_CHAR[ch] for ch in piece))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


@dataclass(frozen=True)
class Generation:
    text: str
    pieces: list[str] = field(repr=False)  # one per token: byte-level string, "" for a special token
    tokens_per_s: float  # generated tokens over generation time, prompt feeding excluded
    ended: bool  # stopped at a special token (`</s>` ends a reply) rather than at the length limit

    @property
    def new_tokens(self) -> int:
        return len(self.pieces)


def generate(
    model: Gpt2,
    prompt: str,
    max_new_tokens: int,
    sampling: GenerationConfig | None = None,
    stop_at_special: bool = True,
    on_text: Callable[[str], None] | None = None,
    seed: int = 42,
) -> Generation:
    """Generate with llm-rs. `sampling=None` is greedy (top_k=1, no repetition penalty: the
    HF-comparable mode); otherwise the seed's sampling settings (llm-rs has no
    no_repeat_ngram_size). `on_text` receives the text as it is produced."""
    if sampling is None:
        config = LlmRsGenerationConfig(top_k=1, top_p=1.0, temperature=1.0, repetition_penalty=1.0, max_new_tokens=max_new_tokens)
    else:
        config = LlmRsGenerationConfig(
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            temperature=sampling.temperature,
            repetition_penalty=sampling.repetition_penalty,
            max_new_tokens=max_new_tokens,
            seed=seed,
        )
    pieces: list[str] = []
    chunks: list[str] = []
    text = TokenText()
    ended = False

    def on_piece(piece: str) -> bool:
        nonlocal ended
        pieces.append(piece)
        if piece == "" and stop_at_special:
            ended = True
            return True  # tells llm-rs to stop
        chunk = text.push(piece)
        if chunk:
            chunks.append(chunk)
            if on_text:
                on_text(chunk)
        return False

    start = time.perf_counter()
    # llm-rs's stub declares a second, embedding `generate` that hides this one.
    result = model.generate(prompt, config, callback=on_piece)  # pyright: ignore[reportCallIssue]
    seconds = time.perf_counter() - start - result.times.prompt_feeding / 1000
    if tail := text.flush():
        chunks.append(tail)
        if on_text:
            on_text(tail)
    return Generation("".join(chunks), pieces, len(pieces) / max(seconds, 1e-6), ended)


def token_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """HF ids as llm-rs reports generated tokens: byte-level strings, "" for special tokens."""
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    return ["" if i in special else tokenizer.convert_ids_to_tokens(i) for i in ids]


def greedy_agreement(ggml_path: Path, model_dir: Path, prompt: str, n: int, threads: int) -> dict:
    """Greedy tokens of the GGML file in llm-rs against the merged model in `model_dir`.

    The reference is the merged model's safetensors, streamed (`CheckpointWeights`, equal to
    HF's GPT2LMHeadModel in the tests), and it verifies llm-rs's tokens as a draft in one pass
    instead of generating token by token (a pass per token would read 26 GB per token at 13B):
    the argmax after the prompt and after each drafted token is the greedy choice as long as
    the draft agrees, so the first disagreement is where greedy decoding would part. llm-rs
    reports special tokens as "" without saying which: the draft carries `</s>` there, and a
    pass is repeated from the first one where the reference chose another special token.
    Returns `hf`: the reference's greedy tokens up to and including the first disagreement.
    """
    from transformers import AutoTokenizer

    model, _ = load_llm_rs(ggml_path, threads)
    got = generate(model, prompt, n, stop_at_special=False).pieces
    del model
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    weights = CheckpointWeights(model_dir)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    draft = [tokenizer.eos_token_id if p == "" else tokenizer.convert_tokens_to_ids(p) for p in got]
    while True:
        chosen = next_token_argmax(weights, prompt_ids + draft[:-1], len(prompt_ids) - 1)
        expected = token_pieces(tokenizer, chosen)
        matching = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), len(got))
        respecial = next((i for i in range(matching) if draft[i] != chosen[i]), None)
        if respecial is None:
            break
        draft[respecial] = chosen[respecial]  # another special token: the positions after it change
    equal = matching == n == len(got)
    return {"tokens": n, "matching_prefix": matching, "equal": equal, "llm_rs": got, "hf": expected[: matching + 1]}


# ---------------------------------------------------------------------------- streamed forward pass

LAYER_NORM_EPS = 1e-5  # ggml's GPT-2 computes with it (HF GPT2Config's default too)
TOKENS_PER_CHUNK = 256  # target tokens per lm_head/log-softmax chunk: 51 MB of log-probs at 50272


@dataclass(frozen=True)
class Shape:
    n_vocab: int
    n_ctx: int
    n_embd: int
    n_head: int
    n_layer: int


class GGMLWeights:
    """A GGML file's tensors, each read and dequantized to float32 when asked for."""

    def __init__(self, path: Path):
        self.name = Path(path).name
        self.file = ggml.read_ggml(path)
        hp = self.file.hparams
        self.shape = Shape(hp.n_vocab, hp.n_ctx, hp.n_embd, hp.n_head, hp.n_layer)

    def tensor(self, name: str) -> torch.Tensor:
        return torch.from_numpy(self.file.tensors[name].to_numpy())

    def rows(self, name: str, ids: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(self.file.tensors[name].rows(ids))


class CheckpointWeights:
    """A GPT-2 safetensors checkpoint (the merged model) read one tensor at a time, in float32,
    under the GGML names and orientation (linear weights as (out, in))."""

    def __init__(self, model_dir: Path):
        config = json.loads((Path(model_dir) / "config.json").read_text())
        self.name = Path(model_dir).name
        self.plan = {name: (key, file) for name, key, file in ggml.tensor_plan(Path(model_dir), config)}
        self.shape = Shape(config["vocab_size"], config["n_positions"], config["n_embd"], config["n_head"], config["n_layer"])

    def tensor(self, name: str) -> torch.Tensor:
        key, file = self.plan[name]
        with safe_open(file, framework="pt") as f:  # closed at once: an open map keeps its pages resident
            weight = f.get_tensor(key)
        return (weight.T if name.endswith("/w") else weight).float()

    def rows(self, name: str, ids: Sequence[int]) -> torch.Tensor:
        key, file = self.plan[name]
        with safe_open(file, framework="pt") as f:
            table = f.get_slice(key)
            return torch.cat([table[i : i + 1] for i in ids]).float()


Weights = GGMLWeights | CheckpointWeights


def _block(hidden: list[torch.Tensor], w: dict[str, torch.Tensor], n_head: int) -> None:
    """One GPT-2 block over each sequence's hidden states (tokens, n_embd), in place."""
    F = torch.nn.functional
    for h in hidden:
        n, width = h.shape
        x = F.layer_norm(h, (width,), w["ln_1/g"], w["ln_1/b"], LAYER_NORM_EPS)
        qkv = F.linear(x, w["attn/c_attn/w"], w["attn/c_attn/b"]).split(width, -1)
        q, k, v = (t.view(n, n_head, -1).transpose(0, 1) for t in qkv)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(n, width)
        h += F.linear(attended, w["attn/c_proj/w"], w["attn/c_proj/b"])
        x = F.layer_norm(h, (width,), w["ln_2/g"], w["ln_2/b"], LAYER_NORM_EPS)
        x = F.gelu(F.linear(x, w["mlp/c_fc/w"], w["mlp/c_fc/b"]), approximate="tanh")
        h += F.linear(x, w["mlp/c_proj/w"], w["mlp/c_proj/b"])


def _final_states(
    weights: Weights, sequences: Sequence[Sequence[int]], progress: Callable[[str], None] | None = None
) -> list[torch.Tensor]:
    """Each sequence's hidden states after ln_f, one layer's weights in memory at a time."""
    shape = weights.shape
    longest = max(len(ids) for ids in sequences)
    if longest > shape.n_ctx:
        raise ValueError(f"{weights.name}: sequences reach {longest} tokens, past the model's {shape.n_ctx} positions")
    used = sorted({i for ids in sequences for i in ids})
    if used[-1] >= shape.n_vocab:
        raise ValueError(f"{weights.name}: token id {used[-1]} is past the vocabulary of {shape.n_vocab}")
    row_of = {token: row for row, token in enumerate(used)}
    embeddings, positions = weights.rows("model/wte", used), weights.rows("model/wpe", range(longest))
    hidden = [embeddings[[row_of[i] for i in ids]] + positions[: len(ids)] for ids in sequences]
    del embeddings, positions
    for layer in range(shape.n_layer):
        _block(hidden, {name: weights.tensor(f"model/h{layer}/{name}") for name in ggml.BLOCK_TENSORS}, shape.n_head)
        if progress:
            progress(f"{weights.name}: layer {layer + 1}/{shape.n_layer}")
    gain, bias = weights.tensor("model/ln_f/g"), weights.tensor("model/ln_f/b")
    for h in hidden:
        h.copy_(torch.nn.functional.layer_norm(h, (shape.n_embd,), gain, bias, LAYER_NORM_EPS))
    return hidden


@torch.inference_mode()
def target_logprobs(
    weights: Weights,
    eval_set: EvalSet,
    tokens_per_chunk: int = TOKENS_PER_CHUNK,
    progress: Callable[[str], None] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Next-token log-probs (tokens, n_vocab) and target ids (tokens,) at every target token
    of `eval_set`, in its order, `tokens_per_chunk` at a time, computed one layer at a time
    (module docstring). Equal, within float rounding, to an HF GPT2LMHeadModel carrying the
    same weights (`ggml.ggml_to_hf_model` for a GGML file)."""
    hidden = _final_states(weights, [ids for ids, _ in eval_set.chats], progress)
    rows, targets = [], []
    for chat, h in enumerate(hidden):
        at, ids = eval_set.targets(chat)
        rows.append(h[at])
        targets += ids
    del hidden
    states, targets = torch.cat(rows), torch.tensor(targets)
    del rows
    head = weights.tensor("model/lm_head")
    for start in range(0, len(targets), tokens_per_chunk):
        chunk = slice(start, start + tokens_per_chunk)
        yield torch.log_softmax(states[chunk] @ head.T, dim=-1), targets[chunk]


@torch.inference_mode()
def next_token_argmax(weights: Weights, ids: Sequence[int], start: int) -> list[int]:
    """The most likely next token after each position from `start` on, in one streamed pass."""
    [h] = _final_states(weights, [ids])
    return (h[start:] @ weights.tensor("model/lm_head").T).argmax(-1).tolist()


# ---------------------------------------------------------------------------- a file's numbers


def evaluation_path(ggml_path: Path) -> Path:
    """A file's numbers sit beside it, so the f16 table and the quantized deltas can read them."""
    return Path(ggml_path).with_suffix(".eval.json")


def reference_path(ggml_path: Path) -> Path:
    """What KL to this file needs of its distributions (`scoring.Reference`), beside it."""
    return Path(ggml_path).with_suffix(".reference.npz")


def file_identity(path: Path) -> dict:
    stat = Path(path).stat()
    return {"file": Path(path).name, "size_bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def read_reference(f16_path: Path, eval_set: EvalSet, f16_asset: str = "ggml_f16") -> Reference:
    """The f16 file's stored reference, only if it was computed from that very file on this
    evaluation set; otherwise a clear error that says what to re-materialize (`f16_asset`, the
    asset that wrote the file: GGML's or GGUF's)."""
    path = reference_path(f16_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: materialize {f16_asset} (it evaluates the f16 file once for every quantization)")
    reference = Reference.load(path)
    if reference.eval_set_sha256 != eval_set.sha256:
        raise ValueError(
            f"{f16_asset} was evaluated on another evaluation set (sha256 {reference.eval_set_sha256[:12]}) than this "
            f"run's ({eval_set.sha256[:12]}): chat_set's validation chats, the tokenizer, the system prompt or the "
            f"eval settings changed since. Re-materialize {f16_asset}, then this partition."
        )
    if any(reference.source.get(k) != v for k, v in file_identity(f16_path).items()):
        raise ValueError(f"{f16_path} changed after {f16_asset} evaluated it: re-materialize {f16_asset}, then this partition")
    return reference


def evaluate_ggml_file(
    path: Path,
    eval_set: EvalSet,
    export: ExportConfig = ExportConfig(),
    f16_path: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict, Reference | None]:
    """Every number an export asset reports about one GGML file, and, for the f16 file, its
    reference for KL.

    Without `f16_path` the file is the f16 one: it is scored and becomes the reference
    (`export.kl_top_k` tokens per target). With `f16_path` (a quantized file's source) the file
    is also compared with f16's stored reference (`read_reference`): `kl_to_f16`, the mean KL
    divergence of f16's next-token distributions from this file's on the same target tokens.
    Unlike a perplexity delta, which on a small model is dominated by first-order noise of
    either sign, KL is never negative and grows with the rounding error, so it ranks the types
    reliably.
    """
    path = Path(path)
    reference = read_reference(f16_path, eval_set) if f16_path is not None else None
    numbers = ggml.file_figures(path, f16_path or path)
    model, load_time = load_llm_rs(path, export.threads)
    prompt = render_prompt([{"role": "user", "content": export.check_prompt}], eval_set.system_prompt)
    sample = generate(model, prompt, export.check_new_tokens)
    del model

    scores = Scores(reference, top_k=0 if reference else export.kl_top_k)
    start, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(export.threads)
    try:
        for logprobs, targets in target_logprobs(GGMLWeights(path), eval_set, progress=progress):
            scores.add(logprobs, targets)
    finally:
        torch.set_num_threads(threads)
    numbers |= {"load_time_s": load_time, "eval_time_s": time.perf_counter() - start}
    return file_numbers(path, numbers, sample, scores, eval_set, export)


def file_numbers(
    path: Path, numbers: dict, sample: Generation, scores: Scores, eval_set: EvalSet, export: ExportConfig
) -> tuple[dict, Reference | None]:
    """A scored file's numbers (GGML's or GGUF's, same keys) and, when it was scored without a
    reference (it is the f16 file), its reference for the quantized files' KL."""
    numbers = {
        **numbers,
        "generation_tokens_per_s": sample.tokens_per_s,
        "perplexity": scores.perplexity,
        "eval_chats": len(eval_set.chats),
        "eval_tokens": scores.tokens,
        "eval_set_sha256": eval_set.sha256,
        "sample_text": sample.text,
        # What the file was evaluated with; its asset checks read it back (`evaluated_with`).
        "export_config": to_dict(export),
    }
    if scores.has_reference:
        numbers |= {"kl_to_f16": scores.kl, "f16_tail_mass": scores.reference_tail_mass}
        return numbers, None
    return numbers, scores.as_reference(eval_set, {**file_identity(path), "sha256": numbers["sha256"]})


def write_evaluation(ggml_path: Path, numbers: dict, reference: Reference | None = None) -> None:
    """A staged file's numbers (and reference) beside it: sidecars of the set it is published
    with (`artifacts.publish_file`), so a reader never pairs a file with another's numbers."""
    if reference is not None:
        reference.save(reference_path(ggml_path))
    evaluation_path(ggml_path).write_text(json.dumps(numbers, ensure_ascii=False, indent=2))


def read_evaluation(ggml_path: Path) -> dict:
    return json.loads(evaluation_path(ggml_path).read_text())


def evaluated_with(path: Path, asset: str) -> ExportConfig:
    """The export settings the file's last materialization ran with (its launchpad values), so
    the asset's checks load, prompt and generate as the asset did."""
    numbers = read_evaluation(path)
    if "export_config" not in numbers:
        raise ValueError(f"{evaluation_path(path)} records no export settings: materialize {asset} again")
    return from_dict(ExportConfig, numbers["export_config"])


def perplexity_delta(numbers: dict, f16_numbers: dict) -> float:
    """Relative perplexity change against f16 (what the per-type bound limits), only between
    numbers measured on the same evaluation set."""
    ours, f16 = numbers.get("eval_set_sha256", "none"), f16_numbers.get("eval_set_sha256", "none")
    if ours != f16:
        raise ValueError(
            f"the f16 perplexity was measured on evaluation set {f16[:12]}, this file's on {ours[:12]}: "
            "re-materialize the f16 asset (ggml_f16 or gguf_f16), then this partition"
        )
    return numbers["perplexity"] / f16_numbers["perplexity"] - 1


def trained_system_prompt(adapter_dir: Path, default: str) -> str:
    """The system prompt the adapter was trained with (its saved TrainConfig), else `default`."""
    config = Path(adapter_dir) / TRAIN_CONFIG_FILE
    return json.loads(config.read_text()).get("system_prompt", default) if config.is_file() else default
