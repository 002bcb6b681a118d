"""int8 CPU inference: Linear layers with int8 weights and dynamically quantized activations.

On a CPU without bf16 the encoder's float32 matrix products are the whole cost of an
embedding. ``Int8Linear`` runs them with fbgemm's ``quantized::linear_dynamic`` (the kernel
behind ``torch.ao.quantization.quantize_dynamic``): weights symmetric per output channel,
quantized once, to 7 bits (``[-63, 63]``); activations uint8, asymmetric per tensor,
quantized on the fly at each call with the full 8-bit range; accumulation in int32, output
float32. The AVX2 kernel adds pairs of u8 x s8 products in int16, which 8-bit weights and
activations can overflow; torch's ``quantize_dynamic`` avoids that by giving the activations 7
bits (``reduce_range``), we give them to the weights instead: on the random 85M GMVAE that cuts
the largest int8 shift of a cluster-logit margin from 0.043 to 0.027 at the same speed (the
per-tensor activation grid, not the per-channel weights, carried most of the error).

The int8 path is a wrapper around the float encoder, which has no int8 code: :func:`int8_copy`
builds an inference-only copy whose ``nn.Linear`` children are replaced (its attentions are
:class:`Int8FlowAttention`); every other submodule (LayerNorm, GELU, ...) is *shared* with the
original, not copied, and the float weights are never touched. :class:`Int8Encoder` runs that
copy in place of the module's float encoding stage (encoder, pre-latent LayerNorm), and
:class:`Int8InferenceMixin` caches it on the module and drops it whenever the float weights
may change.

GMVAE near-ties. A GMVAE embedding is ``E[z | h, argmax_y q(y|h)]``, which jumps where two
clusters tie. int8 moves the margin between two cluster logits by up to 0.027-0.030 (random
official 85M GMVAE, 3 x 2,000 cells; 0.041-0.046 with 7-bit activations), so about 1% of a
random 85M GMVAE's cells switch cluster (min cosine 0.9986). :func:`encode_refining_ties`
re-runs in float32 the rows whose int8 top-2 margin is below ``INT8_TIE_MARGIN = 0.04``
(above every margin shift measured, so no cell that int8 could switch is left out; it widens
itself if the refined rows show a larger shift). Such a row reads the rest of its tissue
only through the flow attention's sums over cells (``k.sum``, the conserved key flow, the
competition-weighted ``kv``: ``FlowAttention.flow_sums``), which are taken from the int8
pass (:func:`recording_flow_sums`), so the re-run costs O(rows), not a float32 pass over
the tissue. The row's own path carries most of the int8 error: refined margins are within
0.003 of float32 (from 0.027). What is left is the int8 error of the sums, mostly the weight
rounding, which is the same for every cell and so does not average out over the tissue
(correcting it, ``(W - W_int8) @ mean(x)`` per layer, leaves 0.0004 but costs about 3% of
the time, so it is not done). Cells whose float32 margin is below that residual can still
switch: 1-3 of 2,000 on the random 85M GMVAE, none of 700 on a trained one. The flagged rows
are 11% of a random 85M GMVAE's cells (3% of a trained one's).

torch 2.13 deprecates the quantized tensor API (``torch.quantize_per_channel`` and friends,
pytorch/pytorch#184982). Its warning is raised once, when weights are quantized; it is
silenced there, so users never see it. :func:`int8_unsupported` is the capability check: the
int8 path refuses to run where the kernel is missing.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ._flowformer import FlowAttention
from ._segments import TissueSegments

INT8_ENGINES = ("x86", "fbgemm")  # torch's x86 CPU backends of quantized::linear_dynamic


def int8_unsupported(device: torch.device | str = "cpu") -> str | None:
    """Why int8 inference cannot run on ``device`` with this torch build, or ``None`` if it can."""
    device = torch.device(device)
    if device.type != "cpu":
        return (
            f"precision='int8' runs on the CPU only (the model is on {device}); on a GPU use "
            "precision='bf16' or '16', or move the model with model.to_device('cpu')."
        )
    engines = [e for e in INT8_ENGINES if e in torch.backends.quantized.supported_engines]
    if not engines:
        return (
            "precision='int8' needs torch's fbgemm/x86 quantized engine, which this torch build "
            f"lacks (supported engines: {torch.backends.quantized.supported_engines}); use "
            "precision='32'."
        )
    ops = torch.ops.quantized
    if not all(hasattr(ops, name) for name in ("linear_prepack", "linear_dynamic")):
        return (
            f"torch {torch.__version__} has no quantized::linear_dynamic kernel any more; use "
            "precision='32'."
        )
    return None


@contextmanager
def _quantized_engine() -> Iterator[None]:
    """Pack weights for the x86/fbgemm engine (the packing decides which kernel runs)."""
    previous = torch.backends.quantized.engine
    if previous not in INT8_ENGINES:
        engine = next(e for e in INT8_ENGINES if e in torch.backends.quantized.supported_engines)
        torch.backends.quantized.engine = engine
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r".*quantiz.*deprecated", UserWarning)
            yield
    finally:
        torch.backends.quantized.engine = previous


WEIGHT_LEVELS = 63  # int8 weights in [-63, 63]: 7 bits, so that 8-bit activations cannot overflow


class Int8Linear(nn.Module):
    """Inference-only stand-in of ``nn.Linear`` layers: int8 weights, dynamic int8 activations.

    Parameters
    ----------
    *linears
        The float layers (same input width); their weights are read, never modified. Several
        layers become one product whose output is their outputs side by side.
    """

    def __init__(self, *linears: nn.Linear):
        super().__init__()
        if len({lin.in_features for lin in linears}) != 1:
            raise ValueError("Int8Linear stacks layers of one input width only.")
        self.in_features = linears[0].in_features
        self.out_features = sum(lin.out_features for lin in linears)
        weight = torch.cat([lin.weight.detach().float() for lin in linears])  # (out, in)
        biases = [lin.bias for lin in linears]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat(
                [
                    torch.zeros(lin.out_features) if b is None else b.detach().float()
                    for lin, b in zip(linears, biases, strict=True)
                ]
            )
        scale = weight.abs().amax(1).clamp_min(1e-12) / WEIGHT_LEVELS  # (out,) per channel
        zero = torch.zeros(self.out_features, dtype=torch.long)
        with _quantized_engine():
            qweight = torch.quantize_per_channel(weight, scale.double(), zero, 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(qweight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out), float32."""
        rows = x.reshape(-1, self.in_features).float()
        # full 8-bit activations (reduce_range=False): with 7-bit weights a pair of u8 x s8
        # products stays within the AVX2 kernel's int16 sums (2 * 255 * 63 < 2**15)
        out = torch.ops.quantized.linear_dynamic(rows, self._packed, False)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8FlowAttention(FlowAttention):
    """The flow attention of an int8 copy (built by :func:`int8_copy`, never trained).

    Its query, key and value projections run as ``fused_qkv``, one :class:`Int8Linear` of
    three times the width (the same numbers as three, with the input quantized once), unless
    ``fused_qkv`` is ``None`` (a projection kept in float32). Inside
    :func:`recording_flow_sums` it appends the :meth:`~FlowAttention.flow_sums` of its
    one-tissue flows to ``recorded_sums``.

    Parameters
    ----------
    attention
        The float attention; its submodules are taken over (not copied).
    fused_qkv
        The fused projection, or ``None`` to keep the three of ``attention``.
    """

    def __init__(self, attention: FlowAttention, fused_qkv: Int8Linear | None):
        nn.Module.__init__(self)
        self.n_heads, self.n_local_heads = attention.n_heads, attention.n_local_heads
        self.eps = attention.eps
        projections = ("query_projection", "key_projection", "value_projection")
        for name in projections:  # the fused copy reads fused_qkv only
            setattr(self, name, None if fused_qkv is not None else getattr(attention, name))
        self.out_projection, self.dropout = attention.out_projection, attention.dropout
        self.fused_qkv = fused_qkv
        self.recorded_sums: list | None = None

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.fused_qkv is None:
            return super()._project(x)
        return self.fused_qkv(x).chunk(3, dim=-1)  # 3 x (N, d), one product

    def _attend(self, q, k, v, tissues: TissueSegments | None, eps: float) -> torch.Tensor:
        if tissues is not None or self.recorded_sums is None:
            return super()._attend(q, k, v, tissues, eps)
        sums, sink_in = self.flow_sums(q, k, v, q.shape[1], eps)
        self.recorded_sums.append(sums)
        return self.sink_flow(q, sums, eps, sink_in)


