"""deploy/k8s against dagster-k8s's own config schemas and Job rendering, without a cluster."""

import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._config import process_config, resolve_to_config_type
from dagster._core.code_pointer import ModuleCodePointer
from dagster._core.instance.config import dagster_instance_config
from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin
from dagster._core.test_utils import instance_for_test
from dagster_k8s import K8sRunLauncher
from dagster_k8s.client import DagsterKubernetesClient
from dagster_k8s.pipes import build_pod_body

from rugpt_assets.launchers import GPU_POD, GPU_POD_SPEC, LAUNCHER_TAG
from rugpt_assets_tests.defs.stand_ins import STAND_IN_DEFS

K8S_DIR = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
IMAGE = "registry.example/rugpt-assets:test"
# What the chart sets on the webserver and daemon pods, which the launcher configs read.
CHART_ENV = {
    "DAGSTER_HOME": "/opt/dagster/dagster_home",
    "DAGSTER_K8S_INSTANCE_CONFIG_MAP": "dagster-instance",
    "DAGSTER_K8S_PG_PASSWORD_SECRET": "dagster-postgresql-secret",
    "DAGSTER_K8S_PIPELINE_RUN_ENV_CONFIGMAP": "dagster-pipeline-env",
    "DAGSTER_PG_PASSWORD": "test",
}


def load(name: str) -> dict:
    return yaml.safe_load((K8S_DIR / name).read_text())


@pytest.fixture(autouse=True)
def chart_env(monkeypatch):
    for key, value in CHART_ENV.items():
        monkeypatch.setenv(key, value)


def side_configs() -> dict:
    return {side: load("dagster.yaml")["run_launcher"]["config"][side] for side in ("gpu", "cpu")}


def test_deployment_instance_yaml_passes_dagsters_schema():
    config, instance_class = dagster_instance_config(str(K8S_DIR))
    assert instance_class is None
    assert config["run_launcher"]["class"] == "RoutingRunLauncher"
    assert config["concurrency"]["pools"] == {"granularity": "op", "default_limit": 1}
    postgres = config["storage"]["postgres"]["postgres_db"]
    assert postgres["password"] == {"env": "DAGSTER_PG_PASSWORD"}


@pytest.mark.parametrize("side", ["gpu", "cpu"])
def test_sub_launcher_configs_pass_k8s_run_launcher_schema(side):
    spec = side_configs()[side]
    assert (spec["module"], spec["class"]) == ("dagster_k8s", "K8sRunLauncher")
    result = process_config(resolve_to_config_type(K8sRunLauncher.config_type()), spec["config"])
    assert result.success, result.errors
    assert result.value["instance_config_map"] == "dagster-instance"


def test_helm_values_say_what_dagster_yaml_says():
    values, instance = load("values.yaml"), load("dagster.yaml")
    launcher = values["runLauncher"]["config"]["customRunLauncher"]
    assert values["runLauncher"]["type"] == "CustomRunLauncher"
    assert launcher == instance["run_launcher"]
    pools = values["concurrency"]["pools"]
    assert {"granularity": pools["granularity"], "default_limit": pools["defaultLimit"]} == (
        instance["concurrency"]["pools"]
    )
    # The one GPU pod shape, shared with the Pipes client.
    assert launcher["config"]["gpu"]["config"]["run_k8s_config"] == GPU_POD


@pytest.fixture
def kubeconfig(tmp_path):
    """A kubeconfig for a cluster that is never contacted: jobs are captured, not created."""
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:9"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    return str(path)


