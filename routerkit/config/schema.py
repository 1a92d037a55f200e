"""Pydantic schema of an experiment YAML: one section per component, ``extra="forbid"``."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

#: Upper bound of every learning rate (Adam / SGD step sizes beyond it diverge).
MAX_LR = 10.0
#: Seeds are torch generator seeds: ``0 <= seed < 2**63``.
MAX_SEED = 2**63
#: Devices a run can train on: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
TRAINING_DEVICE = re.compile(r"cpu|mps|cuda(:\d+)?")
#: Model families whose ``dropout`` parameter is a probability (the mc_dropout check on f_0).
_DROPOUT_MODELS = ("unet", "toy", "cifar_resnet")
#: Key of the validation context holding the folder of the config file (relative ``zoo.models[].weights`` paths).
CONFIG_DIR = "config_dir"


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"Expected a number but got the boolean {value}")
    return value


#: An integer field: strict, so ``true``, ``3.0`` or ``"3"`` are refused rather than read as 1 or 3.
Int = Annotated[int, Strict()]
#: A float field: ints are read as floats, booleans are refused (non-finite values too, see `_Section`).
Float = Annotated[float, BeforeValidator(_not_bool)]


def field_error(field: str, message: str) -> PydanticCustomError:
    """A cross-field validation error reported under ``field`` (a dotted path) by `format_validation_error`."""
    return PydanticCustomError("config_field", message, {"field": field})


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class RunConfig(_Section):
    """Where and how a run executes."""

    name: str = Field("run", description="Run name; the run directory is output_dir/name.")
    output_dir: str = Field("runs", description="Parent folder of run directories (relative to the working directory).")
    seed: Int = Field(0, ge=0, lt=MAX_SEED, description="Seed of torch's generators (0 <= seed < 2**63).")
    device: str = Field("cpu", description="torch device that trains: 'cpu', 'cuda', 'cuda:N' or 'mps'.")
    threads: Int | None = Field(None, ge=1, description="torch CPU threads (None: torch's default).")
    checkpoint_every: Int = Field(
        1, ge=1, description="Checkpoint every N epochs (the end of every stage is always saved); large zoos: raise it."
    )
    cache_memory_gb: Float | None = Field(
        None,
        ge=0,
        description="Memory budget of one replay table (and of f_0's distillation targets), GiB; a larger one is "
        "memory-mapped on disk with the same values. None: half the memory available when it is built; 0: always on disk.",
    )
    cache_dir: str | None = Field(
        None, description="Folder of the memory-mapped tables (None: the system's temporary folder); nothing stays there."
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not TRAINING_DEVICE.fullmatch(v):
            raise ValueError(f"Expected a device that can train ('cpu', 'cuda', 'cuda:N' or 'mps') but got {v!r}")
        return v

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, v: str) -> str:
        _check_folder(Path(v))
        return v

    @model_validator(mode="after")
    def _run_dir(self) -> RunConfig:
        path = Path(self.output_dir) / self.name
        if path.is_file():
            raise field_error("run.name", f"Expected run.output_dir/run.name to be a run folder but {path} is an existing file.")
        return self


def _check_folder(path: Path) -> None:
    """Raise unless the nearest existing path of ``path`` (itself or a parent) is a directory."""
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                raise ValueError(
                    f"Expected a folder (existing or to create) but got {str(path)!r}, and {existing} is an existing file"
                )
            return


class DataConfig(_Section):
    """A data plugin: a factory returning a `routerkit.data.DataBundle`."""

    factory: str = Field(..., description="Dotted path 'package.module:function' returning a DataBundle.")
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the factory.")
    split_fractions: tuple[Float, Float, Float] = Field(
        (1 / 3, 1 / 3, 1 / 3), description="Shares of the training split for D_PT, D_RL and D_FT."
    )

    @field_validator("split_fractions")
    @classmethod
    def _fractions(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f <= 0 for f in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError(f"split_fractions must be three positive numbers summing to 1 (D_PT, D_RL, D_FT), got {v}.")
        return v


class PartitionerConfig(_Section):
    """How inputs are cut into routing units."""

    name: str = Field("patch_grid", description="'patch_grid' or 'whole_input' (or a dotted path).")
    params: dict[str, Any] = Field(default_factory=lambda: {"rows": 4, "cols": 4})


class ModelConfig(_Section):
    """One task model of the zoo."""

    name: str = Field(..., description="Name used in tables and checkpoints.")
    model: str = Field(..., description="Registered model name ('unet', 'unet_paper_large', 'smp', ...) or dotted path.")
    params: dict[str, Any] = Field(default_factory=dict)
    train_on: dict[str, Int] | None = Field(
        None,
        description="Pre-train this model only on inputs whose per-input data meta[key] equals value, e.g. {noise: 1} "
        "(a zoo of specialists, PaSeR's noisy MNIST); None: all of D_PT.",
    )
    weights: str | None = Field(
        None,
        description="State dict loaded into the model right after it is built: a .safetensors file, or a torch file "
        "(torch.save; read with weights_only=True, so it never runs code) holding the state dict or a dict with a "
        "'state_dict' or 'model' entry holding it. A relative path is resolved when the config is read: against the "
        "config file's folder (load_config, `routerkit train CONFIG`, like its plugin packages); one given as a -s "
        "override, or in a config given as a mapping, against the working directory; the run's config.yaml records "
        "the absolute path. None: the model's own initialisation.",
    )
    train: bool = Field(
        True,
        description="false freezes the model: pre-training, joint fine-tuning and the joint cascade stage leave its "
        "weights (batch-norm statistics included) as they are, and a pre-training stage with nothing left to train is "
        "skipped; with weights, a zoo trained elsewhere. A frozen f_m still teaches f_0 (training.pretrain_base.beta).",
    )

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return None
        if not v.strip():
            raise ValueError("Expected the path of a state dict file (.safetensors or a torch file) but got an empty string")
        path = Path(v).expanduser()
        if not path.is_absolute():
            folder = info.context.get(CONFIG_DIR) if isinstance(info.context, dict) else None
            path = (Path(folder) if folder is not None else Path.cwd()) / path
        return os.path.abspath(path)


class ZooConfig(_Section):
    """The task models, cheapest first: ``models[0]`` is the base model f_0."""

    models: list[ModelConfig] = Field(..., min_length=2)

    @model_validator(mode="after")
    def _unique(self) -> ZooConfig:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"zoo.models names must be unique, got {names}.")
        return self


class ComponentConfig(_Section):
    """A registered component by name with its keyword arguments."""

    name: str
    params: dict[str, Any] = Field(default_factory=dict)


class UncertaintyConfig(ComponentConfig):
    """The uncertainty estimator (``routerkit list estimators``)."""

    name: str = "mc_dropout"
    params: dict[str, Any] = Field(default_factory=lambda: {"num_passes": 20})


class CostConfig(ComponentConfig):
    """The cost model (``routerkit list costs``)."""

    name: str = "param_share"


class RouterConfig(ComponentConfig):
    """The router (``routerkit list routers``)."""

    name: str = "paser"


class RewardConfig(_Section):
    """PaSeR's reward ``(1 - lam) * (A(f_a) - A(f_0)) - lam * C(f_a)``."""

    name: str = "paser"
    lam: Float = Field(0.5, ge=0.0, le=1.0, description="Trade-off lambda between accuracy gain and cost.")
    accuracy: str = Field("iou", description="Per-unit accuracy term: 'iou', 'correct' or 'neg_ce'.")


