"""The GGUF half of the export: `gguf_f16`, one `gguf_quantized` partition per `GGUFType`, and
their checks. Part of the code location only when llama-cpp-python (the `gguf` extra) is
installed: writing GGUF needs only the `gguf` package, but every number and check of these
assets comes from llama.cpp."""

import json
from pathlib import Path

import dagster as dg

from rugpt_assets import settings
from rugpt_assets.core import evaluate, gguf, gguf_eval, sources
from rugpt_assets.core.artifacts import publish_file, published, require_upstream, sha256_file
from rugpt_assets.core.base_model import read_manifest
from rugpt_assets.core.chat_template import render_prompt
from rugpt_assets.core.configs import ExportConfig
from rugpt_assets.core.evaluate import evaluated_with, perplexity_delta, read_evaluation
from rugpt_assets.core.figures import MEASURE_DIGITS, significant
from rugpt_assets.core.gguf import GGUFType
from rugpt_assets.defs.automation import retrain_condition
from rugpt_assets.defs.data import chat_set
from rugpt_assets.defs.export import ExportRunConfig, against_f16, eval_set_of, file_metadata, perplexity_bound, quant_table
from rugpt_assets.defs.metadata import metadata_table
from rugpt_assets.defs.model import merged_model
from rugpt_assets.defs.resources import StorageResource

PROFILE = settings.profile()
gguf_partitions = dg.StaticPartitionsDefinition([t.name for t in GGUFType])

# ai-forever/ruGPT-3.5-13B is published under the MIT license; the demo model is built here.
BASE_MODEL_LICENSE = "mit"


def model_card(storage: StorageResource) -> gguf.ModelCard:
    """Provenance for `general.*`: the base model as its snapshot's manifest records it (repo and
    resolved commit, or the demo recipe's content hash), the seven source datasets, and the
    adapter's training set."""
    layout = storage.layout
    manifest = read_manifest(layout.base_model) or {"summary": {}, "content_sha256": "unknown"}
    repo = manifest["summary"].get("repo") or PROFILE.base_model_repo or "demo (built locally)"
    revision = manifest["summary"].get("revision") or f"sha256:{manifest['content_sha256']}"
    metrics_path = layout.lora_adapter / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    train_path = layout.chat_set / "train.jsonl"
    description = (
        f"{repo} with a LoRA adapter (r {metrics.get('lora_config', {}).get('lora_r', '?')}, gigasaiga chat "
        f"template) trained on the rulm/Saiga chat set: {metrics.get('train_chats', '?')} chats, chat_set "
        f"train.jsonl sha256 {sha256_file(train_path) if train_path.exists() else '?'}."
    )
    return gguf.ModelCard(
        name=f"{repo.rsplit('/', 1)[-1]} gigasaiga LoRA",
        base_model=repo,
        base_model_revision=revision,
        license=BASE_MODEL_LICENSE,
        datasets=tuple(spec.repo for spec in sources.SOURCES),
        description=description,
    )


def _fallback_note(report: gguf.GGUFQuantReport) -> dg.MetadataValue:
    if not report.fallbacks:
        return dg.MetadataValue.md(f"none: every 2-D weight's rows fit {report.gguf_type.main_type.name} blocks")
    by_type: dict[str, list[str]] = {}
    for name, tensor_type in report.fallbacks.items():
        by_type.setdefault(tensor_type, []).append(name)
    lines = [
        f"- {tensor_type}: {len(names)} tensors ({', '.join(names[:4])}{', …' if len(names) > 4 else ''})"
        for tensor_type, names in sorted(by_type.items())
    ]
    return dg.MetadataValue.md(
        f"Rows not a multiple of the {report.gguf_type.main_type.name} block length; llama.cpp used instead:\n" + "\n".join(lines)
    )


