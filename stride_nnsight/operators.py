"""Steering operators and STRIDE's training losses: the one implementation behind every backend.

This module also runs *remotely* (inside an NDIF session, where the code of a ``with``
block is executed from its source with only whitelisted imports). It therefore imports
only ``torch``, ``math`` and ``typing``, defines its classes with explicit
``super(Cls, self)`` calls, and never moves or touches the base model. Shapes are given
in docstrings (``b`` batch rows, ``t`` tokens, ``d`` d_model, ``V`` vocabulary,
``K`` operators, ``r`` rank).

An operator ``k`` adds a low-rank, input-dependent edit to a hidden vector::

    residual placement:  z_l -> z_l + B(z_l) @ a_k        a_k: [r, d]
    logits placement:    o   -> o   + B(z_l) @ a_k        a_k: [r, V]
    head placement:      h   -> h   + B(z_l) @ a_k        a_k: [r, d]

where ``B`` (the basis network, shared by all operators) maps the residual stream
``z_l`` at the output of decoder block ``l`` to ``r`` numbers, ``o`` are the final logits
and ``h`` the final hidden state (the output head's input, after the final norm): the head
placement's edit reaches the logits through the frozen output head, ``o_k = head(h + B a_k)``,
so its state does not grow with the vocabulary. ``a_k`` starts at zero, so every operator is
the identity until trained.
"""

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

PLACEMENTS = ("residual", "logits", "head")
#: dtypes the operators' edit can be computed in (their parameters stay float32: master weights)
OPERATOR_DTYPES = ("float32", "bfloat16", "float16")
#: placements whose edit does not change the blocks after ``layer`` (fit from one unsteered forward)
READ_ONLY_PLACEMENTS = ("logits", "head")


class BasisNetwork(torch.nn.Module):
    """Shared basis ``B``: ``[..., d_model] -> [..., rank]``.

    LayerNorm (no affine) -> Linear(d_model, hidden) -> GELU -> Linear(hidden, rank).
    The normalisation makes the operators insensitive to the residual stream's scale,
    which grows with depth.
    """

    def __init__(self, d_model: int, rank: int, hidden: int) -> None:
        super(BasisNetwork, self).__init__()
        self.d_model = int(d_model)
        self.rank = int(rank)
        self.hidden = int(hidden)
        self.inp = torch.nn.Linear(self.d_model, self.hidden)
        self.out = torch.nn.Linear(self.hidden, self.rank)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(z, (self.d_model,))
        return self.out(F.gelu(self.inp(h)))


def edit_width(placement: str, d_model: int, vocab_size: int) -> int:
    """Entries each operator edits (its coefficients' last dimension before any column cut): the
    vocabulary for the ``"logits"`` placement, ``d_model`` for ``"residual"`` and ``"head"``."""
    return int(vocab_size) if placement == "logits" else int(d_model)


