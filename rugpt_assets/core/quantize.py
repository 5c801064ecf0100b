"""GGML quantization with llm-rs's own quantizer, and what each type may cost.

`QuantType` is the one list of quantization types: the Dagster partitions, the files' names,
the ftype checked in each header and the perplexity bound of the asset check all come from it.
"""

from __future__ import annotations

import enum
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from llm_rs import ContainerType, Gpt2, QuantizationType

from rugpt_assets.core import ggml

# Perplexity bound of the asset check, relative to the f16 file's perplexity:
#     max increase = SAFETY_FACTOR * published increase + NOISE_SLACK
# The published figures (llama.cpp, LLaMA-13B, wikitext; docs/ARCHITECTURE.md, "GGML files") are what a 13B model
# loses. A LoRA-tuned ruGPT-3.5-13B should land near them; a factor of 3 leaves room for
# another model family and text domain. The slack covers the evaluation itself: a few dozen
# validation chats, where a tiny model's delta is first-order noise of either sign (the demo
# GPT-2 measured -0.5 % … +1.2 % for every type, docs/PERFORMANCE.md "ggml"). A broken file
# (wrong block layout, transposition or vocabulary) multiplies perplexity instead, far past
# any of these bounds (Q4_0 9.5 %, Q8_0 2.03 %).
SAFETY_FACTOR = 3.0
NOISE_SLACK = 0.02


def max_ppl_increase(published_ppl_increase: float) -> float:
    """An asset check's bound on perplexity / f16 perplexity - 1 for a type with this published
    cost (see SAFETY_FACTOR); GGML and GGUF types alike."""
    return SAFETY_FACTOR * published_ppl_increase + NOISE_SLACK


class QuantType(enum.Enum):
    """name = (ftype in the file header: 1000 * quantization version 2 + ggml ftype,
    published perplexity increase vs f16 as a fraction)."""

    Q4_0 = (2002, 0.025)
    Q4_1 = (2003, 0.020)
    Q5_0 = (2008, 0.006)
    Q5_1 = (2009, 0.003)
    Q8_0 = (2007, 0.0001)

    def __init__(self, ftype: int, published_ppl_increase: float):
        self.ftype = ftype
        self.published_ppl_increase = published_ppl_increase

    @property
    def ggml_type(self) -> GGMLQuantizationType:
        """The tensor type of the file's 2-D weights."""
        return GGMLQuantizationType[self.name]

    @property
    def bits_per_weight(self) -> float:
        """Nominal bits of one quantized weight (block bytes over block length)."""
        block, block_bytes = GGML_QUANT_SIZES[self.ggml_type]
        return 8 * block_bytes / block

    @property
    def llm_rs_type(self) -> QuantizationType:
        return getattr(QuantizationType, self.name)

    @property
    def max_ppl_increase(self) -> float:
        return max_ppl_increase(self.published_ppl_increase)


@dataclass(frozen=True)
class QuantReport:
    path: Path
    quant: QuantType
    size_bytes: int
    parameters: int  # tensor elements in the file
    bits_per_weight: float  # file bits / parameters, headers and f32 norms included
    ratio_to_f16: float
    sha256: str
    wall_time_s: float


def _verify(path: Path, f16: ggml.GGMLFile, quant: QuantType) -> None:
    written = ggml.read_ggml(path)
    problems = []
    if written.hparams.ftype != quant.ftype:
        problems.append(f"ftype {written.hparams.ftype}, expected {quant.ftype}")
    if set(written.tensors) != set(f16.tensors):
        problems.append("its tensors differ from the f16 file's")
    if not any(t.type == quant.ggml_type for t in written.tensors.values()):
        problems.append(f"no tensor is {quant.name}")
    if written.vocab != f16.vocab:
        problems.append("its vocabulary differs from the f16 file's")
    problems += ggml.llm_rs_load_problems(written)
    if problems:
        raise RuntimeError(f"llm-rs quantized {path} wrongly: " + "; ".join(problems))


def quantize_ggml(f16_path: Path, quant: QuantType, out_path: Path, progress: Callable[[str], None] | None = None) -> QuantReport:
    """Quantize an f16 GGML file (from `ggml.write_ggml_f16`) with llm-rs into `out_path`,
    with the `.meta` and tokenizer sidecars llm-rs loads it with, and check it reads back right.
    Written in place: the caller publishes the set (`artifacts.publish_file`).
    `progress` receives llm-rs's per-tensor messages.
    """
    f16_path, out_path = Path(f16_path).resolve(), Path(out_path)
    if not f16_path.is_file():
        raise FileNotFoundError(f"f16 GGML file {f16_path} does not exist; materialize ggml_f16 first")
    f16 = ggml.read_ggml(f16_path)
    if f16.hparams.ftype != ggml.FTYPE_F16:
        raise ValueError(f"{f16_path} has ftype {f16.hparams.ftype}; quantize the f16 file (ftype 1)")

    start = time.perf_counter()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if ggml.tokenizer_sidecar(f16_path).is_file():
        shutil.copyfile(ggml.tokenizer_sidecar(f16_path), ggml.tokenizer_sidecar(out_path))
    ggml.write_llm_rs_meta(out_path, quant.llm_rs_type)
    Gpt2.quantize(str(f16_path), str(out_path), quant.llm_rs_type, ContainerType.GGML, callback=progress)
    _verify(out_path, f16, quant)
    wall_time = time.perf_counter() - start

    figures = ggml.file_figures(out_path, f16_path)
    return QuantReport(
        path=out_path,
        quant=quant,
        size_bytes=figures["size_bytes"],
        parameters=figures["parameters"],
        bits_per_weight=figures["bits_per_weight"],
        ratio_to_f16=figures["ratio_to_f16"],
        sha256=figures["sha256"],
        wall_time_s=wall_time,
    )