@dg.asset(
    deps=[merged_model, chat_set],  # chat_set: the validation chats every file is evaluated on
    group_name="export",
    kinds={"gguf"},
    owners=["team:ml"],
    pool="cpu",
    code_version=gguf.GGUF_WRITER_VERSION,
    # As ggml_f16: new chats arrive through the retrain, not by re-exporting the old model first.
    automation_condition=retrain_condition(ignoring=dg.AssetSelection.assets(chat_set)),
    description=(
        "The merged model as an f16 GGUF file (architecture gpt2) for llama.cpp, Ollama and any "
        "llama-cpp-python/OpenAI client: tokenizer, the gigasaiga chat template, the seed's sampling "
        "defaults and provenance inside; an Ollama Modelfile beside it. Streamed tensor by tensor. "
        "Evaluated in llama.cpp itself on `chat_set`'s validation chats (the same evaluation set as "
        "the GGML files; the f16 distributions every GGUF quantization's KL is measured against, in "
        "`model-f16.reference.npz`). File: `<storage>/gguf/model-f16.gguf`."
    ),
)
def gguf_f16(context: dg.AssetExecutionContext, config: ExportRunConfig, storage: StorageResource) -> dg.MaterializeResult:
    export = settings.config_to_dataclass(config, ExportConfig)
    layout = storage.layout
    require_upstream("gguf_f16", {"merged_model": [layout.merged_model / "config.json"], "chat_set": [layout.chat_set / "val.jsonl"]})
    path = layout.gguf_f16
    eval_set = eval_set_of(storage, export)
    with publish_file(path) as staged:  # the file, its Modelfile, its evaluation and reference: one set
        summary = gguf.write_gguf_f16(layout.merged_model, staged, model_card(storage), eval_set.system_prompt)
        numbers, reference = gguf_eval.evaluate_gguf_file(staged, eval_set, export)
        evaluate.write_evaluation(staged, numbers, reference)
    context.log.info(f"GGUF f16: {numbers['size_bytes'] / 2**20:.1f} MiB, perplexity {numbers['perplexity']:.3f}")
    return dg.MaterializeResult(
        metadata={
            **file_metadata(path, numbers),
            "tensors": summary["tensors"],
            "modelfile": dg.MetadataValue.path(str(gguf.modelfile_path(path))),
            "quantizations": quant_table(storage),
        }
    )


@dg.asset(
    deps=[gguf_f16],
    partitions_def=gguf_partitions,
    group_name="export",
    kinds={"gguf"},
    owners=["team:ml"],
    pool="cpu",
    code_version=gguf.GGUF_WRITER_VERSION,
    automation_condition=retrain_condition(),
    backfill_policy=dg.BackfillPolicy.multi_run(1),
    description=(
        "`gguf_f16` quantized by llama.cpp's own quantizer, one partition per type (Q4_K_M, Q5_K_M, "
        "Q6_K, Q8_0), each with its Ollama Modelfile. Where a weight's rows do not fit a K-quant's "
        "256-blocks llama.cpp falls back per tensor; metadata `fallbacks` lists what it chose. "
        "Files: `<storage>/gguf/model-<type>.gguf`."
    ),
)
def gguf_quantized(context: dg.AssetExecutionContext, config: ExportRunConfig, storage: StorageResource) -> dg.MaterializeResult:
    export = settings.config_to_dataclass(config, ExportConfig)
    gguf_type = GGUFType[context.partition_key]
    layout = storage.layout
    path = layout.gguf_quantized(gguf_type.name)
    eval_set = eval_set_of(storage, export)
    evaluate.read_reference(layout.gguf_f16, eval_set, "gguf_f16")  # stale or missing: fail before quantizing
    f16_path = published(layout.gguf_f16)  # quantized, compared and read from one f16 version
    with publish_file(path) as staged:
        report = gguf.quantize_gguf(f16_path, gguf_type, staged, export.threads)
        numbers, _ = gguf_eval.evaluate_gguf_file(staged, eval_set, export, f16_path)
        evaluate.write_evaluation(staged, numbers)
    f16 = read_evaluation(f16_path)
    delta = perplexity_delta(numbers, f16)
    context.log.info(f"GGUF {gguf_type.name}: {report.size_bytes / 2**20:.1f} MiB, perplexity {delta:+.2%} vs f16")
    context.log_event(dg.AssetObservation(asset_key=gguf_f16.key, metadata={"quantizations": quant_table(storage)}))
    return dg.MaterializeResult(
        metadata={
            **file_metadata(path, numbers),
            **against_f16(numbers, f16, report),
            "tensor_types": metadata_table([{"type": t, "tensors": n} for t, n in report.tensor_types.items()], ["type", "tensors"]),
            "fallbacks": _fallback_note(report),
            "modelfile": dg.MetadataValue.path(str(gguf.modelfile_path(path))),
            "quantizations": quant_table(storage),
        }
    )


