"""Output-aware weight error: the layer input's per-feature second moments.

A Linear's output error from its weight error is ``e_i = sum_j (w_ij - q_ij) x_j``; over
the inputs, ``E[e_i^2] ~ sum_j (w_ij - q_ij)^2 E[x_j^2]`` (the diagonal approximation:
cross terms of different features dropped). So the error a weight quantizer should
minimise weights each element by its input feature's second moment ``h_j = E[x_j^2]``,
and LLM layers' input features differ in energy by orders of magnitude.

A weight quantizer with ``error="output"`` (or ``"auto"``, where the front end feeds
it) receives the layer's input on each forward that updates statistics and keeps
``h`` as a running mean over the last :data:`MOMENT_WINDOW` rows (a cumulative mean
until then, so calibration over fewer rows is the exact mean). In a data-parallel run
the sums are reduced over the activation process group, like every activation
statistic. Conv weights ``[out, in, kh, kw]`` weight each element by its input
channel's moment.

Example:
    >>> import torch
    >>> from statqat_ao.quantizers.fake_quantizer import FakeQuantizer
    >>> fq = FakeQuantizer("fp4_e2m1", "search", granularity=32, error="output")
    >>> w = torch.randn(8, 64)
    >>> x = torch.randn(16, 64) * torch.linspace(0.1, 3.0, 64)
    >>> fq(w, layer_input=x).shape, fq.input_moments.shape
    (torch.Size([8, 64]), torch.Size([64]))
"""

from __future__ import annotations

import warnings

import torch

from statqat_ao.numerics.block_stats import reduce_blocks_with_count
from statqat_ao.parallel import distributed

ERRORS = ("weight", "output", "auto")
MOMENT_WINDOW = 65536.0  # input rows (tokens, or pixels for a conv) the running mean spans


class InputMomentsTracking:
    """Mixin for :class:`~statqat_ao.FakeQuantizer`: the ``error`` setting and ``h = E[x_j^2]``."""

    def _init_input_moments(self, error: str) -> None:
        if error not in ERRORS:
            raise ValueError(f"error must be one of {ERRORS}, got {error!r}")
        self.error = error
        self.input_feature_dim = -1  # the feature axis of the layer input: -1 Linear, 1 Conv
        self._moments_warned = False
        if error != "weight":
            self.register_buffer("input_moments", torch.zeros(0))
            self.register_buffer("input_count", torch.zeros(()))

    @property
    def output_aware(self) -> bool:
        """Whether this quantizer weights its error by the layer input's second moments."""
        return self.error != "weight"

    @property
    def has_input_moments(self) -> bool:
        return self.output_aware and self.input_moments.numel() > 0

    @torch.no_grad()
    def allocate_input_moments(self, features: int, device: torch.device | str | None = None) -> None:
        """Give ``h`` its final shape, ``features`` zeros, no rows counted.

        A prepared model's state then keeps its shapes through training: a copy taken
        right after prepare (timm's ``ModelEmaV3``, a checkpoint) lines up with it, and a
        model compiled straight away is not traced again at the first step. The first
        observed rows replace the zeros exactly (their weight is ``rows / rows``); until
        then the zero moments weight every element alike (plain error).
        """
        if self.output_aware and not self.input_moments.numel() and features > 0:
            self.input_moments = torch.zeros(features, device=device)
            self.input_count = torch.zeros((), device=device)

    @torch.no_grad()
    def observe_input(self, x: torch.Tensor, window: float = MOMENT_WINDOW) -> None:
        """Add the rows of layer input ``x`` to the running second moments."""
        if not self.output_aware or x.numel() == 0:
            return
        feats = x.detach().float().movedim(self.input_feature_dim, 0)
        group = distributed.resolve(getattr(self, "process_group", distributed.DEFAULT))
        with distributed.block_statistics_over(group):
            sums, _, n = reduce_blocks_with_count(sums=[feats * feats])
        rows = torch.as_tensor(n, dtype=torch.float32, device=feats.device).reshape(-1)[0]
        h = sums[0] / rows
        if self.input_moments.shape != h.shape:
            if self.input_moments.numel():
                raise ValueError(
                    f"{getattr(self, '_statqat_name', 'a weight quantizer')} saw layer inputs with "
                    f"{self.input_moments.numel()} features, now {h.numel()}: one quantizer per layer"
                )
            self.input_moments = h.clone()
            self.input_count = rows.clone().clamp(max=window)
            return
        total = self.input_count + rows
        self.input_moments.add_((h - self.input_moments) * (rows / total))
        self.input_count.copy_(total.clamp(max=window))

    def error_weights(self, x: torch.Tensor, warn: bool = True) -> torch.Tensor | None:
        """Per-element weights for weight ``x`` (``[out, in, ...]``), or None (plain MSE).

        None when no input was observed (``warn``: say so, for ``error="output"``), or when
        the moments do not match the weight's input dimension (grouped convolutions: each
        output sees its own input channels).
        """
        if not self.output_aware:
            return None
        if not self.has_input_moments:
            if warn:
                self._warn_no_moments("no layer input has reached it")
            return None
        h = self.input_moments
        if x.dim() < 2 or x.shape[1] != h.numel():
            self._warn_no_moments(f"its layer input has {h.numel()} features, the weight {tuple(x.shape)}")
            return None
        # A plain error where every moment is 0 (a dead input): all weights equal.
        h = torch.where(h.sum() > 0, h, torch.ones_like(h))
        return h.reshape(1, -1, *([1] * (x.dim() - 2))).expand_as(x)

    def _warn_no_moments(self, why: str) -> None:
        if self.error != "output" or self._moments_warned:
            return
        self._moments_warned = True
        warnings.warn(
            f"{getattr(self, '_statqat_name', 'a weight quantizer')} has error='output' but {why}: it "
            "estimates with the weight's own error. The layer input reaches it in sq.prepare_qat_fx and "
            "sq.quantize_ models (not torch.ao's prepare_qat_fx or PT2E); run sq.calibrate or train first.",
            stacklevel=4,
        )
