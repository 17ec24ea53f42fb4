"""``fedbench report``: tables and plots from a grid's finished cells.

For each setting (every grid axis but attack, defense and seed: data set, Dirichlet
beta, malicious fraction, ...) a table with one row per defense and, per attack, A (clean
accuracy), ASR over non-target test images (the headline), ASR over all test images (the
published SDFC/FDCR count) and V = (A + (100 - ASR)) / 2, each the mean over seeds with its standard deviation (as the SDFC/FDCR papers report
the mean of the last rounds). Attack ``none`` cells join every malicious fraction of
their setting. Untargeted attacks also get ``A drop``: the same defense's clean accuracy
without attack minus with it, seed by seed (``--reference`` takes the attack-free cells
from another grid of the same protocol, e.g. the quick grid's for the Byzantine grid). Reads only ``summary.json`` and ``metrics.jsonl`` files: what is not
finished is not reported.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shlex
from collections import defaultdict
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean, pstdev
from typing import Any, Sequence

from fedbench.config import dump_config, parse_config_dict
from fedbench.errors import FedbenchError
from fedbench.grid import CELLS, value_label
from fedbench.metrics import headline
from fedbench.tracking import WandbConfig
from fedbench.results import METRICS, SUMMARY, read_jsonl, write_atomic


Setting = tuple[tuple[str, Any], ...]
NOT_SETTINGS = ("attack", "defense", "seed")


@dataclass
class CellResult:
    cell: str
    dataset: str
    setting: Setting
    attack: str
    defense: str
    seed: int
    final: dict
    detection: dict | None
    records: list[dict]
    wall_time_s: float | None = None
    device: str | None = None
    defense_args: dict | None = None
    versions: dict | None = None
    code: str | None = None
    config: dict | None = None
    non_finite_rounds: list[int] = dataclasses.field(default_factory=list)


def _fallback_setting(summary: dict) -> Setting:
    """The setting of a run that did not come from a grid: data set, beta, malicious fraction."""
    config = summary.get("config") or {}
    setting = [("data.name", summary["dataset"]), ("partition.beta", (config.get("partition") or {}).get("beta"))]
    if summary["attack"] != "none":
        fraction = ((config.get("attack") or {}).get("init_args") or {}).get("malicious_fraction")
        setting.append(("attack.malicious_fraction", fraction))
    return tuple(setting)


def collect(grid_dir: Path) -> list[CellResult]:
    """Every finished cell, labelled by its grid axes: the attack and defense labels keep
    their arguments (two SDFC variants stay apart) and every other axis but the seed is
    part of the setting (so it is never mistaken for a repetition)."""
    results = []
    for summary_path in sorted((grid_dir / CELLS).glob(f"*/{SUMMARY}")):
        summary = json.loads(summary_path.read_text())
        cell_file = summary_path.parent / "cell.json"
        axes = json.loads(cell_file.read_text())["axes"] if cell_file.exists() else {}
        setting = tuple((k, v) for k, v in axes.items() if k not in NOT_SETTINGS) if axes \
            else _fallback_setting(summary)
        results.append(CellResult(
            cell=summary_path.parent.name,
            dataset=summary["dataset"],
            setting=setting,
            attack=value_label(axes["attack"]) if "attack" in axes else summary["attack"],
            defense=value_label(axes["defense"]) if "defense" in axes else summary["defense"],
            seed=summary["seed"],
            final=summary["final"],
            detection=summary.get("detection"),
            records=read_jsonl(summary_path.parent / METRICS),
            wall_time_s=summary.get("wall_time_s"),
            device=summary.get("device"),
            defense_args=((summary.get("config") or {}).get("defense") or {}).get("init_args"),
            versions=summary.get("versions"),
            code=summary.get("code"),
            config=summary.get("config"),
            non_finite_rounds=summary.get("non_finite_aggregate_rounds") or [],
        ))
    return results


def _order(grid_info: dict, key: str, present: set[str]) -> list[str]:
    """The grid file's order of an axis' labels, then any others present, sorted."""
    ordered: list[str] = []
    for value in grid_info.get("axes", {}).get(key, []):
        name = value_label(value)
        if name in present and name not in ordered:
            ordered.append(name)
    return ordered + sorted(present - set(ordered))


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return fmean(values), (pstdev(values) if len(values) > 1 else 0.0)


def _fmt(mean: float | None, std: float | None, n: int) -> str:
    if mean is None:
        return "-"
    return f"{mean:.1f}" if n <= 1 else f"{mean:.1f}±{std:.1f}"


def _without_attack_keys(setting: Setting) -> Setting:
    return tuple((k, v) for k, v in setting if not k.startswith("attack."))


def settings_of(results: list[CellResult]) -> list[Setting]:
    """Distinct settings of attacked cells; a no-attack cell joins each matching one."""
    attacked = {r.setting for r in results if r.attack != "none"} or {r.setting for r in results}
    return sorted(attacked, key=str)


def cells_for(results: list[CellResult], setting: Setting, defense: str, attack: str) -> list[CellResult]:
    if attack == "none":
        wanted = _without_attack_keys(setting)
        return [r for r in results if r.defense == defense and r.attack == "none"
                and _without_attack_keys(r.setting) == wanted]
    return [r for r in results if r.defense == defense and r.attack == attack and r.setting == setting]


def setting_label(setting: Setting, dataset: str = "") -> str:
    parts = [f"{k}={v}" for k, v in setting]
    return ", ".join(parts) if parts else dataset


def setting_slug(setting: Setting) -> str:
    slug = "_".join(f"{k.rsplit('.', 1)[-1]}{value_label(v)}" for k, v in setting)
    return slug or "all"


def build_rows(results: list[CellResult], defenses: list[str], attacks: list[str]) -> list[dict]:
    """One row per setting x defense x attack: each headline number's mean and std over
    seeds, the detection means and, where the same defense ran without attack, ``A_drop``:
    its clean accuracy without attack minus with it, seed by seed, then mean and std."""
    rows = []
    dataset = results[0].dataset
    for setting in settings_of(results):
        for defense in defenses:
            for attack in attacks:
                cells = cells_for(results, setting, defense, attack)
                if not cells:
                    continue
                row: dict[str, Any] = {"setting": setting_label(setting, dataset), "defense": defense,
                                       "attack": attack, "seeds": len(cells)}
                for key in headline():
                    row[f"{key}_mean"], row[f"{key}_std"] = mean_std([c.final.get(key) for c in cells])
                for key in ("tpr", "fpr", "malicious_weight"):
                    row[f"{key}_mean"], _ = mean_std([(c.detection or {}).get(key) for c in cells])
                clean = [] if attack == "none" else cells_for(results, setting, defense, "none")
                row["A_drop_mean"], row["A_drop_std"] = mean_std(accuracy_drops(clean, cells))
                row["non_finite_aggregates"] = non_finite_note(cells)
                rows.append(row)
    return rows


def non_finite_note(cells: list[CellResult]) -> str:
    """Which seeds' defense returned a NaN/Inf aggregate (refused; the model stayed), and when."""
    return "; ".join(f"seed {c.seed}: {len(c.non_finite_rounds)} of {len(c.records)} rounds, "
                     f"from round {c.non_finite_rounds[0]}" for c in cells if c.non_finite_rounds)


