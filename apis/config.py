"""Server configuration: one YAML file, validated by pydantic, overridable from the command line.

Everything an operator decides lives here (which models, where their weights are, batch and
cache sizes, input and size limits), so the routes themselves carry no policy.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, create_model

from apis.core.settings import Family, Inputs, Limits, StrictSettings
from apis.families import FAMILIES

# Environment of the model workers (a value already set wins): OpenMP threads spin less after a
# forward, so they free the core the HTTP side needs to deliver the answer (docs/benchmarks.md).
WORKER_ENV = {"GOMP_SPINCOUNT": "10000"}


class _ServerSettings(StrictSettings):
    """The settings of the whole server; one optional section per family is added below."""

    limits: Limits = Field(default_factory=Limits)
    inputs: Inputs = Field(default_factory=Inputs)
    public_docs: bool = Field(False, description="Serve /docs and /openapi.json without a key.")
    public_metrics: bool = Field(False, description="Serve /metrics (Prometheus) without a key.")
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Also serve /metrics without a key on this port, and nothing else there "
        "(for Prometheus in a cluster: docs/observability.md).",
    )

    def families(self) -> dict[str, Family]:
        """The enabled families' settings, in the registry's order."""
        return {name: fam for name in FAMILIES if (fam := getattr(self, name)) is not None and fam.enabled}


#: One optional section per registered family (apis/families.py), each of its own settings type.
ServerConfig = create_model(
    "ServerConfig",
    __base__=_ServerSettings,
    **{name: (entry.settings | None, None) for name, entry in FAMILIES.items()},
)


def load_config(path: str | Path | None) -> ServerConfig:
    """Read and validate a YAML config; relative paths in it are taken from the file's folder."""
    if path is None:
        return ServerConfig()
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    cfg = ServerConfig.model_validate(raw)
    base = path.resolve().parent
    for fam in cfg.families().values():
        for m in fam.models:
            if m.arch_config is not None and not m.arch_config.is_absolute():
                m.arch_config = base / m.arch_config
            if (
                m.weights not in (None, "random")
                and not m.weights.startswith("hf://")
                and not Path(m.weights).is_absolute()
            ):
                m.weights = str(base / m.weights)
    cfg.inputs.path.roots = [r if r.is_absolute() else base / r for r in cfg.inputs.path.roots]
    return cfg