def int8_copy(module: nn.Module, keep: Callable[[str], bool] = lambda name: False) -> nn.Module:
    """Inference copy of ``module`` with its ``nn.Linear`` layers as :class:`Int8Linear`.

    Each :class:`~cellplm_scvi.nn.FlowAttention` becomes an :class:`Int8FlowAttention`, its
    query, key and value projections one :class:`Int8Linear` of three times the width.

    Parameters
    ----------
    module
        The float module (unchanged; the copy shares its non-Linear parameters and buffers).
    keep
        ``keep(name)`` -> True keeps the Linear of that qualified name (e.g.
        ``"layers.3._ff_block.3"``) in float32 (also shared, not copied).
    """
    shared = {id(t): t for t in (*module.parameters(), *module.buffers())}  # deepcopy memo
    clone = copy.deepcopy(module, memo=dict(shared))
    projections = ("query_projection", "key_projection", "value_projection")
    for name, child in list(clone.named_modules()):
        if isinstance(child, FlowAttention):
            prefix = f"{name}." if name else ""
            fused = None
            if not any(keep(prefix + p) for p in projections):
                fused = Int8Linear(*(getattr(child, p) for p in projections))
            attention = Int8FlowAttention(child, fused)
            if name:
                parent, _, attr = name.rpartition(".")
                setattr(clone.get_submodule(parent), attr, attention)
            else:
                clone = attention
    for name, child in list(clone.named_modules()):
        if isinstance(child, nn.Linear) and not keep(name):
            parent, _, attr = name.rpartition(".")
            setattr(clone.get_submodule(parent), attr, Int8Linear(child))
    return clone.eval()  # requires_grad stays: the shared parameters are the original's