class OptimConfig(_Section):
    """Settings shared by the stages."""

    epochs: Int = Field(1, ge=0)
    lr: Float = Field(1e-4, gt=0, le=MAX_LR)
    batch_size: Int = Field(32, ge=1)
    weight_decay: Float = Field(0.0, ge=0)
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="'cosine' anneals the learning rate to 0 over the stage's epochs."
    )


class _PretrainChecksConfig(OptimConfig):
    """A pre-training stage's optimiser and precision, and what it does after every epoch (validation, batch norm)."""

    lr_schedule: Literal["constant", "cosine", "onecycle"] = Field(  # type: ignore[assignment]
        "constant",
        description="'cosine' anneals the learning rate to 0 over the stage's epochs (set every epoch); 'onecycle' "
        "warms it up linearly from lr / 25 to lr over the first 15% of the steps, then anneals it by a cosine to "
        "lr / 25 / 1e4 (set every step; Smith's one-cycle policy, for SGD).",
    )
    optimizer: Literal["adam", "sgd"] = Field("adam", description="Adam, or SGD with momentum (the CIFAR ResNets' recipe).")
    momentum: Float = Field(0.9, ge=0, lt=1, description="SGD momentum (optimizer: sgd).")
    nesterov: bool = Field(True, description="Nesterov momentum (optimizer: sgd, momentum > 0).")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="'bf16': forward passes under torch.autocast in bfloat16 (weights, gradients and optimiser state "
        "stay float32); faster on CPUs with AVX-512 BF16 / AMX and on GPUs.",
    )
    channels_last: bool = Field(False, description="Convolution weights and batches in channels-last memory (oneDNN).")

    precise_bn: bool = Field(
        True,
        description="Recompute each model's exact batch-norm statistics on its training data after every epoch "
        "(the running averages of a short training leave models far worse in eval mode).",
    )
    bn_batches: Int | None = Field(
        4, ge=1, description="Training batches (stage batch size, no augmentation) averaged for those statistics (None: all)."
    )
    keep_best: bool = Field(True, description="Each model ends the stage with the weights of its best validation epoch.")


