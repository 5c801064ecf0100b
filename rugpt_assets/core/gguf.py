"""GGUF for llama.cpp and what is built on it (Ollama, LM Studio, llama-cpp-python).

`write_gguf_f16` writes the merged model as one f16 GGUF file of architecture `gpt2` with the
`gguf` package, streamed tensor by tensor from the safetensors files (the same tensor plan,
transpositions and dtypes as the GGML writer, `ggml.tensor_plan` / `ggml.load_tensor`), with
everything a runtime needs to chat without this project:

- the tokenizer: `gpt2` BPE with the `gpt-2` pre-tokenizer (without it llama.cpp splits
  punctuation, digits and spaces differently), the byte-level tokens and merges, special
  tokens typed CONTROL, ids past the tokenizer padded to the model's vocab_size with unique
  `[PAD{i}]` entries of type UNUSED, bos/eos/pad ids and no automatic BOS;
- the gigasaiga chat template as Jinja (`tokenizer.chat_template`), which llama.cpp,
  llama-cpp-python and LM Studio apply themselves, and the seed's sampling defaults
  (`general.sampling.*`, read by llama.cpp's tools);
- `general.*` provenance: name, base model and revision, license, the training sources.

`quantize_gguf` turns it into the `GGUFType`s with llama.cpp's own quantizer
(`llama_cpp.llama_model_quantize`). K-quants work in blocks of 256 along a row; where a
tensor's rows are shorter or not a multiple of 256 (the demo model's width of 128),
llama.cpp falls back per tensor (Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0). The file is read
back and every tensor's type is reported, fallbacks included.

Next to each file goes an Ollama `Modelfile` (`write_modelfile`).
"""

from __future__ import annotations

import ctypes
import enum
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, LlamaFileType, TokenType
from transformers import AutoTokenizer

from rugpt_assets.core import ggml
from rugpt_assets.core.artifacts import check_safetensors, published, weights_file_figures
from rugpt_assets.core.chat_template import jinja_chat_template, ollama_template
from rugpt_assets.core.configs import DEFAULT_SYSTEM_PROMPT, GenerationConfig
from rugpt_assets.core.quantize import max_ppl_increase

# Dagster's code_version of the GGUF assets: bump when the same model would give other bytes.
GGUF_WRITER_VERSION = "1"
ARCH = "gpt2"

# The published cost of each type: llama.cpp's perplexity scoreboard (tools/perplexity/README.md,
# LLaMA-3-8B on wikitext-2, no importance matrix): f16 perplexity 6.233160, and per type the
# perplexity increase and the mean KL divergence to f16 (nats).
LLAMA3_8B_F16_PERPLEXITY = 6.233160


class GGUFType(enum.Enum):
    """The quantized GGUF types, one `gguf_quantized` partition each.
    name = (published perplexity increase, published mean KL to f16), see LLAMA3_8B_F16_PERPLEXITY."""

    Q4_K_M = (0.175482, 0.031273)
    Q5_K_M = (0.056974, 0.010762)
    Q6_K = (0.021748, 0.005452)
    Q8_0 = (0.002650, 0.001355)

    def __init__(self, published_ppl_delta: float, published_kl: float):
        self.published_ppl_increase = published_ppl_delta / LLAMA3_8B_F16_PERPLEXITY
        self.published_kl = published_kl

    @property
    def file_type(self) -> LlamaFileType:
        """llama.cpp's `llama_ftype` (`general.file_type` of the result)."""
        return LlamaFileType[f"MOSTLY_{self.name}"]

    @property
    def main_type(self) -> GGMLQuantizationType:
        """The tensor type of most 2-D weights (the _M mixes keep some at a higher type)."""
        return GGMLQuantizationType[self.name.removesuffix("_M")]

    @property
    def max_ppl_increase(self) -> float:
        return max_ppl_increase(self.published_ppl_increase)


@dataclass(frozen=True)
class ModelCard:
    """`general.*` provenance written into every GGUF file."""

    name: str
    base_model: str  # hub repo id, or a description of a locally built model
    base_model_revision: str
    license: str
    datasets: tuple[str, ...] = ()  # hub repo ids the adapter's training set was built from
    description: str = ""  # what the adapter was trained on, in words


# ---------------------------------------------------------------------------- writing