def accuracy_drops(clean: list[CellResult], attacked: list[CellResult]) -> list[float]:
    """``A(no attack) - A(attack)`` for every seed both ran."""
    clean_by_seed = {c.seed: c.final.get("A") for c in clean}
    return [clean_by_seed[c.seed] - c.final["A"] for c in attacked
            if clean_by_seed.get(c.seed) is not None and c.final.get("A") is not None]


def markdown_tables(rows: list[dict], defenses: list[str], attacks: list[str]) -> str:
    out = io.StringIO()
    for setting in dict.fromkeys(r["setting"] for r in rows):
        here = {(r["defense"], r["attack"]): r for r in rows if r["setting"] == setting}
        shown_attacks = [a for a in attacks if any((d, a) in here for d in defenses)]
        # Attacks without a trigger (none, the untargeted ones) have no ASR: accuracy only.
        targeted = {a for a in shown_attacks if any(here.get((d, a), {}).get("ASR_mean") is not None for d in defenses)}
        # Untargeted attacks: their accuracy drop against the same defense without attack, when known.
        dropped = {a for a in shown_attacks if any(here.get((d, a), {}).get("A_drop_mean") is not None
                                                   for d in defenses)}
        columns = {a: ["A", "ASR", "ASR_all", "V"] if a in targeted else ["A", "A_drop"] if a in dropped else ["A"]
                   for a in shown_attacks}
        names = {"A": "A", "ASR": "ASR non-target", "ASR_all": "ASR all", "V": "V", "A_drop": "A drop"}
        header = ["defense"] + [f"{a} {names[key]}" for a in shown_attacks for key in columns[a]]
        out.write(f"\n### {setting}\n\n")
        out.write("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
        for defense in defenses:
            if not any((defense, a) in here for a in shown_attacks):
                continue
            cells = [defense]
            for attack in shown_attacks:
                row = here.get((defense, attack))
                mark = "†" if row and row.get("non_finite_aggregates") else ""
                for key in columns[attack]:
                    text = _fmt(row[f"{key}_mean"], row[f"{key}_std"], row["seeds"]) if row else "-"
                    cells.append(text + mark if text != "-" else text)
            out.write("| " + " | ".join(cells) + " |\n")
        shown = [here[(d, a)] for d in defenses for a in shown_attacks if (d, a) in here]
        out.write(non_finite_footnote([row for row in shown if row.get("non_finite_aggregates")]))
    return out.getvalue()


def non_finite_footnote(rows: list[dict]) -> str:
    if not rows:
        return ""
    listed = "\n".join(f"- {r['defense']} / {r['attack']}: {r['non_finite_aggregates']}" for r in rows)
    return ("\n† the defense returned an aggregate with NaN/Inf in some rounds; the server refused it "
            "and kept its model (the numbers are that model's), in:\n" + listed + "\n")


def write_csv(rows: list[dict], path: Path) -> None:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else (round(v, 4) if isinstance(v, float) else v))
                             for k, v in row.items()})
    write_atomic(path, buffer.getvalue())


