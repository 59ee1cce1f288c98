"""Fuzzing the mask-file reader: mutated, truncated and re-sealed files give only SelfmaskError.

About 10,000 files per run (hypothesis, derandomized so CI is reproducible) derived from two
small valid mask files (every codec, an extra tensor, selective masking; masks coded given the
base weights, which the reader then decodes on :data:`BASE_WEIGHTS`, as ``apply_mask`` would after
its fingerprint check):

* raw mutations: byte flips, truncations, insertions, deletions, splices of the two files
  (mostly stopped by the sizes or the checksum);
* re-sealed mutations, where the checksum is recomputed so the damage reaches the deeper
  checks, as a deliberate attacker would: edited payload bytes, edited safetensors header
  entries (dtype, shape, offsets), edited selfmask metadata and mask config, edited or
  re-ordered tensor-index records (shapes, counts, codecs, sizes), a garbage index.

Each file must decode or raise :class:`SelfmaskError`; any other exception fails the test.
Every decode must finish quickly, and the process's peak memory must stay bounded
(``max_entries`` bounds what a file may claim; its default is checked separately).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfmask.errors import SelfmaskError
from selfmask.masking.config import MaskConfig
from selfmask.masking.layer import selective_trainable_mask
from selfmask.storage.container import CHECKSUM_PLACEHOLDER, read_container, write_container
from selfmask.storage.maskfile import MAX_ENTRIES, decode_mask_file, encode_mask_file

FP = "ab" * 32
#: What a fuzzed file may claim in all (4 Mi entries: a few MiB of bools at most).
FUZZ_MAX_ENTRIES = 2**22
#: Longest one decode may take (generous: the machine is shared).
SLOW_S = 5.0
FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


#: The base weights of the fuzzed files' tensors (what apply_mask would pass after the fingerprint check).
BASE_WEIGHTS = {
    name: torch.randn(shape, generator=torch.Generator().manual_seed(i))
    for i, (name, shape) in enumerate([("a.weight", (16, 3, 3, 3)), ("b.weight", (64, 9)), ("c.weight", (8, 40)),
                                       ("d.weight", (4, 4)), ("e.weight", (24, 50))])
}


def _masks(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.rand(8, 1, generator=g) * torch.tensor([[0.02], [0.98]]).repeat(4, 1)
    e = BASE_WEIGHTS["e.weight"].abs()
    return {
        "a.weight": torch.rand(16, 3, 3, 3, generator=g) < 0.5,  # packbits
        "b.weight": torch.rand(64, 9, generator=g) < 0.03,  # ans
        "c.weight": torch.rand(8, 40, generator=g) < rows,  # ans-channel: rows differ in density
        "d.weight": torch.ones(4, 4, dtype=torch.bool),  # const
        "e.weight": torch.rand(24, 50, generator=g) < e / e.max() * 3,  # ans-weight: small weights are off
    }


def _base_files() -> list[bytes]:
    plain, infos = encode_mask_file(_masks(0), backbone="resnet_tiny", fingerprint=FP, config=MaskConfig(),
                                    extra={"head.weight": torch.randn(2, 3, generator=torch.Generator().manual_seed(0)),
                                           "head.bias": torch.zeros(2)},
                                    source={"run": "x"}, base=BASE_WEIGHTS)
    assert [i.codec for i in infos] == ["packbits", "ans", "ans-channel", "const", "ans-weight"]
    sel = MaskConfig(trainable_fraction=0.5, seed=3)
    masks = {k: v | ~selective_trainable_mask(tuple(v.shape), 0.5, 3, k) for k, v in _masks(1).items()}
    selective, infos = encode_mask_file(masks, backbone="resnet_tiny", fingerprint=FP, config=sel, base=BASE_WEIGHTS)
    assert "ans-weight" in {i.codec for i in infos}
    for data in (plain, selective):
        decode(data, "base.mask")  # both valid
    return [plain, selective]


def decode(data: bytes, where: str, max_entries: int = MAX_ENTRIES):  # noqa: ANN201
    """What apply_mask does with a file once the fingerprint is checked: read it, then decode on the base."""
    mf = decode_mask_file(data, where, max_entries=max_entries)
    return mf.decode_with_base(BASE_WEIGHTS, mf.fingerprint)


BASES = _base_files()
STATS = {"files": 0, "decoded": 0, "slowest_s": 0.0}


def check_reader(data: bytes) -> None:
    """Decode ``data``: a MaskFile or a SelfmaskError, quickly; anything else propagates and fails."""
    t0 = time.perf_counter()
    try:
        decode(data, "fuzzed.mask", FUZZ_MAX_ENTRIES)
        STATS["decoded"] += 1
    except SelfmaskError as exc:
        assert str(exc).startswith("fuzzed.mask"), str(exc)  # every message names the file
    elapsed = time.perf_counter() - t0
    STATS["files"] += 1
    STATS["slowest_s"] = max(STATS["slowest_s"], elapsed)
    assert elapsed < SLOW_S, f"decode took {elapsed:.1f} s"


# ------------------------------------------------------------------------------------ helpers
def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def seal(header: dict, body: bytes) -> bytes:
    """Serialise a (possibly edited) header and recompute the checksum, as an attacker could."""
    meta = json.loads(header["__metadata__"]["selfmask"])
    meta["checksum"] = CHECKSUM_PLACEHOLDER
    header = {**header, "__metadata__": {"selfmask": json.dumps(meta, sort_keys=True, separators=(",", ":"))}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    digest = hashlib.sha256(struct.pack("<Q", len(raw)) + raw + body).hexdigest()
    raw = raw.replace(CHECKSUM_PLACEHOLDER.encode(), digest.encode(), 1)
    return struct.pack("<Q", len(raw)) + raw + body


def parts(data: bytes) -> tuple[dict, list, dict[str, tuple[str, tuple[int, ...], bytes]]]:
    """(selfmask metadata, index records, tensors) of a valid file, for rebuilding with write_container."""
    meta, raw = read_container(data, "base")
    tensors = {k: (t.dtype, t.shape, bytes(t.data)) for k, t in raw.items()}
    return meta, json.loads(zlib.decompress(tensors["index"][2])), tensors


def rebuild(meta: dict, records: list | None, tensors: dict, index_bytes: bytes | None = None) -> bytes:
    tensors = dict(tensors)
    if index_bytes is None:
        index_bytes = zlib.compress(json.dumps(records).encode())
    tensors["index"] = ("U8", (len(index_bytes),), index_bytes)
    return write_container(meta, tensors)


NASTY_INTS = [0, 1, -1, 2, 7, 8, 63, 64, 255, 256, 2**16, 2**20, 2**21 + 1, 2**22, 2**22 + 1, 2**31, 2**32, 2**33,
              2**40, 2**53 + 1, 2**63, 2**64, -(2**63)]
NASTY_WORDS = ["", "const", "packbits", "ans", "ans-channel", "ans-weight", "U8", "F32", "BOOL", "BF16", "I64", "resnet", "topk",
               "threshold", "train", "(", "[a-", "x" * 300, "\u0000", "selfmask.mask"]


def nasty_int(rng: random.Random) -> int:
    return rng.choice([rng.choice(NASTY_INTS), rng.randint(-5, 300), rng.randint(-(2**70), 2**70)])


def nasty_shape(rng: random.Random) -> list[int]:
    dims = [0, 1, 2, 3, 8, 9, 40, 2**11, 2**16, 2**21, 2**22, 2**40, -1]
    return [rng.choice(dims) if rng.random() < 0.5 else rng.randint(0, 100) for _ in range(rng.randint(0, 9))]


def nasty(rng: random.Random, depth: int = 0) -> object:
    """A hostile JSON value: boundary ints, huge ints, odd floats, strings, shapes, nested containers."""
    kind = rng.randrange(9 if depth < 2 else 7)
    if kind == 0:
        return nasty_int(rng)
    if kind == 1:
        return rng.choice([0.0, -0.0, 0.5, 1.0, 1.5, -1.0, 1e300, float("inf"), float("nan"), rng.uniform(-2, 2)])
    if kind == 2:
        return rng.choice(NASTY_WORDS)
    if kind in (3, 4):
        return rng.choice([None, True, False])
    if kind in (5, 6):
        return nasty_shape(rng)
    if kind == 7:
        return [nasty(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {rng.choice(NASTY_WORDS): nasty(rng, depth + 1) for _ in range(rng.randint(0, 3))}


# ------------------------------------------------------------------------------------ mutators
# Each takes a seeded random.Random and returns (file bytes, what was done); hypothesis draws the seeds.
def raw_mutation(rng: random.Random) -> tuple[bytes, str]:
    """Byte flips, truncations, insertions, deletions, splices, a forged header length; no re-sealing."""
    data = bytearray(rng.choice(BASES))
    done = []
    for _ in range(rng.randint(1, 4)):
        op = rng.choice(["flip", "flip", "truncate", "truncate", "insert", "delete", "splice", "set-length"])
        pos = rng.randrange(max(1, len(data)))
        if op == "flip" and data:
            data[pos] ^= rng.randint(1, 255)
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif op == "delete":
            del data[pos : pos + rng.randint(1, 64)]
        elif op == "splice":
            other = rng.choice(BASES)
            start = rng.randrange(len(other))
            data[pos:] = other[start : start + rng.randint(1, len(other))]
        elif op == "set-length" and len(data) >= 8:
            data[:8] = struct.pack("<Q", rng.choice([0, 1, 7, 2**24, 2**63, 2**64 - 1, len(data)]))
        done.append(f"{op}@{pos}")
    return bytes(data), " ".join(done)


def resealed_body(rng: random.Random) -> tuple[bytes, str]:
    """Valid header and checksum, damaged tensor bytes (index, payloads, extras)."""
    header, body = split(rng.choice(BASES))
    body = bytearray(body)
    # a tensor first (index, payloads or an extra, each as likely), then bytes inside it
    spans = [e["data_offsets"] for k, e in header.items() if k != "__metadata__"]
    begin, end = rng.choice([(b, e) for b, e in spans if e > b])
    spots = [rng.randrange(begin, end) for _ in range(rng.randint(1, 6))]
    for pos in spots:
        body[pos] = rng.randint(0, 255)
    return seal(header, bytes(body)), f"bytes {spots}"


def resealed_header(rng: random.Random) -> tuple[bytes, str]:
    """Edited safetensors header: a tensor's dtype/shape/offsets, entries added, replaced or removed."""
    header, body = split(rng.choice(BASES))
    names = sorted(k for k in header if k != "__metadata__")
    done = []
    for _ in range(rng.randint(1, 3)):
        name = rng.choice([*names, "extra.new", "zzz"])
        action = rng.choice(["dtype", "shape", "shape", "data_offsets", "data_offsets", "replace", "drop"])
        value = nasty(rng) if action != "data_offsets" or rng.random() < 0.5 else [nasty_int(rng), nasty_int(rng)]
        if action == "drop":
            header.pop(name, None)
        elif action == "replace":
            header[name] = value
        else:
            entry = header.setdefault(name, {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]})
            if isinstance(entry, dict):
                entry[action] = value
        done.append(f"{name}.{action}={value!r:.60}")
    return seal(header, body), "; ".join(done)