def gguf_vocab(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens and token types as llama.cpp's `gpt2` vocabulary reads them: byte-level strings,
    added tokens as their text, unused ids as unique `[PAD{i}]` (llama.cpp maps text to id)."""
    tokens, types = [], []
    for i, entry in enumerate(ggml.tokenizer_vocab(tokenizer, n_vocab)):
        if entry is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        else:
            tokens.append(entry.text)
            types.append(TokenType.CONTROL if entry.special else TokenType.USER_DEFINED if entry.added else TokenType.NORMAL)
    if len(set(tokens)) != len(tokens):
        raise ValueError("the vocabulary has duplicate token texts; llama.cpp maps each text to one id")
    return tokens, [int(t) for t in types]


def _add_model_card(writer: GGUFWriter, card: ModelCard) -> None:
    writer.add_name(card.name)
    writer.add_license(card.license)
    writer.add_base_model_count(1)
    writer.add_base_model_name(0, card.base_model)
    writer.add_base_model_version(0, card.base_model_revision)
    if "/" in card.base_model:
        writer.add_base_model_repo_url(0, f"https://huggingface.co/{card.base_model}")
    if card.datasets:
        writer.add_dataset_count(len(card.datasets))
        for i, repo in enumerate(card.datasets):
            writer.add_dataset_name(i, repo)
            writer.add_dataset_repo_url(i, f"https://huggingface.co/datasets/{repo}")
    if card.description:
        writer.add_description(card.description)


def _add_sampling(writer: GGUFWriter, generation: GenerationConfig) -> None:
    """The seed's sampling as llama.cpp's default; no min-p (the seed has none), the repetition
    penalty over the whole context (-1) as transformers applies it."""
    writer.add_float32(gguf.Keys.General.SAMPLING_TEMP, generation.temperature)
    writer.add_sampling_top_k(generation.top_k)
    writer.add_sampling_top_p(generation.top_p)
    writer.add_sampling_min_p(0.0)
    writer.add_float32(gguf.Keys.General.SAMPLING_PENALTY_REPEAT, generation.repetition_penalty)
    writer.add_int32(gguf.Keys.General.SAMPLING_PENALTY_LAST_N, -1)


def write_gguf_f16(
    model_dir: Path,
    out_path: Path,
    card: ModelCard,
    system_prompt: str = DEFAULT_SYSTEM_PROMPT,
    generation: GenerationConfig = GenerationConfig(),
) -> dict:
    """Export a GPT-2 safetensors checkpoint to an f16 GGUF file, with its Ollama Modelfile.
    Written in place: the caller publishes the set (`artifacts.publish_file`), so the file and
    its sidecars switch together.

    Streams: the tensor infos come from the safetensors headers, then one tensor is read,
    converted and written at a time (peak memory ≈ the largest tensor). Returns tensors,
    parameters (elements stored) and size_bytes.
    """
    model_dir, out_path = published(model_dir), Path(out_path)
    config = json.loads((model_dir / "config.json").read_text())
    if problems := ggml.gpt2_config_problems(config):
        raise ValueError(f"{model_dir}/config.json cannot be exported to GGUF: " + "; ".join(problems))
    check_safetensors(model_dir)
    plan = ggml.tensor_plan(model_dir, config)
    by_name = {name: st_name for name, st_name, _ in plan}
    if by_name["model/lm_head"] == by_name["model/wte"]:
        plan = [entry for entry in plan if entry[0] != "model/lm_head"]  # tied: llama.cpp reuses token_embd
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, config["n_layer"])
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    try:
        tokens, token_types = gguf_vocab(tokenizer, config["vocab_size"])
    except ValueError as exc:
        raise ValueError(f"{model_dir}: {exc}") from exc
    merges = ggml.bpe_merges(json.loads(tokenizer.backend_tokenizer.to_str()))
    chat_template = jinja_chat_template(system_prompt)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_modelfile(out_path, config["n_positions"], system_prompt, generation)
    writer = GGUFWriter(out_path, ARCH)
    _add_model_card(writer, card)
    writer.add_file_type(LlamaFileType.MOSTLY_F16)
    writer.add_context_length(config["n_positions"])
    writer.add_embedding_length(config["n_embd"])
    writer.add_feed_forward_length(config.get("n_inner") or 4 * config["n_embd"])
    writer.add_block_count(config["n_layer"])
    writer.add_head_count(config["n_head"])
    writer.add_layer_norm_eps(config.get("layer_norm_epsilon", 1e-5))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_template)
    _add_sampling(writer, generation)

    gguf_names = []
    for ggml_name, st_name, st_file in plan:
        gguf_name = names.get_name(st_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ValueError(f"{model_dir}: no GGUF name for tensor {st_name!r}")
        shape, dtype = ggml.stored_shape_and_dtype(ggml_name, st_name, st_file)
        nbytes = dtype.itemsize
        for n in shape:
            nbytes *= n
        writer.add_tensor_info(gguf_name, shape, dtype, nbytes)
        gguf_names.append(gguf_name)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    parameters = 0
    for ggml_name, st_name, st_file in plan:
        data = ggml.load_tensor(ggml_name, st_name, st_file)
        writer.write_tensor_data(data)
        parameters += data.size
        del data
    writer.close()

    written = read_gguf(out_path)
    if (
        [t.name for t in written.tensors] != gguf_names
        or written.tokens != tokens
        or written.string("tokenizer.chat_template") != chat_template
    ):
        raise RuntimeError(f"{out_path}: the file read back differs from what was written")
    return {"tensors": len(plan), "parameters": parameters, "size_bytes": out_path.stat().st_size}


def modelfile_path(gguf_path: Path) -> Path:
    """The Ollama Modelfile next to a GGUF file: `ollama create NAME -f <this file>`."""
    return Path(gguf_path).with_suffix(".Modelfile")


def modelfile_text(
    gguf_name: str, n_ctx: int, system_prompt: str = DEFAULT_SYSTEM_PROMPT, generation: GenerationConfig = GenerationConfig()
) -> str:
    """An Ollama Modelfile for the GGUF file `gguf_name` in the same directory: the gigasaiga
    template in Go-template form, the default system prompt, a stop at `</s>`, the seed's
    sampling (repetition penalty over the whole context, as transformers applies it; Ollama
    has no no_repeat_ngram_size) and the model's own context length."""
    if '"""' in system_prompt:
        raise ValueError('the system prompt cannot contain """ in a Modelfile')
    parameters = [
        ("stop", '"</s>"'),
        ("temperature", generation.temperature),
        ("top_p", generation.top_p),
        ("top_k", generation.top_k),
        ("min_p", 0.0),
        ("repeat_penalty", generation.repetition_penalty),
        ("repeat_last_n", -1),
        ("num_predict", generation.max_new_tokens),
        ("num_ctx", n_ctx),
    ]
    return f'FROM ./{gguf_name}\nTEMPLATE """{ollama_template()}"""\nSYSTEM """{system_prompt}"""\n' + "".join(
        f"PARAMETER {k} {v}\n" for k, v in parameters
    )


def write_modelfile(
    gguf_path: Path, n_ctx: int, system_prompt: str = DEFAULT_SYSTEM_PROMPT, generation: GenerationConfig = GenerationConfig()
) -> Path:
    path = modelfile_path(gguf_path)
    path.write_text(modelfile_text(Path(gguf_path).name, n_ctx, system_prompt, generation), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    type: GGMLQuantizationType
    ne: tuple[int, ...]  # GGML order: row length first
    n_elements: int


@dataclass(frozen=True)
class GGUFContents:
    fields: dict[str, Any] = field(repr=False)  # key → value (strings decoded, arrays as lists)
    tensors: list[GGUFTensorInfo] = field(repr=False)

    def string(self, key: str) -> str | None:
        value = self.fields.get(key)
        return value if isinstance(value, str) else None

    @property
    def tokens(self) -> list[str]:
        return list(self.fields.get("tokenizer.ggml.tokens", []))

    @property
    def file_type(self) -> int:
        return int(self.fields["general.file_type"])

    @property
    def n_ctx(self) -> int:
        return int(self.fields[f"{ARCH}.context_length"])

    def type_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(t.type.name for t in self.tensors).items()))


