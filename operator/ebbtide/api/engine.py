"""The engine each replica runs: the vLLM container, its environment, resources and model cache.

Environment entries have the shape of Kubernetes' own (EnvVar, EnvFromSource) and are rendered
into the container unchanged. A Secret is referenced, never copied: the kubelet resolves it when
it starts the container, so neither the spec nor the operator ever holds its value (and the
operator needs no permission on Secrets).
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from ebbtide.api.base import ApiModel, cel
from ebbtide.api.quantity import Quantity

HF_CACHE = "/root/.cache/huggingface"  # where Hugging Face downloads to in vLLM's images (they run as root)


def exactly_one(first: str, second: str) -> tuple[str, str]:
    """The CEL rule (and its message) that exactly one of two fields, by wire name, is set."""
    return f"has(self.{first}) != has(self.{second})", f"exactly one of {first} and {second} must be set"


def check_exactly_one(rule: tuple[str, str], *values: object) -> None:
    """The same rule, checked here (for `ebbtide render` and API servers without CEL)."""
    if sum(value is not None for value in values) != 1:
        raise ValueError(rule[1])


KEY_REF = exactly_one("secretKeyRef", "configMapKeyRef")
SOURCE_REF = exactly_one("secretRef", "configMapRef")
CACHE_VOLUME = exactly_one("persistentVolumeClaim", "emptyDir")
VALUE_OR_VALUE_FROM = (
    "!has(self.value) || self.value == '' || !has(self.valueFrom)",
    "value and valueFrom are mutually exclusive",
)


class SourceRef(ApiModel):
    """A Secret or ConfigMap in the service's namespace."""

    name: str = Field(min_length=1, description="Name of the Secret or ConfigMap.")
    optional: bool | None = Field(
        default=None, description="When true, a missing object (or key) does not keep the container from starting."
    )


class KeySelector(SourceRef):
    """One key of a Secret or ConfigMap in the service's namespace."""

    key: str = Field(min_length=1, description="The key whose value is used.")


class EnvVarSource(ApiModel):
    model_config = ApiModel.model_config | {"json_schema_extra": cel(KEY_REF)}
    secret_key_ref: KeySelector | None = Field(default=None, description="A key of a Secret.")
    config_map_key_ref: KeySelector | None = Field(default=None, description="A key of a ConfigMap.")

    @model_validator(mode="after")
    def one_key(self) -> EnvVarSource:
        check_exactly_one(KEY_REF, self.secret_key_ref, self.config_map_key_ref)
        return self


