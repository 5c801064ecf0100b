"""The GGML container llm-rs 0.2.15 reads for GPT-2: writing it from safetensors, reading it back.

Layout (unversioned GGML, little-endian i32 unless said otherwise):

    magic 0x67676d6c
    n_vocab, n_ctx, n_embd, n_head, n_layer, ftype          (ftype: 1 = f16, 2000 + type quantized)
    n_vocab again, then n_vocab × (u32 length, token bytes)   (no scores in this container)
    tensors until EOF: n_dims, name length, ggml type, ne[0..n_dims) (innermost first), name, data

Tensor names and the choice of f16/f32 per tensor are those of llm-rs's own GPT-2 converter
(and ggml's gpt-2 example): 2-D weights and the embeddings `model/wte`, `model/lm_head` in
f16; `model/wpe`, biases and layer norms in f32; Conv1D weights transposed to (out, in).

Unlike llm-rs's converter, which loads the whole model and writes the vocabulary as decoded
text (single-byte tokens become U+FFFD, docs/ARCHITECTURE.md, "GGML files"), `write_ggml_f16` streams one tensor at a
time from the safetensors files and writes each token's raw bytes. Next to each file go two
sidecars: `.meta` (how llm-rs's `AutoModel` recognizes the model) and `.tokenizer.json` (the
real BPE for llm-rs, see `write_llm_rs_tokenizer`).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from llm_rs import ContainerType, QuantizationType
from llm_rs.auto import KnownModels, ModelMetadata, QuantizationVersions
from safetensors import safe_open
from transformers import AutoTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from rugpt_assets.core.artifacts import check_safetensors, published, weights_file_figures

# Dagster's code_version of the GGML assets: bump when the same model would give other bytes.
GGML_WRITER_VERSION = "1"

GGML_MAGIC = 0x67676D6C
FTYPE_F16 = 1
_HEADER = struct.Struct("<7i")  # magic, n_vocab, n_ctx, n_embd, n_head, n_layer, ftype
# llm-rs 0.2.15 sizes its ggml memory pool without the 16-byte alignment ggml pads each tensor
# to: a file with any tensor whose byte size is not a multiple of 16 aborts the whole process
# on load ("not enough space in the context's memory pool").
LLM_RS_TENSOR_ALIGN = 16
QUANT_BLOCK = 32  # elements per block of every quantized type written here
DEQUANTIZE_BLOCK_BYTES = 64 << 20  # float32 output per read-and-dequantize step of a tensor

# HF GPT-2 parameter name (without the `transformer.` prefix) → GGML name.
_BLOCK_NAMES = {
    "ln_1.weight": "ln_1/g",
    "ln_1.bias": "ln_1/b",
    "attn.c_attn.weight": "attn/c_attn/w",
    "attn.c_attn.bias": "attn/c_attn/b",
    "attn.c_proj.weight": "attn/c_proj/w",
    "attn.c_proj.bias": "attn/c_proj/b",
    "ln_2.weight": "ln_2/g",
    "ln_2.bias": "ln_2/b",
    "mlp.c_fc.weight": "mlp/c_fc/w",
    "mlp.c_fc.bias": "mlp/c_fc/b",
    "mlp.c_proj.weight": "mlp/c_proj/w",
    "mlp.c_proj.bias": "mlp/c_proj/b",
}
BLOCK_TENSORS = tuple(_BLOCK_NAMES.values())  # one transformer block's tensors, named inside `model/h{i}/`
_BLOCK_RE = re.compile(r"h\.(\d+)\.(.+)")
_MASK_BUFFER_RE = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")

# GPT-2's byte-level BPE spells each byte as one printable character; this maps them back.
BYTE_OF_CHAR = {ch: b for b, ch in bytes_to_unicode().items()}


@dataclass(frozen=True)
class GGMLHparams:
    n_vocab: int
    n_ctx: int
    n_embd: int
    n_head: int
    n_layer: int
    ftype: int


@dataclass(frozen=True)
class GGMLTensor:
    """One tensor of a GGML file, located but not loaded: each read goes to the file.

    Reads are plain file reads into fresh memory, not a memory map: every page of a map that
    was touched stays in the process's resident set until the map is closed, so streaming a
    13B file through one map would count the whole file (26 GB) against the process.
    """

    name: str
    type: GGMLQuantizationType
    ne: tuple[int, ...]  # GGML order: innermost (row length) first
    path: Path
    offset: int  # of the data in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy/torch order."""
        return tuple(reversed(self.ne))

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (`ne[0]` elements): rows are whole blocks in every type."""
        return self.nbytes // int(np.prod(self.ne[1:], dtype=np.int64))

    @property
    def data(self) -> np.ndarray:
        """The raw bytes (uint8)."""
        out = np.empty(self.nbytes, dtype=np.uint8)
        with open(self.path, "rb", buffering=0) as f:
            _read_exactly(f, self.offset, out)
        return out

    def to_numpy(self) -> np.ndarray:
        """Dequantized to float32 in numpy order; the quantized block formats (Q4_0…Q8_0)
        are the same bytes as GGUF's, so gguf's numpy kernels read them. Read and dequantized
        in row blocks, so memory is the result plus one block (gguf's kernel alone would hold
        a second float32 copy of the whole tensor)."""
        n_rows = int(np.prod(self.ne[1:], dtype=np.int64))
        out = np.empty((n_rows, self.ne[0]), dtype=np.float32)
        step = max(1, DEQUANTIZE_BLOCK_BYTES // (4 * self.ne[0]))
        raw = np.empty((min(step, n_rows), self.row_bytes), dtype=np.uint8)
        with open(self.path, "rb", buffering=0) as f:
            for start in range(0, n_rows, step):
                n = min(step, n_rows - start)
                _read_exactly(f, self.offset + start * self.row_bytes, raw[:n])
                out[start : start + n] = dequantize(raw[:n], self.type)
        return out.reshape(self.shape)

    def rows(self, ids: Sequence[int]) -> np.ndarray:
        """Rows `ids` of a 2-D tensor (e.g. the embeddings of some tokens), dequantized to
        float32, reading only those rows."""
        raw = np.empty((len(ids), self.row_bytes), dtype=np.uint8)
        with open(self.path, "rb", buffering=0) as f:
            for i, row in enumerate(ids):
                _read_exactly(f, self.offset + int(row) * self.row_bytes, raw[i])
        return dequantize(raw, self.type).reshape(len(ids), self.ne[0])


def _read_exactly(f, offset: int, out: np.ndarray) -> None:
    view = out.data.cast("B")
    f.seek(offset)
    done = 0
    while done < len(view):  # one read returns at most ~2 GB on Linux
        n = f.readinto(view[done:])
        if not n:
            raise ValueError(f"{f.name}: ends before byte {offset + len(view)} (truncated?)")
        done += n


@dataclass(frozen=True)
class GGMLFile:
    hparams: GGMLHparams
    vocab: list[bytes]
    tensors: dict[str, GGMLTensor]


# ---------------------------------------------------------------------------- writing


def tensor_plan(model_dir: Path, config: dict) -> list[tuple[str, str, Path]]:
    """(ggml name, safetensors name, file) in llm-rs's converter order; lm_head from wte when tied
    (then its safetensors name is wte's)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = {k: model_dir / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    elif (model_dir / "model.safetensors").exists():
        with safe_open(model_dir / "model.safetensors", framework="pt") as f:
            weight_map = {k: model_dir / "model.safetensors" for k in f.keys()}
    else:
        raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")

    by_ggml: dict[str, str] = {}
    for name in weight_map:
        short = name.removeprefix("transformer.")
        if _MASK_BUFFER_RE.fullmatch(short):
            continue  # causal-mask buffers saved by old checkpoints, not parameters
        if short == "lm_head.weight":
            by_ggml["model/lm_head"] = name
        elif short in ("wte.weight", "wpe.weight"):
            by_ggml[f"model/{short.split('.')[0]}"] = name
        elif short in ("ln_f.weight", "ln_f.bias"):
            by_ggml["model/ln_f/" + ("g" if short.endswith("weight") else "b")] = name
        elif (m := _BLOCK_RE.fullmatch(short)) and m.group(2) in _BLOCK_NAMES:
            by_ggml[f"model/h{m.group(1)}/{_BLOCK_NAMES[m.group(2)]}"] = name
        else:
            raise ValueError(f"{model_dir}: tensor {name!r} is not part of a GPT-2 LM (GPT2LMHeadModel)")
    if "model/lm_head" not in by_ggml:
        if not config.get("tie_word_embeddings", True):
            raise ValueError(f"{model_dir}: lm_head.weight is missing and the embeddings are not tied")
        by_ggml["model/lm_head"] = by_ggml.get("model/wte", "")

    order = _gpt2_tensor_names(config["n_layer"])
    missing = [n for n in order if not by_ggml.get(n)]
    if missing:
        raise ValueError(f"{model_dir}: safetensors lack tensors for {', '.join(missing[:5])}")
    return [(n, by_ggml[n], weight_map[by_ggml[n]]) for n in order]


def _gpt2_tensor_names(n_layer: int) -> list[str]:
    """Every tensor of a GPT-2 GGML file, in llm-rs's converter order."""
    names = ["model/wte", "model/wpe"]
    for i in range(n_layer):
        names += [f"model/h{i}/{v}" for v in _BLOCK_NAMES.values()]
    return names + ["model/ln_f/g", "model/ln_f/b", "model/lm_head"]


def gpt2_config_problems(config: dict) -> list[str]:
    """Why ggml (llm-rs and llama.cpp alike) would compute another function than this HF config."""
    problems = []
    if config.get("model_type") != "gpt2":
        problems.append(f"model_type is {config.get('model_type')!r}, expected 'gpt2'")
    if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append("activation_function must be the tanh GELU (gelu_new) that ggml computes")
    if config.get("scale_attn_by_inverse_layer_idx") or config.get("reorder_and_upcast_attn"):
        problems.append("scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported by ggml")
    return problems


def _check_config(model_dir: Path, config: dict) -> None:
    problems = gpt2_config_problems(config)
    if config.get("n_inner") not in (None, 4 * config["n_embd"]):
        problems.append("n_inner must be 4 * n_embd (llm-rs's GPT-2 assumes it)")
    if problems:
        raise ValueError(f"{model_dir}/config.json cannot be exported to GGML: " + "; ".join(problems))


@dataclass(frozen=True)
class VocabEntry:
    text: str  # byte-level BPE string (GPT-2's printable spelling of bytes), or an added token's text
    added: bool  # an added token (`<s>`, `</s>`, …), matched literally before BPE
    special: bool


def tokenizer_vocab(tokenizer, n_vocab: int) -> list[VocabEntry | None]:
    """Each id's entry; None for ids the tokenizer does not use (the model's embedding may be
    padded past it). Only GPT-2 style byte-level BPE tokenizers can be exported."""
    added = tokenizer.added_tokens_decoder
    vocab: list[VocabEntry | None] = [None] * n_vocab
    for token, i in tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True).items():
        if i >= n_vocab:
            raise ValueError(f"tokenizer id {i} ({token!r}) is past the model's vocab_size {n_vocab}")
        if i in added:
            vocab[i] = VocabEntry(added[i].content, added=True, special=added[i].special)
        elif all(ch in BYTE_OF_CHAR for ch in token):
            vocab[i] = VocabEntry(token, added=False, special=False)
        else:
            raise ValueError(
                f"token {i} {token!r} is not byte-level BPE; only GPT-2 style byte-level tokenizers can be exported to GGML or GGUF"
            )
    return vocab