class PretrainLargeConfig(_PretrainChecksConfig):
    """Stage 1a: large models on units of D_PT."""

    augment: bool = True


class PretrainBaseConfig(_PretrainChecksConfig):
    """Stage 1b: f_0 on whole inputs with distillation."""

    beta: Float = Field(0.01, ge=0, description="Weight of the MSE distillation to the largest model's logits.")
    augment: bool = True
    teacher_batch: Int = Field(
        16, ge=1, description="Inputs per batch while the largest model's logits on D_PT are computed (once, for beta > 0)."
    )


class PolicyConfig(OptimConfig):
    """Stage 2: REINFORCE on D_RL with replayed outputs."""

    alpha_start: Float = Field(0.7, ge=0, le=1)
    alpha_end: Float = Field(0.95, ge=0, le=1)
    baseline: Literal["none", "mean", "expected"] = "expected"
    credit: Literal["unit", "input"] = "unit"
    entropy_coef: Float = Field(0.0, ge=0)
    importance_weighting: bool = Field(True, description="Correct explore/exploit sampling with pi(a) / mu(a).")
    estimator: Literal["reinforce", "all_actions"] = Field(
        "reinforce", description="Sampled REINFORCE, or the exact expected-reward gradient over all replayed actions."
    )
    cache_batch: Int = Field(
        16,
        ge=1,
        description="Inputs per batch while the replay cache is built (every model on every unit: lower it for large inputs).",
    )


class FinetuneConfig(OptimConfig):
    """Stage 3: joint fine-tuning of the large models and the policy on D_FT."""

    alpha_start: Float = Field(0.95, ge=0, le=1)
    alpha_end: Float = Field(1.0, ge=0, le=1)
    baseline: Literal["none", "mean"] = "mean"
    credit: Literal["unit", "input"] = "unit"
    entropy_coef: Float = Field(0.0, ge=0)
    large_lr: Float | None = Field(None, gt=0, le=MAX_LR, description="Learning rate of the large models (default: lr).")
    large_on: Literal["routed", "all"] = "routed"
    freeze_bn: bool = Field(True, description="Keep the large models' batch-norm statistics fixed while fine-tuning.")
    cache_batch: Int = Field(
        16, ge=1, description="With tvd_threshold: inputs per batch while the replay cache of D_FT is built."
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="'bf16': the large models' forward passes under torch.autocast in bfloat16 (weights, gradients, "
        "the losses and the policy stay float32); for accelerators and CPUs with AVX-512 BF16 / AMX.",
    )
    importance_weighting: bool = Field(True, description="Correct explore/exploit sampling with pi(a) / mu(a).")
    tvd_threshold: Float | None = Field(
        None,
        ge=0,
        le=1,
        description="Policy-only fine-tuning (PaSeR noisy MNIST): lambda rises linearly from reward.lam to lam_end and "
        "fine-tuning stops before the policy's total-variation distance from the stage's starting policy exceeds this.",
    )
    lam_end: Float | None = Field(None, ge=0, le=1, description="Final lambda of the linear schedule (with tvd_threshold).")
    tvd_on: Literal["decisions", "probs"] = Field(
        "probs",
        description="What the TVD threshold measures: 'probs', the TVD of the action probabilities (the paper), or "
        "'decisions', the share of units whose greedy model changed (what evaluation sees).",
    )

    @model_validator(mode="after")
    def _tvd(self) -> FinetuneConfig:
        if (self.tvd_threshold is None) != (self.lam_end is None):
            raise field_error(
                "training.finetune.lam_end",
                "training.finetune.tvd_threshold and training.finetune.lam_end go together: set both (policy-only "
                "fine-tuning with a lambda schedule stopped at a TVD threshold) or neither (joint fine-tuning).",
            )
        return self