def read_gguf(path: Path) -> GGUFContents:
    """Keys and tensor infos of a GGUF file (tensor data stay on disk)."""
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{path}: not a readable GGUF file ({exc})") from exc
    fields = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = f.contents()
        fields[name] = value
    tensors = [
        GGUFTensorInfo(t.name, GGMLQuantizationType(t.tensor_type), tuple(int(n) for n in t.shape), int(t.n_elements))
        for t in reader.tensors
    ]
    return GGUFContents(fields, tensors)


def file_figures(path: Path, f16_path: Path) -> dict:
    """`artifacts.weights_file_figures` of a GGUF file."""
    return weights_file_figures(path, f16_path, sum(t.n_elements for t in read_gguf(path).tensors))


# llama.cpp quantizes every 2-D weight but this one (GPT-2's position table stays as written).
UNQUANTIZED = frozenset({"position_embd.weight"})


def fallbacks(contents: GGUFContents, gguf_type: GGUFType) -> dict[str, str]:
    """Weights whose rows do not fit `gguf_type`'s blocks, with the type llama.cpp chose."""
    block = gguf.GGML_QUANT_SIZES[gguf_type.main_type][0]
    return {t.name: t.type.name for t in contents.tensors if len(t.ne) == 2 and t.name not in UNQUANTIZED and t.ne[0] % block}