MASK_CONFIG_KEYS = [*MaskConfig().to_dict(), "unknown"]


def resealed_metadata(rng: random.Random) -> tuple[bytes, str]:
    """Edited selfmask metadata: backbone, fingerprint, format, version, tensor count, source, mask config."""
    meta, records, tensors = parts(rng.choice(BASES))
    done = []
    for _ in range(rng.randint(1, 3)):
        value = nasty(rng)
        if rng.random() < 0.4:
            key = rng.choice(["backbone", "fingerprint", "format", "version", "tensors", "source", "mask_config"])
            meta[key] = value
        else:
            key = "mask_config." + rng.choice(MASK_CONFIG_KEYS)
            if isinstance(meta.get("mask_config"), dict):
                meta["mask_config"][key.split(".", 1)[1]] = value
        done.append(f"{key}={value!r:.60}")
    return rebuild(meta, records, tensors), "; ".join(done)


def resealed_index(rng: random.Random) -> tuple[bytes, str]:
    """Edited tensor-index records (shape, active, codec, bytes, name), re-ordered, duplicated, dropped, garbage."""
    meta, records, tensors = parts(rng.choice(BASES))
    action = rng.choice(["field", "field", "field", "field", "shuffle", "duplicate", "drop", "garbage"])
    if action == "garbage":
        raw = rng.randbytes(rng.randint(0, 64)) if rng.random() < 0.5 else zlib.compress(json.dumps(nasty(rng)).encode())
        return rebuild(meta, None, tensors, index_bytes=raw), f"garbage index {raw[:20]!r}"
    done = [action]
    if action == "field":
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(records))
            key = rng.choice(["shape", "shape", "active", "active", "codec", "bytes", "name"])
            value = nasty_shape(rng) if key == "shape" and rng.random() < 0.7 else nasty(rng)
            if key in ("active", "bytes") and rng.random() < 0.5:
                value = nasty_int(rng)
            records[i][key] = value
            done.append(f"[{i}].{key}={value!r:.60}")
    elif action == "shuffle":
        rng.shuffle(records)
    elif action == "duplicate":
        records.append(dict(rng.choice(records)))
    else:
        records.pop(rng.randrange(len(records)))
    if rng.random() < 0.7:
        meta["tensors"] = len(records)  # keep the count consistent, to get past that check
    return rebuild(meta, records, tensors), " ".join(done)