class CascadeFitConfig(_Section):
    """Fitting of a cascade router (``router.name`` ``idk`` or ``optimal_stopping``) on the frozen zoo."""

    epochs: Int = Field(1, ge=0, le=1, description="1 fits the cascade, 0 skips the fit.")
    lr: Float = Field(1e-2, gt=0, le=MAX_LR, description="Learning rate of the optimal-stopping policies.")
    batch_size: Int = Field(16, ge=1, description="Inputs per batch when replaying the zoo's outputs.")
    weight_decay: Float = Field(0.0, ge=0)
    method: Literal["grid", "iou_match"] = Field("grid", description="IDK: grid search on CE + lam * C, or IoU match.")
    lam: Float = Field(0.1, ge=0, description="IDK: lambda_IDK of the loss CE + lambda_IDK * C (PaSeR Eq. 5).")
    iou_target: Float | None = Field(None, ge=0, le=1, description="IDK iou_match: validation IoU to match within 1e-3.")
    grid_steps: Int = Field(21, ge=2, description="IDK: grid points per stage between mean -/+ 1 std.")
    alpha: Float = Field(0.1, ge=0, description="Optimal stopping: cost weight of the reward -loss - alpha * cost.")
    policy_epochs: Int = Field(60, ge=1, description="Optimal stopping: REINFORCE epochs over the replayed units.")
    loss: Literal["ce", "acc"] = Field("ce", description="Optimal stopping: per-unit loss, cross-entropy or 1 - accuracy.")
    split: Literal["val", "rl"] = Field("val", description="Split the cascade is fitted on: validation or D_RL.")
    joint: bool = Field(
        False,
        description="Optimal stopping: after the policy-only fit, a second stage (fit_cascade_joint) trains the stop "
        "policies and f_1..f_m together on the same split, on Guan et al.'s objective -loss - alpha * cost paid "
        "(f_0, the router state, and models with train: false stay frozen).",
    )
    joint_epochs: Int = Field(5, ge=1, description="Optimal stopping with joint: epochs of the joint stage (live passes).")
    joint_lr: Float = Field(
        1e-4, gt=0, le=MAX_LR, description="Optimal stopping with joint: Adam learning rate of f_1..f_m (the policies use lr)."
    )


