"""Codecs for one binary mask tensor (METHOD.md section 5: storage).

A mask of ``n`` entries with ``k`` ones carries at most ``n * H(k/n)`` bits of
information (``H`` the binary entropy). The codecs below; the writer keeps the smallest:

* ``"const"``: all entries equal (``k == 0`` or ``k == n``); no payload at all.
* ``"packbits"``: one bit per entry (``numpy.packbits``, little bit order), ``ceil(n/8)`` bytes.
* ``"ans"``: asymmetric numeral system coding (``constriction``'s stack coder) with a
  Bernoulli model at the tensor's own active fraction ``k/n``; the payload is the
  coder's little-endian ``uint32`` words. It reaches ``n * H(k/n)`` to within a few
  words per tensor.
* ``"ans-channel"``: a context model per output channel (row ``i`` of the tensor seen as
  ``rows x cols``, ``rows = shape[0]``): the active count ``k_i`` of every row is coded
  first (uniform over ``0..cols``), then each row with a Bernoulli model at ``k_i/cols``
  (rows that are all ones or all zeros cost nothing more). It costs about
  ``sum_i cols * H(k_i/cols) + rows * log2(cols + 1)`` bits, so it wins when channels
  differ in density (learned masks often do), and is only tried when that estimate
  beats the per-tensor one.
* ``"ans-weight"``: each bit coded given the base weight it masks (quantile bins of
  ``|w|``, optionally with channel groups); see :mod:`selfmask.storage.conditional`.
  Its payload decodes only with the base weights (:data:`NEEDS_BASE`); tried when the
  writer is given them.

Every codec works on a flat bool array (C order). Decoders never trust their input:
a payload of the wrong size, a coder error or a decoded count that differs from the
recorded ``k`` raises :class:`~selfmask.errors.SelfmaskError`.
"""

from __future__ import annotations

import numpy as np

from selfmask.errors import SelfmaskError
from selfmask.masking.model import binary_entropy
from selfmask.storage import conditional

CODECS = ("const", "packbits", "ans", "ans-channel", conditional.CODEC)
#: Codecs whose payload decodes only given the base weights of the tensor.
NEEDS_BASE = frozenset({conditional.CODEC})
#: The per-channel codec is used for rows of fewer entries than this (the coder's precision).
MAX_CHANNEL_COLS = 2**16
#: Entries decoded per call into the coder: bounds the coder's int32 output (4 bytes per entry) to a few
#: MiB whatever a file claims, so decoding costs about one byte per entry (the bool result).
DECODE_CHUNK = 2**20


def _bernoulli(active: int, numel: int):  # -> constriction model
    import constriction

    # p is computed from two integers, so the decoder rebuilds exactly the encoder's model.
    return constriction.stream.model.Bernoulli(active / numel, perfect=False)


def pack_bits(flat: np.ndarray) -> bytes:
    """One bit per entry, little bit order (entry ``i`` is bit ``i % 8`` of byte ``i // 8``)."""
    return np.packbits(flat, bitorder="little").tobytes()