# ------------------------------------------------ GMVAE near-ties: a float32 refinement
INT8_TIE_MARGIN = 0.04  # top-2 cluster-logit margin below which a row is refined in float32


@contextmanager
def recording_flow_sums(encoder: nn.Module) -> Iterator[list[list[tuple]]]:
    """Inside, each layer's attention of ``encoder`` (the :func:`int8_copy` of a
    ``FlowformerEncoder``) appends the :meth:`~cellplm_scvi.nn.FlowAttention.flow_sums` of
    its one-tissue flows to that layer's list (packed tissues record nothing)."""
    log = []
    attentions = [layer.self_attn for layer in encoder.layers]
    if not all(isinstance(a, Int8FlowAttention) for a in attentions):
        raise TypeError("recording_flow_sums reads an int8_copy of a FlowformerEncoder.")
    for attention in attentions:
        log.append([])
        attention.recorded_sums = log[-1]
    try:
        yield log
    finally:
        for attention in attentions:
            attention.recorded_sums = None


def encode_refining_ties(
    encoder: nn.Module,
    float_encoder: nn.Module,
    finish: Callable[[torch.Tensor], torch.Tensor],
    cluster_logits: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tissues=None,
    spatial: torch.Tensor | None = None,
    margin: float | None = None,
) -> torch.Tensor:
    """``finish(encoder(x))`` (N, d) with the rows whose two best GMVAE clusters nearly tie
    recomputed in float32.

    A GMVAE embedding is ``E[z | h, argmax_y q(y|h)]``: where the top-2 cluster logits are
    closer than the int8 error, int8 may pick the other cluster and the embedding jumps. The
    rows whose int8 top-2 margin is below ``margin`` run again through ``float_encoder``,
    layer by layer, reading the rest of the tissue through the attention sums of the int8
    pass (:meth:`~cellplm_scvi.nn._flowformer.FlowformerEncoder.forward_rows`): a row's own
    path is float32, the tissue sums keep their small int8 error (see the module docstring).
    Packed ``tissues``: each tissue holding such a row runs again alone in float32 (exact).

    The refined rows measure the int8 error: if int8 moved one of their margins (the spread
    of the per-cluster logit errors) by more than ``margin / 1.25``, the margin widens to
    1.25 times that shift and the rows newly below it are refined too (a model whose int8
    error exceeds the default still gets its ties refined). ``margin``: default
    :data:`INT8_TIE_MARGIN` (0: no refinement).
    """
    margin = INT8_TIE_MARGIN if margin is None else margin
    with recording_flow_sums(encoder) as sums:
        h = finish(encoder(x, tissues, spatial))  # (N, d)
    logits = cluster_logits(h)  # (N, K), int8
    top2 = logits.topk(2, dim=-1).values  # (N, 2)
    margins = top2[:, 0] - top2[:, 1]  # (N,)
    refined = torch.zeros_like(margins, dtype=torch.bool)
    while bool((new := (margins < margin) & ~refined).any()):
        if tissues is None:
            rows = new.nonzero().view(-1)  # (R,)
            near = None if spatial is None else spatial[rows]
            h[rows] = finish(float_encoder.forward_rows(x[rows], sums, near))
        else:
            for tissue in tissues.rows():
                if bool(new[tissue].any()):
                    near = None if spatial is None else spatial[tissue]
                    h[tissue] = finish(float_encoder(x[tissue], None, near))
                    new[tissue] = True
            rows = new.nonzero().view(-1)
        refined[rows] = True
        error = logits[rows] - cluster_logits(h[rows])  # (R, K): int8 - float32
        shift = float((error.amax(1) - error.amin(1)).max())  # the most a margin moved
        margin = max(margin, 1.25 * shift)
    return h