class TrainingConfig(_Section):
    """The stages of PaSeR's Algorithm 1."""

    pretrain_large: PretrainLargeConfig = Field(default_factory=PretrainLargeConfig)
    pretrain_base: PretrainBaseConfig = Field(default_factory=PretrainBaseConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    cascade: CascadeFitConfig = Field(default_factory=CascadeFitConfig)


class EvaluationConfig(_Section):
    """What the final table compares."""

    split: Literal["val", "test"] = "test"
    batch_size: Int = Field(16, ge=1)
    baselines: list[Literal["single", "random"]] = Field(default_factory=lambda: ["single", "random"])  # type: ignore[arg-type]
    random_seed: Int = Field(0, ge=0, lt=MAX_SEED, description="Seed of the random-policy baseline.")
    expert_key: str | None = Field(
        None,
        description="Per-input data meta key holding the index of the model that should answer each input "
        "(e.g. the noise type of noisy MNIST): compare then reports model-assignment accuracy against it.",
    )
    compare: bool = Field(False, description="After training, run `routerkit compare` on the run (writes run_dir/compare).")


class CompareConfig(_Section):
    """Settings of ``routerkit compare``: every strategy on the same trained zoo."""

    split: Literal["val", "test"] = "test"
    batch_size: Int = Field(16, ge=1, description="Inputs per batch when replaying the zoo.")
    idk_lambda: Float = Field(0.1, ge=0, description="lambda_IDK of the IDK grid search (loss CE + lambda_IDK * C).")
    idk_grid_steps: Int = Field(21, ge=2)
    stop_alpha: Float | None = Field(None, ge=0, description="Optimal-stopping cost weight (default: reward.lam).")
    stop_epochs: Int = Field(60, ge=1, description="REINFORCE epochs of the stop policies.")
    stop_joint_epochs: Int = Field(
        1,
        ge=0,
        description="Epochs of the optimal-stopping cascade trained jointly with f_1..f_m on D_RL, from the policy-only "
        "cascade and a copy of the zoo (its own row; training.cascade.joint_lr and loss); 0 leaves the row out.",
    )
    pareto: bool = Field(True, description="Run the cost/quality sweep and draw pareto.png.")
    sweep_lambdas: list[Float] = Field(
        default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7], description="PaSeR / oracle lambdas."
    )
    sweep_policy_epochs: Int = Field(25, ge=1, description="Replayed REINFORCE epochs per swept PaSeR policy.")
    idk_offsets: list[Float] = Field(
        default_factory=lambda: [-2.0, -1.5, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0],
        description="IDK thresholds: mean + offset * std of each stage's uncertainty (validation split).",
    )
    stop_alphas: list[Float] = Field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0])
    tvd_thresholds: list[Float] = Field(
        default_factory=list,
        description="Re-run the TVD-threshold fine-tuning from the run's stage-2 policy at each threshold (PaSeR Fig. 12); "
        "needs training.finetune.tvd_threshold / lam_end and a run directory.",
    )


class RayAutoscalingConfig(_Section):
    """Ray Serve autoscaling of one deployment (replicas follow the requests in flight)."""

    min_replicas: Int = Field(1, ge=0, description="Fewest replicas (0: scale to zero when idle).")
    max_replicas: Int = Field(4, ge=1, description="Most replicas.")
    target_ongoing_requests: Float = Field(2.0, gt=0, description="Requests in flight per replica the autoscaler aims at.")

    @model_validator(mode="after")
    def _bounds(self) -> RayAutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas}).")
        return self


class RayDeploymentConfig(_Section):
    """Resources and scaling of one Ray Serve deployment (the ingress, or one costlier model)."""

    num_replicas: Int = Field(1, ge=1, description="Fixed number of replicas (ignored with autoscaling).")
    autoscaling: RayAutoscalingConfig | None = Field(None, description="Scale replicas with the load instead.")
    num_cpus: Float = Field(
        0.5,
        ge=0,
        description="CPUs reserved per replica; its torch threads are this rounded, at least 1 (0.5: three deployments "
        "fit in 2 CPUs).",
    )
    num_gpus: Float = Field(0.0, ge=0, description="GPUs per replica (fractions share a GPU); > 0 runs the model on CUDA.")
    max_ongoing_requests: Int = Field(32, ge=1, description="Requests one replica takes at once.")


class RayModelConfig(RayDeploymentConfig):
    """A costlier model's deployment: its `@serve.batch` batching and how units are cut into calls."""

    max_batch: Int = Field(8, ge=1, description="Most calls (groups of units from the ingress) batched into one forward.")
    batch_wait_ms: Float = Field(2.0, ge=0, description="Longest wait for more calls after the first of a batch (ms).")
    units_per_call: Int | None = Field(
        None,
        ge=1,
        description="Cut the units a batch sends to this model into calls of at most this many, sent at once, so that "
        "several replicas share one batch (None: one call per batch).",
    )


class RayServeConfig(_Section):
    """``routerkit serve --backend ray``: f_0 and the router in an ingress deployment, each costlier model its own."""

    address: str | None = Field(
        None, description="Ray cluster to join ('auto': the running one; None: start a local cluster in this process)."
    )
    num_cpus: Int | None = Field(None, ge=1, description="CPUs of a local cluster (None: the machine's).")
    app_name: str = Field("routerkit", min_length=1, description="Ray Serve application name.")
    ingress: RayDeploymentConfig = Field(default_factory=RayDeploymentConfig)
    model_defaults: RayModelConfig = Field(
        default_factory=RayModelConfig, description="Settings of every costlier model not listed in models."
    )
    models: dict[str, RayModelConfig] = Field(
        default_factory=dict,
        description="Per costlier model (by zoo name), replacing model_defaults for it; a name the served run does not "
        "have is an error when serving (a serve file may be written for several runs).",
    )