def unpack_bits(payload: bytes | np.ndarray, numel: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: a flat bool array of ``numel`` entries."""
    buf = np.frombuffer(payload, dtype=np.uint8) if isinstance(payload, bytes) else payload
    return np.unpackbits(buf, count=numel, bitorder="little").view(np.bool_)


def _check_rows(numel: int, rows: int | None, where: str) -> int:
    if rows is None or rows < 1 or numel % rows or numel // rows >= MAX_CHANNEL_COLS:
        raise SelfmaskError(
            f"{where}: codec 'ans-channel' needs a row count dividing {numel} into rows of fewer than "
            f"{MAX_CHANNEL_COLS} entries, got {rows!r}"
        )
    return numel // rows


def _encode_channels(flat: np.ndarray, rows: int) -> bytes:
    import constriction

    model = constriction.stream.model
    cols = flat.size // rows
    grid = flat.reshape(rows, cols)
    counts = np.count_nonzero(grid, axis=1).astype(np.int32)
    coder = constriction.stream.stack.AnsCoder()
    for r in range(rows - 1, -1, -1):  # a stack: the last encoded is decoded first
        k = int(counts[r])
        if 0 < k < cols:
            coder.encode_reverse(grid[r].astype(np.int32), model.Bernoulli(k / cols, perfect=False))
    coder.encode_reverse(counts, model.Uniform(cols + 1))
    return coder.get_compressed().astype("<u4").tobytes()


def _channel_estimate_bits(flat: np.ndarray, rows: int) -> float:
    cols = flat.size // rows
    counts = np.count_nonzero(flat.reshape(rows, cols), axis=1) / cols
    inner = counts[(counts > 0) & (counts < 1)]
    entropy = -(inner * np.log2(inner) + (1 - inner) * np.log2(1 - inner))
    return float(cols * entropy.sum() + rows * np.log2(cols + 1))


def encode(flat: np.ndarray, codec: str, rows: int | None = None, weights: np.ndarray | None = None) -> bytes:
    """Encode a flat bool array with ``codec`` (one of :data:`CODECS`).

    ``rows``: the output channels (``"ans-channel"``, optional for ``"ans-weight"``);
    ``weights``: the flat base weights of the same entries (``"ans-weight"``).
    """
    numel = int(flat.size)
    active = int(np.count_nonzero(flat))
    if codec == "const":
        if active not in (0, numel):
            raise SelfmaskError(f"codec 'const' needs an all-ones or all-zeros mask, got {active} of {numel} active")
        return b""
    if codec == "packbits":
        return pack_bits(flat)
    if codec == "ans":
        if active in (0, numel):
            return b""
        import constriction

        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(flat.astype(np.int32), _bernoulli(active, numel))
        return coder.get_compressed().astype("<u4").tobytes()
    if codec == "ans-channel":
        _check_rows(numel, rows, "mask")
        assert rows is not None
        return _encode_channels(flat, rows)
    if codec == conditional.CODEC:
        if weights is None:
            raise SelfmaskError(f"codec {codec!r} needs the base weights of the tensor")
        payload = conditional.encode(flat, weights, rows)
        assert payload is not None
        return payload
    raise SelfmaskError(f"unknown mask codec {codec!r}; expected one of {CODECS}")


def encode_best(flat: np.ndarray, rows: int | None = None, weights: np.ndarray | None = None) -> tuple[str, bytes]:
    """The smallest encoding of a flat bool array: ``(codec, payload)``.

    With ``rows`` (the output channels of the tensor) the per-channel model is tried
    too when its estimated size beats the per-tensor entropy. With ``weights`` (the
    flat base weights of the same entries) the weight-conditioned model is tried when
    its estimate beats the smallest payload so far; on a tie the others win (they
    decode without the base).
    """
    numel = int(flat.size)
    active = int(np.count_nonzero(flat))
    if active in (0, numel):
        return "const", b""
    candidates = [("packbits", encode(flat, "packbits")), ("ans", encode(flat, "ans"))]
    channels_fit = rows is not None and rows > 1 and numel % rows == 0 and numel // rows < MAX_CHANNEL_COLS
    if channels_fit and _channel_estimate_bits(flat, rows) < numel * binary_entropy(active / numel):
        candidates.append(("ans-channel", _encode_channels(flat, rows)))
    codec, payload = min(candidates, key=lambda c: len(c[1]))
    if weights is not None:
        conditioned = conditional.encode(flat, weights, rows, max_bits=8 * len(payload))
        if conditioned is not None and len(conditioned) < len(payload):
            return conditional.CODEC, conditioned
    return codec, payload


def expected_payload_bytes(codec: str, numel: int) -> int | None:
    """Payload size a codec must have for ``numel`` entries, when it is fixed (else ``None``)."""
    if codec == "const":
        return 0
    if codec == "packbits":
        return (numel + 7) // 8
    return None


def decode(
    payload: bytes,
    codec: str,
    numel: int,
    active: int,
    *,
    rows: int | None = None,
    weights: np.ndarray | None = None,
    where: str = "mask",
) -> np.ndarray:
    """Decode ``payload`` into a flat bool array of ``numel`` entries with ``active`` ones.

    ``rows`` is the row count of ``"ans-channel"`` (and the channels of ``"ans-weight"``);
    ``weights`` the flat base weights of the entries (``"ans-weight"`` only: the caller has
    checked they are the file's base); ``where`` names the tensor (and file) in error messages.
    """
    if codec not in CODECS:
        raise SelfmaskError(f"{where}: unknown codec {codec!r}; expected one of {CODECS}")
    if not (0 <= active <= numel):
        raise SelfmaskError(f"{where}: active count {active} is outside [0, {numel}]")
    if codec in NEEDS_BASE and (weights is None or weights.size != numel):
        got = "none" if weights is None else f"{weights.size}"
        raise SelfmaskError(f"{where}: codec {codec!r} decodes only given the {numel} base weights of the tensor, got {got}")
    fixed = expected_payload_bytes(codec, numel)
    if fixed is not None and len(payload) != fixed:
        raise SelfmaskError(f"{where}: codec {codec!r} needs {fixed} payload bytes for {numel} entries, got {len(payload)}")
    if codec == "const" or (codec == "ans" and active in (0, numel)):
        if codec == "const" and active not in (0, numel):
            raise SelfmaskError(f"{where}: codec 'const' with {active} of {numel} active")
        if payload:
            raise SelfmaskError(f"{where}: a constant mask has no payload, got {len(payload)} bytes")
        return np.full(numel, active == numel, dtype=np.bool_)
    if codec == "packbits":
        flat = unpack_bits(payload, numel)
    elif codec == "ans-channel":
        flat = _decode_channels(payload, numel, _check_rows(numel, rows, where), where)
    elif codec == conditional.CODEC:
        assert weights is not None
        flat = conditional.decode(payload, weights, rows, where)
    else:
        if len(payload) % 4 or not payload:
            raise SelfmaskError(f"{where}: an 'ans' payload is a whole number of 4-byte words, got {len(payload)} bytes")
        # No lower bound on the payload size: symbols that an emptied coder decodes anyway (a
        # trailing run of the likelier value) cost no bits, so a valid payload can be far shorter
        # than n * H(k/n). Decoding is bounded by ``numel`` (capped by the reader) and checked by
        # the active count below.
        import constriction

        try:
            words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
            coder = constriction.stream.stack.AnsCoder(words)
            model = _bernoulli(active, numel)
            flat = np.empty(numel, dtype=np.bool_)
            for start in range(0, numel, DECODE_CHUNK):  # one stream, decoded in pieces
                flat[start : start + DECODE_CHUNK] = coder.decode(model, min(DECODE_CHUNK, numel - start))
        except (ValueError, RuntimeError, OverflowError) as exc:  # constriction's errors on corrupt data
            raise SelfmaskError(f"{where}: corrupt 'ans' payload ({exc})") from None
    got = int(np.count_nonzero(flat))
    if got != active:
        raise SelfmaskError(
            f"{where}: decoded {got} active entries, the header says {active} (payload corrupt or too short)"
        )
    return flat


def _decode_channels(payload: bytes, numel: int, cols: int, where: str) -> np.ndarray:
    import constriction

    if len(payload) % 4:  # may be empty: all rows constant and the counts fit the coder's initial state
        raise SelfmaskError(f"{where}: an 'ans-channel' payload is a whole number of 4-byte words, got {len(payload)}")
    model = constriction.stream.model
    rows = numel // cols
    grid = np.empty((rows, cols), dtype=np.bool_)
    counts = np.empty(rows, dtype=np.uint16)  # cols < 2**16: a count fits in 2 bytes
    try:
        coder = constriction.stream.stack.AnsCoder(np.frombuffer(payload, dtype="<u4").astype(np.uint32))
        uniform = model.Uniform(cols + 1)
        for start in range(0, rows, DECODE_CHUNK):
            counts[start : start + DECODE_CHUNK] = coder.decode(uniform, min(DECODE_CHUNK, rows - start))
        if int(counts.max(initial=0)) > cols:  # pragma: no cover - Uniform(cols + 1) never yields more
            raise SelfmaskError(f"{where}: corrupt 'ans-channel' payload (a row count above {cols})")
        grid[:] = (counts == cols)[:, None]  # constant rows cost nothing more
        mixed = np.flatnonzero((counts > 0) & (counts < cols))
        # The mixed rows, in order, as one run of Bernoulli symbols with a per-row probability: the same
        # stream the encoder wrote row by row, decoded with no Python loop per row (a hostile file may
        # claim millions of rows), in pieces of about DECODE_CHUNK entries.
        family = model.Bernoulli(perfect=False)
        per_chunk = max(1, DECODE_CHUNK // cols)
        for start in range(0, len(mixed), per_chunk):
            part = mixed[start : start + per_chunk]
            p = np.repeat(counts[part].astype(np.float64) / cols, cols)
            grid[part] = coder.decode(family, p).reshape(len(part), cols)
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise SelfmaskError(f"{where}: corrupt 'ans-channel' payload ({exc})") from None
    return grid.reshape(-1)


__all__ = ["CODECS", "NEEDS_BASE", "decode", "encode", "encode_best", "expected_payload_bytes", "pack_bits", "unpack_bits"]
