"""Round checkpoints of a run, so that an interrupted run resumes where it stopped.

Two kinds of file under ``<run>/checkpoints/``:
- ``last.pt`` (the main process): the round, the process count, the global parameters
  and buffers, the round records so far, the defense's and the attack's server state and
  the run's config and device type (a run resumed under others is refused:
  fedbench.config_changes);
- ``clients.rank<r>.round<k>.pt`` (every process): the client-side state of the clients
  that process trains (a defense's client hook, e.g. SDFC's per-client Delta), one file
  per round until the main checkpoint of that round is on disk.
Every file is written to a temporary name and renamed, so a crash never leaves half a
checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedbench.errors import ConfigError


def save_atomic(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


class Checkpoints:
    """Save and load a run's checkpoints for one process of ``world`` processes."""

    def __init__(self, run_dir: Path, fabric) -> None:
        self.fabric = fabric
        self.rank = fabric.global_rank
        self.world = fabric.world_size
        self.path = run_dir / "checkpoints" / "last.pt"

    def clients_path(self, rank: int, round_index: int) -> Path:
        return self.path.with_name(f"clients.rank{rank}.round{round_index}.pt")

    def save(self, round_index: int, server: dict[str, Any], clients: dict[str, Any]) -> None:
        """Every process calls this: each writes its clients' state, then the main process
        the server's; older client files go once the new main checkpoint exists."""
        mine = self.clients_path(self.rank, round_index)
        save_atomic({"round": round_index, **clients}, mine)
        self.fabric.barrier()
        if self.rank == 0:
            save_atomic({"round": round_index, "world_size": self.world, **server}, self.path)
        self.fabric.barrier()
        for old in self.path.parent.glob(f"clients.rank{self.rank}.round*.pt"):
            if old != mine:
                old.unlink(missing_ok=True)

    def load(self, device: torch.device) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """``(server state, this process's client state)``, or None without a checkpoint."""
        if not self.path.exists():
            return None
        server = torch.load(self.path, map_location=device, weights_only=True)
        if server["world_size"] != self.world:
            raise ConfigError([("fabric.devices", self.world,
                                f"the checkpoint's {server['world_size']} processes to resume it")])
        clients = torch.load(self.clients_path(self.rank, int(server["round"])), map_location=device,
                             weights_only=True)
        return server, clients
