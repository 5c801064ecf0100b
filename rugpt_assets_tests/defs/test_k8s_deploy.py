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

from rugpt_assets import definitions, gpu_definitions
from rugpt_assets.defs import jobs
from rugpt_assets.launchers import GPU_POD, LAUNCHER_TAG, MixedRunError
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
    assert {"granularity": pools["granularity"], "default_limit": pools["defaultLimit"]} == (instance["concurrency"]["pools"])
    # The one GPU pod shape, written down once in rugpt_assets.launchers.
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


def code_location(module: str) -> dict:
    """The chart's deployment of this code location's module (values.yaml)."""
    deployments = load("values.yaml")["dagster-user-deployments"]["deployments"]
    (deployment,) = [d for d in deployments if d["codeServerArgs"] == ["-m", module]]
    return deployment


def container_context(deployment: dict) -> dict:
    """What `includeConfigInLaunchedRuns` hands the launcher for this deployment's runs: the
    chart's `dagsterUserDeployments.k8sContainerContext` of the values that matter here."""
    return {
        "k8s": {
            "env_config_maps": [f"dagster-{deployment['name']}-user-env"],
            "env": deployment["env"],
            "volumes": deployment["volumes"],
            "volume_mounts": deployment["volumeMounts"],
            "namespace": "dagster",
        }
    }


def test_both_code_locations_are_deployed_with_the_same_image_env_and_storage():
    deployments = load("values.yaml")["dagster-user-deployments"]["deployments"]
    workspace = yaml.safe_load((K8S_DIR.parents[1] / "workspace.yaml").read_text())["load_from"]
    assert sorted(d["codeServerArgs"][1] for d in deployments) == sorted(e["python_module"]["module_name"] for e in workspace)
    first, *others = deployments
    for deployment in others:
        for key in ("image", "env", "volumes", "volumeMounts", "includeConfigInLaunchedRuns"):
            assert deployment[key] == first[key], key
    assert first["includeConfigInLaunchedRuns"] == {"enabled": True}


@pytest.fixture
def created_jobs(monkeypatch) -> list:
    """The Kubernetes Jobs the launchers would create, captured instead."""
    created = []
    monkeypatch.setattr(
        DagsterKubernetesClient,
        "create_namespaced_job_with_retries",
        lambda self, body, namespace, **kwargs: created.append(body),
    )
    return created


def launch_on_k8s(kubeconfig: str, module: str, job: dg.JobDefinition) -> str:
    """Launch a run of `job` from the code location of `module` through the deployment's routing
    launcher, with that location's container context; return the side that took it."""
    launcher = load("dagster.yaml")["run_launcher"]
    for side in ("gpu", "cpu"):
        k8s_config = launcher["config"][side]["config"]
        k8s_config |= {"load_incluster_config": False, "kubeconfig_file": kubeconfig}

    code_origin = JobPythonOrigin(
        job.name,
        RepositoryPythonOrigin(
            sys.executable,
            ModuleCodePointer(module, "defs", None),
            IMAGE,
            container_context=container_context(code_location(module)),
        ),
    )
    partition = {"dagster/partition": job.partitions_def.get_partition_keys()[0]} if job.partitions_def else {}
    with instance_for_test(overrides={"run_launcher": launcher}) as instance:
        run = instance.create_run_for_job(job, job_code_origin=code_origin, tags=partition)
        instance.launch_run(run.run_id, workspace=None)  # pyright: ignore[reportArgumentType]  # as Dagster's own tests
        return instance.get_run_by_id(run.run_id).tags[LAUNCHER_TAG]


def assert_reads_and_writes_artifacts(pod) -> None:
    """The pod mounts the shared artifact volume where RUGPT_STORAGE_DIR points, with the profile set."""
    [container] = pod.containers
    [volume] = pod.volumes
    assert volume.persistent_volume_claim.claim_name == "rugpt-storage"
    [mount] = [m for m in container.volume_mounts if m.name == volume.name]
    env = {e.name: e.value for e in container.env}
    assert env["RUGPT_STORAGE_DIR"].startswith(mount.mount_path + "/") and not mount.read_only
    assert env["RUGPT_PROFILE"] == "rugpt35"


def test_training_run_renders_a_job_with_one_gpu_on_a_gpu_node(kubeconfig, created_jobs):
    train = gpu_definitions.defs.resolve_job_def(jobs.train_job.name)
    side = launch_on_k8s(kubeconfig, "rugpt_assets.gpu_definitions", train)
    [job] = created_jobs
    pod = job.spec.template.spec
    [container] = pod.containers
    assert side == "gpu"
    assert container.image == IMAGE
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert pod.node_selector == {"nvidia.com/gpu.present": "true"}
    assert [(t.key, t.operator, t.effect) for t in pod.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
    assert pod.service_account_name == "dagster"
    # The run worker itself trains (a subprocess of this pod): it loads the GPU location.
    assert "execute_run" in container.args and "rugpt_assets.gpu_definitions" in " ".join(container.args)
    assert_reads_and_writes_artifacts(pod)


@pytest.mark.parametrize("job_name", ["prepare", "export", "quantize"])
def test_cpu_runs_render_jobs_kept_off_gpu_nodes(kubeconfig, created_jobs, job_name):
    job = definitions.defs.resolve_job_def(job_name)
    side = launch_on_k8s(kubeconfig, "rugpt_assets.definitions", job)
    [k8s_job] = created_jobs
    pod = k8s_job.spec.template.spec
    [container] = pod.containers
    assert side == "cpu"
    # sized for the 13B export steps (docs/PERFORMANCE.md), no GPU
    assert container.resources.requests == {"cpu": "2", "memory": "16Gi"}
    assert container.resources.limits == {"memory": "30Gi"}
    assert pod.node_selector is None and pod.tolerations is None
    required = pod.affinity.node_affinity.required_during_scheduling_ignored_during_execution
    [term] = required.node_selector_terms
    assert [(e.key, e.operator) for e in term.match_expressions] == [("nvidia.com/gpu.present", "DoesNotExist")]
    assert_reads_and_writes_artifacts(pod)


def test_mixed_run_creates_no_pod(kubeconfig, created_jobs):
    mixed = STAND_IN_DEFS.resolve_implicit_global_asset_job_def()  # chat_set + lora_adapter
    with pytest.raises(MixedRunError):
        launch_on_k8s(kubeconfig, "rugpt_assets.definitions", mixed)
    assert created_jobs == []


def chart_available() -> bool:
    if shutil.which("helm") is None:
        return False
    shown = subprocess.run(["helm", "show", "chart", "dagster/dagster"], capture_output=True)
    return shown.returncode == 0


@pytest.mark.skipif(not chart_available(), reason="needs helm and the dagster/dagster chart repo")
def test_helm_renders_our_launcher_into_the_instance_configmap():
    rendered = subprocess.run(
        ["helm", "template", "dagster", "dagster/dagster", "-n", "dagster", "-f", str(K8S_DIR / "values.yaml")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    [configmap] = [
        doc for doc in yaml.safe_load_all(rendered) if doc and doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "dagster-instance"
    ]
    instance = yaml.safe_load(configmap["data"]["dagster.yaml"])
    assert instance["run_launcher"] == load("dagster.yaml")["run_launcher"]
    assert instance["concurrency"]["pools"] == load("dagster.yaml")["concurrency"]["pools"]
