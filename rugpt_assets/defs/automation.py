"""Retrain when a dataset changes, and only then.

A new data version of any `hf/<name>` source (observed on a schedule) or a new recipe
`code_version` makes the downstream assets eligible. Each code location has its own sensor, and
a run never spans two locations, so the chain runs as one run per stretch of a location, each
requested once the stretch before it has been materialized: `raw_<name>` + `chat_set` (CPU),
then `lora_adapter` (GPU), then `merged_model` + `ggml_f16` (CPU), then one run per
`ggml_quantized` partition. Storm guards: nothing is requested while it (or one of its parents)
is in progress, nothing is built on a parent whose blocking check failed, the `gpu` pool runs
one training at a time, and `lora_adapter` waits at least `RUGPT_MIN_RETRAIN_HOURS` after its
last materialization.
"""

from __future__ import annotations

import dagster as dg

from rugpt_assets import settings


class MaterializedLongAgo(dg.AutomationCondition):
    """True when the asset has no materialization in the last `RUGPT_MIN_RETRAIN_HOURS` hours.

    The interval is read at each evaluation, so changing it needs no redeploy. Custom
    conditions are evaluated in the code server (`use_user_code_server=True` below).
    """

    @property
    def description(self) -> str:
        return f"No materialization in the last {min_retrain_interval_hours():g} h (RUGPT_MIN_RETRAIN_HOURS)"

    @property
    def name(self) -> str:
        return "materialized_long_ago"

    def evaluate(self, context: dg.AutomationContext) -> dg.AutomationResult:
        record = context.asset_graph_view.instance.get_latest_materialization_event(context.key)
        now = context.evaluation_time.timestamp()
        if record is None or now - record.timestamp >= min_retrain_interval_hours() * 3600:
            return dg.AutomationResult(context=context, true_subset=context.candidate_subset)
        return dg.AutomationResult(context=context, true_subset=context.get_empty_subset())


def retrain_condition(ignoring: dg.AssetSelection | None = None) -> dg.AutomationCondition:
    """Eager on new parent data, plus a one-shot request when this asset's code version changes;
    never on a parent whose latest blocking check failed (an unhealthy source snapshot stops
    chat_set; `lora_adapter`'s eval-loss check stops the export, although the export runs in
    another code location than the training). Parents in `ignoring` count for none of it."""
    condition = (
        dg.AutomationCondition.eager()
        | (
            dg.AutomationCondition.code_version_changed()
            & ~dg.AutomationCondition.any_deps_missing()
            & ~dg.AutomationCondition.in_progress()
        ).with_label("code_version_changed")
    ) & dg.AutomationCondition.all_deps_blocking_checks_passed()
    return condition.ignore(ignoring) if ignoring is not None else condition


def min_retrain_interval_hours() -> float:
    return settings.environment().min_retrain_hours


def training_condition() -> dg.AutomationCondition:
    """`retrain_condition`, held back until the minimum interval since the last training passed."""
    return (retrain_condition() & MaterializedLongAgo()).with_label("retrain (rate-limited)")


# One sensor per code location: a sensor only requests the assets of its own location.
cpu_automation_sensor = dg.AutomationConditionSensorDefinition(
    "retrain_on_new_data",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    # Evaluated by the daemon (the default), on the whole workspace's asset graph: that is
    # where the GPU location's blocking check on `lora_adapter` is visible to `merged_model`.
    description="Evaluates the automation condition of every asset of this (CPU) code location; runs by default.",
)
gpu_automation_sensor = dg.AutomationConditionSensorDefinition(
    "train_on_new_data",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    use_user_code_server=True,  # MaterializedLongAgo is evaluated in the code server
    description="Evaluates `lora_adapter`'s automation condition (retrain, rate-limited); runs by default.",
)