#: mutator -> hypothesis examples; every example checks FILES_PER_EXAMPLE files (10,000 files in all).
MUTATORS = {
    raw_mutation: 850,
    resealed_body: 350,
    resealed_header: 400,
    resealed_metadata: 350,
    resealed_index: 550,
}
FILES_PER_EXAMPLE = 4
#: ``SELFMASK_FUZZ_SCALE=100`` runs 100 times as many files (a longer run outside CI).
FUZZ_SCALE = max(1, int(os.environ.get("SELFMASK_FUZZ_SCALE", "1")))


def _fuzz(mutator, seed: int) -> None:
    for j in range(FILES_PER_EXAMPLE):
        rng = random.Random(seed * FILES_PER_EXAMPLE + j)
        data, what = mutator(rng)
        try:
            check_reader(data)
        except Exception as exc:  # report how to rebuild the file
            raise AssertionError(f"{mutator.__name__} seed {seed * FILES_PER_EXAMPLE + j} ({what}): "
                                 f"{type(exc).__name__}: {exc}") from exc


def _make_fuzz_test(mutator, examples: int):  # noqa: ANN202
    @settings(FUZZ, max_examples=examples * FUZZ_SCALE)
    @given(st.integers(0, 2**40))
    def test(seed: int) -> None:
        _fuzz(mutator, seed)

    test.__doc__ = mutator.__doc__
    test.__name__ = test.__qualname__ = f"test_fuzz_{mutator.__name__}"  # hypothesis derives its seed from it
    return test


