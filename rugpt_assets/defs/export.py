"""The export half: `ggml_f16` and one `ggml_quantized` partition per `QuantType`, and what
every exported file's asset shares (its evaluation beside it, the table of all files)."""

import json
from collections.abc import Callable
from pathlib import Path

import dagster as dg

from rugpt_assets import settings
from rugpt_assets.core import evaluate, ggml
from rugpt_assets.core.artifacts import atomic_file, read_jsonl
from rugpt_assets.core.configs import ExportConfig
from rugpt_assets.core.gguf import GGUFType
from rugpt_assets.core.quantize import QuantType, quantize_ggml
from rugpt_assets.defs.automation import retrain_condition
from rugpt_assets.defs.model import merged_model
from rugpt_assets.defs.resources import StorageResource, metadata_table

ExportRunConfig = settings.launchpad_config("ExportRunConfig", settings.active_profile().export)

quant_partitions = dg.StaticPartitionsDefinition([q.name for q in QuantType])


def evaluation_path(ggml_path: Path) -> Path:
    """Each file's numbers sit beside it, so the f16 table and the quant deltas can read them."""
    return ggml_path.with_suffix(".eval.json")


def read_evaluation(ggml_path: Path) -> dict:
    return json.loads(evaluation_path(ggml_path).read_text())


def perplexity_delta(numbers: dict, f16_numbers: dict) -> float:
    """Relative perplexity change against f16: what the per-type bound limits."""
    return numbers["perplexity"] / f16_numbers["perplexity"] - 1


def evaluate_and_record(
    evaluate_file: Callable[..., dict], path: Path, f16_path: Path, storage: StorageResource, export: ExportConfig
) -> dict:
    """`evaluate_file` (GGML's or GGUF's) on the validation chats, written beside the file."""
    layout = storage.layout
    val_chats = list(read_jsonl(layout.chat_set / "val.jsonl"))
    numbers = evaluate_file(path, layout.merged_model, val_chats, export, f16_path=f16_path)
    with atomic_file(evaluation_path(path)) as tmp:
        tmp.write_text(json.dumps(numbers, ensure_ascii=False, indent=2))
    return numbers


def exported_files(storage: StorageResource) -> list[tuple[str, str, Path]]:
    """(format, type, path) of every file the export assets can write, each format's f16 first."""
    layout = storage.layout
    return (
        [("GGML", "F16", layout.ggml_f16)]
        + [("GGML", q.name, layout.ggml_quantized(q.name)) for q in QuantType]
        + [("GGUF", "F16", layout.gguf_f16)]
        + [("GGUF", t.name, layout.gguf_quantized(t.name)) for t in GGUFType]
    )


def quant_table(storage: StorageResource) -> dg.MetadataValue:
    """Size, speed, perplexity and KL to its format's f16 of every GGML and GGUF file
    materialized so far. Tokens/s are measured with the same thread count (ExportConfig.threads)."""
    rows = []
    for container, name, path in exported_files(storage):
        if path.exists() and evaluation_path(path).exists():
            numbers = read_evaluation(path)
            rows.append(
                {
                    "format": container,
                    "type": name,
                    "size_mb": round(numbers["size_bytes"] / 2**20, 2),
                    "bits_per_weight": round(numbers["bits_per_weight"], 2),
                    "tokens_per_s": round(numbers["generation_tokens_per_s"], 1),
                    "perplexity": round(numbers["perplexity"], 4),
                    "kl_to_f16": round(numbers.get("kl_to_f16", 0.0), 6),
                }
            )
    columns = ["format", "type", "size_mb", "bits_per_weight", "tokens_per_s", "perplexity", "kl_to_f16"]
    return metadata_table(rows, columns)


def file_metadata(path: Path, numbers: dict) -> dict:
    return {
        "size_bytes": numbers["size_bytes"],
        "bits_per_weight": numbers["bits_per_weight"],
        "sha256": numbers["sha256"],
        "load_time_s": numbers["load_time_s"],
        "generation_tokens_per_s": numbers["generation_tokens_per_s"],
        "perplexity": numbers["perplexity"],
        "sample_generation": dg.MetadataValue.md(f"```\n{numbers['sample_text']}\n```"),
        "path": dg.MetadataValue.path(str(path)),
    }


@dg.asset(
    deps=[merged_model],
    group_name="export",
    kinds={"ggml"},
    owners=["team:ml"],
    pool="cpu",
    code_version=ggml.GGML_WRITER_VERSION,
    automation_condition=retrain_condition(),
    description=(
        "The merged model as an f16 GGML file in llm-rs's container (with its `.meta` sidecar), "
        "streamed tensor by tensor, vocabulary stored as the tokenizer's bytes. "
        "File: `<storage>/ggml/model-f16.bin`. Metadata `quantizations` compares size, speed, "
        "perplexity and KL to f16 of every GGML and GGUF file; each quantization run records the "
        "updated table as an observation of this asset (newest first under Events)."
    ),
)
def ggml_f16(
    context: dg.AssetExecutionContext, config: ExportRunConfig, storage: StorageResource
) -> dg.MaterializeResult:
    export = settings.config_to_dataclass(config, ExportConfig)
    path = storage.layout.ggml_f16
    ggml.write_ggml_f16(storage.layout.merged_model, path)
    numbers = evaluate_and_record(evaluate.evaluate_ggml_file, path, path, storage, export)
    context.log.info(f"f16: {numbers['size_bytes'] / 2**20:.1f} MiB, perplexity {numbers['perplexity']:.3f}")
    return dg.MaterializeResult(
        metadata={**file_metadata(path, numbers), "quantizations": quant_table(storage)}
    )


@dg.asset(
    deps=[ggml_f16],
    partitions_def=quant_partitions,
    group_name="export",
    kinds={"ggml"},
    owners=["team:ml"],
    pool="cpu",
    code_version=ggml.GGML_WRITER_VERSION,
    automation_condition=retrain_condition(),
    backfill_policy=dg.BackfillPolicy.multi_run(1),
    description=(
        "`ggml_f16` quantized by llm-rs, one partition per type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0); "
        "partitions run side by side and never touch each other's files. "
        "Files: `<storage>/ggml/model-<type>.bin`."
    ),
)
def ggml_quantized(
    context: dg.AssetExecutionContext, config: ExportRunConfig, storage: StorageResource
) -> dg.MaterializeResult:
    export = settings.config_to_dataclass(config, ExportConfig)
    quant = QuantType[context.partition_key]
    layout = storage.layout
    path = layout.ggml_quantized(quant.name)
    report = quantize_ggml(layout.ggml_f16, quant, path)
    numbers = evaluate_and_record(evaluate.evaluate_ggml_file, path, layout.ggml_f16, storage, export)
    f16 = read_evaluation(layout.ggml_f16)
    delta = perplexity_delta(numbers, f16)
    context.log.info(f"{quant.name}: {report.size_bytes / 2**20:.1f} MiB, perplexity {delta:+.2%} vs f16")
    # The f16 asset's table gains this row: record it there as an observation.
    context.log_event(dg.AssetObservation(asset_key=ggml_f16.key, metadata={"quantizations": quant_table(storage)}))
    return dg.MaterializeResult(
        metadata={
            **file_metadata(path, numbers),
            "ratio_to_f16": report.ratio_to_f16,
            "kl_to_f16": numbers["kl_to_f16"],
            "quantize_time_s": report.wall_time_s,
            "perplexity_f16": f16["perplexity"],
            "perplexity_delta": delta,
            "quantizations": quant_table(storage),
        }
    )
