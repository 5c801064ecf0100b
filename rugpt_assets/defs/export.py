"""The export half: `ggml_f16` and one `ggml_quantized` partition per `QuantType`, and what
every exported file's asset shares (the evaluation set, the table of all files)."""

from pathlib import Path

import dagster as dg
from transformers import AutoTokenizer

from rugpt_assets import settings
from rugpt_assets.core import evaluate, ggml
from rugpt_assets.core.artifacts import publish_file, published, read_jsonl, require_upstream
from rugpt_assets.core.configs import ExportConfig
from rugpt_assets.core.evaluate import perplexity_delta, read_evaluation
from rugpt_assets.core.figures import MEASURE_DIGITS, PERPLEXITY_DIGITS, QUALITY_DIGITS, percent, significant
from rugpt_assets.core.gguf import GGUFQuantReport, GGUFType
from rugpt_assets.core.quantize import QuantReport, QuantType, quantize_ggml
from rugpt_assets.core.scoring import EvalSet, build_eval_set
from rugpt_assets.defs.automation import retrain_condition
from rugpt_assets.defs.data import chat_set
from rugpt_assets.defs.metadata import metadata_table
from rugpt_assets.defs.model import merged_model
from rugpt_assets.defs.resources import StorageResource

PROFILE = settings.profile()


class ExportRunConfig(settings.launchpad_config(PROFILE.export)):
    """`ExportConfig` in the launchpad, defaulting to the profile's values."""


quant_partitions = dg.StaticPartitionsDefinition([q.name for q in QuantType])


def system_prompt(storage: StorageResource) -> str:
    """The system prompt the adapter was trained with (the profile's if it recorded none)."""
    return evaluate.trained_system_prompt(storage.layout.lora_adapter, PROFILE.train.system_prompt)


def eval_set_of(storage: StorageResource, export: ExportConfig) -> EvalSet:
    """The validation chats as the adapter was trained on them (its own system prompt)."""
    layout = storage.layout
    tokenizer = AutoTokenizer.from_pretrained(layout.merged_model, trust_remote_code=False)
    val_chats = read_jsonl(layout.chat_set / "val.jsonl")
    return build_eval_set(val_chats, tokenizer, export.eval_max_tokens, system_prompt(storage), export.eval_chats)


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
    """Size (MiB), speed, perplexity and KL to its format's f16 of every GGML and GGUF file
    materialized so far. Tokens/s are measured with the same thread count (ExportConfig.threads)."""
    rows = []
    for container, name, path in exported_files(storage):
        if path.exists() and evaluate.evaluation_path(path).exists():
            numbers = read_evaluation(path)
            rows.append(
                {
                    "format": container,
                    "type": name,
                    "size_mib": significant(numbers["size_bytes"] / 2**20, QUALITY_DIGITS),
                    "bits_per_weight": significant(numbers["bits_per_weight"], QUALITY_DIGITS),
                    "tokens_per_s": round(numbers["generation_tokens_per_s"]),
                    "perplexity": significant(numbers["perplexity"], PERPLEXITY_DIGITS),
                    "kl_to_f16": significant(numbers.get("kl_to_f16", 0.0), MEASURE_DIGITS),
                    "eval_set": numbers.get("eval_set_sha256", "")[:12],
                }
            )
    columns = ["format", "type", "size_mib", "bits_per_weight", "tokens_per_s", "perplexity", "kl_to_f16", "eval_set"]
    return metadata_table(rows, columns)


def file_metadata(path: Path, numbers: dict) -> dict:
    """What every exported file's asset shows of its evaluation."""
    return {
        "size_bytes": numbers["size_bytes"],
        "bits_per_weight": significant(numbers["bits_per_weight"], QUALITY_DIGITS),
        "sha256": numbers["sha256"],
        "load_time_s": significant(numbers["load_time_s"], MEASURE_DIGITS),
        "generation_tokens_per_s": round(numbers["generation_tokens_per_s"]),
        "perplexity": significant(numbers["perplexity"], PERPLEXITY_DIGITS),
        "eval_chats": numbers["eval_chats"],
        "eval_tokens": numbers["eval_tokens"],
        "eval_set_sha256": numbers["eval_set_sha256"],
        "eval_time_s": significant(numbers["eval_time_s"], MEASURE_DIGITS),
        "sample_generation": dg.MetadataValue.md(f"```\n{numbers['sample_text']}\n```"),
        "path": dg.MetadataValue.path(str(path)),
    }


def against_f16(numbers: dict, f16: dict, report: QuantReport | GGUFQuantReport) -> dict:
    """What a quantized file's asset shows against its format's f16 file."""
    return {
        "ratio_to_f16": significant(report.ratio_to_f16, MEASURE_DIGITS),
        "kl_to_f16": significant(numbers["kl_to_f16"], MEASURE_DIGITS),
        "f16_tail_mass": significant(numbers["f16_tail_mass"], MEASURE_DIGITS),
        "quantize_time_s": significant(report.wall_time_s, MEASURE_DIGITS),
        "perplexity_f16": significant(f16["perplexity"], PERPLEXITY_DIGITS),
        "perplexity_delta_pct": percent(perplexity_delta(numbers, f16)),
    }