test_fuzz_raw_mutations = _make_fuzz_test(raw_mutation, MUTATORS[raw_mutation])
test_fuzz_resealed_body = _make_fuzz_test(resealed_body, MUTATORS[resealed_body])
test_fuzz_resealed_header = _make_fuzz_test(resealed_header, MUTATORS[resealed_header])
test_fuzz_resealed_metadata = _make_fuzz_test(resealed_metadata, MUTATORS[resealed_metadata])
test_fuzz_resealed_index = _make_fuzz_test(resealed_index, MUTATORS[resealed_index])


def test_fuzz_totals_and_memory_stay_bounded() -> None:
    """Runs after the fuzz tests above (file order): at least 10,000 files, bounded time and memory."""
    if STATS["files"] < sum(MUTATORS.values()) * FILES_PER_EXAMPLE:
        pytest.skip("run together with all the fuzz tests above")
    assert STATS["files"] >= 10_000, STATS
    assert 0 < STATS["decoded"] < STATS["files"]  # some edits are harmless (e.g. in 'source'), most are not
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert peak_mib < 1500, f"peak memory {peak_mib:.0f} MiB"


# ------------------------------------------------------------------------------------ allocation bounds
def _claim(codec: str, shape: list[int], active: int, payload: bytes = b"") -> bytes:
    """A sealed file whose single tensor claims ``shape`` with ``active`` ones under ``codec``."""
    meta, _records, tensors = parts(BASES[0])
    meta["tensors"] = 1
    tensors = {"masks": ("U8", (len(payload),), payload)}
    return rebuild(meta, [{"name": "w", "shape": shape, "active": active, "codec": codec, "bytes": len(payload)}],
                   tensors)


