"""What a fake quantizer does when a training batch holds NaN or Inf.

A scale estimated from a NaN is NaN, and one NaN scale turns every later output of the
layer into NaN. So a quantizer never takes a scale from a non-finite batch: it keeps the
scale it had. On top of that, its ``nonfinite`` policy says what else happens:

* ``"raise"`` (the default): :class:`NonFiniteError`, naming the quantizer (its module
  path) and the statistics update (the training step: updates count from 0, the first
  training forward after prepare). In eager mode it is raised by the forward that saw the batch; that
  costs one host sync per quantizer per training forward. Under ``torch.compile`` a
  data-dependent raise would break the graph, so the quantizer records the step instead
  and :func:`check_finite` raises for it (one sync for the whole model, when you call it).
* ``"skip"``: nothing is raised; the batch's statistics are dropped and the step is
  recorded. The output still carries the NaN, so the loss is NaN: skip the optimizer
  step in the training loop (``if not torch.isfinite(loss): continue``), as mixed
  precision's loss scaling does. Quantizers that saw only finite values (upstream of
  the NaN) take their usual update on that forward.

Example:
    >>> import torch, statqat_ao as sq
    >>> fq = sq.FakeQuantizer("int4", nonfinite="skip")
    >>> _ = fq(torch.randn(8, 8))
    >>> s = fq.scale.clone()
    >>> _ = fq(torch.full((8, 8), float("nan")))
    >>> bool(torch.equal(fq.scale, s)), nonfinite_report(torch.nn.Sequential(fq))
    (True, {'0': [1, 1]})
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from statqat_ao.numerics.compute_range import count_beyond_float32

NonFinitePolicy = Literal["raise", "skip"]
POLICIES = ("raise", "skip")


class NonFiniteError(FloatingPointError):
    """A quantizer saw NaN or Inf in a batch it was to estimate a scale from."""


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"nonfinite must be one of {POLICIES}, got {policy!r}")
    return policy


class NonFiniteTracking:
    """Mixin for quantizer modules: counts statistics updates and records non-finite ones.

    The counters are buffers (so a compiled graph updates them in place, with no graph
    break) that are not in the state dict (so checkpoints keep their keys); the update
    count travels in the quantizer's extra state instead, so a resumed run keeps counting.
    """

    def _init_nonfinite(self, policy: str) -> None:
        self.nonfinite = check_policy(policy)
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64), persistent=False)
        self.register_buffer("first_nonfinite_update", torch.full((), -1, dtype=torch.int64), persistent=False)
        self.register_buffer("nonfinite_updates", torch.zeros((), dtype=torch.int64), persistent=False)

    def _record_update(self, xs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Count one statistics update of ``xs``; return whether all of it is finite (0-dim bool).

        Under the ``"raise"`` policy in eager mode, raise :class:`NonFiniteError` instead.
        """
        if self.updates.device != xs[0].device:  # a quantizer used before .to(device)
            for name in ("updates", "first_nonfinite_update", "nonfinite_updates"):
                setattr(self, name, getattr(self, name).to(xs[0].device))
        finite = _computable(xs[0])
        for t in xs[1:]:
            finite = finite & _computable(t)
        bad = ~finite
        first = self.first_nonfinite_update
        first.copy_(torch.where(bad & (first < 0), self.updates, first))
        self.nonfinite_updates.add_(bad.to(torch.int64))
        self.updates.add_(1)
        if self.nonfinite == "raise" and not torch.compiler.is_compiling() and bool(bad):
            raise NonFiniteError(_message(self, xs, int(self.updates) - 1))
        return finite

    def restart_update_count(self) -> None:
        """Count the next statistics update as update 0 (prepare calls this after its
        initialising forward, so updates number the training steps)."""
        self.updates.zero_()

    def _nonfinite_state(self) -> dict:
        return {"updates": int(self.updates), "nonfinite_policy": self.nonfinite}

    def _load_nonfinite_state(self, state: dict) -> None:
        self.updates.fill_(int(state.get("updates", 0)))
        self.nonfinite = check_policy(state.get("nonfinite_policy", self.nonfinite))


def _computable(t: torch.Tensor) -> torch.Tensor:
    """Whether every element of ``t`` is finite in float32, where statistics are computed
    (0-dim bool): float64 values beyond float32's range count as Inf."""
    if t.dtype == torch.float64:
        return torch.isfinite(t.float()).all()
    return torch.isfinite(t).all()


