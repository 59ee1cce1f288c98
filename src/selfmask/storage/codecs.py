"""Codecs for one binary mask tensor (METHOD.md section 5: storage).

A mask of ``n`` entries with ``k`` ones carries at most ``n * H(k/n)`` bits of
information (``H`` the binary entropy). Three codecs, the writer keeps the smallest:

* ``"const"``: all entries equal (``k == 0`` or ``k == n``); no payload at all.
* ``"packbits"``: one bit per entry (``numpy.packbits``, little bit order), ``ceil(n/8)`` bytes.
* ``"ans"``: asymmetric numeral system coding (``constriction``'s stack coder) with a
  Bernoulli model at the tensor's own active fraction ``k/n``; the payload is the
  coder's little-endian ``uint32`` words. It reaches ``n * H(k/n)`` to within a few
  words per tensor.

Every codec works on a flat bool array (C order). Decoders never trust their input:
a payload of the wrong size, a coder error or a decoded count that differs from the
recorded ``k`` raises :class:`~selfmask.errors.SelfmaskError`.
"""

from __future__ import annotations

import numpy as np

from selfmask.errors import SelfmaskError
from selfmask.masking.model import binary_entropy

CODECS = ("const", "packbits", "ans")


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


def encode(flat: np.ndarray, codec: str) -> bytes:
    """Encode a flat bool array with ``codec`` (one of :data:`CODECS`)."""
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
    raise SelfmaskError(f"unknown mask codec {codec!r}; expected one of {CODECS}")


def encode_best(flat: np.ndarray) -> tuple[str, bytes]:
    """The smallest encoding of a flat bool array: ``(codec, payload)``."""
    active = int(np.count_nonzero(flat))
    if active in (0, flat.size):
        return "const", b""
    packed = encode(flat, "packbits")
    coded = encode(flat, "ans")
    return ("ans", coded) if len(coded) < len(packed) else ("packbits", packed)


def expected_payload_bytes(codec: str, numel: int) -> int | None:
    """Payload size a codec must have for ``numel`` entries, when it is fixed (else ``None``)."""
    if codec == "const":
        return 0
    if codec == "packbits":
        return (numel + 7) // 8
    return None


def decode(payload: bytes, codec: str, numel: int, active: int, *, where: str = "mask") -> np.ndarray:
    """Decode ``payload`` into a flat bool array of ``numel`` entries with ``active`` ones.

    ``where`` names the tensor (and file) in error messages.
    """
    if codec not in CODECS:
        raise SelfmaskError(f"{where}: unknown codec {codec!r}; expected one of {CODECS}")
    if not (0 <= active <= numel):
        raise SelfmaskError(f"{where}: active count {active} is outside [0, {numel}]")
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
    else:
        if len(payload) % 4 or not payload:
            raise SelfmaskError(f"{where}: an 'ans' payload is a whole number of 4-byte words, got {len(payload)} bytes")
        # A valid payload is never shorter than the information content of the mask.
        bound_bits = numel * binary_entropy(active / numel)
        if len(payload) * 8 < bound_bits - 64:
            raise SelfmaskError(
                f"{where}: 'ans' payload of {len(payload)} bytes is too short for {numel} entries "
                f"at {active} active (needs about {bound_bits / 8:.0f} bytes)"
            )
        import constriction

        try:
            words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
            coder = constriction.stream.stack.AnsCoder(words)
            flat = coder.decode(_bernoulli(active, numel), numel).astype(np.bool_)
        except (ValueError, RuntimeError, OverflowError) as exc:  # constriction's errors on corrupt data
            raise SelfmaskError(f"{where}: corrupt 'ans' payload ({exc})") from None
    got = int(np.count_nonzero(flat))
    if got != active:
        raise SelfmaskError(f"{where}: decoded {got} active entries, the header says {active}")
    return flat


__all__ = ["CODECS", "decode", "encode", "encode_best", "expected_payload_bytes", "pack_bits", "unpack_bits"]
