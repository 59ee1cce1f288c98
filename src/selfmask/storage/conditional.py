"""The ``"ans-weight"`` mask codec: each mask bit coded given the base weight it masks.

Whether a mask bit flips depends on its weight (the score gradient is
``dL/dS_i = g_i * w_i / alpha``), and the decoder always has the base weights (a mask
file's fingerprint names them). So the entries of a tensor are split into contexts that
both ends compute from the base weights alone:

* ``B`` quantile bins of ``|w|`` within the tensor: the entry of rank ``r`` in the stable
  ascending order of ``|w|`` (ties broken by position) is in bin ``r * B // n``;
* optionally ``G`` groups of output channels (rows ``i`` of the tensor seen as
  ``rows x cols``) by their active fraction: each row's active count ``k_i`` is coded first
  (``Uniform(cols + 1)``), rows with ``k_i`` 0 or ``cols`` are then known, and the others
  are ranked by ``(k_i, i)`` and cut into ``G`` equal groups.

Each context ``c`` (group, bin) holds ``n_c`` entries, known to both ends; its active count
``k_c`` is coded (``Uniform(n_c + 1)``), then, context after context, every entry of a context
with ``0 < k_c < n_c`` (in rank order within it) with ``Bernoulli(k_c / n_c)``: one model per
context, so the decoder makes one call per context and scatters the bits to their places. The cost is about
``sum_c n_c H(k_c / n_c) + sum_c log2(n_c + 1)`` bits (plus the row counts when ``G > 1``):
the writer evaluates it for every ``(B, G)`` of :data:`BIN_CHOICES` x :data:`GROUP_CHOICES`
from one table of counts and codes with the cheapest. The payload (``constriction``'s stack
ANS coder, little-endian ``uint32`` words) decodes in this order: the choice of ``(B, G)``
(``Uniform``), the row counts (``G > 1``), the context counts, the bits.

The decoder is given the base weights by the caller, who has checked the file's fingerprint
against them first (:meth:`selfmask.storage.MaskFile.decode_with_base`): other weights would
put the same counts in other places, a decode no check inside the payload could catch.
"""

from __future__ import annotations

import numpy as np

from selfmask.errors import SelfmaskError

CODEC = "ans-weight"
#: Quantile bins of |w| the writer may choose (1: no weight information).
BIN_CHOICES = (1, 2, 4, 8, 16, 32, 64)
#: Groups of output channels by active fraction the writer may choose (1: no channel information).
GROUP_CHOICES = (1, 2, 4, 8)
_FINEST_BINS = BIN_CHOICES[-1]
_FINEST_GROUPS = GROUP_CHOICES[-1]
#: A count above this is coded as two symbols (constriction's Uniform takes at most 2**24 values).
_COUNT_SPLIT = 2**16
#: Entries decoded per call into the coder (bounds its int32 output and the probability array).
DECODE_CHUNK = 2**20


def weight_bins(weights: np.ndarray, bins: int = _FINEST_BINS) -> np.ndarray:
    """Quantile bin of ``|w|`` for every entry of a flat weight array: ``rank * bins // n`` (uint8).

    The rank is the position in the ascending order of ``(|w|, position)``: a definition, not an
    algorithm, so both ends compute the same bins from the same weights whatever their dtype.
    """
    return _ranked(weights, bins)[1]