def launch_on_k8s(kubeconfig: str, monkeypatch, asset: str):
    """Launch a one-asset run through the deployment's routing launcher; return (side, V1Job)."""
    created = []
    monkeypatch.setattr(
        DagsterKubernetesClient,
        "create_namespaced_job_with_retries",
        lambda self, body, namespace, **kwargs: created.append(body),
    )
    launcher = load("dagster.yaml")["run_launcher"]
    for side in ("gpu", "cpu"):
        k8s_config = launcher["config"][side]["config"]
        k8s_config |= {"load_incluster_config": False, "kubeconfig_file": kubeconfig}

    job = STAND_IN_DEFS.resolve_implicit_global_asset_job_def()
    code_origin = JobPythonOrigin(
        job.name,
        RepositoryPythonOrigin(
            sys.executable, ModuleCodePointer("rugpt_assets.definitions", "defs", None), IMAGE
        ),
    )
    keys = {dg.AssetKey(asset)}
    with instance_for_test(overrides={"run_launcher": launcher}) as instance:
        run = instance.create_run_for_job(
            job.get_subset(asset_selection=keys), asset_selection=keys, job_code_origin=code_origin
        )
        instance.launch_run(run.run_id, workspace=None)
        side = instance.get_run_by_id(run.run_id).tags[LAUNCHER_TAG]
    [k8s_job] = created
    return side, k8s_job


def test_gpu_run_renders_a_job_with_one_gpu_on_a_gpu_node(kubeconfig, monkeypatch):
    side, job = launch_on_k8s(kubeconfig, monkeypatch, "lora_adapter")
    pod = job.spec.template.spec
    [container] = pod.containers
    assert side == "gpu"
    assert container.image == IMAGE
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert pod.node_selector == {"nvidia.com/gpu.present": "true"}
    assert [(t.key, t.operator, t.effect) for t in pod.tolerations] == [
        ("nvidia.com/gpu", "Exists", "NoSchedule")
    ]
    assert pod.service_account_name == "dagster"
    assert "execute_run" in container.args  # the run worker itself


def test_cpu_run_renders_a_job_kept_off_gpu_nodes(kubeconfig, monkeypatch):
    side, job = launch_on_k8s(kubeconfig, monkeypatch, "chat_set")
    pod = job.spec.template.spec
    [container] = pod.containers
    assert side == "cpu"
    # sized for the 13B export steps (docs/PERFORMANCE.md), no GPU
    assert container.resources.requests == {"cpu": "2", "memory": "16Gi"}
    assert container.resources.limits == {"memory": "30Gi"}
    assert pod.node_selector is None and pod.tolerations is None
    required = pod.affinity.node_affinity.required_during_scheduling_ignored_during_execution
    [term] = required.node_selector_terms
    assert [(e.key, e.operator) for e in term.match_expressions] == [
        ("nvidia.com/gpu.present", "DoesNotExist")
    ]


def test_pipes_pod_has_the_same_gpu_shape():
    pod = build_pod_body(
        pod_name="rugpt-train",
        image=IMAGE,
        command=["python", "-m", "rugpt_assets.core.train"],
        env_vars={"RUGPT_PROFILE": "rugpt35"},
        base_pod_meta=None,
        base_pod_spec=GPU_POD_SPEC,
    )
    [container] = pod.spec.containers
    assert container.image == IMAGE
    assert container.resources.limits == {"nvidia.com/gpu": "1"}
    assert pod.spec.node_selector == {"nvidia.com/gpu.present": "true"}
    assert pod.spec.tolerations[0].key == "nvidia.com/gpu"
    assert pod.spec.restart_policy == "Never"
    assert GPU_POD_SPEC["containers"] == [{"resources": {"limits": {"nvidia.com/gpu": "1"}}}]


def chart_available() -> bool:
    if shutil.which("helm") is None:
        return False
    shown = subprocess.run(["helm", "show", "chart", "dagster/dagster"], capture_output=True)
    return shown.returncode == 0


@pytest.mark.skipif(not chart_available(), reason="needs helm and the dagster/dagster chart repo")
def test_helm_renders_our_launcher_into_the_instance_configmap():
    rendered = subprocess.run(
        ["helm", "template", "dagster", "dagster/dagster", "-n", "dagster",
         "-f", str(K8S_DIR / "values.yaml")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    [configmap] = [
        doc
        for doc in yaml.safe_load_all(rendered)
        if doc and doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "dagster-instance"
    ]
    instance = yaml.safe_load(configmap["data"]["dagster.yaml"])
    assert instance["run_launcher"] == load("dagster.yaml")["run_launcher"]
    assert instance["concurrency"]["pools"] == load("dagster.yaml")["concurrency"]["pools"]