def _per_round(cells: list[CellResult], key: str) -> tuple[list[int], list[float]]:
    by_round: dict[int, list[float]] = defaultdict(list)
    for cell in cells:
        for record in cell.records:
            if record.get(key) is not None:
                by_round[record["round"]].append(record[key])
    rounds = sorted(by_round)
    return [r + 1 for r in rounds], [fmean(by_round[r]) for r in rounds]


def plot_curves(results, setting, defenses, attacks, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacked = [a for a in attacks if a != "none"] or attacks
    fig, axes = plt.subplots(len(attacked), 2, figsize=(10, 2.8 * len(attacked)), squeeze=False)
    for row, attack in enumerate(attacked):
        for col, (key, label) in enumerate([("clean_acc", "clean accuracy (%)"), ("asr", "ASR (%)")]):
            ax = axes[row][col]
            for defense in defenses:
                cells = cells_for(results, setting, defense, attack)
                rounds, values = _per_round(cells, key)
                if rounds:
                    ax.plot(rounds, values, label=defense, marker=".", linewidth=1)
            ax.set_title(f"{attack}: {label}", fontsize=9)
            ax.set_xlabel("round", fontsize=8)
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=7, loc="best")
    fig.suptitle(setting_label(setting, results[0].dataset), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heatmap(rows: list[dict], setting, defenses, attacks, key: str, path: Path, results_dataset: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = setting_label(setting, results_dataset)
    here = {(r["defense"], r["attack"]): r for r in rows if r["setting"] == label}
    shown = [a for a in attacks if (key != "ASR" or a != "none") and any((d, a) in here for d in defenses)]
    matrix = [[(here.get((d, a)) or {}).get(f"{key}_mean") for a in shown] for d in defenses]
    values = [[math.nan if v is None else v for v in line] for line in matrix]
    fig, ax = plt.subplots(figsize=(1.4 + 1.1 * len(shown), 1.0 + 0.45 * len(defenses)))
    image = ax.imshow(values, cmap="RdYlGn_r" if key == "ASR" else "RdYlGn", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(shown)), shown, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(defenses)), defenses, fontsize=8)
    for i, line in enumerate(matrix):
        for j, value in enumerate(line):
            if value is not None:
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7)
    ax.set_title(f"{'ASR' if key == 'ASR' else 'clean accuracy A'} (%) - {label}", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def defense_settings(results: list[CellResult], defenses: list[str]) -> str:
    """One line per defense label with the arguments its cells ran with (estimator, f, ...),
    so every table says which variant a row is; differing cells are flagged."""
    lines = []
    for defense in defenses:
        used = {json.dumps(r.defense_args or {}, sort_keys=True) for r in results if r.defense == defense}
        shown = "; ".join(", ".join(f"{k}={v}" for k, v in json.loads(u).items()) or "no arguments" for u in sorted(used))
        note = " (cells differ)" if len(used) > 1 else ""
        lines.append(f"- `{defense}`: {shown}{note}")
    return "Defenses as run (f=None: the expected number of attackers):\n\n" + "\n".join(lines) + "\n"


def provenance(results: list[CellResult]) -> str:
    """Where the cells ran and on which code, and a warning when a table mixes them."""
    def count(values: list[str]) -> str:
        seen = sorted(set(values))
        plural = {v: "cell" if values.count(v) == 1 else "cells" for v in seen}
        return "; ".join(f"{v} ({values.count(v)} {plural[v]})" for v in seen) if len(seen) > 1 else seen[0]

    devices = [r.device or "unknown" for r in results]
    codes = [r.code or "unknown" for r in results]
    packages = [", ".join(f"{k} {v}" for k, v in (r.versions or {}).items()) or "unknown" for r in results]
    lines = [f"Machine: {count(devices)}. Code: {count(codes)}. Packages: {count(packages)}."]
    mixed = [name for name, values in (("devices", devices), ("code versions", codes), ("package versions", packages))
             if len(set(values)) > 1]
    if mixed:
        lines.append(f"**Note: the cells of this table ran on different {' and '.join(mixed)}**; compare "
                     "numbers across them with care (fp32 CPU results are reproducible only on the same "
                     "code, thread count and library versions).")
    return "\n".join(lines) + "\n"


def cells_wandb(results: list[CellResult], mode: str | None) -> WandbConfig:
    """The cells' W&B settings (project, entity, group, mode), the mode overridden if given."""
    known = {"mode", "project", "entity", "group", "tags"}
    given = {k: v for k, v in ((results[0].config or {}).get("wandb") or {}).items() if k in known}
    config = WandbConfig(**given)
    if mode is not None:
        config.mode = mode
    return config


# Config sections that may differ between a grid and the grid it takes its attack-free
# cells from; everything else (data, partition, model, training, federation) must match.
NOT_PROTOCOL = ("attack", "defense", "seed", "output", "wandb")
# How the clients' training is executed, not what it computes: a cohort (compiled or not,
# its convolutions grouped or as matrix products) equals sequential training to float
# rounding (tested), as runs on two machines do.
EXECUTION_ONLY = ("train.cohort", "train.compile", "train.cohort_convolution")


def flat_protocol(config: dict | None, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in (config or {}).items():
        if not prefix and key in NOT_PROTOCOL:
            continue
        if isinstance(value, dict):
            flat.update(flat_protocol(value, f"{prefix}{key}."))
        elif f"{prefix}{key}" not in EXECUTION_ONLY:
            flat[f"{prefix}{key}"] = value
    return flat


def reference_cells(reference_dir: Path, results: list[CellResult]) -> list[CellResult]:
    """The attack-free cells of another grid run under the same protocol (checked key by
    key), to give this grid's attacks an accuracy drop; their setting becomes this grid's."""
    clean = [r for r in collect(reference_dir) if r.attack == "none"]
    if not clean:
        raise FedbenchError(f"--reference {reference_dir}: no finished attack-free cells under {reference_dir / CELLS}")
    # a key one side lacks was added to the config after that side ran: it ran with its default
    defaults = flat_protocol(dump_config(parse_config_dict({})))
    mine, theirs = flat_protocol(results[0].config), flat_protocol(clean[0].config)
    differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k, defaults.get(k)) != theirs.get(k, defaults.get(k)))
    if differ:
        shown = ", ".join(f"{k}: {mine.get(k)!r} here, {theirs.get(k)!r} there" for k in differ[:5])
        raise FedbenchError(f"--reference {reference_dir}: another protocol ({shown})")
    settings = {_without_attack_keys(r.setting) for r in results}
    return [dataclasses.replace(r, setting=setting) for r in clean for setting in settings]


