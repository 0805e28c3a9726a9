"""Pure-PyTorch reference for the fused recurrent op, written from the equations.

Same arguments and semantics as :func:`fastcells.functional.rnn` (and the
``fastcells::rnn_forward`` op), computed with a plain per-step Python loop so
that every line can be checked against the torch.nn documentation. Slow; meant
for tests and for reading.

Shape legend: ``T`` steps, ``B`` batch, ``N`` packed rows (sum of
``batch_sizes``), ``I`` input size, ``H`` hidden size, ``P`` output size of a
step (``proj_size`` if > 0 else ``H``), ``L`` layers, ``D`` directions (2 if
bidirectional else 1).

Equations (torch.nn gate order; ``W_i* x`` includes ``b_i*`` and ``W_h* h``
includes ``b_h*`` when ``has_biases``)::

    LSTM  i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of (W_ih x + W_hh h) chunks
          c' = f * c + i * g
          h' = o * tanh(c')            then h' = W_hr h' if proj_size > 0
    GRU   r = sigmoid(W_ir x + W_hr h), z = sigmoid(W_iz x + W_hz h)
          n = tanh(W_in x + r * (W_hn h))        (reset applied after the matmul)
          h' = (1 - z) * n + z * h
    GRU_RESET_BEFORE  r, z as GRU
          n = tanh(W_in x + W_hn (r * h))        (reset applied before the matmul;
          h' = (1 - z) * n + z * h                b_hn is added, not multiplied by r)
    RNN   h' = tanh or relu of (W_ih x + W_hh h)
    LSTM_LN  (fastcells.LayerNormLSTM; haste's LayerNormLSTM)
          gates = LN(x W_ih^T; g_ih) + LN(h W_hh^T; g_hh) + b_ih + b_hh
          i, f, g, o and c' as LSTM, h' = o * tanh(LN(c'; g_c, b_c))
    GRU_LN   (fastcells.LayerNormGRU) GRU with x W_ih^T + b_ih -> LN(x W_ih^T; g_ih) + b_ih
          and h W_hh^T + b_hh -> LN(h W_hh^T; g_hh) + b_hh (b_hn still inside r * (...))
    where LN(v; g[, b]) = (v - mean(v)) / sqrt(var(v) + 1e-5) * g [+ b] over the last
    dimension (biased variance, as torch.nn.LayerNorm).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._cells import MODES, cell

__all__ = ["rnn_reference", "lstm_cell", "gru_cell", "gru_reset_before_cell", "rnn_tanh_cell",
           "rnn_relu_cell", "layer_norm", "layer_norm_lstm_cell", "layer_norm_gru_cell"]

LSTM, GRU, RNN_TANH, RNN_RELU, GRU_RESET_BEFORE, LSTM_LN, GRU_LN = (
    MODES[n] for n in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU", "GRU_RESET_BEFORE", "LSTM_LN",
                       "GRU_LN"))

LAYER_NORM_EPS = 1e-5


def _linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """(n, K) @ (M, K)^T (+ b (M)) -> (n, M)."""
    y = x @ w.t()
    return y if b is None else y + b


def lstm_cell(
    x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor,
    b_ih: Tensor | None, b_hh: Tensor | None, w_hr: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step. x (n, I), h (n, P), c (n, H), w_ih (4H, I), w_hh (4H, P),
    b_* (4H), w_hr (P, H) or None. Returns h' (n, P), c' (n, H)."""
    gates = _linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, dim=1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_new = f * c + i * g
    h_new = o * torch.tanh(c_new)
    if w_hr is not None:
        h_new = h_new @ w_hr.t()
    return h_new, c_new


