"""Resources: where artifacts live, where source rows come from, and how training is launched.

Both code locations (`rugpt_assets.definitions`, `rugpt_assets.gpu_definitions`) take their
resources from `resources_for`; assets only see these interfaces.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

import dagster as dg

from rugpt_assets import settings
from rugpt_assets.core import sources
from rugpt_assets.core.artifacts import StorageLayout


class StorageResource(dg.ConfigurableResource):
    """Root directory of every artifact this project writes (see `core.artifacts.StorageLayout`).

    Empty `root` means `settings.storage_root()`, resolved when a run uses it, not at import.
    """

    root: str = ""

    @property
    def layout(self) -> StorageLayout:
        return StorageLayout(Path(self.root) if self.root else settings.storage_root())


class SourcesResource(dg.ConfigurableResource):
    """Where the seven rulm datasets are read from: the hub, or a local mirror in the hub layout."""

    mode: Literal["local", "hub"] = "local"
    # Empty: RUGPT_SOURCES_DIR or the bundled samples, resolved at use.
    local_dir: str = ""
    # Pinned dataset revisions by source name; unset means the hub's current `main`.
    revisions: dict[str, str] = {}
    # Name of the environment variable holding a hub token; the token itself never enters config.
    token_env_var: str = "HF_TOKEN"

    def _token(self) -> str | None:
        return settings.secret(self.token_env_var)

    def _local_dir(self) -> Path:
        return Path(self.local_dir) if self.local_dir else settings.environment().local_sources_dir

    def read(self, spec: sources.SourceSpec) -> tuple[Iterable, str]:
        """Rows (or malformed-line markers) and the revision they come from."""
        if self.mode == "hub":
            return sources.read_hub(spec, self.revisions.get(spec.name), self._token())
        local_dir = self._local_dir()
        return sources.read_local(spec, local_dir), "sha256:" + sources.content_hash(spec, local_dir)

    def data_version(self, spec: sources.SourceSpec) -> str:
        """What an observation reports: the hub revision, or a hash of the local files."""
        if self.mode == "hub":
            return sources.hub_revision(spec, self.revisions.get(spec.name), self._token())
        return "sha256:" + sources.content_hash(spec, self._local_dir())


class TrainerResource(dg.ConfigurableResource):
    """Runs `python -m rugpt_assets.core.train` in its own process through Dagster Pipes, on the
    machine (or pod) of the GPU run: `subprocess` runs one process; `torchrun` starts
    `nproc_per_node` workers (DDP) of one host."""

    launcher: Literal["subprocess", "torchrun"] = "subprocess"
    nproc_per_node: int = 1

    def command(self, job_path: Path) -> list[str]:
        module = ["-m", "rugpt_assets.core.train", "--config", str(job_path)]
        if self.launcher == "torchrun":
            return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.nproc_per_node}", *module]
        return [sys.executable, *module]

    def run(
        self, context: dg.AssetExecutionContext, job_path: Path, env: Mapping[str, str] | None = None
    ) -> dg.PipesClientCompletedInvocation:
        # The client keeps the parent's environment (PATH, HOME, thread settings) and adds `env`.
        return dg.PipesSubprocessClient().run(context=context, command=self.command(job_path), env=env)


def resources_for(profile: settings.Profile) -> dict[str, dg.ConfigurableResource]:
    """The resources of both code locations: one storage root, one trainer, one source reader."""
    return {
        "storage": StorageResource(),
        "sources_resource": SourcesResource(mode=profile.source_mode),
        "trainer": TrainerResource(),
    }