def _loads_generates_tokenizes(path: Path, asset: str, model_dir: Path) -> dg.AssetCheckResult:
    """Loads in llama.cpp, decodes the check's tokens, and tokenizes the probes exactly as HF,
    with the export settings the file was materialized with."""
    from transformers import AutoTokenizer

    export = evaluated_with(path, asset)
    llama, load_s = gguf_eval.load_llama(path, export.threads)
    prompt = render_prompt([{"role": "user", "content": export.check_prompt}])
    tokens, _ = gguf_eval.greedy_tokens(llama, prompt, export.check_new_tokens)
    mismatches = gguf_eval.tokenization_mismatches(llama, AutoTokenizer.from_pretrained(model_dir))
    return dg.AssetCheckResult(
        passed=len(tokens) == export.check_new_tokens and not mismatches,
        metadata={
            "load_time_s": significant(load_s, MEASURE_DIGITS),
            "new_tokens": len(tokens),
            "probes": len(gguf_eval.TOKENIZATION_PROBES),
            "tokenization_mismatches": dg.MetadataValue.json(mismatches),
        },
    )


@dg.asset_check(
    asset=gguf_f16,
    blocking=True,
    description="Loads in llama.cpp, generates, and tokenizes Cyrillic, ё, «», —, emoji, tabs and <s>/</s> as HF.",
)
def gguf_f16_loads_and_tokenizes(storage: StorageResource) -> dg.AssetCheckResult:
    return _loads_generates_tokenizes(storage.layout.gguf_f16, "gguf_f16", storage.layout.merged_model)


@dg.asset_check(
    asset=gguf_f16,
    blocking=True,
    description="llama.cpp greedy tokens (argmax of its logits) equal the merged HF model's for a fixed prompt.",
)
def gguf_f16_matches_merged_model(storage: StorageResource) -> dg.AssetCheckResult:
    layout = storage.layout
    export = evaluated_with(layout.gguf_f16, "gguf_f16")
    prompt = render_prompt([{"role": "user", "content": export.check_prompt}])
    agreement = gguf_eval.greedy_agreement(layout.gguf_f16, layout.merged_model, prompt, export.check_new_tokens, export.threads)
    return dg.AssetCheckResult(
        passed=agreement["equal"],
        metadata={"tokens": agreement["tokens"], "matching_prefix": agreement["matching_prefix"]},
    )


@dg.asset_check(
    asset=gguf_quantized,
    partitions_def=gguf_partitions,
    description="Loads in llama.cpp, generates, and tokenizes the probes as HF.",
)
def gguf_quantized_loads_and_tokenizes(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    return _loads_generates_tokenizes(storage.layout.gguf_quantized(context.partition_key), "gguf_quantized", storage.layout.merged_model)


@dg.asset_check(
    asset=gguf_quantized,
    partitions_def=gguf_partitions,
    description="Perplexity (llama.cpp's logits) within the type's bound of f16's (3× the published llama.cpp cost + 2 %).",
)
def gguf_quantized_perplexity_bound(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
    gguf_type = GGUFType[context.partition_key]
    layout = storage.layout
    return perplexity_bound(layout.gguf_quantized(gguf_type.name), layout.gguf_f16, gguf_type.max_ppl_increase)


# The CPU code location holds these assets and checks only where llama-cpp-python is installed.
INSTALLED = gguf_eval.llama_available()
gguf_assets = [gguf_f16, gguf_quantized]
gguf_checks = [
    gguf_f16_loads_and_tokenizes,
    gguf_f16_matches_merged_model,
    gguf_quantized_loads_and_tokenizes,
    gguf_quantized_perplexity_bound,
]