def _bin_starts(n: int, bins: int) -> np.ndarray:
    """First rank of each bin (and ``n``): bin ``b`` holds the ranks ``r`` with ``r * bins // n == b``."""
    return np.array([-(-b * n // bins) for b in range(bins + 1)], dtype=np.int64)


def _ranked(weights: np.ndarray, bins: int = _FINEST_BINS) -> tuple[np.ndarray, np.ndarray]:
    """``(positions in rank order, bin of every entry)`` for :func:`weight_bins`."""
    order = _rank_order(np.abs(weights))
    return order, _scatter_bins(order, bins)


def _scatter_bins(order: np.ndarray, bins: int) -> np.ndarray:
    """The bin of every entry, from the positions in rank order."""
    out = np.empty(order.size, dtype=np.uint8)
    out[order] = np.repeat(np.arange(bins, dtype=np.uint8), np.diff(_bin_starts(order.size, bins)))
    return out


def _rank_order(magnitude: np.ndarray) -> np.ndarray:
    """Positions in ascending ``(|w|, position)`` order.

    When every value is exactly a float32 (weights of float32, float16 or bfloat16), one sort
    of the unique 64-bit keys ``float32 bits << 32 | position`` (the bits of a non-negative
    float order as the float does): about 5 times faster than a stable argsort of float64.
    """
    n = magnitude.size
    narrow = magnitude.astype(np.float32, copy=False)
    exact = magnitude.dtype == np.float32 and not np.isnan(narrow).any()
    if n < 2**32 and (exact or np.array_equal(narrow, magnitude)):  # False with a NaN: the stable sort below
        keys = narrow.view(np.uint32).astype(np.uint64)
        keys <<= np.uint64(32)
        keys |= np.arange(n, dtype=np.uint64)
        keys.sort()
        if np.little_endian:  # the low 32 bits of each key, without a copy
            return keys.view(np.uint32)[0::2]
        return (keys & np.uint64(0xFFFFFFFF)).astype(np.uint32)  # pragma: no cover - big-endian hosts
    return np.argsort(magnitude.astype(np.float64, copy=False), kind="stable")


def _row_groups(counts: np.ndarray, cols: int) -> np.ndarray:
    """Group (0..7, the finest) of every row with ``0 < k_i < cols`` by rank of ``(k_i, i)``; -1 elsewhere."""
    mixed = np.flatnonzero((counts > 0) & (counts < cols))
    groups = np.full(counts.size, -1, dtype=np.int8)
    if mixed.size:
        order = mixed[np.argsort(counts[mixed], kind="stable")]
        groups[order] = (np.arange(order.size, dtype=np.int64) * _FINEST_GROUPS // order.size).astype(np.int8)
    return groups


def context_entropy_bits(active: np.ndarray, total: np.ndarray) -> float:
    """``sum n H(k / n)`` over contexts (0 where ``k`` is 0 or ``n``): ``active`` of ``total`` in each."""
    k, n = active.astype(np.float64), total.astype(np.float64)
    mixed = (k > 0) & (k < n)
    k, n = k[mixed], n[mixed]
    return float(-(k * np.log2(k / n) + (n - k) * np.log2((n - k) / n)).sum())


def _count_bits(total: np.ndarray) -> float:
    """Bits of the context counts: ``log2(n + 1)``, or ``log2(n >> 16 + 1) + 16`` for large ``n``."""
    t = total[total > 0].astype(np.float64)
    small = t < _COUNT_SPLIT
    return float(np.log2(t[small] + 1).sum() + (np.log2(np.floor(t[~small] / _COUNT_SPLIT) + 1) + 16).sum())


def _fold(table: np.ndarray, groups: int, bins: int) -> np.ndarray:
    """Sum a finest ``(8, 64)`` table into ``(groups, bins)`` (the nested quantile cuts)."""
    g, b = table.shape
    return table.reshape(groups, g // groups, bins, b // bins).sum(axis=(1, 3))


def _contexts(bins64: np.ndarray, rows: int, row_groups: np.ndarray | None, groups: int, bins: int) -> np.ndarray:
    """Context id (``group * bins + bin``) of every entry; ``groups * bins`` for entries of constant rows."""
    b = (bins64 // (_FINEST_BINS // bins)).astype(np.int32)
    if groups == 1 or row_groups is None:
        return b
    cols = bins64.size // rows
    g = np.repeat(row_groups.astype(np.int32), cols)
    return np.where(g < 0, groups * bins, (g // (_FINEST_GROUPS // groups)) * bins + b)


def _context_states(active: np.ndarray, total: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per context id (and the constant-row id last): state (0 all off, 1 all on, 2 coded, 3 row) and P(on)."""
    state = np.full(active.size + 1, 3, dtype=np.uint8)
    state[:-1] = np.where(active == 0, 0, np.where(active == total, 1, 2))
    prob = np.zeros(active.size + 1)
    prob[:-1] = active / np.maximum(total, 1)
    return state, prob


def _by_context(ranked: np.ndarray, ctx: np.ndarray | None, bins: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Entry positions grouped by context, in rank order within each, and where each context starts.

    Without channel groups (``ctx`` None) the contexts are the bins: contiguous runs of the rank
    order already. With them, a stable sort of the 16-bit context ids taken in rank order (at
    most ``8 * 64 + 1``: a radix sort, linear in the entries).
    """
    if ctx is None:
        return ranked, _bin_starts(ranked.size, bins)
    in_rank_order = ctx[ranked].astype(np.int16)
    order = ranked[np.argsort(in_rank_order, kind="stable")]
    starts = np.zeros(size + 2, dtype=np.int64)  # the constant-row context (id ``size``) last
    np.cumsum(np.bincount(in_rank_order, minlength=size + 1), out=starts[1:])
    return order, starts


def _layout(
    ranked: np.ndarray, bins64: np.ndarray | None, rows: int | None, row_counts: np.ndarray | None, groups: int,
    bins: int,
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(positions grouped by context, context starts, context count)`` of a choice of bins and groups.

    ``bins64`` (:func:`weight_bins`) is needed only with channel groups (``None``: computed here).
    """
    size = groups * bins
    ctx = None
    if groups > 1:
        assert rows is not None and row_counts is not None
        if bins64 is None:
            bins64 = _scatter_bins(ranked, _FINEST_BINS)
        ctx = _contexts(bins64, rows, _row_groups(row_counts, bins64.size // rows), groups, bins)
    order, starts = _by_context(ranked, ctx, bins, size)
    return order, starts, size


def _choices(rows: int | None, numel: int) -> tuple[int, ...]:
    """Group choices allowed for this tensor: > 1 needs rows of fewer than 2**16 entries."""
    if rows is None or rows < 2 or numel % rows or numel // rows >= 2**16:
        return (1,)
    return GROUP_CHOICES


def estimate(
    flat: np.ndarray, weights: np.ndarray, rows: int | None = None, bins64: np.ndarray | None = None
) -> tuple[float, int, int]:
    """``(bits, B, G)``: the estimated payload of the cheapest choice of bins and groups.

    ``bins64``: :func:`weight_bins` of ``weights``, when the caller has it already.
    """
    n = flat.size
    if bins64 is None:
        bins64 = weight_bins(weights)
    total_all = np.bincount(bins64, minlength=_FINEST_BINS)
    active_all = np.bincount(bins64[flat], minlength=_FINEST_BINS)
    best = (np.inf, 1, 1)
    param_bits = np.log2(len(BIN_CHOICES) * len(GROUP_CHOICES))
    for bins in BIN_CHOICES:
        a = active_all.reshape(bins, -1).sum(1)
        t = total_all.reshape(bins, -1).sum(1)
        bits = context_entropy_bits(a, t) + _count_bits(t) + param_bits
        best = min(best, (bits, bins, 1))
    allowed = _choices(rows, n)
    if len(allowed) > 1:
        assert rows is not None
        cols = n // rows
        counts = np.count_nonzero(flat.reshape(rows, cols), axis=1)
        groups = _row_groups(counts, cols)
        g = np.repeat(groups.astype(np.int64), cols)
        keep = g >= 0
        ctx = g[keep] * _FINEST_BINS + bins64[keep]
        size = _FINEST_GROUPS * _FINEST_BINS
        active = np.bincount(ctx[flat[keep]], minlength=size).reshape(_FINEST_GROUPS, _FINEST_BINS)
        total = np.bincount(ctx, minlength=size).reshape(_FINEST_GROUPS, _FINEST_BINS)
        row_bits = rows * np.log2(cols + 1)
        for group_count in allowed[1:]:
            for bins in BIN_CHOICES:
                a, t = _fold(active, group_count, bins).ravel(), _fold(total, group_count, bins).ravel()
                bits = context_entropy_bits(a, t) + _count_bits(t) + row_bits + param_bits
                best = min(best, (bits, bins, group_count))
    return best


def _count_sizes(total: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Alphabet sizes of the count symbols, in context order, and which symbols are high halves.

    A context of ``n < 2**16`` entries codes its count as one symbol of ``n + 1`` values;
    a larger one as ``k >> 16`` (``(n >> 16) + 1`` values) then ``k & 0xFFFF`` (``2**16``);
    an empty context codes nothing. Both ends derive this from the context sizes alone.
    """
    sizes: list[int] = []
    high: list[bool] = []
    for n in total.tolist():
        if n == 0:
            continue
        if n < _COUNT_SPLIT:
            sizes.append(n + 1)
            high.append(False)
        else:
            sizes += [(n >> 16) + 1, _COUNT_SPLIT]
            high += [True, False]
    return np.array(sizes, dtype=np.int32), np.array(high, dtype=np.bool_)


def _encode_counts(coder, model, active: np.ndarray, total: np.ndarray) -> None:  # noqa: ANN001
    """Context counts, in context order (decoded first to last), in one call (:func:`_count_sizes`)."""
    sizes, high = _count_sizes(total)
    if not sizes.size:
        return
    symbols = []
    for n, k in zip(total.tolist(), active.tolist()):
        if n >= _COUNT_SPLIT:
            symbols += [k >> 16, k & (_COUNT_SPLIT - 1)]
        elif n:
            symbols.append(k)
    coder.encode_reverse(np.array(symbols, dtype=np.int32), model.Uniform(), sizes)


def encode(
    flat: np.ndarray, weights: np.ndarray, rows: int | None = None, *, max_bits: float = float("inf")
) -> bytes | None:
    """Encode a flat bool mask given the flat base weights of the same entries (``rows``: output channels).

    Returns ``None`` without coding when the estimated payload is not below ``max_bits``
    (the size of another codec's payload, say).
    """
    import constriction

    if weights.shape != flat.shape:
        raise SelfmaskError(f"codec {CODEC!r}: {weights.size} weights for {flat.size} mask entries")
    model = constriction.stream.model
    ranked, bins64 = _ranked(weights)
    bits, bins, groups = estimate(flat, weights, rows, bins64)
    if bits >= max_bits:
        return None
    n = flat.size
    row_counts = None
    if groups > 1:
        assert rows is not None
        cols = n // rows
        row_counts = np.count_nonzero(flat.reshape(rows, cols), axis=1).astype(np.int32)
    order, starts, size = _layout(ranked, bins64, rows, row_counts, groups, bins)
    on = flat[order]
    ones_before = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(on, out=ones_before[1:])
    total = np.diff(starts)[:size]
    active = (ones_before[starts[1:]] - ones_before[starts[:-1]])[:size]
    state, prob = _context_states(active, total)
    coder = constriction.stream.stack.AnsCoder()
    for c in np.flatnonzero(state[:-1] == 2)[::-1]:  # a stack: the last context first
        coder.encode_reverse(on[starts[c] : starts[c + 1]].astype(np.int32), model.Bernoulli(float(prob[c]), perfect=False))
    _encode_counts(coder, model, active, total)
    if row_counts is not None:
        coder.encode_reverse(row_counts, model.Uniform(cols + 1))
    choice = BIN_CHOICES.index(bins) * len(GROUP_CHOICES) + GROUP_CHOICES.index(groups)
    coder.encode_reverse(np.array([choice], dtype=np.int32), model.Uniform(len(BIN_CHOICES) * len(GROUP_CHOICES)))
    return coder.get_compressed().astype("<u4").tobytes()


def decode(payload: bytes, weights: np.ndarray, rows: int | None, where: str) -> np.ndarray:
    """Decode a flat bool mask of ``weights.size`` entries given the base weights of those entries.

    Raises :class:`SelfmaskError` (naming ``where``) on a payload that is not whole words,
    a coder error, a choice of groups the tensor's shape does not allow, or a count out of range.
    """
    import constriction

    if len(payload) % 4:
        raise SelfmaskError(f"{where}: an {CODEC!r} payload is a whole number of 4-byte words, got {len(payload)} bytes")
    model = constriction.stream.model
    n = weights.size
    try:
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(payload, dtype="<u4").astype(np.uint32))
        choice = int(coder.decode(model.Uniform(len(BIN_CHOICES) * len(GROUP_CHOICES)), 1)[0])
        bins, groups = BIN_CHOICES[choice // len(GROUP_CHOICES)], GROUP_CHOICES[choice % len(GROUP_CHOICES)]
        if groups not in _choices(rows, n):
            raise SelfmaskError(f"{where}: corrupt {CODEC!r} payload ({groups} channel groups for shape rows={rows})")
        flat = np.zeros(n, dtype=np.bool_)
        ranked = _rank_order(np.abs(weights))  # the bins themselves only with channel groups (_layout)
        row_counts = None
        if groups > 1:
            assert rows is not None
            cols = n // rows
            row_counts = np.empty(rows, dtype=np.int64)
            uniform = model.Uniform(cols + 1)
            for start in range(0, rows, DECODE_CHUNK):
                row_counts[start : start + DECODE_CHUNK] = coder.decode(uniform, min(DECODE_CHUNK, rows - start))
            flat.reshape(rows, cols)[:] = (row_counts == cols)[:, None]
        order, starts, size = _layout(ranked, None, rows, row_counts, groups, bins)
        total = np.diff(starts)[:size]
        sizes, high = _count_sizes(total)
        symbols = coder.decode(model.Uniform(), sizes).astype(np.int64) if sizes.size else np.zeros(0, np.int64)
        low = ~high
        upper = np.zeros(int(low.sum()), dtype=np.int64)  # the high half of each count (0 for small contexts)
        upper[np.r_[False, high[:-1]][low]] = symbols[high]
        active = np.zeros(size, dtype=np.int64)
        active[total > 0] = (upper << 16) | symbols[low]
        bad = np.flatnonzero(active > total)
        if bad.size:
            c = int(bad[0])
            raise SelfmaskError(f"{where}: corrupt {CODEC!r} payload (context {c}: {active[c]} active of {total[c]})")
        state, prob = _context_states(active, total)
        for c in np.flatnonzero(state[:-1] > 0):
            positions = order[starts[c] : starts[c + 1]]
            if state[c] == 1:
                flat[positions] = True
                continue
            bernoulli = model.Bernoulli(float(prob[c]), perfect=False)
            got = 0
            for start in range(0, positions.size, DECODE_CHUNK):
                part = positions[start : start + DECODE_CHUNK]
                bits = coder.decode(bernoulli, part.size).astype(np.bool_)
                flat[part] = bits
                got += int(np.count_nonzero(bits))
            if got != active[c]:
                raise SelfmaskError(
                    f"{where}: corrupt {CODEC!r} payload (context {c}: decoded {got} active, the count says {active[c]})"
                )
        if row_counts is not None and not np.array_equal(np.count_nonzero(flat.reshape(rows, -1), axis=1), row_counts):
            raise SelfmaskError(f"{where}: corrupt {CODEC!r} payload (decoded bits disagree with the row counts)")
    except SelfmaskError:
        raise
    except (ValueError, RuntimeError, OverflowError) as exc:  # constriction's errors on corrupt data
        raise SelfmaskError(f"{where}: corrupt {CODEC!r} payload ({exc})") from None
    return flat


__all__ = ["BIN_CHOICES", "CODEC", "GROUP_CHOICES", "context_entropy_bits", "decode", "encode", "estimate", "weight_bins"]