def _message(quantizer: nn.Module, xs: tuple[torch.Tensor, ...], update: int) -> str:
    n_nan = sum(int(torch.isnan(t).sum()) for t in xs)
    n_inf = sum(int(torch.isinf(t).sum()) for t in xs)
    n_big = sum(count_beyond_float32(t) for t in xs)
    numel = sum(t.numel() for t in xs)
    role = "weight" if any(isinstance(t, nn.Parameter) for t in xs) else "input"
    big = (
        f" and {n_big} float64 values beyond float32's range (statistics are computed in float32, "
        "where they are Inf: rescale the tensor)"
        if n_big
        else ""
    )
    return (
        f"{quantizer_name(quantizer)} saw {n_nan} NaN and {n_inf} Inf values{big} out of {numel} in its {role} "
        f"at statistics update {update} (its training step: updates count from 0, the first "
        "training forward after prepare). "
        "Its scale keeps its previous value. Find where the values come from (a diverging loss, "
        "fp16 overflow, a bad batch), or pass nonfinite='skip' "
        "(statqat_ao.quantizers.nonfinite.set_policy(model, 'skip')) and skip the optimizer step on a non-finite loss."
        + (getattr(quantizer, "nonfinite_hint", "") if n_nan else "")
    )


def quantizer_name(quantizer: nn.Module) -> str:
    """The module path :func:`name_quantizers` gave ``quantizer``, or its class name."""
    name = getattr(quantizer, "_statqat_name", None)
    return f"quantizer {name!r}" if name else f"a {type(quantizer).__name__} (call statqat_ao.quantizers.nonfinite.name_quantizers(model) to name it)"


def _trackers(model: nn.Module):
    return ((name, m) for name, m in model.named_modules() if isinstance(m, NonFiniteTracking))


def name_quantizers(model: nn.Module) -> nn.Module:
    """Tell every quantizer in ``model`` its module path, for error messages.

    ``statqat_ao.prepare_qat_fx`` does this itself; call it after torch.ao's
    ``prepare_qat_fx`` or torchao's ``prepare_qat_pt2e``. Returns ``model``.

    Example:
        >>> import torch, statqat_ao as sq
        >>> m = name_quantizers(torch.nn.ModuleDict({"fq": sq.FakeQuantizer("int8")}))
        >>> m["fq"]._statqat_name
        'fq'
    """
    for name, m in _trackers(model):
        m._statqat_name = name
    return model


def set_policy(model: nn.Module, policy: NonFinitePolicy) -> nn.Module:
    """Set the non-finite policy (``"raise"`` or ``"skip"``) of every quantizer in ``model``.

    Example:
        >>> import torch, statqat_ao as sq
        >>> m = set_policy(torch.nn.Sequential(sq.FakeQuantizer("int8")), "skip")
        >>> m[0].nonfinite
        'skip'
    """
    check_policy(policy)
    for _, m in _trackers(model):
        m.nonfinite = policy
    return model


def nonfinite_report(model: nn.Module) -> dict[str, list[int]]:
    """``{quantizer path: [first non-finite update, number of non-finite updates]}``.

    Only quantizers that saw a non-finite batch are listed. One host sync.

    Example:
        >>> import torch, statqat_ao as sq
        >>> nonfinite_report(torch.nn.Sequential(sq.FakeQuantizer("int8")))
        {}
    """
    trackers = list(_trackers(model))
    if not trackers:
        return {}
    table = torch.stack([torch.stack([m.first_nonfinite_update, m.nonfinite_updates]).cpu() for _, m in trackers]).tolist()
    return {name: row for (name, _), row in zip(trackers, table, strict=True) if row[1] > 0}


def check_finite(model: nn.Module) -> None:
    """Raise :class:`NonFiniteError` if any quantizer in ``model`` recorded a non-finite batch.

    For compiled training, where the quantizers record instead of raising: call it after
    a step (or when the loss is NaN) to learn which quantizer saw the NaN first, and when.

    Example:
        >>> import torch, statqat_ao as sq
        >>> check_finite(torch.nn.Sequential(sq.FakeQuantizer("int8")))  # nothing recorded
    """
    report = nonfinite_report(model)
    if report:
        first = min(report.items(), key=lambda kv: kv[1][0])
        listing = "; ".join(f"{name!r}: first at update {f}, {n} update(s)" for name, (f, n) in report.items())
        raise NonFiniteError(
            f"quantizer {first[0]!r} saw NaN or Inf first, at statistics update {first[1][0]} "
            f"(its training step). Quantizers with non-finite batches: {listing}. Their scales kept "
            "their previous values."
        )