@pytest.mark.parametrize("codec", ["const", "ans", "ans-channel", "packbits", "ans-weight"])
def test_default_cap_refuses_huge_claims_before_allocating(codec) -> None:
    data = _claim(codec, [2**20, 2**20], 1 if codec == "ans" else 0, b"\x01\x00\x00\x00")
    assert len(data) < 2000
    tracemalloc.start()
    with pytest.raises(SelfmaskError, match=f"more than {MAX_ENTRIES} mask entries in all"):
        decode_mask_file(data, "huge.mask")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2**20


@pytest.mark.parametrize(("codec", "shape", "active"), [
    ("const", [2**22], 2**22),
    ("ans", [2**22], 1),
    ("ans-channel", [2**12, 2**10], 1),
    ("ans-channel", [2**22, 1], 0),  # 4 Mi rows: was a Python loop per row (about 50 s), now vectorised
    ("ans-channel", [2**20, 4], 2**20),  # 1 Mi mixed rows decoded from an empty coder
])
def test_claimed_entries_cost_bounded_memory_and_time(codec, shape, active) -> None:
    """A tiny file claiming 4 Mi entries: at most 3 bytes per entry in numpy/torch memory, and quick."""
    data = _claim(codec, shape, active, b"" if codec == "const" else b"\x01\x00\x00\x00")
    numel = int(np.prod(shape))
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        decode_mask_file(data, "claim.mask")
    except SelfmaskError:
        pass
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak <= 3 * numel + 16 * 2**20, f"{peak / numel:.2f} bytes per entry"
    assert elapsed < SLOW_S


def test_coder_output_is_decoded_in_pieces() -> None:
    """The coder's int32 output (invisible to tracemalloc) is bounded: 64 Mi claimed entries add < 128 MiB."""
    code = (
        "import resource, sys; sys.path.insert(0, 'tests'); import test_fuzz_maskfile as f; "
        "from selfmask.storage.maskfile import decode_mask_file; "
        "d = f._claim('ans', [2**26], 1, bytes([1, 0, 0, 0])); "
        "r = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; before = r()\n"
        "try:\n decode_mask_file(d, 'x')\nexcept Exception as e:\n print(type(e).__name__)\n"
        "print((r() - before) // 1024)"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(root / "src")})
    assert out.returncode == 0, out.stderr
    kind, grown_mib = out.stdout.split()
    assert kind == "SelfmaskError" and int(grown_mib) < 128, out.stdout  # unchunked: 64 + 256 MiB