def gru_cell(
    x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor,
    b_ih: Tensor | None, b_hh: Tensor | None, h_rec: Tensor | None = None,
) -> Tensor:
    """One GRU step. x (n, I), h (n, H), w_ih (3H, I), w_hh (3H, H), b_* (3H).
    h_rec: the recurrent product's operand when it is not h (recurrent
    dropout: h * m). Returns h' (n, H)."""
    xr, xz, xn = _linear(x, w_ih, b_ih).chunk(3, dim=1)
    hr, hz, hn = _linear(h if h_rec is None else h_rec, w_hh, b_hh).chunk(3, dim=1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h


def gru_reset_before_cell(
    x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor,
    b_ih: Tensor | None, b_hh: Tensor | None, h_rec: Tensor | None = None,
) -> Tensor:
    """One step of the original GRU (reset before the recurrent matmul; Keras
    ``reset_after=False``, ONNX ``linear_before_reset=0``). Same shapes and
    parameters as :func:`gru_cell`; h_rec as there (the operand of the recurrent
    products, r * h_rec included)."""
    xr, xz, xn = _linear(x, w_ih, b_ih).chunk(3, dim=1)
    w_hr, w_hz, w_hn = w_hh.chunk(3, dim=0)
    b_hr, b_hz, b_hn = b_hh.chunk(3) if b_hh is not None else (None, None, None)
    hr = h if h_rec is None else h_rec
    r = torch.sigmoid(xr + _linear(hr, w_hr, b_hr))
    z = torch.sigmoid(xz + _linear(hr, w_hz, b_hz))
    n = torch.tanh(xn + _linear(r * hr, w_hn, b_hn))
    return (1 - z) * n + z * h


def layer_norm(v: Tensor, g: Tensor, b: Tensor | None = None) -> Tensor:
    """LN(v; g[, b]) over the last dimension: (v - mean) / sqrt(var + eps) * g [+ b],
    with the biased variance and eps = 1e-5 (torch.nn.LayerNorm's)."""
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    y = (v - mean) / torch.sqrt(var + LAYER_NORM_EPS) * g
    return y if b is None else y + b


def layer_norm_lstm_cell(
    x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor,
    b_ih: Tensor | None, b_hh: Tensor | None, ln: Sequence[Tensor],
) -> tuple[Tensor, Tensor]:
    """One LayerNorm LSTM step. Shapes as :func:`lstm_cell` (no projection);
    ln = (g_ih (4H), g_hh (4H), g_c (H), b_c (H)). Returns h' (n, H), c' (n, H)."""
    g_ih, g_hh, g_c, b_c = ln
    gates = layer_norm(x @ w_ih.t(), g_ih) + layer_norm(h @ w_hh.t(), g_hh)
    if b_ih is not None:
        gates = gates + b_ih + b_hh
    i, f, g, o = gates.chunk(4, dim=1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_new = f * c + i * g
    return o * torch.tanh(layer_norm(c_new, g_c, b_c)), c_new


def layer_norm_gru_cell(
    x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor,
    b_ih: Tensor | None, b_hh: Tensor | None, ln: Sequence[Tensor],
    h_rec: Tensor | None = None,
) -> Tensor:
    """One LayerNorm GRU step (reset after the product, as torch.nn's GRU).
    Shapes as :func:`gru_cell`; ln = (g_ih (3H), g_hh (3H)); h_rec as there."""
    g_ih, g_hh = ln
    gx = layer_norm(x @ w_ih.t(), g_ih)
    gh = layer_norm((h if h_rec is None else h_rec) @ w_hh.t(), g_hh)
    if b_ih is not None:
        gx, gh = gx + b_ih, gh + b_hh
    xr, xz, xn = gx.chunk(3, dim=1)
    hr, hz, hn = gh.chunk(3, dim=1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h


def rnn_tanh_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor,
                  b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor:
    """One Elman step with tanh. x (n, I), h (n, H) -> h' (n, H)."""
    return torch.tanh(_linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh))


def rnn_relu_cell(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor,
                  b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor:
    """One Elman step with relu. x (n, I), h (n, H) -> h' (n, H)."""
    return torch.relu(_linear(x, w_ih, b_ih) + _linear(h, w_hh, b_hh))


def _layer_direction(
    x: Tensor, batch_sizes: Sequence[int], reverse: bool, mode: int,
    w: list[Tensor], has_biases: bool, proj_size: int, h0: Tensor, c0: Tensor | None,
    zone: Tensor | None = None, rmask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Run one layer in one direction over packed rows.

    x (N, I) packed (step t owns rows offsets[t] : offsets[t] + batch_sizes[t]);
    h0 (B, P); c0 (B, H) for LSTM. The rows active at step t are the first
    batch_sizes[t] rows of the state; inactive rows keep their state, so the
    forward direction ends each sequence at its own last step, and the reverse
    direction (t = T-1 .. 0) starts each sequence from h0 at its own last step.
    rmask: None, or recurrent dropout's multipliers (B, P) of h_{t-1} in the
    recurrent product (the same at every step).
    zone: None, or zoneout's keep-previous weights per row (N, P [+ H]): h_t =
    z h_{t-1} + (1 - z) h~_t, and the LSTM's c_t alike (its h~_t uses the
    candidate c~_t).
    Returns out (N, P), h_n (B, P), c_n (B, H) or None, and for LSTM the cell
    state c_t of every row (N, H), else None.
    """
    w_ih, w_hh = w[0], w[1]
    b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
    norms = cell(mode).norms
    w_hr = w[len(w) - 1 - norms] if proj_size > 0 else None
    ln = w[len(w) - norms:]  # the layer-norm parameters (LayerNorm cells), last
    has_c = cell(mode).has_cell_state
    offsets = [0]
    for bs in batch_sizes[:-1]:
        offsets.append(offsets[-1] + bs)
    steps = range(len(batch_sizes) - 1, -1, -1) if reverse else range(len(batch_sizes))
    h, c = h0, c0
    outs: list[Tensor | None] = [None] * len(batch_sizes)
    cells: list[Tensor | None] = [None] * len(batch_sizes)
    for t in steps:
        bs, off = batch_sizes[t], offsets[t]
        xt, ht = x[off:off + bs], h[:bs]
        zt = zone[off:off + bs] if zone is not None else None
        hr = ht if rmask is None else ht * rmask[:bs]  # the recurrent product's operand
        if has_c:
            if mode == LSTM_LN:
                h_new, c_new = layer_norm_lstm_cell(xt, hr, c[:bs], w_ih, w_hh, b_ih, b_hh, ln)
            else:
                h_new, c_new = lstm_cell(xt, hr, c[:bs], w_ih, w_hh, b_ih, b_hh, w_hr)
            if zt is not None:
                zc = zt[:, h0.shape[1]:]
                c_new = zc * c[:bs] + (1 - zc) * c_new
            c = torch.cat([c_new, c[bs:]])
            cells[t] = c_new
        elif mode == GRU:
            h_new = gru_cell(xt, ht, w_ih, w_hh, b_ih, b_hh, hr)
        elif mode == GRU_LN:
            h_new = layer_norm_gru_cell(xt, ht, w_ih, w_hh, b_ih, b_hh, ln, hr)
        elif mode == GRU_RESET_BEFORE:
            h_new = gru_reset_before_cell(xt, ht, w_ih, w_hh, b_ih, b_hh, hr)
        elif mode == RNN_TANH:
            h_new = rnn_tanh_cell(xt, hr, w_ih, w_hh, b_ih, b_hh)
        else:
            h_new = rnn_relu_cell(xt, hr, w_ih, w_hh, b_ih, b_hh)
        if zt is not None:
            zh = zt[:, :h0.shape[1]]
            h_new = zh * ht + (1 - zh) * h_new
        h = torch.cat([h_new, h[bs:]])
        outs[t] = h_new
    out = torch.cat(outs) if outs else x.new_zeros(0, h0.shape[1])
    if not has_c:
        return out, h, c, None
    cell_rows = torch.cat(cells) if cells else x.new_zeros(0, c0.shape[1])
    return out, h, c, cell_rows


def rnn_reference(
    input: Tensor, weights: Sequence[Tensor], hx: Tensor, cx: Tensor | None,
    batch_sizes: Sequence[int] | Tensor | None, mode: int, num_layers: int,
    bidirectional: bool, has_biases: bool, proj_size: int,
    dropout_masks: Tensor | None = None, return_cell_states: bool = False,
    zoneout: Tensor | None = None, recurrent_masks: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """Multi-layer, optionally bidirectional recurrent net, step by step.

    Args:
        input: (T, B, I) time-major, or packed data (N, I) if batch_sizes is given.
        weights: torch.nn ``_flat_weights`` order: per layer, per direction,
            w_ih, w_hh, [b_ih, b_hh], [w_hr], then the LayerNorm cells' ln_ih_weight,
            ln_hh_weight (G*H) [, ln_cell_weight, ln_cell_bias (H), LSTM_LN].
        hx: (L*D, B, P) initial hidden state. cx: (L*D, B, H) for LSTM, else None.
        batch_sizes: None for dense input, else the (T,) non-increasing
            PackedSequence.batch_sizes (list or CPU tensor).
        mode: the cell's code, ``fastcells.MODES[name]`` (fastcells/_cells.py).
        dropout_masks: None, or (L-1, T, B, D*P) dense / (L-1, N, D*P) packed,
            multiplied into the input of layers 1..L-1.
        return_cell_states: LSTM only; also return the last layer's cell state
            c_t of every step.
        zoneout: None, or keep-previous weights (L*D, T, B, Z) dense / (L*D, N, Z)
            packed, Z = P (+ H for the LSTM): h_t = z h_{t-1} + (1 - z) h~_t and
            c_t = z c_{t-1} + (1 - z) c~_t, where h~_t uses the candidate c~_t.
        recurrent_masks: None, or (L*D, B, P) multipliers of h_{t-1} in the
            recurrent product (variational recurrent dropout: the same mask at
            every step); a GRU's update z * h_{t-1} uses h_{t-1} itself.

    Returns:
        output (T, B, D*P) or (N, D*P); hy (L*D, B, P); cy (L*D, B, H) for LSTM,
        None otherwise. Layer l direction d is state index l*D + d. With
        ``return_cell_states`` a fourth value: c_t of the last layer, (T, B, D*H)
        or (N, D*H), laid out like ``output``.
    """
    has_c = cell(mode).has_cell_state  # ValueError naming `mode` for an unknown code
    if return_cell_states and not has_c:
        raise ValueError(f"return_cell_states: only cells with a cell state (LSTM) have it; "
                         f"mode {mode} has none")
    dense = batch_sizes is None
    if dense:
        sizes = [input.shape[1]] * input.shape[0]
        x = input.reshape(input.shape[0] * input.shape[1], input.shape[2])
    else:
        sizes = [int(s) for s in batch_sizes]
        x = input
    D = 2 if bidirectional else 1
    per = 2 + 2 * int(has_biases) + int(proj_size > 0) + cell(mode).norms
    if len(weights) != num_layers * D * per:
        raise ValueError(f"weights: expected {num_layers * D * per} tensors, got {len(weights)}")
    hy: list[Tensor] = []
    cy: list[Tensor] = []
    for layer in range(num_layers):
        if layer > 0 and dropout_masks is not None:
            x = x * dropout_masks[layer - 1].reshape(x.shape)
        outs, cell_parts = [], []
        for d in range(D):
            k = layer * D + d
            w = list(weights[k * per:(k + 1) * per])
            c0 = cx[k] if has_c else None
            zone = zoneout[k].reshape(x.shape[0], -1) if zoneout is not None else None
            out, h_n, c_n, cells = _layer_direction(x, sizes, d == 1, mode, w, has_biases,
                                                    proj_size, hx[k], c0, zone,
                                                    None if recurrent_masks is None
                                                    else recurrent_masks[k])
            outs.append(out)
            cell_parts.append(cells)
            hy.append(h_n)
            if c_n is not None:
                cy.append(c_n)
        x = torch.cat(outs, dim=1)
    output = x.reshape(input.shape[0], input.shape[1], x.shape[1]) if dense else x
    result = (output, torch.stack(hy), (torch.stack(cy) if has_c else None))
    if not return_cell_states:
        return result
    cs = torch.cat(cell_parts, dim=1)
    return result + (cs.reshape(input.shape[0], input.shape[1], cs.shape[1]) if dense else cs,)