def tokenizer_vocab_bytes(tokenizer, n_vocab: int) -> list[bytes]:
    """Each id's raw bytes: byte-level BPE tokens mapped back through GPT-2's byte↔unicode
    table, added (special) tokens as their literal UTF-8 text, unused ids empty."""
    vocab = [
        b"" if e is None else e.text.encode("utf-8") if e.added else bytes(BYTE_OF_CHAR[ch] for ch in e.text)
        for e in tokenizer_vocab(tokenizer, n_vocab)
    ]
    if b"<|endoftext|>" not in vocab:
        raise ValueError("the tokenizer has no <|endoftext|> token, which llm-rs's GPT-2 requires")
    return vocab


def bpe_merges(tokenizer_json: dict) -> list[str]:
    """A `tokenizer.json`'s merges as "a b" strings, the form llm-rs and GGUF read (current
    `tokenizers` writes pairs); byte-level tokens never contain a space, so the join is unambiguous."""
    return [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]


def tokenizer_sidecar(ggml_path: Path) -> Path:
    """The BPE tokenizer written next to a GGML file for llm-rs (see `write_llm_rs_tokenizer`)."""
    return Path(ggml_path).with_suffix(".tokenizer.json")


def write_llm_rs_tokenizer(tokenizer, out_path: Path) -> None:
    """The BPE tokenizer as a `tokenizer.json` llm-rs's bundled `tokenizers` can parse.

    llm-rs's tokenizer for the vocabulary inside a GGML file is not BPE (it picks the
    segmentation with the longest pieces), so text such as " —" or tabs would get other ids
    than in training; given this file it runs the real BPE. Two changes make it usable:
    - merges as "a b" strings (`bpe_merges`): llm-rs cannot read the pairs current `tokenizers` writes
      (docs/ARCHITECTURE.md, "GGML files"); byte-level tokens never contain a space, so the join is unambiguous;
    - a `Fuse` decoder instead of ByteLevel: llm-rs decodes each generated token on its own,
      which turns a token holding part of a UTF-8 character into U+FFFD. With `Fuse` it hands
      out the token's byte-level string, which `evaluate.TokenText` maps back to exact bytes.
      Special tokens still come out as empty strings, which is how a reply's end is seen.
    """
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    data["model"]["merges"] = bpe_merges(data)
    data["decoder"] = {"type": "Fuse"}
    Path(out_path).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def _check_quantizable(model_dir: Path, ggml_name: str, shape: tuple[int, ...]) -> None:
    """A 2-D weight becomes blocks of 32 of 18-34 bytes; llm-rs loads the result only if its
    size is a multiple of 16 bytes, which holds for every type when rows × blocks per row is
    a multiple of 8 (see LLM_RS_TENSOR_ALIGN)."""
    rows, cols = shape
    if cols % QUANT_BLOCK or rows * (cols // QUANT_BLOCK) % 8:
        raise ValueError(
            f"{model_dir}: {ggml_name} has shape {shape}; its quantized files would not load in llm-rs. "
            f"Rows need a multiple of {QUANT_BLOCK} elements (n_embd) and rows × row/{QUANT_BLOCK} a "
            "multiple of 8: pad vocab_size to a multiple of 8 (ruGPT-3.5's 50272 is one)."
        )


def _stored_dtype(ggml_name: str, ndim: int) -> torch.dtype:
    """llm-rs's converter (and llama.cpp's): 2-D weights in f16; the position table, biases and
    norms in f32."""
    return torch.float16 if ndim == 2 and ggml_name != "model/wpe" else torch.float32


def stored_shape_and_dtype(ggml_name: str, st_name: str, st_file: Path) -> tuple[tuple[int, ...], np.dtype]:
    """What `load_tensor` will return, from the safetensors header alone (no data read)."""
    with safe_open(st_file, framework="pt") as st:
        shape = tuple(st.get_slice(st_name).get_shape())
    if ggml_name.endswith("/w"):
        shape = shape[::-1]
    return shape, np.dtype(np.float16 if _stored_dtype(ggml_name, len(shape)) == torch.float16 else np.float32)


def load_tensor(ggml_name: str, st_name: str, st_file: Path) -> np.ndarray:
    """One tensor of a `tensor_plan`, as it is stored in a GGML or GGUF file."""
    # Opened per tensor: a safetensors memory map keeps every page it touched resident until
    # closed, which would grow RSS to the whole shard.
    with safe_open(st_file, framework="pt") as st:
        return _ggml_array(ggml_name, st.get_tensor(st_name))


def _check_shapes(model_dir: Path, plan: list[tuple[str, str, Path]]) -> None:
    """Every f16 tensor's shape, from the headers, before anything is written."""
    for ggml_name, st_name, st_file in plan:
        shape, dtype = stored_shape_and_dtype(ggml_name, st_name, st_file)
        if dtype == np.float16:
            _check_quantizable(model_dir, ggml_name, shape)


def _ggml_array(ggml_name: str, tensor: torch.Tensor) -> np.ndarray:
    """llm-rs's converter: Conv1D weights transposed to (out, in), dtypes as `_stored_dtype`."""
    if ggml_name.endswith("/w"):
        tensor = tensor.T
    dtype = _stored_dtype(ggml_name, tensor.ndim)
    out = tensor.to(dtype).contiguous()
    # In row blocks: a whole-tensor isfinite would allocate float32 and bool copies of it.
    if not all(torch.isfinite(rows).all() for rows in out.split(4096)):
        raise ValueError(f"tensor {ggml_name} has values that overflow {dtype} (or are NaN/inf)")
    return out.numpy()


def _write_tensor_header(f, name: str, ggml_type: int, shape: tuple[int, ...]) -> None:
    encoded = name.encode("utf-8")
    f.write(struct.pack("<3i", len(shape), len(encoded), ggml_type))
    f.write(struct.pack(f"<{len(shape)}i", *reversed(shape)))
    f.write(encoded)


def write_ggml_f16(model_dir: Path, out_path: Path) -> dict:
    """Export a GPT-2 safetensors checkpoint to llm-rs's f16 GGML file, plus its `.meta` and
    `.tokenizer.json` sidecars. Written in place: the caller publishes the set
    (`artifacts.publish_file`), so the three files (and any added beside them) switch together.

    Streams: one tensor is read, converted and written at a time (peak memory ≈ the largest
    tensor, not the model). Returns a summary: tensors, parameters (elements stored in the
    file, a tied lm_head counted again: the denominator of bits per weight), size_bytes.
    """
    model_dir, out_path = published(model_dir), Path(out_path)
    config = json.loads((model_dir / "config.json").read_text())
    _check_config(model_dir, config)
    check_safetensors(model_dir)
    plan = tensor_plan(model_dir, config)
    _check_shapes(model_dir, plan)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    try:
        vocab = tokenizer_vocab_bytes(tokenizer, config["vocab_size"])
    except ValueError as exc:
        raise ValueError(f"{model_dir}: {exc}") from exc
    hparams = (config["vocab_size"], config["n_positions"], config["n_embd"], config["n_head"], config["n_layer"])

    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_llm_rs_tokenizer(tokenizer, tokenizer_sidecar(out_path))
    write_llm_rs_meta(out_path, QuantizationType.F16)
    parameters = 0
    with open(out_path, "wb") as f:
        f.write(_HEADER.pack(GGML_MAGIC, *hparams, FTYPE_F16))
        f.write(struct.pack("<i", len(vocab)))
        for token in vocab:
            f.write(struct.pack("<I", len(token)))
            f.write(token)
        for ggml_name, st_name, st_file in plan:
            data = load_tensor(ggml_name, st_name, st_file)
            ggml_type = GGMLQuantizationType.F16 if data.dtype == np.float16 else GGMLQuantizationType.F32
            _write_tensor_header(f, ggml_name, ggml_type, data.shape)
            data.tofile(f)
            parameters += data.size
            del data
    written = read_ggml(out_path)
    if list(written.tensors) != [name for name, _, _ in plan] or written.vocab != vocab:
        raise RuntimeError(f"{out_path}: the file read back differs from what was written")
    return {"tensors": len(plan), "parameters": parameters, "size_bytes": out_path.stat().st_size}


def meta_path(ggml_path: Path) -> Path:
    """llm-rs's `AutoModel` finds a file's model type in this sidecar."""
    return Path(ggml_path).with_suffix(".meta")


def write_llm_rs_meta(ggml_path: Path, quantization: QuantizationType) -> Path:
    """The `.meta` JSON llm-rs writes next to its files. No `base_model` (a hub id to fetch a
    tokenizer from): `evaluate.load_llm_rs` passes the tokenizer sidecar instead."""
    metadata = ModelMetadata(
        model=KnownModels.Gpt2,
        quantization=quantization,
        container=ContainerType.GGML,
        quantization_version=(QuantizationVersions.Not_Quantized if quantization == QuantizationType.F16 else QuantizationVersions.V2),
    )
    meta_path(ggml_path).write_text(json.dumps(metadata.serialize(), indent=4) + "\n")
    return meta_path(ggml_path)


# ---------------------------------------------------------------------------- reading


def read_hparams(path: Path) -> GGMLHparams:
    with open(path, "rb") as f:
        header = f.read(_HEADER.size)
    magic, *hp = _HEADER.unpack(header) if len(header) == _HEADER.size else (0,)
    if magic != GGML_MAGIC:
        raise ValueError(f"{path}: not an unversioned GGML file (magic {magic:#x}, expected {GGML_MAGIC:#x})")
    return GGMLHparams(*hp)


def read_ggml(path: Path) -> GGMLFile:
    """Parse a GPT-2 GGML file's header, vocabulary and tensor index; tensor data are read
    only when asked for (`GGMLTensor`).

    A truncated or cut file fails here, naming where it ends, before llm-rs (which aborts the
    whole process on a bad file) or any other work sees it.
    """
    path = Path(path)
    hparams = read_hparams(path)
    buf = np.memmap(path, dtype=np.uint8, mode="r")
    pos = _HEADER.size

    def need(n: int, what: str) -> None:
        if n < 0 or pos + n > len(buf):
            raise ValueError(f"{path}: truncated or corrupt: {what} at byte {pos} runs past the end ({len(buf)} bytes)")

    def ints(n: int, what: str) -> tuple[int, ...]:
        nonlocal pos
        need(4 * n, what)
        values = struct.unpack_from(f"<{n}i", buf.data, pos)
        pos += 4 * n
        return values

    (n_vocab,) = ints(1, "the vocabulary size")
    if n_vocab != hparams.n_vocab:
        raise ValueError(f"{path}: vocabulary has {n_vocab} entries, hyperparameters say {hparams.n_vocab}")
    vocab = []
    for i in range(n_vocab):
        (length,) = ints(1, f"vocabulary entry {i}")
        need(length, f"vocabulary entry {i}")
        vocab.append(bytes(buf[pos : pos + length]))
        pos += length

    tensors = {}
    while pos < len(buf):
        n_dims, name_len, type_id = ints(3, "a tensor header")
        if not 1 <= n_dims <= 4:
            raise ValueError(f"{path}: corrupt tensor header at byte {pos - 12} ({n_dims} dimensions)")
        ne = ints(n_dims, "a tensor header")
        need(name_len, "a tensor name")
        name = bytes(buf[pos : pos + name_len]).decode("utf-8", errors="replace")
        pos += name_len
        try:
            ggml_type = GGMLQuantizationType(type_id)
        except ValueError:
            raise ValueError(f"{path}: tensor {name} has unknown ggml type {type_id} (corrupt file?)") from None
        block, block_bytes = GGML_QUANT_SIZES[ggml_type]
        nbytes = int(np.prod(ne, dtype=np.int64)) // block * block_bytes
        need(nbytes, f"tensor {name}")
        tensors[name] = GGMLTensor(name, ggml_type, tuple(ne), path, pos, nbytes)
        pos += nbytes
    missing = [n for n in _gpt2_tensor_names(hparams.n_layer) if n not in tensors]
    if missing:
        raise ValueError(f"{path}: truncated or incomplete: it ends at byte {pos} without tensor {missing[0]}")
    return GGMLFile(hparams, vocab, tensors)


def llm_rs_load_problems(ggml: GGMLFile) -> list[str]:
    """Why llm-rs would abort loading this file (empty when it loads), see LLM_RS_TENSOR_ALIGN."""
    return [
        f"tensor {t.name} is {t.nbytes} bytes, not a multiple of {LLM_RS_TENSOR_ALIGN}"
        for t in ggml.tensors.values()
        if t.nbytes % LLM_RS_TENSOR_ALIGN
    ]


def file_figures(path: Path, f16_path: Path) -> dict:
    """`artifacts.weights_file_figures` of a GGML file."""
    elements = sum(int(np.prod(t.ne, dtype=np.int64)) for t in read_ggml(path).tensors.values())
    return weights_file_figures(path, f16_path, elements)


def iter_hf_state_dict(ggml: GGMLFile) -> Iterator[tuple[str, torch.Tensor]]:
    """The file's weights, dequantized to float32, under GPT2LMHeadModel's parameter names."""
    hf_block = {v: k for k, v in _BLOCK_NAMES.items()}
    for name, tensor in ggml.tensors.items():
        array = tensor.to_numpy()
        if name == "model/lm_head":
            hf = "lm_head.weight"
        elif name in ("model/wte", "model/wpe"):
            hf = f"transformer.{name.split('/')[1]}.weight"
        elif name.startswith("model/ln_f/"):
            hf = "transformer.ln_f." + ("weight" if name.endswith("/g") else "bias")
        else:
            layer, rest = name.removeprefix("model/h").split("/", 1)
            hf = f"transformer.h.{layer}.{hf_block[rest]}"
        if name.endswith("/w"):
            array = array.T  # back to Conv1D's (in, out)
        yield hf, torch.from_numpy(np.ascontiguousarray(array))


def ggml_to_hf_model(path: Path, model_dir: Path):
    """An HF GPT2LMHeadModel (architecture from `model_dir`'s config) carrying the GGML file's
    own, dequantized weights, whole and in float32 (52 GB for 13B): the independent reference
    the tests hold the streamed evaluation (`evaluate.target_logprobs`) to."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config.from_pretrained(model_dir)
    config.tie_word_embeddings = False  # the file has its own (possibly differently quantized) lm_head
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    state = dict(iter_hf_state_dict(read_ggml(path)))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
