"""One W&B run that shows a whole grid: the results table, the report's images and, per
defense, accuracy and ASR over rounds for every attack. Logged by ``fedbench report`` to
the grid's W&B group (offline unless you are logged in, as every run), so that one page
compares the cells."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import fmean
from fedbench.tracking import WandbConfig, resolve_mode, use_local_wandb_dirs

TABLE_COLUMNS = ("cell", "dataset", "setting", "attack", "defense", "seed", "A", "ASR", "ASR_all", "V", "V_all",
                 "tpr", "fpr", "malicious_weight", "wall_time_s", "device", "code", "config")


def table_rows(results: list) -> list[list]:
    """One row per finished cell (``fedbench.report.CellResult``), in :data:`TABLE_COLUMNS` order."""
    rows = []
    for r in results:
        detection = r.detection or {}
        setting = ", ".join(f"{k}={v}" for k, v in r.setting)
        rows.append([r.cell, r.dataset, setting, r.attack, r.defense, r.seed,
                     *(r.final.get(k) for k in ("A", "ASR", "ASR_all", "V", "V_all")),
                     *(detection.get(k) for k in ("tpr", "fpr", "malicious_weight")),
                     r.wall_time_s, r.device, r.code, json.dumps(r.config, sort_keys=True)])
    return rows


def curves(results: list, key: str) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """``{defense: {attack: (rounds, mean over seeds of key)}}`` from the cells' records."""
    grouped: dict[str, dict[str, dict[int, list[float]]]] = {}
    for r in results:
        series = grouped.setdefault(r.defense, {}).setdefault(r.attack, {})
        for record in r.records:
            if record.get(key) is not None:
                series.setdefault(record["round"] + 1, []).append(record[key])
    return {d: {a: (sorted(s), [fmean(s[x]) for x in sorted(s)]) for a, s in by_attack.items()}
            for d, by_attack in grouped.items()}


def log_grid_summary(results: list, images: list[Path], name: str, config: WandbConfig,
                     folder: Path) -> Path | None:
    """Log the summary run; returns its local run folder (None when W&B is disabled)."""
    mode = resolve_mode(config.mode)
    if mode == "disabled":
        return None
    import wandb

    use_local_wandb_dirs(folder.resolve(), mode)
    run = wandb.init(project=config.project, entity=config.entity, group=config.group or name,
                     name=f"{name}-summary", job_type="grid-summary", dir=str(folder.resolve().parent), mode=mode,
                     settings=wandb.Settings(console="off", x_disable_stats=True, silent=True), reinit=True)
    try:
        run.log({"results": wandb.Table(columns=list(TABLE_COLUMNS), data=table_rows(results))})
        run.log({f"report/{path.stem}": wandb.Image(str(path)) for path in images})
        for key, label in (("clean_acc", "accuracy"), ("asr", "ASR")):
            for defense, by_attack in curves(results, key).items():
                attacks = sorted(by_attack)
                if not attacks:
                    continue
                run.log({f"{label}/{defense}": wandb.plot.line_series(
                    xs=[by_attack[a][0] for a in attacks], ys=[by_attack[a][1] for a in attacks], keys=attacks,
                    title=f"{defense}: {label} over rounds (mean over seeds)", xname="round")})
        return Path(run.dir).parent
    finally:
        run.finish()