def test_regression_ans_payload_below_the_entropy_of_the_mask_is_valid() -> None:
    """Found while fuzzing: 'ans' payloads can be shorter than n*H(k/n) (a trailing run of zeros costs
    nothing), and the reader refused such files that save_mask had just written."""
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(4000, dtype=torch.bool)
    mask[:1500] = torch.rand(1500, generator=g) < 0.5
    data, infos = encode_mask_file({"w": mask}, backbone="resnet_tiny", fingerprint=FP, config=MaskConfig())
    assert infos[0].codec == "ans" and infos[0].payload_bytes * 8 < infos[0].entropy_bits - 64
    assert torch.equal(decode_mask_file(data).masks["w"], mask)


def test_regression_header_dtype_of_another_type() -> None:
    """Found by the fuzzer: a list as a tensor's dtype raised TypeError (unhashable) instead of SelfmaskError."""
    header, body = split(BASES[0])
    header["masks"]["dtype"] = []
    with pytest.raises(SelfmaskError, match=r"tensor 'masks': unknown dtype \[\]"):
        decode_mask_file(seal(header, body), "x.mask")


def test_regression_empty_tensor_with_huge_other_sizes() -> None:
    """Found by the fuzzer: shape [.., 0, 2**22, 2**16, 2**16] has no bytes but numpy cannot reshape to it
    (ValueError: array is too big)."""
    header, body = split(BASES[0])
    header["extra.new"] = {"dtype": "U8", "shape": [8, 9, 35, 0, 2**22, 2**16, 2**16], "data_offsets": [0, 0]}
    with pytest.raises(SelfmaskError, match=r"tensor 'extra.new': invalid shape .*the other sizes multiplying below 2\*\*62"):
        decode_mask_file(seal(header, body), "x.mask")


@pytest.mark.parametrize("seed", ["", [], 1.5, None, True])
def test_regression_mask_config_seed_of_another_type(seed) -> None:
    """Found by the fuzzer: a non-integer seed of a selective config raised ValueError/TypeError deep inside."""
    meta, records, tensors = parts(BASES[1])
    meta["mask_config"]["seed"] = seed
    with pytest.raises(SelfmaskError, match="mask_config 'seed' must be an integer"):
        decode_mask_file(rebuild(meta, records, tensors), "x.mask")


@settings(FUZZ, max_examples=150)
@given(st.integers(0, 2**40))
def test_valid_masks_of_any_structure_round_trip(seed: int) -> None:
    """The writer and the reader agree on random masks: runs, constant rows, mixed densities, any shape,
    with and without the base weights (masks that depend on |w| or not, weights with many ties)."""
    rng = np.random.default_rng(seed)
    masks, base = {}, {}
    for i in range(int(rng.integers(1, 4))):
        shape = tuple(int(d) for d in rng.integers(1, 40, size=int(rng.integers(1, 4))))
        rows = shape[0]
        density = rng.choice([0.0, 1.0, 0.01, 0.5, 0.97], size=rows)
        w = rng.standard_normal((rows, int(np.prod(shape)) // rows))
        if rng.random() < 0.3:
            w = np.round(w)  # ties
        m = rng.random(w.shape) < density[:, None]
        if rng.random() < 0.5:  # pruning that depends on |w|
            m |= np.abs(w) > rng.uniform(0, 2)
        if rng.random() < 0.5:  # a long run at the end
            m.reshape(-1)[int(rng.integers(0, m.size)) :] = bool(rng.integers(0, 2))
        masks[f"t{i}.weight"] = torch.from_numpy(m.reshape(shape))
        base[f"t{i}.weight"] = torch.from_numpy(w.reshape(shape)).float()
    for given in (None, base):
        data, _ = encode_mask_file(masks, backbone="resnet_tiny", fingerprint=FP, config=MaskConfig(), base=given)
        back = decode_mask_file(data).decode_with_base(base, FP).masks
        assert all(torch.equal(back[k], v) for k, v in masks.items())