# ---------------------------------------------------------------------------- quantizing


@dataclass(frozen=True)
class GGUFQuantReport:
    path: Path
    gguf_type: GGUFType
    size_bytes: int
    parameters: int
    bits_per_weight: float
    ratio_to_f16: float
    sha256: str
    wall_time_s: float
    tensor_types: dict[str, int]  # tensor type → how many tensors have it
    fallbacks: dict[str, str]  # see `fallbacks`


def quantize_gguf(f16_path: Path, gguf_type: GGUFType, out_path: Path, threads: int) -> GGUFQuantReport:
    """Quantize an f16 GGUF file (from `write_gguf_f16`) with llama.cpp's own quantizer into
    `out_path`, with its Modelfile, and check it reads back right. Written in place: the caller
    publishes the set (`artifacts.publish_file`)."""
    import llama_cpp

    if not Path(f16_path).is_file():
        raise FileNotFoundError(f"f16 GGUF file {f16_path} does not exist; materialize gguf_f16 first")
    f16_path, out_path = published(f16_path), Path(out_path)  # the file and its Modelfile from one version
    f16 = read_gguf(f16_path)
    if f16.file_type != LlamaFileType.MOSTLY_F16:
        raise ValueError(f"{f16_path} has file type {f16.file_type}; quantize the f16 file ({int(LlamaFileType.MOSTLY_F16)})")

    start = time.perf_counter()
    modelfile = modelfile_path(f16_path).read_text(encoding="utf-8")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    modelfile_path(out_path).write_text(modelfile.replace(f"FROM ./{f16_path.name}\n", f"FROM ./{out_path.name}\n", 1), encoding="utf-8")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(gguf_type.file_type)
    params.nthread = threads
    params_ref = ctypes.byref(params)  # what the C function takes; llama_cpp's annotation wants a pointer type
    if llama_cpp.llama_model_quantize(str(f16_path).encode(), str(out_path).encode(), params_ref) != 0:  # pyright: ignore[reportArgumentType]
        raise RuntimeError(f"llama.cpp could not quantize {f16_path} to {gguf_type.name} (see its log above)")
    written = read_gguf(out_path)
    problems = []
    if written.file_type != gguf_type.file_type:
        problems.append(f"file type {written.file_type}, expected {int(gguf_type.file_type)}")
    if sorted(t.name for t in written.tensors) != sorted(t.name for t in f16.tensors):  # llama.cpp reorders
        problems.append("its tensors differ from the f16 file's")
    if written.tokens != f16.tokens or written.string("tokenizer.chat_template") != f16.string("tokenizer.chat_template"):
        problems.append("its tokenizer or chat template differs from the f16 file's")
    if problems:
        raise RuntimeError(f"llama.cpp quantized {out_path.name} wrongly: " + "; ".join(problems))
    wall_time = time.perf_counter() - start

    figures = file_figures(out_path, f16_path)
    return GGUFQuantReport(
        path=out_path,
        gguf_type=gguf_type,
        size_bytes=figures["size_bytes"],
        parameters=figures["parameters"],
        bits_per_weight=figures["bits_per_weight"],
        ratio_to_f16=figures["ratio_to_f16"],
        sha256=figures["sha256"],
        wall_time_s=wall_time,
        tensor_types=written.type_counts(),
        fallbacks=fallbacks(written, gguf_type),
    )