class EnvVar(ApiModel):
    model_config = ApiModel.model_config | {"json_schema_extra": cel(VALUE_OR_VALUE_FROM)}
    name: str = Field(min_length=1, description="Environment variable name.")
    value: str | None = Field(
        default=None,
        description="A literal value. It is in the pod template for anyone who can read the Deployment: "
        "keep secrets in a Secret and use valueFrom.",
    )
    value_from: EnvVarSource | None = Field(
        default=None,
        description="A key of a Secret or ConfigMap, resolved by the kubelet when the container starts.",
    )

    @field_validator("value")
    @classmethod
    def empty_is_unset(cls, value: str | None) -> str | None:
        # As for Kubernetes: the API server drops an empty value, rendering one would read as drift.
        return value or None

    @model_validator(mode="after")
    def value_or_value_from(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError(VALUE_OR_VALUE_FROM[1])
        return self


class EnvFromSource(ApiModel):
    model_config = ApiModel.model_config | {"json_schema_extra": cel(SOURCE_REF)}
    prefix: str | None = Field(default=None, description="Prepended to the name of every variable.")
    secret_ref: SourceRef | None = Field(default=None, description="Every key of this Secret becomes a variable.")
    config_map_ref: SourceRef | None = Field(
        default=None, description="Every key of this ConfigMap becomes a variable."
    )

    @model_validator(mode="after")
    def one_source(self) -> EnvFromSource:
        check_exactly_one(SOURCE_REF, self.secret_ref, self.config_map_ref)
        return self


class ClaimRef(ApiModel):
    claim_name: str = Field(min_length=1, description="A PersistentVolumeClaim in the service's namespace.")


class SizedEmptyDir(ApiModel):
    size_limit: Quantity = Field(
        description="Most the cache may hold (the weights, and then some): beyond it the pod is evicted."
    )


class ModelCache(ApiModel):
    """A volume for the weights vLLM downloads, so that a restarted engine does not download them again."""

    model_config = ApiModel.model_config | {"json_schema_extra": cel(CACHE_VOLUME)}
    persistent_volume_claim: ClaimRef | None = Field(
        default=None,
        description="An existing claim: the weights outlive pods and are shared by replicas "
        "(on several nodes only with ReadWriteMany).",
    )
    empty_dir: SizedEmptyDir | None = Field(
        default=None,
        description="Node-local space for the pod's lifetime: it survives engine restarts, not rescheduling.",
    )
    mount_path: str = Field(
        default=HF_CACHE,
        min_length=1,
        description="Where the volume is mounted; elsewhere than Hugging Face's cache, also set HF_HOME in env.",
    )

    @model_validator(mode="after")
    def one_volume(self) -> ModelCache:
        check_exactly_one(CACHE_VOLUME, self.persistent_volume_claim, self.empty_dir)
        return self


class ResourceRequirements(ApiModel):
    requests: dict[str, Quantity] = Field(
        default_factory=dict, description="Resources each engine container requests (besides its GPUs)."
    )
    limits: dict[str, Quantity] = Field(
        default_factory=dict, description="Resource limits of each engine container (besides its GPUs)."
    )


class EngineSpec(ApiModel):
    image: str = Field(
        default="vllm/vllm-openai:v0.11.0", min_length=1, description="The vLLM container image."
    )
    args: list[str] = Field(
        default_factory=list,
        description="Extra arguments for `vllm serve`, after the ones Ebbtide sets "
        "(model, port, served name, sleep mode). Not for secrets (such as --api-key): set those "
        "from a Secret with env valueFrom (VLLM_API_KEY).",
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        description="Extra environment variables of the engine, as in a container: a literal value, "
        "or valueFrom a key of a Secret or ConfigMap.",
    )
    env_from: list[EnvFromSource] = Field(
        default_factory=list, description="Secrets and ConfigMaps whose every key becomes an environment variable."
    )
    port: int = Field(default=8000, ge=1, le=65535, description="The port vLLM listens on (API and /metrics).")
    gpus: int = Field(default=1, ge=0, le=16, description="GPUs per replica (tensor parallel size).")
    gpu_resource: str = Field(
        default="nvidia.com/gpu", description="The extended resource name GPUs are requested under."
    )
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements,
        description="CPU, memory and other resources per replica, besides the GPUs.",
    )
    model_cache: ModelCache | None = Field(
        default=None, description="A volume the downloaded weights are kept in; none keeps them in the container."
    )
    startup_budget_seconds: int = Field(
        default=900,
        ge=30,
        le=7200,
        description="How long a replica may take to load the model before it is restarted "
        "(the startupProbe's budget). Cold starts with weight downloads take minutes.",
    )
    termination_grace_period_seconds: int = Field(
        default=120,
        ge=0,
        le=3600,
        description="Time a stopping replica gets to finish the requests in flight.",
    )

    @field_validator("args")
    @classmethod
    def no_managed_args(cls, args: list[str]) -> list[str]:
        if clash := managed_args_clash(args, "engine.args"):
            raise ValueError(clash)
        return args


def managed_args_clash(args: list[str], where: str) -> str | None:
    """Why `args` may not be used, if they set a flag Ebbtide sets itself; None when they may."""
    managed = {"--port", "--served-model-name", "--enable-sleep-mode"}
    clashes = sorted({a.split("=", 1)[0] for a in args} & managed)
    if not clashes:
        return None
    return (
        f"{where} must not set {', '.join(clashes)}: Ebbtide sets them from the spec "
        "(engine.port, model.servedName, sleep.enabled)"
    )