def cell_seconds(cell: CellResult) -> float | None:
    """A cell's wall time, or the sum of its rounds' times where that is larger: a cell
    resumed from a checkpoint written before checkpoints kept the time so far has only
    its last attempt's wall time."""
    rounds = sum((r.get("time") or {}).get("round") or 0.0 for r in cell.records)
    if cell.wall_time_s is None:
        return rounds or None
    return max(cell.wall_time_s, rounds)


def run_time(cells: list[CellResult], jobs: int) -> str:
    """The cells' summed wall time, slowest cell and devices ("" when none was timed)."""
    timed = [t for t in map(cell_seconds, cells) if t is not None]
    if not timed:
        return ""
    devices = ", ".join(sorted({r.device for r in cells if r.device}))
    parallel = f", {jobs} cells at a time" if jobs > 1 else ""
    return (f"Run time: {sum(timed) / 60:.1f} min for {len(timed)} cells (sum of the cells' wall times over all "
            f"their attempts{parallel}; slowest cell {max(timed):.0f} s) on {devices}.\n")


def make_report(grid_dir: Path, out_dir: Path, command: str | None = None, wandb_mode: str | None = None,
                reference: Path | None = None) -> dict:
    results = collect(grid_dir)
    if not results:
        raise FedbenchError(f"no finished cells under {grid_dir / CELLS}")
    own = list(results)  # counts, run time and provenance describe this grid's cells
    if reference is not None:
        results += reference_cells(reference, [r for r in results if r.attack != "none"] or results)
    grid_file = grid_dir / "grid.json"
    grid_info = json.loads(grid_file.read_text()) if grid_file.exists() else {}
    defenses = [d for d in _order(grid_info, "defense", {r.defense for r in results})
                if any(r.defense == d for r in results if r.attack != "none") or reference is None]
    attacks = sorted(_order(grid_info, "attack", {r.attack for r in results}), key=lambda a: a != "none")
    rows = build_rows(results, defenses, attacks)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out_dir / "results.csv")
    images = []
    for setting in settings_of(results):
        slug = setting_slug(setting)
        for name, draw in [
            (f"curves_{slug}.png", lambda p: plot_curves(results, setting, defenses, attacks, p)),
            (f"heatmap_asr_{slug}.png",
             lambda p: plot_heatmap(rows, setting, defenses, attacks, "ASR", p, results[0].dataset)),
            (f"heatmap_acc_{slug}.png",
             lambda p: plot_heatmap(rows, setting, defenses, attacks, "A", p, results[0].dataset)),
        ]:
            draw(out_dir / name)
            images.append(name)
    seeds = sorted({r.seed for r in results})
    title = grid_info.get("name", grid_dir.name)
    if command and grid_info.get("file"):
        settings = "".join(f" --set {shlex.quote(setting)}" for setting in grid_info.get("settings", []))
        command = f"fedbench grid {grid_info['file']}{settings}` then `{command}"
    text = [f"# Results: {title}\n",
            f"{len(own)} finished cells; seeds {seeds}. A = clean accuracy; ASR non-target = attack "
            "success rate over test images whose true label is not the target (the headline); ASR all = the "
            "same over every test image (how the published SDFC/FDCR code counts; R in their tables is "
            "100 - this); V = (A + 100 - ASR non-target) / 2; each the mean of a cell's last "
            "federation.final_rounds rounds (mean±std over seeds, std the population's). A defense label "
            "without arguments runs its defaults (sdfc: the published Fisher estimator; Krum, Multi-Krum, "
            "trimmed mean: f = the expected number of attackers, which is 0 in attack-free cells, where "
            "Multi-Krum and trimmed mean then average every update).\n"]
    if command:
        text.append(f"Made by: `{command}`\n")
    if reference is not None:
        text.append(f"Attack-free columns (none A, and each A drop) from the attack-free cells of {reference}, "
                    "the same protocol.\n")
    text += [line for line in (run_time(own, grid_info.get("jobs", 1)), provenance(own)) if line]
    text.append(defense_settings(results, defenses))
    text.append(markdown_tables(rows, defenses, attacks))
    text.append("\n" + "\n".join(f"![{name}]({name})" for name in images) + "\n")
    write_atomic(out_dir / "results.md", "\n".join(text))
    from fedbench.wandb_summary import log_grid_summary

    wandb_run = log_grid_summary(results, [out_dir / name for name in images], title,
                                 cells_wandb(results, wandb_mode), grid_dir / "wandb")
    return {"rows": rows, "images": images, "cells": len(own), "wandb": wandb_run}


