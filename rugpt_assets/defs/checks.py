"""Asset checks on the exported GGML files: they load and generate in llm-rs, f16 agrees with
the merged HF model token for token, and each quantization stays within its perplexity bound.
Each check runs with the export settings its file was materialized with (recorded beside the
file), so a launchpad override reaches the checks too."""

from pathlib import Path

import dagster as dg

from rugpt_assets.core import evaluate
from rugpt_assets.core.artifacts import published
from rugpt_assets.core.chat_template import render_prompt
from rugpt_assets.core.configs import ExportConfig
from rugpt_assets.core.evaluate import evaluated_with
from rugpt_assets.core.figures import MEASURE_DIGITS, significant
from rugpt_assets.core.quantize import QuantType
from rugpt_assets.defs.export import ggml_f16, ggml_quantized, perplexity_bound, quant_partitions, system_prompt
from rugpt_assets.defs.resources import StorageResource


def _check_prompt(storage: StorageResource, export: ExportConfig) -> str:
    return render_prompt([{"role": "user", "content": export.check_prompt}], system_prompt(storage))


def _generates(path: Path, asset: str, storage: StorageResource) -> dg.AssetCheckResult:
    path = published(path)  # the file and the settings recorded with it, from one version
    export = evaluated_with(path, asset)
    model, load_s = evaluate.load_llm_rs(path, export.threads)
    out = evaluate.generate(model, _check_prompt(storage, export), export.check_new_tokens, stop_at_special=False)
    return dg.AssetCheckResult(
        passed=out.new_tokens == export.check_new_tokens,
        metadata={"load_time_s": significant(load_s, MEASURE_DIGITS), "new_tokens": out.new_tokens, "text": out.text},
    )


@dg.asset_check(asset=ggml_f16, blocking=True, description="Loads in llm-rs and generates tokens.")
def ggml_f16_generates(storage: StorageResource) -> dg.AssetCheckResult:
    return _generates(storage.layout.ggml_f16, "ggml_f16", storage)


@dg.asset_check(
    asset=ggml_f16,
    blocking=True,
    description="llm-rs greedy output (top_k=1) equals the merged model's for a fixed prompt.",
)
def ggml_f16_matches_merged_model(storage: StorageResource) -> dg.AssetCheckResult:
    layout = storage.layout
    export = evaluated_with(layout.ggml_f16, "ggml_f16")
    agreement = evaluate.greedy_agreement(
        layout.ggml_f16, layout.merged_model, _check_prompt(storage, export), export.check_new_tokens, export.threads
    )
    return dg.AssetCheckResult(
        passed=agreement["equal"],
        metadata={"tokens": agreement["tokens"], "matching_prefix": agreement["matching_prefix"]},
    )


@dg.asset_check(asset=ggml_quantized, partitions_def=quant_partitions, description="Loads in llm-rs and generates tokens.")
def ggml_quantized_generates(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    return _generates(storage.layout.ggml_quantized(context.partition_key), "ggml_quantized", storage)


@dg.asset_check(
    asset=ggml_quantized,
    partitions_def=quant_partitions,
    description="Perplexity within the type's bound of f16's (3× the published llama.cpp cost + 2 %).",
)
def ggml_quantized_perplexity_bound(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    quant = QuantType[context.partition_key]
    layout = storage.layout
    return perplexity_bound(layout.ggml_quantized(quant.name), layout.ggml_f16, quant.max_ppl_increase)


export_checks = [
    ggml_f16_generates,
    ggml_f16_matches_merged_model,
    ggml_quantized_generates,
    ggml_quantized_perplexity_bound,
]