def perplexity_bound(path: Path, f16_path: Path, bound: float) -> dg.AssetCheckResult:
    """A quantized file's perplexity within `bound` (relative) of its format's f16 file's."""
    quantized = read_evaluation(path)
    delta = perplexity_delta(quantized, read_evaluation(f16_path))
    return dg.AssetCheckResult(
        passed=delta <= bound,
        metadata={
            "perplexity_delta_pct": percent(delta),
            "bound_pct": percent(bound),
            "kl_to_f16": significant(quantized["kl_to_f16"], MEASURE_DIGITS),
        },
    )


@dg.asset(
    deps=[merged_model, chat_set],  # chat_set: the validation chats every file is evaluated on
    group_name="export",
    kinds={"ggml"},
    owners=["team:ml"],
    pool="cpu",
    code_version=ggml.GGML_WRITER_VERSION,
    # New chats reach this asset through the retrain (lora_adapter → merged_model); re-exporting
    # the old model on them first would export twice. Until then a partition run says f16 is stale.
    automation_condition=retrain_condition(ignoring=dg.AssetSelection.assets(chat_set)),
    description=(
        "The merged model as an f16 GGML file in llm-rs's container (with its `.meta` sidecar), "
        "streamed tensor by tensor, vocabulary stored as the tokenizer's bytes, then evaluated "
        "layer by layer on `chat_set`'s validation chats (perplexity; the f16 distributions every "
        "quantization's KL is measured against, in `model-f16.reference.npz`). "
        "File: `<storage>/ggml/model-f16.bin`. Metadata `quantizations` compares size, speed, "
        "perplexity and KL to f16 of every GGML and GGUF file; each quantization run records the "
        "updated table as an observation of this asset (newest first under Events)."
    ),
)
def ggml_f16(context: dg.AssetExecutionContext, config: ExportRunConfig, storage: StorageResource) -> dg.MaterializeResult:
    export = settings.config_to_dataclass(config, ExportConfig)
    layout = storage.layout
    require_upstream("ggml_f16", {"merged_model": [layout.merged_model / "config.json"], "chat_set": [layout.chat_set / "val.jsonl"]})
    path = layout.ggml_f16
    eval_set = eval_set_of(storage, export)
    with publish_file(path) as staged:  # the file, its sidecars, its evaluation and reference: one set
        ggml.write_ggml_f16(layout.merged_model, staged)
        numbers, reference = evaluate.evaluate_ggml_file(staged, eval_set, export, progress=context.log.info)
        evaluate.write_evaluation(staged, numbers, reference)
    context.log.info(f"f16: {numbers['size_bytes'] / 2**20:.1f} MiB, perplexity {numbers['perplexity']:.3f}")
    return dg.MaterializeResult(metadata={**file_metadata(path, numbers), "quantizations": quant_table(storage)})


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
        "partitions run side by side and never touch each other's files. Perplexity and KL are "
        "measured against ggml_f16's evaluation on the same validation chats (same content hash), "
        "or the run fails before quantizing. Files: `<storage>/ggml/model-<type>.bin`."
    ),
)
def ggml_quantized(context: dg.AssetExecutionContext, config: ExportRunConfig, storage: StorageResource) -> dg.MaterializeResult:
    export = settings.config_to_dataclass(config, ExportConfig)
    quant = QuantType[context.partition_key]
    layout = storage.layout
    path = layout.ggml_quantized(quant.name)
    eval_set = eval_set_of(storage, export)
    evaluate.read_reference(layout.ggml_f16, eval_set)  # stale or missing: fail before quantizing
    f16_path = published(layout.ggml_f16)  # quantized, compared and read from one f16 version
    with publish_file(path) as staged:
        report = quantize_ggml(f16_path, quant, staged)
        numbers, _ = evaluate.evaluate_ggml_file(staged, eval_set, export, f16_path, progress=context.log.info)
        evaluate.write_evaluation(staged, numbers)
    f16 = read_evaluation(f16_path)
    delta = perplexity_delta(numbers, f16)
    context.log.info(f"{quant.name}: {report.size_bytes / 2**20:.1f} MiB, perplexity {delta:+.2%} vs f16")
    # The f16 asset's table gains this row: record it there as an observation.
    context.log_event(dg.AssetObservation(asset_key=ggml_f16.key, metadata={"quantizations": quant_table(storage)}))
    return dg.MaterializeResult(
        metadata={**file_metadata(path, numbers), **against_f16(numbers, f16, report), "quantizations": quant_table(storage)}
    )
