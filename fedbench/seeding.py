"""Every random stream in a run is derived from the one run seed.

A stream is named (``"partition"``, ``"train"``, ...) and may be keyed further by round
and client, so a client's local training in round r draws the same numbers whatever
order the clients train in and whichever process trains them. That is what lets a
multi-process run equal the single-process run bit for bit.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

STREAMS = (
    "partition",
    "server_split",
    "malicious",
    "poison",
    "model_init",
    "sampling",
    "train",
    "server",
    "defense",
    "attack",
)


def derive_seed(seed: int, stream: str, *keys: int) -> int:
    """A 63-bit seed for ``stream`` keyed by ``keys``, derived from the run seed."""
    if stream not in STREAMS:
        raise KeyError(f"unknown random stream {stream!r}; known: {', '.join(STREAMS)}")
    stream_key = zlib.crc32(stream.encode())
    sequence = np.random.SeedSequence(entropy=int(seed), spawn_key=(stream_key, *[int(k) for k in keys]))
    return int(sequence.generate_state(2, dtype=np.uint32).astype(np.uint64) @ np.array([1 << 31, 1], dtype=np.uint64)) & (
        (1 << 63) - 1
    )


def numpy_rng(seed: int, stream: str, *keys: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, stream, *keys))


def torch_generator(seed: int, stream: str, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, stream, *keys))
    return generator


def seed_table(seed: int) -> dict[str, int]:
    """The un-keyed seed of every stream, recorded in the run summary."""
    return {stream: derive_seed(seed, stream) for stream in STREAMS}