class Int8Encoder(nn.Module):
    """The int8 wrapper of a float encoding stage ``finish(encoder(x, tissues, spatial))``.

    Runs :func:`int8_copy` of ``encoder``; with ``cluster_logits`` (a GMVAE), the rows whose
    two best clusters nearly tie are recomputed in float32 through ``encoder``
    (:func:`encode_refining_ties`). Inference only; the float modules are read, never changed.

    Parameters
    ----------
    encoder
        The float ``FlowformerEncoder``.
    finish
        (N, d) -> (N, d) after the encoder (the pre-latent LayerNorm).
    cluster_logits
        (N, d) finished states -> (N, K) cluster logits of a GMVAE latent; ``None``: no
        refinement (the latent is continuous in the states).
    """

    def __init__(
        self,
        encoder: nn.Module,
        finish: nn.Module,
        cluster_logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        self.quantized = int8_copy(encoder)
        self.float_encoder, self.finish = encoder, finish
        self.cluster_logits = cluster_logits

    def forward(
        self,
        x: torch.Tensor,
        tissues: TissueSegments | None = None,
        spatial: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N, d) -> (N, d), as ``finish(encoder(x, tissues, spatial))``."""
        if self.cluster_logits is None:
            return self.finish(self.quantized(x, tissues, spatial))
        args = (self.finish, self.cluster_logits, x, tissues, spatial)
        return encode_refining_ties(self.quantized, self.float_encoder, *args)


class Int8InferenceMixin:
    """int8 CPU inference for :class:`~cellplm_scvi.module.CellPLMModule`.

    Mix into the module (before it in the bases). The module's forward runs its encoding stage
    through :meth:`encode`: the float :meth:`encode_float` of the module, or, inside
    :meth:`int8_inference` (evaluation mode), its :class:`Int8Encoder` (built from the
    module's ``encoder``, ``pre_latent_norm`` and, for a GMVAE, the latent's cluster logits
    on first use, and cached). The cache is dropped by ``train()``, ``load_state_dict`` and
    every ``to()``/``cpu()``/``float()`` (all of which go through ``_apply``), and rebuilt
    when a float weight of the encoder changed in place (its version counter) or moved (its
    storage).
    """

    @contextmanager
    def int8_inference(self) -> Iterator[None]:
        """Run the forward with the int8 encoder (``ValueError`` where int8 cannot run)."""
        reason = int8_unsupported(next(self.parameters()).device)
        if reason is not None:
            raise ValueError(reason)
        previous = self.__dict__.get("_int8_active")
        self.__dict__["_int8_active"] = self.int8_encoder()
        try:
            yield
        finally:
            self.__dict__["_int8_active"] = previous

    def encode(
        self,
        x: torch.Tensor,
        tissues: TissueSegments | None = None,
        spatial: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(N, d) -> (N, d): :meth:`encode_float`, or the :class:`Int8Encoder` inside
        :meth:`int8_inference` (evaluation mode)."""
        active = self.__dict__.get("_int8_active")
        if active is None or self.training:
            return self.encode_float(x, tissues, spatial)
        return active(x, tissues, spatial)

    def int8_encoder(self) -> Int8Encoder:
        """The cached :class:`Int8Encoder` of the module (quantized on first use)."""
        cache = self.__dict__.get("_int8_cache")
        fingerprint = self._int8_fingerprint()
        if cache is None or cache[0] != fingerprint:
            logits = None
            if self.latent_type == "gmvae":
                logits = self.latent.layers[1].cluster_logits
            wrapper = Int8Encoder(self.encoder, self.pre_latent_norm, logits)
            cache = self.__dict__["_int8_cache"] = (fingerprint, {"encoder": wrapper})
        return cache[1]["encoder"]

    def _int8_fingerprint(self) -> tuple:
        """Storage and version counter of every float tensor the int8 copy was built from."""
        return tuple((t.data_ptr(), t._version) for t in self.encoder.parameters())

    def drop_int8_cache(self) -> None:
        """Free the int8 encoder (the next int8 call quantizes again)."""
        self.__dict__.pop("_int8_cache", None)

    # ---------------------------------------------------- whatever may change the weights
    def train(self, mode: bool = True):
        if mode:
            self.drop_int8_cache()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.drop_int8_cache()
        return super()._apply(fn, *args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        self.drop_int8_cache()
        return super().load_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict:
        """Pickles and deep copies leave the int8 encoder out (it is rebuilt on use)."""
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k not in ("_int8_cache", "_int8_active")}