def frequency_columns(counts: torch.Tensor, columns: int, seed: int = 0, rest: str = "unedited") -> torch.Tensor:
    """The logits placement's column of each vocabulary entry when the coefficients have
    ``columns = H`` columns for a vocabulary of ``V > H``: ``counts [V]`` (how often each token
    occurs in the training corpus; `Stride.fit` counts the predicted tokens, BOS excluded) -> ``column_of [V]`` long.

    ``rest="unedited"`` (what fits use): the ``H`` most frequent tokens (ties: lower id first) get
    a column of their own; every other token maps to ``H``, a column that is always zero, so the
    operators never edit its logit (`SteeringOperators.expand_columns`). ``rest="shared"`` (an
    earlier variant, kept for states saved with it and for comparisons): the ``H - H // 16`` most
    frequent get their own column, every other token shares one of the last ``H // 16`` columns
    (at least one), assigned at random from ``seed``. ``H >= V``: the identity."""
    counts = torch.as_tensor(counts).reshape(-1)
    V, H = int(counts.numel()), int(columns)
    if H >= V:
        return torch.arange(V)
    if rest not in ("unedited", "shared"):
        raise ValueError("rest must be 'unedited' or 'shared', got %r" % (rest,))
    order = torch.argsort(-counts.double(), stable=True)
    column = torch.empty(V, dtype=torch.long)
    if rest == "unedited":
        column[order[:H]] = torch.arange(H)
        column[order[H:]] = H
        return column
    shared = max(1, H // 16)
    own = H - shared
    column[order[:own]] = torch.arange(own)
    generator = torch.Generator().manual_seed(int(seed))
    column[order[own:]] = own + torch.randint(0, shared, (V - own,), generator=generator)
    return column


def state_bytes(n_operators: int, rank: int, d_model: int, out_dim: int, hidden: int = 64,
                columns: Optional[int] = None) -> int:
    """Bytes of a `SteeringOperators` state dict from its shapes: the float32 basis network, the
    ``K x r x W`` float32 coefficients (``W = min(columns, out_dim)``, ``out_dim`` when ``columns``
    is None) and, when ``columns < out_dim``, the int64 ``column_of [out_dim]`` map."""
    cut = columns is not None and int(columns) < int(out_dim)
    width = int(columns) if cut else int(out_dim)
    basis = d_model * hidden + hidden + hidden * rank + rank
    return 4 * (basis + n_operators * rank * width) + (8 * int(out_dim) if cut else 0)


class GatherColumns(torch.autograd.Function):
    """``coefficients [K, r, V]`` at rows ``operator [b]`` and columns ``ids [b, t, c]`` ->
    ``[b, t, c, r]``. Its backward adds the ``b t c r`` gradient entries *in place* into
    ``coefficients.grad`` (created as zeros if missing) and hands autograd nothing for it, so a
    step touches only what it read instead of allocating and zeroing a ``K x r x V`` gradient
    (`SteeringOperators.candidate_deltas`; the fitter keeps ``.grad`` and zeroes it in place)."""

    @staticmethod
    def forward(ctx, coefficients, operator, ids):
        ctx.save_for_backward(operator, ids)
        ctx.coefficients = coefficients
        return coefficients.transpose(1, 2)[operator[:, None, None], ids]

    @staticmethod
    def backward(ctx, grad):
        operator, ids = ctx.saved_tensors
        coef = ctx.coefficients
        K, r, V = coef.shape
        if coef.grad is None:
            coef.grad = torch.zeros_like(coef)
        ranks = torch.arange(r, device=ids.device)
        flat = (operator[:, None, None, None] * r + ranks) * V + ids.unsqueeze(-1)     # [b, t, c, r]
        coef.grad.view(-1).index_add_(0, flat.reshape(-1), grad.reshape(-1).to(coef.grad.dtype))
        return None, None, None


class SteeringOperators(torch.nn.Module):
    """All ``K`` steering operators of one layer: a shared basis and one ``a_k`` per subset.

    Args:
        n_operators: ``K``.
        d_model: width of the residual stream read (and, for ``"residual"``, edited).
        rank: ``r``, the basis size.
        out_dim: width of what is edited: ``d_model`` for ``"residual"`` and ``"head"``
            (the final hidden state's width), the vocabulary size for ``"logits"``.
        placement: ``"residual"``, ``"logits"`` or ``"head"``.
        layer: index of the decoder block whose output is read (and edited).
        hidden: width of the basis network's hidden layer.
        compute_dtype: one of `OPERATOR_DTYPES`: the dtype `delta` computes the edit in (under
            ``torch.autocast``; the parameters stay float32, so the optimiser updates float32
            master weights). Measurement functions read the parameters in float32.
        columns: logits placement only: ``H``, the coefficient columns per operator. ``None`` or
            ``H >= V``: one per vocabulary entry (``a_k: r x V``). ``H < V``: ``a_k: r x H``, and
            vocabulary entry ``v`` reads column ``column_of[v]`` (a buffer, saved with the state;
            `frequency_columns`, set from the corpus by `assign_columns`): the state no longer
            grows with the vocabulary beyond ``H``.
    """

    def __init__(
        self,
        n_operators: int,
        d_model: int,
        rank: int,
        out_dim: int,
        placement: str = "residual",
        layer: int = 0,
        hidden: int = 64,
        compute_dtype: str = "float32",
        columns: Optional[int] = None,
    ) -> None:
        super(SteeringOperators, self).__init__()
        if placement not in PLACEMENTS:
            raise ValueError("placement must be one of %s, got %r" % (PLACEMENTS, placement))
        if compute_dtype not in OPERATOR_DTYPES:
            raise ValueError("compute_dtype must be one of %s, got %r" % (OPERATOR_DTYPES, compute_dtype))
        self.compute_dtype = str(compute_dtype)
        self.n_operators = int(n_operators)
        self.d_model = int(d_model)
        self.rank = int(rank)
        self.out_dim = int(out_dim)
        self.placement = placement
        self.layer = int(layer)
        self.basis = BasisNetwork(d_model, rank, hidden)
        shared = placement == "logits" and columns is not None and int(columns) < self.out_dim
        if columns is not None and int(columns) < 1:
            raise ValueError("columns must be >= 1 (or None: one per vocabulary entry), got %r" % (columns,))
        self.columns = int(columns) if shared else None
        width = self.columns if shared else self.out_dim
        self.coefficients = torch.nn.Parameter(torch.zeros(self.n_operators, self.rank, width))
        if shared:
            self.register_buffer("column_of", frequency_columns(torch.zeros(self.out_dim), width))
        else:
            self.column_of = None

    def assign_columns(self, counts: torch.Tensor, seed: int = 0) -> None:
        """Set ``column_of`` from the corpus's token ``counts [V]`` (`frequency_columns`); a no-op
        when every vocabulary entry has its own column."""
        if self.column_of is not None:
            self.column_of.copy_(frequency_columns(counts, self.columns, seed).to(self.column_of.device))

    def edited_tokens(self) -> torch.Tensor:
        """``[V]`` bool: the vocabulary entries whose logit the operators can edit (all of them
        unless `frequency_columns` left the rarer ones unedited)."""
        if self.column_of is None:
            return torch.ones(self.out_dim, dtype=torch.bool, device=self.coefficients.device)
        return self.column_of < self.columns

    def expand_columns(self, a: torch.Tensor) -> torch.Tensor:
        """``a [..., H]`` (coefficient columns) -> ``[..., V]`` (one value per vocabulary entry;
        zero for an unedited one); the identity when every entry has its own column."""
        if self.column_of is None:
            return a
        return F.pad(a, (0, 1)).index_select(-1, self.column_of.to(a.device))

    def vocabulary_coefficients(self, operators=None) -> torch.Tensor:
        """``a_k`` of ``operators`` (a slice or index; default all) as ``[k, r, V]`` (a view when
        every vocabulary entry has its own column, else a gathered copy)."""
        a = self.coefficients if operators is None else self.coefficients[operators]
        return self.expand_columns(a)

    def operator_weights(self, operator, batch: int) -> torch.Tensor:
        """Per-row coefficient matrices ``[b, r, out]`` for ``operator``.

        ``operator`` may be an int (the same operator on every row), a LongTensor ``[b]``
        (one operator per row; ``-1`` means no steering on that row) or a float tensor
        ``[b, K]`` or ``[K]`` of mixing weights (a weighted sum of operators).
        """
        a = self.coefficients
        if isinstance(operator, int):
            if not -self.n_operators <= operator < self.n_operators:
                raise IndexError("operator %d out of range [0, %d)" % (operator, self.n_operators))
            return self.expand_columns(a[operator]).unsqueeze(0).expand(batch, -1, -1)
        operator = torch.as_tensor(operator, device=a.device)
        if operator.is_floating_point():
            weights = operator.to(a.dtype)
            if weights.dim() == 1:
                weights = weights.unsqueeze(0).expand(batch, -1)
            if weights.shape != (batch, self.n_operators):
                raise ValueError(
                    "mixing weights must have shape [%d] or [%d, %d], got %s"
                    % (self.n_operators, batch, self.n_operators, tuple(operator.shape))
                )
            return self.expand_columns(torch.einsum("bk,kro->bro", weights, a))
        if operator.dim() != 1 or operator.shape[0] != batch:
            raise ValueError("per-row operator ids must have shape [%d], got %s" % (batch, tuple(operator.shape)))
        if bool((operator >= self.n_operators).any()) or bool((operator < -1).any()):
            raise IndexError("operator ids must lie in [-1, %d)" % self.n_operators)
        keep = (operator >= 0).to(a.dtype)[:, None, None]
        return self.expand_columns(a[operator.clamp(min=0)] * keep)

    def autocast(self, device: torch.device):
        """``torch.autocast`` to `compute_dtype` on ``device`` (a no-op for float32)."""
        return torch.autocast(device_type=torch.device(device).type, dtype=getattr(torch, self.compute_dtype),
                              enabled=self.compute_dtype != "float32")

    def delta(self, z: torch.Tensor, operator) -> torch.Tensor:
        """The edit ``B(z) @ a_k``: ``z [b, t, d] -> [b, t, out]``, on the operators' device, in
        `compute_dtype` (float32 by default)."""
        coef = self.operator_weights(operator, z.shape[0])
        with self.autocast(coef.device):
            basis = self.basis(z.to(device=coef.device, dtype=coef.dtype))
            return torch.bmm(basis, coef)

    def forward(self, z: torch.Tensor, operator, target: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Apply ``operator``.

        Residual placement: ``steer(z) = z + B(z) a_k``, ``z [b, t, d]``.
        Logits placement: pass the logits as ``target [b, t, V]``; returns
        ``target + B(z) a_k``. Head placement: pass the final hidden state as
        ``target [b, t, d]``; returns ``target + B(z) a_k`` (to be put through the head).
        """
        base = z if target is None else target
        return base + self.delta(z, operator).to(device=base.device, dtype=base.dtype)

    def candidate_deltas(self, z: torch.Tensor, operator, ids: torch.Tensor) -> torch.Tensor:
        """The logits placement's edit at chosen vocabulary entries only: ``z [b, t, d]``,
        ``operator`` an int or a LongTensor ``[b]`` (``-1``: unsteered row), ``ids [b, t, c]``
        (long) -> ``[b, t, c]``, entry ``(i, j, m)`` = ``(B(z_ij) a_k)[ids_ijm]``. Reads
        ``b t c r`` coefficients instead of the ``r V`` of each row's `delta`, so a fit step's work
        does not grow with the vocabulary (`vocabulary_candidates`)."""
        coef = self.coefficients
        b = int(z.shape[0])
        if isinstance(operator, int):
            operator = torch.full((b,), operator, dtype=torch.long)
        operator = torch.as_tensor(operator, device=coef.device)
        if operator.is_floating_point() or operator.dim() != 1 or operator.shape[0] != b:
            raise ValueError("candidate_deltas takes an int or per-row operator ids of shape [%d]" % b)
        if bool((operator >= self.n_operators).any()) or bool((operator < -1).any()):
            raise IndexError("operator ids must lie in [-1, %d)" % self.n_operators)
        ids = ids.to(coef.device)
        if bool((ids < 0).any()) or bool((ids >= self.out_dim).any()):
            raise IndexError("vocabulary ids must lie in [0, %d)" % self.out_dim)
        keep = (operator >= 0).to(coef.dtype)[:, None, None, None]
        if self.column_of is not None:  # unedited entries (column H) read a zero
            ids = self.column_of.to(ids.device)[ids]
            keep = keep * (ids < self.columns).to(coef.dtype).unsqueeze(-1)
            ids = ids.clamp(max=self.columns - 1)
        with self.autocast(coef.device):
            basis = self.basis(z.to(device=coef.device, dtype=coef.dtype))                  # [b, t, r]
            # coefficients as [K, V, r]: row i, token j, candidate m reads a[k_i, :, ids_ijm]
            picked = GatherColumns.apply(coef, operator.clamp(min=0), ids) * keep            # [b, t, c, r]
            return (picked * basis.unsqueeze(2)).sum(-1)

    def all_logit_deltas(self, z: torch.Tensor) -> torch.Tensor:
        """Edits of every operator at once (logits placement): ``z [p, d] -> [K, p, V]``."""
        coef = self.coefficients
        with self.autocast(coef.device):
            basis = self.basis(z.to(device=coef.device, dtype=coef.dtype))
            return self.expand_columns(torch.einsum("pr,kro->kpo", basis, coef))

    def settings(self) -> dict:
        return {
            "n_operators": self.n_operators,
            "d_model": self.d_model,
            "rank": self.rank,
            "out_dim": self.out_dim,
            "placement": self.placement,
            "layer": self.layer,
            "hidden": self.basis.hidden,
            "compute_dtype": self.compute_dtype,
            "columns": self.columns,
        }


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL per row (nats/token) over the tokens where ``loss_mask`` is 1.

    ``logits [b, t, V]`` predict ``input_ids [b, t]`` shifted by one; ``loss_mask [b, t]``
    marks target tokens (position ``t`` is predicted from ``t - 1``). Returns ``[b]``.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = input_ids[:, 1:]
    mask = loss_mask[:, 1:].to(logp.dtype)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return (nll * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def kl_to_base(base_logits: torch.Tensor, steered_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token ``KL(base || steered)`` per row (nats), over tokens where ``mask`` is 1. ``[b]``."""
    base_logp = torch.log_softmax(base_logits.float(), dim=-1)
    steered_logp = torch.log_softmax(steered_logits.float(), dim=-1)
    kl = (base_logp.exp() * (base_logp - steered_logp)).sum(-1)
    m = mask.to(kl.dtype)
    return (kl * m).sum(-1) / m.sum(-1).clamp(min=1.0)


def vocabulary_candidates(logits: torch.Tensor, next_ids: torch.Tensor, n_candidates: int,
                          generator: Optional[torch.Generator] = None) -> tuple:
    """A compressed copy of the base model's next-token distribution at every position of one
    document, on which a fit step's losses are computed instead of the whole vocabulary.

    ``logits [t, V]`` (one document, unsteered), ``next_ids [t]`` (long: the token each position
    predicts, ``-1`` where there is none) -> ``(ids [t, c] long, log_weights [t, c] float32)``,
    ``c = min(n_candidates, V)``. Slot 0 is the position's next token (the base model's top
    token where there is none); then the ``(c - 1) // 2`` most probable other tokens, exactly;
    then ``c - 1 - (c - 1) // 2`` draws (with replacement, from ``generator``) from the rest of
    the distribution, each weighted ``p_rest / draws``. ``log_weights`` are the base
    log-probabilities of the exact slots and ``log(p_rest / draws)`` of the drawn ones, so they
    sum to one in probability: with ``e`` the edit at these ids, ``log_softmax(log_weights + e)``
    is the steered next-token distribution on this support (slot 0: the NLL of the target), and
    ``KL(base || steered)`` on it is an estimate of the full one (exact when nothing is drawn,
    i.e. ``c = V``).
    """
    logp = torch.log_softmax(logits.detach().float(), dim=-1)                               # [t, V]
    t, V = int(logp.shape[0]), int(logp.shape[1])
    broken = torch.isnan(logp).any(-1)  # non-finite logits: the losses read NaN (the fit then names these rows)
    if bool(broken.any()):
        logp = logp.clone()
        logp[broken] = -math.log(V)
    c = max(1, min(int(n_candidates), V))
    next_ids = next_ids.to(logp.device).long()
    first = next_ids.clone()                                                                 # [t]
    missing = first < 0
    if bool(missing.any()):  # no next token (a document's last position): the base model's top token
        first[missing] = logp[missing].argmax(-1)
    ids, logw = [first[:, None]], [logp.gather(1, first[:, None])]
    rest = logp.clone()
    rest.scatter_(1, first[:, None], float("-inf"))
    n_top = (c - 1) // 2 if c < V else c - 1
    if n_top:
        top_lp, top_ids = rest.topk(n_top, dim=-1)
        ids.append(top_ids)
        logw.append(top_lp)
        rest.scatter_(1, top_ids, float("-inf"))
    n_draw = c - 1 - n_top
    if n_draw:
        weights = rest.exp()                                                                 # [t, V]
        mass = weights.sum(-1, keepdim=True)
        if bool((mass <= 0).any()):  # the remaining mass underflowed: draw uniformly among the tokens left
            weights = torch.where(mass > 0, weights, torch.isfinite(rest).to(weights.dtype))
        drawn = torch.multinomial(weights.cpu(), n_draw, replacement=True, generator=generator).to(logp.device)
        ids.append(drawn)
        logw.append((mass.clamp(min=1e-30) / n_draw).log().expand(t, n_draw))
    logw = torch.cat(logw, 1).float()
    if bool(broken.any()):
        logw[broken] = float("nan")
    return torch.cat(ids, 1), logw


def document_candidates(logits: torch.Tensor, input_ids: torch.Tensor, length: int, doc: int, n_candidates: int,
                        seed: int) -> tuple:
    """`vocabulary_candidates` of one document: its row's unsteered ``logits [t, V]`` and
    ``input_ids [t]``, of which the first ``length`` tokens are real; each token's target is the
    next token (none for the last). Document ``doc`` draws from a generator seeded with
    ``seed * 1000003 + doc``, so the live fit (`candidate_forward`) and an activation cache built
    with the same seed read the same candidates. Returns ``(ids [length, c], log_weights [length, c])``."""
    length = int(length)
    nxt = torch.full((length,), -1, dtype=torch.long, device=logits.device)
    nxt[: max(length - 1, 0)] = input_ids[1:length].to(logits.device)
    generator = torch.Generator().manual_seed(int(seed) * 1000003 + int(doc))
    return vocabulary_candidates(logits[:length], nxt, n_candidates, generator)


def candidate_forward(forward, index: torch.Tensor, n_candidates: int, seed: int):
    """Wrap a full unsteered ``forward(input_ids, attention_mask, None) -> (logits, z)`` so that
    ``forward(..., candidates=True)`` returns ``(log_weights [b, t, c], z [b, t, d], ids [b, t,
    c])`` (`vocabulary_candidates` of every row, computed once per distinct document; padding
    positions get slot 0 = token 0). Document ``j``'s draws come from a generator seeded with
    ``seed * 1000003 + j``, so they are the same at every step, in every process and in an
    activation cache built with the same seed. ``index [b]``: which document each row is."""
    index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
    unique, inverse = torch.unique(index, return_inverse=True)
    first = torch.full((len(unique),), len(index), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(len(index)), reduce="amin")

    def wrapped(input_ids, attention_mask, edit=None, candidates=False, **kwargs):
        if not candidates:
            return forward(input_ids, attention_mask, edit, **kwargs)
        rows = first.to(input_ids.device)
        logits, z = forward(input_ids, attention_mask, None)
        logits, z = logits[rows.to(logits.device)], z[rows.to(z.device)]
        ids_u, logw_u = [], []
        for row, doc in enumerate(unique.tolist()):
            length = int(attention_mask[int(rows[row])].sum())
            cand, logw = document_candidates(logits[row], input_ids[int(rows[row])], length, doc, n_candidates, seed)
            full_ids = cand.new_zeros(int(logits.shape[1]), cand.shape[1])
            full_logw = logw.new_zeros(int(logits.shape[1]), cand.shape[1])
            full_ids[:length], full_logw[:length] = cand, logw
            ids_u.append(full_ids)
            logw_u.append(full_logw)
        inv = inverse.to(logits.device)
        return torch.stack(logw_u)[inv], z[inv], torch.stack(ids_u)[inv]

    wrapped.candidates = True
    return wrapped


def completion_measurements(operators: SteeringOperators, z: torch.Tensor, logits: torch.Tensor,
                            input_ids: torch.Tensor, loss_mask: torch.Tensor, max_elements: int = 1 << 20,
                            first_order: bool = False) -> tuple:
    """All ``K`` logits-placement measurements of the default metric for a batch of queries at once.

    ``first_order=True``: each operator's first-order effect instead of its exact one, the
    directional derivative of the metric along the operator's edit ``e_k = B(z) a_k``: per scored
    position ``-(p . e_k - e_k[target])`` with ``p`` the base softmax (the linear term of the
    log-sum-exp in the edit), averaged over the completion like the loss; no log-sum-exp per
    operator (`first_order_measurements`).

    Only the positions that predict a scored token matter, so the work is done on those
    ``P`` positions alone: their base logits ``[P, V]`` plus every operator's edit, in chunks
    of operators holding at most ``max_elements`` logits (``k * P * V``; small chunks stay in
    the CPU cache, which is what makes this fast). The log-sum-exp is shifted by the base
    logits' maximum (computed once); an operator whose edit would overflow or underflow that
    shift is redone with its own maximum.

    ``z [b, t, d]`` (residual at the operators' layer), ``logits [b, t, V]`` (unsteered),
    ``input_ids``/``loss_mask [b, t]`` as for `token_nll`. Returns ``(y [b, K], base [b])``
    float32 on ``logits``' device: ``base = -token_nll(logits)`` and
    ``y[:, k] = -token_nll(logits + edit_k) - base`` (nats; the same numbers as running each
    operator through `SteeringOperators.forward` and `token_nll`, up to float rounding).
    """
    with torch.no_grad():  # measurements only: no graph
        device = logits.device
        scored = loss_mask[:, 1:].to(device) > 0                           # [b, t-1]
        rows, cols = scored.nonzero(as_tuple=True)                         # P positions
        n_rows = int(input_ids.shape[0])
        targets = input_ids[:, 1:].to(device)[rows, cols]                  # [P]
        counts = scored.sum(1).clamp(min=1).to(torch.float32)              # [b]
        base_p = logits[:, :-1][rows, cols].float()                        # [P, V]
        base_target = base_p.gather(-1, targets[:, None]).squeeze(-1)      # [P]
        base_nll = torch.logsumexp(base_p, -1) - base_target
        base = -torch.zeros(n_rows, device=device).index_add(0, rows, base_nll) / counts
        coef = operators.coefficients
        basis = operators.basis(z[:, :-1][rows, cols].to(device=coef.device, dtype=coef.dtype)).to(device).float()
        if first_order:  # the metric's gradient w.r.t. the logits, (onehot(target) - p) per position
            grad = -torch.softmax(base_p, -1)
            grad[torch.arange(int(rows.shape[0]), device=device), targets] += 1.0
            return first_order_measurements(operators, basis, grad, rows, counts, n_rows, max_elements), base
        n_pos, vocab, K = int(rows.shape[0]), int(base_p.shape[-1]), operators.n_operators
        # log-sum-exp of (base + edit) per position, shifted by the base logits' max: exp stays in
        # range unless an edit exceeds ~88 nats, and such operators are redone with their own max
        base_max = base_p.amax(-1)                                          # [P]
        shifted = (base_p - base_max[:, None]).unsqueeze(0)                 # [1, P, V]
        k_chunk = max(1, int(max_elements) // max(1, n_pos * vocab))
        buffer = torch.empty(min(k_chunk, K), n_pos, vocab, device=device)
        sums = torch.empty(K, n_pos, device=device)
        target = torch.empty(K, n_pos, device=device)
        for k0 in range(0, K, k_chunk):
            a = operators.vocabulary_coefficients(slice(k0, k0 + k_chunk)).to(device=device, dtype=torch.float32)
            n_k = int(a.shape[0])
            out = buffer[:n_k]
            torch.baddbmm(shifted, basis.expand(n_k, -1, -1), a, out=out)       # base - max + edit, [k, P, V]
            target[k0: k0 + n_k] = base_target + torch.einsum("pr,krp->kp", basis, a[:, :, targets])
            torch.sum(out.exp_(), -1, out=sums[k0: k0 + n_k])
        bad = ((~torch.isfinite(sums)) | (sums < 1e-30)).any(1).nonzero().flatten().tolist()
        lse = sums.log_() + base_max                                        # [K, P]
        for k in bad:                                                       # overflow/underflow: exact shift
            edited = base_p + basis @ operators.vocabulary_coefficients(k).to(device=device, dtype=torch.float32)
            lse[k] = torch.logsumexp(edited, -1)
        per_row = torch.zeros(K, n_rows, device=device).index_add(1, rows, lse - target) / counts   # [K, b]
        y = (-per_row - base.unsqueeze(0)).t().contiguous()
        return y, base


def first_order_measurements(operators: SteeringOperators, basis: torch.Tensor, grad: torch.Tensor,
                             rows: torch.Tensor, counts: torch.Tensor, n_rows: int,
                             max_elements: int = 1 << 20) -> torch.Tensor:
    """First-order measurements ``y [b, K]``: per query row, the mean over its scored positions of
    ``grad_P . e_k`` with ``e_k = basis_P @ a_k`` (the edit operator ``k`` adds at that position).

    ``basis [P, r]`` (``B(z)`` at the ``P`` scored positions), ``grad [P, out]`` (the metric's
    gradient w.r.t. the edited vector there: the logits, or the output head's input), ``rows [P]``
    (each position's query row), ``counts [b]`` (scored positions per row). Operators are taken in
    chunks holding at most ``max_elements`` coefficients (``k * r * out``).
    """
    K, rank, out = operators.n_operators, int(basis.shape[1]), int(grad.shape[1])
    device = grad.device
    k_chunk = max(1, int(max_elements) // max(1, rank * out))
    per_position = torch.empty(K, int(basis.shape[0]), device=device)
    for k0 in range(0, K, k_chunk):
        if operators.placement == "logits":
            a = operators.vocabulary_coefficients(slice(k0, k0 + k_chunk))
        else:
            a = operators.coefficients[k0: k0 + k_chunk]
        a = a.to(device=device, dtype=torch.float32)                         # [k, r, out]
        projected = torch.matmul(a, grad.t())                                  # [k, r, P]
        per_position[k0: k0 + int(a.shape[0])] = torch.einsum("pr,krp->kp", basis, projected)
    per_row = torch.zeros(K, int(n_rows), device=device).index_add(1, rows, per_position) / counts
    return per_row.t().contiguous()


def head_measurements(operators: SteeringOperators, head, z: torch.Tensor, h: torch.Tensor,
                      input_ids: torch.Tensor, loss_mask: torch.Tensor, max_elements: int = 1 << 20,
                      first_order: bool = False) -> tuple:
    """All ``K`` head-placement measurements of the default metric for a batch of queries.

    Like `completion_measurements`, on the ``P`` positions that predict a scored token only:
    ``head(h_P + B(z_P) a_k)`` for every operator, in chunks of operators holding at most
    ``max_elements`` logits. ``z``/``h [b, t, d]`` (residual at the operators' layer, output
    head's input), ``head(h) -> logits``. Returns ``(y [b, K], base [b])`` float32 with
    ``base = -token_nll(head(h))`` and ``y[:, k] = -token_nll(head(h + edit_k)) - base`` (nats).
    ``first_order=True``: the directional derivative of the metric along each edit instead, from
    one backward pass through ``head`` (the gradient of minus the NLL w.r.t. ``h_P``), as in
    `completion_measurements`.
    """
    with torch.no_grad():
        coef = operators.coefficients
        device = coef.device
        scored = loss_mask[:, 1:].to(device) > 0
        rows, cols = scored.nonzero(as_tuple=True)
        n_rows = int(input_ids.shape[0])
        targets = input_ids[:, 1:].to(device)[rows, cols]                  # [P]
        counts = scored.sum(1).clamp(min=1).to(torch.float32)              # [b]
        h_p = h[:, :-1].to(device)[rows, cols].to(coef.dtype)             # [P, d]
        basis = operators.basis(z[:, :-1].to(device)[rows, cols].to(coef.dtype))   # [P, r]
        if first_order:
            with torch.enable_grad():
                h_grad = h_p.detach().float().requires_grad_(True)
                base_logits = head(h_grad).to(device).float()
                base_nll = torch.logsumexp(base_logits, -1) - base_logits.gather(-1, targets[:, None]).squeeze(-1)
                (grad,) = torch.autograd.grad(-base_nll.sum(), h_grad)      # [P, d]
            base = -torch.zeros(n_rows, device=device).index_add(0, rows, base_nll.detach()) / counts
            y = first_order_measurements(operators, basis.float(), grad.to(device), rows, counts, n_rows,
                                         max_elements)
            return y, base
        base_logits = head(h_p).to(device).float()
        base_nll = torch.logsumexp(base_logits, -1) - base_logits.gather(-1, targets[:, None]).squeeze(-1)
        base = -torch.zeros(n_rows, device=device).index_add(0, rows, base_nll) / counts
        K, n_pos, vocab = operators.n_operators, int(rows.shape[0]), int(base_logits.shape[-1])
        k_chunk = max(1, int(max_elements) // max(1, n_pos * vocab))
        nll = torch.empty(K, n_pos, device=device)
        for k0 in range(0, K, k_chunk):
            a = coef[k0: k0 + k_chunk]                                      # [k, r, d]
            edited = h_p.unsqueeze(0) + torch.einsum("pr,krd->kpd", basis, a)
            logits = head(edited).to(device).float()                        # [k, P, V]
            nll[k0: k0 + a.shape[0]] = torch.logsumexp(logits, -1) - logits.gather(
                -1, targets.view(1, -1, 1).expand(a.shape[0], -1, 1)).squeeze(-1)
        per_row = torch.zeros(K, n_rows, device=device).index_add(1, rows, nll) / counts   # [K, b]
        y = (-per_row - base.unsqueeze(0)).t().contiguous()
        return y, base


def linearity_penalty(responses: torch.Tensor, sketch: torch.Tensor, ridge: float) -> torch.Tensor:
    """STRIDE's linearity loss: how far ``y`` is from the span of the sketched design.

    ``responses [s]``: responses ``y_k = loss_base - loss_k`` of ``s`` operators to one
    probe example; ``sketch [s, q]``: the matching rows of ``M R`` (membership times a
    Johnson-Lindenstrauss projection). Returns the mean squared residual
    ``|| S (S^T S + gamma I)^-1 S^T y - y ||^2 / s`` (a scalar).
    """
    s = sketch.to(responses.dtype)
    gram = s.t() @ s + ridge * torch.eye(s.shape[1], dtype=s.dtype, device=s.device)
    fitted = s @ torch.linalg.solve(gram, s.t() @ responses)
    return ((fitted - responses) ** 2).mean()


def jl_projection(n_examples: int, dim: int, seed: int) -> torch.Tensor:
    """Gaussian Johnson-Lindenstrauss projection ``R [n, q]`` with entries N(0, 1/q)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(n_examples, dim, generator=gen) / math.sqrt(dim)


def stride_loss(
    steered_nll: torch.Tensor,
    stability_kl: torch.Tensor,
    linearity: torch.Tensor,
    weights: tuple,
) -> torch.Tensor:
    """Weighted sum ``w_f * mean(fidelity) + w_s * mean(stability) + w_l * linearity``."""
    w_f, w_s, w_l = weights
    total = w_f * steered_nll.mean()
    if stability_kl.numel():
        total = total + w_s * stability_kl.mean()
    return total + w_l * linearity


StrideOperator = Union[int, torch.Tensor]


# ---------------------------------------------------------------------------------------
# Remote-safe building blocks of a fit / a measurement. stride_nnsight.remote calls them
# inside ``model.session(remote=...)``; they are shipped to the server by value (source),
# so they may use only torch / math / typing and must not import anything from this
# package. ``model`` is the nnsight model envoy (the server's live model when remote);
# ``layers_path`` the dotted path of its decoder blocks (e.g. "transformer.h"). Token
# tensors arrive on the CPU and are moved to the model; what is returned is small, detached
# and on the CPU. They mirror OperatorFitter.train_step and measurement.measure (default
# metric) exactly, so a remote run reproduces a local one (tests/test_remote.py checks it).
# ---------------------------------------------------------------------------------------


def decoder_blocks(model, layers_path: str):
    """The envoy of the decoder-block list, e.g. ``model.transformer.h`` for ``"transformer.h"``."""
    node = model
    for name in layers_path.split("."):
        node = getattr(node, name)
    return node


def block_device(model, layers_path: str, layer: int) -> torch.device:
    """Device of decoder block ``layer`` (where the operators go); a clear error when the
    model (on the server: the deployed one) has no such block."""
    blocks = decoder_blocks(model, layers_path)
    n_blocks = len(blocks)
    if not -n_blocks <= int(layer) < n_blocks:
        raise IndexError("layer %d is out of range: the model at %r has %d decoder blocks"
                         % (int(layer), layers_path, n_blocks))
    device = blocks[int(layer)].device
    return device if device is not None else torch.device("cpu")


def trimmed_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                 index: torch.Tensor) -> tuple:
    """Rows ``index`` of padded token tensors, trailing all-padding columns cut (>= 2 kept),
    exactly like ``TokenBatch.rows``. Returns ``(input_ids, attention_mask, loss_mask)``."""
    index = torch.as_tensor(index, dtype=torch.long)
    mask = attention_mask[index]
    width = max(int(mask.sum(1).max().item()), 2) if len(index) else 2
    return input_ids[index, :width], mask[:, :width], loss_mask[index, :width]


def steered_forward(model, layers_path: str, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    edit=None, intervention=None) -> tuple:
    """One forward of the frozen nnsight model in ``model.trace``: the single implementation of
    STRIDE's steering site, used locally (``NNsightBackend.forward``) and inside remote sessions.

    ``intervention(model)`` (the user's own patch) runs first inside the trace; ``edit`` maps
    the output ``z`` of block ``layer`` to the activation the rest of the network sees.
    Returns ``(logits [b, t, V], z [b, t, d])``, ``z`` read before the edit.

    Results leave the trace through a list built outside it, so this works whether or not
    nnsight's ``.save()`` is mounted and at any trace depth (inside a session or not).
    """
    box = []
    with model.trace(input_ids=input_ids, attention_mask=attention_mask):
        if intervention is not None:
            intervention(model)
        block = decoder_blocks(model, layers_path)[layer]
        out = block.output
        hidden = out[0] if isinstance(out, tuple) else out
        if edit is not None:
            steered = edit(hidden)
            block.output = (steered,) + tuple(out[1:]) if isinstance(out, tuple) else steered
        box.append(hidden)
        box.append(model.output.logits)
    return box[1], box[0]


def loss_candidates(input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                    n_fidelity: int, n_stability: int) -> torch.Tensor:
    """Which logits positions each row's loss reads: ``[b, t]`` bool.

    Fidelity and probe rows: positions ``j`` whose next token ``j + 1`` is a loss target
    (``loss_mask[:, j + 1] == 1``). Stability rows: every real token (``attention_mask``).
    """
    cand = torch.zeros(input_ids.shape, dtype=torch.bool, device=loss_mask.device)
    cand[:, :-1] = loss_mask[:, 1:] > 0
    n_fid, n_stab = int(n_fidelity), int(n_stability)
    cand[n_fid: n_fid + n_stab] = attention_mask[n_fid: n_fid + n_stab].to(loss_mask.device) > 0
    return cand


def gather_positions(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``values [b, t, ...]`` at ``positions [b, m]`` -> ``[b, m, ...]``."""
    rows = torch.arange(values.shape[0], device=values.device)[:, None]
    return values[rows, positions.to(values.device)]


def shared_rows_forward(forward, index: torch.Tensor):
    """Wrap ``forward(input_ids, attention_mask, edit, **kw) -> (a [b, ...], c [b, ...])`` so that
    an unsteered call (``edit=None``, no ``positions=``) runs each distinct row once.

    ``index [b]``: which document each row is (rows with equal ids must hold the same tokens).
    The wrapped forward runs the first row of each document and copies its outputs to the
    document's other rows; the outputs are those of the full call up to float rounding (a
    smaller batch). Steered calls and calls with ``positions=`` pass through unchanged."""
    index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
    unique, inverse = torch.unique(index, return_inverse=True)
    if len(unique) == len(index):
        return forward
    first = torch.full((len(unique),), len(index), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(len(index)), reduce="amin")

    def wrapped(input_ids, attention_mask, edit=None, **kwargs):
        if edit is not None or kwargs.get("positions") is not None or int(input_ids.shape[0]) != len(index):
            return forward(input_ids, attention_mask, edit, **kwargs)
        rows = first.to(input_ids.device)
        out_a, out_c = forward(input_ids[rows], attention_mask[rows.to(attention_mask.device)], None, **kwargs)
        return out_a[inverse.to(out_a.device)], out_c[inverse.to(out_c.device)]

    return wrapped


def step_losses(forward, operators: SteeringOperators, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                loss_mask: torch.Tensor, operator_ids: torch.Tensor, sketch: Optional[torch.Tensor],
                n_fidelity: int, n_stability: int, loss_weights: tuple, ridge: float,
                positions: Optional[torch.Tensor] = None, valid: Optional[torch.Tensor] = None,
                head=None) -> tuple:
    """STRIDE's three losses for one batch: the single implementation behind local fitting
    (``OperatorFitter``) and remote fitting (``run_training_steps``).

    ``forward(input_ids, attention_mask, edit) -> (logits, z)`` runs the frozen model (``edit``
    ``None`` = unsteered). Rows: ``n_fidelity`` fidelity rows, ``n_stability`` stability rows,
    then the linearity probe example repeated once per probe operator. ``sketch [p, q]``: the
    sketched design rows of the ``p`` probe operators.

    ``positions [b, m]`` (long) and ``valid [b, m]`` (bool): the logits positions each row's
    losses are read at (``OperatorFitter.sample_positions``); a row's loss is the mean over its
    valid positions (fidelity / probe rows: the NLL of the next token; stability rows: the KL to
    the unsteered model). ``None``: every position of `loss_candidates`. When ``forward`` has
    ``accepts_positions = True`` (the activation cache) it is called with ``positions=`` and
    returns ``(logits [b, m, V], z [b, m, d])`` at those positions only, so the vocabulary-wide
    work scales with ``m``, not with the document length.

    Head placement: ``forward(..., head_input=True)`` returns ``(h [b, t, d], z [b, t, d])``, the
    output head's input instead of the logits, and ``head(h) -> logits`` is the model's frozen
    output head (`stride_nnsight.activations.head_function`); steered logits are
    ``head(h + B(z) a_k)``.

    Returns ``(total, fidelity [n_f], stability [n_s], linearity)``.
    """
    n_fid, n_stab = int(n_fidelity), int(n_stability)
    n_rows = int(input_ids.shape[0])
    n_probe = n_rows - n_fid - n_stab
    n_ref = n_stab + (1 if n_probe else 0)  # rows that need the unsteered model's output
    full = positions is None  # every position: no gather needed
    if full:
        cand = loss_candidates(input_ids, attention_mask, loss_mask, n_fid, n_stab)
        positions = torch.arange(int(input_ids.shape[1]), device=cand.device).expand(n_rows, -1)
        valid = cand
    elif valid is None:
        raise ValueError("step_losses: positions given without valid")

    def pick(values, where):
        return values if full else gather_positions(values, where)

    targets = None
    if operators.placement == "logits" and getattr(forward, "candidates", False):
        # The losses on a compressed vocabulary (vocabulary_candidates): slot 0 is the target.
        with torch.no_grad():
            base_full, z_full, ids_full = forward(input_ids, attention_mask, None, candidates=True)
            base, z, cand_ids = pick(base_full, positions), pick(z_full, positions), pick(ids_full, positions)
        steered = base + operators.candidate_deltas(z, operator_ids, cand_ids).to(base.device, base.dtype)
        reference = base[n_fid: n_fid + n_ref]
        targets = torch.zeros(positions.shape, dtype=torch.long, device=steered.device)
    elif operators.placement == "logits":
        # One unsteered forward serves both: the edit is added to its logits.
        with torch.no_grad():
            if not full and getattr(forward, "accepts_positions", False):
                base, z = forward(input_ids, attention_mask, None, positions=positions)
            else:
                logits, z_full = forward(input_ids, attention_mask, None)
                base, z = pick(logits, positions), pick(z_full, positions)
        steered = operators(z, operator_ids, target=base)                      # [b, m, V]
        reference = base[n_fid: n_fid + n_ref]
    elif operators.placement == "head":
        # One unsteered forward gives z and the head's input h; the edit goes through the head.
        if head is None:
            raise ValueError("the head placement needs head= (the model's output head, "
                             "stride_nnsight.activations.head_function)")
        with torch.no_grad():
            if not full and getattr(forward, "accepts_positions", False):
                h, z = forward(input_ids, attention_mask, None, positions=positions, head_input=True)
            else:
                h_full, z_full = forward(input_ids, attention_mask, None, head_input=True)
                h, z = pick(h_full, positions), pick(z_full, positions)
            reference = head(h[n_fid: n_fid + n_ref])
        edited = operators(z, operator_ids, target=h.to(operators.coefficients.dtype))   # [b, m, d]
        steered = head(edited)                                                  # [b, m, V]
    else:
        reference = None
        if n_ref:
            with torch.no_grad():
                ref_logits, _ = forward(input_ids[n_fid: n_fid + n_ref], attention_mask[n_fid: n_fid + n_ref], None)
                reference = pick(ref_logits, positions[n_fid: n_fid + n_ref])
        steered_full, _ = forward(input_ids, attention_mask, lambda h: operators(h, operator_ids))
        steered = pick(steered_full, positions)
    device = steered.device
    positions, weights = positions.to(device), valid.to(device=device, dtype=torch.float32)
    ids = input_ids.to(device)
    if targets is None:  # the next token, as an index into the vocabulary
        targets = ids.gather(1, (positions + 1).clamp(max=ids.shape[1] - 1))      # [b, m]
    counts = weights.sum(-1).clamp(min=1.0)                                       # [b]
    steered = steered.float()
    logp = torch.log_softmax(steered, dim=-1)
    nll = (-logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * weights).sum(-1) / counts   # [b]
    fidelity = nll[:n_fid]
    if n_stab:
        base_logp = torch.log_softmax(reference[:n_stab].to(device).float(), dim=-1)
        stab = slice(n_fid, n_fid + n_stab)
        kl = (base_logp.exp() * (base_logp - logp[stab])).sum(-1)
        stability = (kl * weights[stab]).sum(-1) / counts[stab]
    else:
        stability = nll.new_zeros(0)
    if n_probe:
        row = n_fid + n_stab
        with torch.no_grad():
            probe_logp = torch.log_softmax(reference[n_stab:].to(device).float(), dim=-1)             # [1, m, V]
            base_nll = (-probe_logp.gather(-1, targets[row: row + 1].unsqueeze(-1)).squeeze(-1)
                        * weights[row: row + 1]).sum(-1) / counts[row: row + 1]
        responses = base_nll - nll[row: row + n_probe]
        linearity = linearity_penalty(responses, sketch.to(responses.device), ridge)
    else:
        linearity = nll.new_zeros(())
    total = stride_loss(fidelity, stability, linearity, tuple(loss_weights))
    if not total.requires_grad:
        raise RuntimeError("the STRIDE loss does not depend on the operators: gradients are not reaching "
                           "the operators (is the edit applied inside the trace / hook?)")
    return total, fidelity, stability, linearity


def module_device(module: torch.nn.Module) -> torch.device:
    """Device of a module's first parameter (CPU if it has none)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def run_training_steps(
    model,
    layers_path: str,
    operators: SteeringOperators,
    optimizer,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    rows: torch.Tensor,
    operator_ids: torch.Tensor,
    sketches: torch.Tensor,
    n_fidelity: int,
    n_stability: int,
    loss_weights: tuple,
    ridge: float,
    positions: Optional[torch.Tensor] = None,
    valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Run ``S`` optimiser steps of STRIDE's losses on pre-sampled rows (model frozen).

    Args:
        model (Any): the nnsight model (``TransformersModel`` / ``LanguageModel``).
        layers_path: the path of its decoder blocks.
        operators: the operators (on the model's device).
        optimizer (torch.optim.Optimizer): their optimiser.
        input_ids: ``[u, t]`` CPU tensor of the ``u`` distinct training examples the steps use.
        attention_mask: ``[u, t]`` CPU tensor, the same examples' attention mask.
        loss_mask: ``[u, t]`` CPU tensor, the same examples' loss mask.
        rows: ``[S, R]`` indices into those ``u`` examples, one row of the batch each:
            ``n_fidelity`` fidelity rows, ``n_stability`` stability rows, then the probe
            example repeated for the linearity rows.
        operator_ids: ``[S, R]`` the operator of every row.
        sketches: ``[S, p, q]`` rows of the sketched design for the ``p`` probe operators
            (``p = R - n_fidelity - n_stability``; ``p = 0`` switches the linearity loss off).
        loss_weights: ``(fidelity, stability, linearity)``.
        ridge: ``gamma``.
        positions: ``[S, R, m]`` the logits positions each row's losses read (see
            `step_losses`); ``None``: every position.
        valid: ``[S, R, m]`` which of those positions count (see `step_losses`); ``None``:
            every position.

    Returns ``[S, 4]`` float64 CPU: total, fidelity, stability, linearity loss of each step.
    """
    device = module_device(operators)
    n_stab = int(n_stability)
    records = []
    for s in range(int(rows.shape[0])):
        ids, attn, lmask = trimmed_rows(input_ids, attention_mask, loss_mask, rows[s])
        ids, attn, lmask = ids.to(device), attn.to(device), lmask.to(device)
        operators.train()

        def live(i, a, edit):
            return steered_forward(model, layers_path, operators.layer, i, a, edit)

        forward = shared_rows_forward(live, rows[s])  # one unsteered forward per distinct example

        loss, fidelity, stability, linearity = step_losses(
            forward, operators, ids, attn, lmask, operator_ids[s].to(device), sketches[s],
            n_fidelity, n_stab, loss_weights, ridge,
            None if positions is None else positions[s].to(device), None if valid is None else valid[s].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        records.append([
            float(loss.detach()),
            float(fidelity.detach().mean()),
            float(stability.detach().mean()) if n_stab else 0.0,
            float(linearity.detach()),
        ])
    return torch.tensor(records, dtype=torch.float64).reshape(-1, 4)


def measure_queries(
    model,
    layers_path: str,
    operators: SteeringOperators,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
    batch_size: int,
    first_order: bool = False,
) -> tuple:
    """Measurements of all ``K`` operators for ``q`` queries, default metric (minus the mean
    completion NLL), the same chunking as ``measurement.measure``.

    Token tensors are ``[q, t]`` CPU tensors. Returns ``(y [q, K], base [q])`` float32 CPU with
    ``y[i, k] = -loss_k(x_i) + loss_base(x_i)``; ``first_order`` (logits placement only): its
    first-order part instead (`completion_measurements`).
    """
    device = module_device(operators)
    operators.eval()
    K, n_q = operators.n_operators, int(input_ids.shape[0])
    layer = operators.layer
    base = torch.empty(n_q)
    y = torch.empty(n_q, K)
    q_chunk = max(1, int(batch_size) // 4)
    with torch.no_grad():
        for start in range(0, n_q, q_chunk):
            idx = list(range(start, min(start + q_chunk, n_q)))
            ids, attn, lmask = trimmed_rows(input_ids, attention_mask, loss_mask, torch.tensor(idx))
            ids, attn, lmask = ids.to(device), attn.to(device), lmask.to(device)
            logits, z = steered_forward(model, layers_path, layer, ids, attn)
            base_values = (-token_nll(logits, ids.to(logits.device), lmask.to(logits.device))).float().cpu()
            base[idx] = base_values
            if operators.placement == "logits":
                values, _ = completion_measurements(operators, z, logits, ids, lmask, first_order=first_order)
                y[idx] = values.float().cpu()
            else:
                pairs = [(row, k) for row in range(len(idx)) for k in range(K)]
                for p0 in range(0, len(pairs), int(batch_size)):
                    chunk = pairs[p0: p0 + int(batch_size)]
                    rows = torch.tensor([r for r, _ in chunk])
                    ks = torch.tensor([k for _, k in chunk], device=device)
                    sub_ids, sub_attn, sub_loss = trimmed_rows(ids, attn, lmask, rows)
                    steered, _ = steered_forward(model, layers_path, layer, sub_ids, sub_attn,
                                                 lambda h: operators(h, ks))
                    values = -token_nll(steered, sub_ids.to(steered.device), sub_loss.to(steered.device))
                    y[torch.tensor(idx)[rows], ks.cpu()] = values.float().cpu() - base_values[rows]
    return y, base


def cpu_state(value):
    """Detached CPU copies of every tensor in a (nested) dict / list / tuple; other values as is.
    What a remote session saves must be this: small, no graph, no device memory."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: cpu_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(cpu_state(v) for v in value)
    return value