class ServeConfig(_Section):
    """``routerkit serve``: where, how requests are batched and limited, and the backend (command-line flags win)."""

    backend: Literal["local", "ray"] = Field("local", description="'local': one process (FastAPI + uvicorn); 'ray': Ray Serve.")
    host: str = Field("127.0.0.1", min_length=1, description="Address to listen on (0.0.0.0: every interface).")
    port: Int = Field(8000, ge=0, le=65535)
    max_batch: Int = Field(32, ge=1, description="Most concurrent inputs routed together by the ingress.")
    max_wait_ms: Float = Field(10.0, ge=0, description="Longest wait for more inputs after the first of a batch (ms).")
    max_bytes: Int = Field(20_000_000, ge=1, description="Largest request body in bytes (larger: 413).")
    max_pixels: Int = Field(4096 * 4096, ge=1, description="Largest input in pixels, H x W (larger: 413).")
    max_queue: Int = Field(1024, ge=1, description="Most inputs waiting for the model (beyond: 503).")
    mask_seed: Int = Field(0, ge=0, description="Seed of f_0's fixed MC-dropout masks (answers independent of batching).")
    threads: Int | None = Field(None, ge=1, description="torch CPU threads of the one-process server (None: torch's).")
    ray: RayServeConfig = Field(default_factory=RayServeConfig)

    @model_validator(mode="after")
    def _ingress_fits_a_batch(self) -> ServeConfig:
        if self.backend == "ray" and self.ray.ingress.max_ongoing_requests < self.max_batch:
            raise field_error(
                "serve.ray.ingress.max_ongoing_requests",
                f"serve.ray.ingress.max_ongoing_requests ({self.ray.ingress.max_ongoing_requests}) must be >= max_batch "
                f"({self.max_batch}): a replica that takes fewer requests at once can never fill a batch.",
            )
        return self


class ExperimentConfig(_Section):
    """A whole experiment: ``routerkit train`` reads one of these from YAML."""

    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig
    partitioner: PartitionerConfig = Field(default_factory=PartitionerConfig)
    zoo: ZooConfig
    uncertainty: UncertaintyConfig = Field(default_factory=UncertaintyConfig)
    cost: CostConfig = Field(default_factory=CostConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    compare: CompareConfig = Field(default_factory=CompareConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> ExperimentConfig:
        base = self.zoo.models[0]
        if self.uncertainty.name == "mc_dropout" and base.model.startswith(_DROPOUT_MODELS):
            dropout = base.params.get("dropout", 0.0)
            if dropout is not None and (
                isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1
            ):
                raise field_error(
                    "zoo.models.0.params.dropout",
                    f"Expected the dropout probability of f_0, a number in [0, 1), but got {dropout!r}.",
                )
            if not dropout:
                raise field_error(
                    "zoo.models.0.params.dropout",
                    "uncertainty.name is 'mc_dropout' but zoo.models[0] (the base model f_0) has no dropout: "
                    "set zoo.models[0].params.dropout (e.g. 0.1) or use uncertainty.name: softmax_entropy.",
                )
        for i, m in enumerate(self.zoo.models):
            if m.train_on is not None and len(m.train_on) != 1:
                raise field_error(
                    f"zoo.models.{i}.train_on",
                    f"Expected exactly one meta key, e.g. {{noise: 1}}, but got {m.train_on}.",
                )
        if self.training.finetune.lam_end is not None and self.training.finetune.lam_end < self.reward.lam:
            raise field_error(
                "training.finetune.lam_end",
                f"training.finetune.lam_end ({self.training.finetune.lam_end}) must be >= reward.lam ({self.reward.lam}): "
                "the fine-tuning schedule raises lambda.",
            )
        for stage in ("policy", "finetune"):
            s = getattr(self.training, stage)
            if s.alpha_end < s.alpha_start:
                raise field_error(
                    f"training.{stage}.alpha_end",
                    f"training.{stage}.alpha_end ({s.alpha_end}) must be >= alpha_start ({s.alpha_start}).",
                )
        return self
