"""Strict loading: every tensor or nothing, and errors that name what does not fit."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from toist_core.listing import listing

from .errors import CheckpointError, PathLike
from .official import BANK_KEYS, OfficialCheckpoint, read_official


def state_dict_problems(module: nn.Module, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Human-readable differences between ``state_dict`` and ``module``'s tensors (empty = loadable)."""
    return tensor_differences(state_dict, module.state_dict())


def tensor_differences(given: Mapping[str, Tensor], expected: Mapping[str, Tensor], given_as: str = "file",
                       expected_as: str = "model", limit: int = 8) -> list[str]:
    """Tensors of ``expected`` that ``given`` lacks, has in excess, or has in another shape (or
    an integer tensor for a float one); ``given_as`` / ``expected_as`` name the two sides."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    misshaped = []
    for key, want in expected.items():
        have = given.get(key)
        if have is None:
            continue
        if tuple(have.shape) != tuple(want.shape):
            misshaped.append(f"{key} ({given_as} {list(have.shape)}, {expected_as} {list(want.shape)})")
        elif have.dtype.is_floating_point != want.dtype.is_floating_point:
            misshaped.append(f"{key} ({given_as} dtype {have.dtype}, {expected_as} dtype {want.dtype})")
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {listing(missing, limit)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {listing(unexpected, limit)}")
    if misshaped:
        problems.append(f"{len(misshaped)} mis-shaped tensor(s): {listing(misshaped, limit)}")
    return problems


def non_finite_tensors(state_dict: Mapping[str, Tensor]) -> list[str]:
    """``key (N of M values NaN/inf)`` for every floating tensor holding a NaN or an inf.

    No tensor of a TOIST / MDETR state_dict or memory bank may: the -inf of attention masks is
    made at run time, never stored (the official files' buffers are BatchNorm statistics and the
    int64 position ids). A finite sum proves a tensor finite (NaN and inf propagate through
    it) at a tenth of the cost of ``isfinite``, which allocates a mask per tensor (the paper
    model's 0.75 GB: ~0.05 s against ~1 s on two cores); only a sum that is not finite, or
    overflowed, is looked at value by value.
    """
    bad = []
    for key, tensor in state_dict.items():
        if not tensor.dtype.is_floating_point or bool(torch.isfinite(tensor.sum())):
            continue
        count = int(tensor.numel() - torch.isfinite(tensor).sum())
        if count:
            bad.append(f"{key} ({count} of {tensor.numel()} values NaN/inf)")
    return bad


def meta_model(config, tokenizer=None) -> nn.Module:
    """``build_model(config)`` on the meta device: its modules and tensor shapes, no memory (on the
    CPU if some part has no meta kernel)."""
    from ..model import build_model

    try:
        with torch.device("meta"):
            return build_model(config, tokenizer=tokenizer)
    except (NotImplementedError, RuntimeError):  # an operation without a meta kernel
        return build_model(config, tokenizer=tokenizer)


def build_for_state(config, tokenizer, state_dict: Mapping[str, Tensor], where: str) -> nn.Module:
    """The model ``config`` describes (a ModelConfig), built once ``state_dict``'s tensors are known
    to fit it: a config that names a network far larger than its weights (a damaged or crafted
    file: 400 million queries) took that memory, or ended in a bare RuntimeError, before the
    strict load could say what was wrong."""
    from ..model import build_model

    problems = state_dict_problems(meta_model(config, tokenizer), state_dict)
    if problems:
        raise CheckpointError(f"{where} does not match the model: " + "; ".join(problems))
    return build_model(config, tokenizer=tokenizer)


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, Tensor], where: str = "checkpoint") -> None:
    """Load every tensor or nothing: any missing / unexpected / mis-shaped tensor, or one holding
    NaN / inf values, raises :class:`CheckpointError` naming them."""
    problems = state_dict_problems(module, state_dict)
    if problems:
        raise CheckpointError(f"{where} does not match the model: " + "; ".join(problems))
    refuse_non_finite(state_dict, where)
    module.load_state_dict(state_dict, strict=True)


def refuse_non_finite(state_dict: Mapping[str, Tensor], where: str = "checkpoint") -> None:
    """:class:`CheckpointError` naming every tensor of ``state_dict`` that holds NaN / inf values
    (every load checks this, strict about names and shapes or not)."""
    bad = non_finite_tensors(state_dict)
    if bad:
        raise CheckpointError(f"{where}: {len(bad)} tensor(s) hold non-finite values (the training that wrote "
                              f"them diverged, or the file is damaged): {listing(bad, 8)}")


def load_official_weights(model: nn.Module, checkpoint: Union[PathLike, OfficialCheckpoint],
                          detector_only: bool = False, ignore_prefixes: Sequence[str] = ()) -> OfficialCheckpoint:
    """Strictly load an official file's weights into ``model`` (built with a matching config).

    ``detector_only``: ``model`` is a detector and the file a segmentation checkpoint: load the
    ``detr.`` weights and deliberately skip the mask head (the reference's ``--resume`` rule).
    ``ignore_prefixes``: tensors of the file to leave out on purpose, e.g. heads of an MDETR
    pre-training file that TOIST does not have (``("isfinal_embed.",)``); everything else must
    still match exactly.
    """
    ckpt = checkpoint if isinstance(checkpoint, OfficialCheckpoint) else read_official(checkpoint)
    state = ckpt.detector_state_dict() if detector_only else ckpt.state_dict
    if ignore_prefixes:
        state = {k: v for k, v in state.items() if not k.startswith(tuple(ignore_prefixes))}
    load_state_dict_strict(model, state, where=f"{ckpt.path} [{ckpt.source_key}]")
    return ckpt


def check_bank_shapes(cluster_state: Mapping[str, Tensor], where: str, d_model: Optional[int] = None) -> None:
    """Refuse a bank whose ``feature_bank [tasks, size, dim]`` and ``cluster_centers [tasks, K, dim]``
    do not fit each other, or whose ``dim`` is not the model's ``d_model`` (the pronoun rows of
    the decoder memory that its centres replace)."""
    shapes = {key: tuple(cluster_state[key].shape) for key in ("feature_bank", "cluster_centers")}
    for key, dims in (("feature_bank", "[tasks, size, dim]"), ("cluster_centers", "[tasks, K, dim]")):
        if len(shapes[key]) != 3:
            raise CheckpointError(f"{where}: memory bank {key} has shape {list(shapes[key])}; expected {dims}")
    (tasks, _, dim), (centre_tasks, _, centre_dim) = shapes["feature_bank"], shapes["cluster_centers"]
    if (centre_tasks, centre_dim) != (tasks, dim):
        raise CheckpointError(f"{where}: memory bank cluster_centers {list(shapes['cluster_centers'])} does not fit "
                              f"feature_bank {list(shapes['feature_bank'])} (same tasks and dim expected)")
    if d_model is not None and dim != d_model:
        raise CheckpointError(f"{where}: memory bank feature_bank {list(shapes['feature_bank'])} holds {dim}-d "
                              f"features but the model's transformer.d_model is {d_model}")


@dataclass
class BankSettings:
    """How a loaded memory bank re-runs k-means (and would update): what ``distill.*`` the
    training that filled it used. The defaults are the reference's, and what official files
    (which record none) load with: seed 0, tolerance 1e-4, no iteration cap.

    They matter after loading: a task whose bank is not yet full draws its k-means start rows
    from ``seed``, and ``kmeans_max_iter`` moves warm-started centres it runs on again, so a
    bank rebuilt with other settings gives other centres than the training's evaluation used.
    """

    seed: int = 0
    kmeans_tol: float = 1e-4
    kmeans_max_iter: Optional[int] = None
    kmeans_rerun: Literal["on_change", "every_use"] = "on_change"
    update: Literal["closest", "fifo"] = "closest"

    def __post_init__(self) -> None:
        # As DistillConfig: a config.yaml edited by hand must not start a k-means that never stops.
        if self.kmeans_max_iter is not None and self.kmeans_max_iter < 1:
            raise ValueError(f"kmeans_max_iter: must be >= 1 or null, got {self.kmeans_max_iter!r}")
        if not self.kmeans_tol >= 0 or (self.kmeans_tol == 0 and self.kmeans_max_iter is None):
            raise ValueError(f"kmeans_tol: must be > 0, or >= 0 with an iteration cap, got {self.kmeans_tol!r}")

    @classmethod
    def of_distill(cls, distill) -> "BankSettings":
        """The settings of a run's :class:`~toist_core.distill.config.DistillConfig`."""
        return cls(seed=distill.seed, kmeans_tol=distill.kmeans_tol, kmeans_max_iter=distill.kmeans_max_iter,
                   kmeans_rerun=distill.kmeans_rerun, update=distill.update)

    @classmethod
    def of_bank(cls, bank: nn.Module) -> "BankSettings":
        """The settings a :class:`~toist_core.distill.memory_bank.MemoryBank` runs with (the
        defaults for any other module)."""
        default = cls()
        return cls(seed=getattr(bank, "seed", default.seed), kmeans_tol=getattr(bank, "tol", default.kmeans_tol),
                   kmeans_max_iter=getattr(bank, "max_iter", default.kmeans_max_iter),
                   kmeans_rerun=getattr(bank, "rerun", default.kmeans_rerun),
                   update=getattr(bank, "update_rule", default.update))


def build_memory_bank(cluster_state: Mapping[str, Tensor], where: str = "cluster_criterion",
                      d_model: Optional[int] = None, settings: Optional[BankSettings] = None,
                      stale: Optional[Tensor] = None):
    """A :class:`toist_core.distill.memory_bank.MemoryBank` holding an official bank state.

    ``d_model``: the model's width, which the bank's feature dim must equal (None: not checked).
    ``settings``: its k-means settings (None: :class:`BankSettings` defaults, the reference's).
    ``stale``: ``[T]`` bool, the tasks whose centres k-means has yet to recompute, as saved
    beside the state (None: every task, what loading a state leaves).
    """
    from ..distill.memory_bank import MemoryBank

    missing = [k for k in BANK_KEYS if k not in cluster_state]
    if missing:
        raise CheckpointError(f"{where}: memory bank state lacks {missing}")
    check_bank_shapes(cluster_state, where, d_model)
    num_tasks, size, dim = cluster_state["feature_bank"].shape
    num_clusters = cluster_state["cluster_centers"].shape[1]
    settings = settings or BankSettings()
    try:
        bank = MemoryBank(num_tasks=num_tasks, size=size, dim=dim, num_clusters=num_clusters,
                          update=settings.update, seed=settings.seed, tol=settings.kmeans_tol,
                          max_iter=settings.kmeans_max_iter, rerun=settings.kmeans_rerun)
    except ValueError as exc:  # e.g. more cluster centres than bank entries
        raise CheckpointError(f"{where}: {exc}") from None
    load_state_dict_strict(bank, {k: v.float() for k, v in cluster_state.items()}, where=where)
    if stale is not None:
        if stale.dtype != torch.bool or tuple(stale.shape) != (num_tasks,):
            raise CheckpointError(f"{where}: its stale flags are {stale.dtype} {list(stale.shape)}; expected "
                                  f"[{num_tasks}] bool (one per task of the bank)")
        bank.load_stale_flags(stale)
    return bank