def report_command(argv: Sequence[str]) -> int:
    from jsonargparse import ArgumentError, ArgumentParser

    from fedbench.execution import fail

    parser = ArgumentParser(prog="fedbench report", description="Markdown table, CSV and PNG plots from a grid's "
                            "finished cells.", exit_on_error=False, default_env=False)
    parser.add_argument("grid_dir", type=str, help="the grid's output folder (e.g. runs/quick)")
    parser.add_argument("--out", type=str | None, default=None, help="where to write (default: <grid_dir>/report)")
    parser.add_argument("--reference", type=str | None, default=None,
                        help="another grid's folder (same protocol) whose attack-free cells give each attack's "
                             "accuracy drop, e.g. runs/quick for runs/byzantine")
    parser.add_argument("--wandb", type=str | None, default=None,
                        help="auto, online, offline or disabled: log one summary run of the grid to its W&B group "
                             "(default: the cells' wandb.mode)")
    try:
        args = parser.parse_args(list(argv))
    except ArgumentError as err:
        return fail(str(err).strip(), "report")
    if args.wandb not in (None, "auto", "online", "offline", "disabled"):
        return fail(f"--wandb={args.wandb!r}: one of auto, online, offline, disabled", "report")
    grid_dir = Path(args.grid_dir)
    out = Path(args.out) if args.out else grid_dir / "report"
    try:
        report = make_report(grid_dir, out, command=f"fedbench report {' '.join(argv)}", wandb_mode=args.wandb,
                             reference=Path(args.reference) if args.reference else None)
    except FedbenchError as err:
        return fail(str(err), "report")
    print(f"{report['cells']} cells -> {out / 'results.md'}, {out / 'results.csv'}, {len(report['images'])} plots")
    if report["wandb"] is not None:
        print(f"W&B summary run: {report['wandb']} (offline runs upload with `wandb sync {report['wandb']}`)")
    return 0
