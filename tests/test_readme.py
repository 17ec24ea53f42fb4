"""The README, run as written: every ``fedbench`` command of its shell blocks and the
own-defense example, each with tiny overrides appended (a few samples, one round, W&B
off), in a temporary folder, in the README's order. A README edit that breaks a command
fails here."""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedbench.cli import main

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
RUN_FILES = ("config.yaml", "partition.json", "metrics.jsonl", "summary.json")


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def fedbench_commands() -> list[str]:
    """``fedbench ...`` lines of the README's bash blocks, without trailing comments."""
    lines = (line.strip() for block in code_blocks("bash") for line in block.splitlines())
    return [re.split(r"\s+#", line)[0].strip() for line in lines if line.startswith("fedbench ")]


def tiny_run(root: Path, name: str) -> list[str]:
    return ["--data.root", str(root), "--data.download", "false", "--data.train_subset", "600",
            "--data.test_subset", "200", "--federation.rounds", "1",
            "--federation.final_rounds", "1", "--train.local_steps", "2", "--wandb.mode", "disabled",
            "--output.progress", "false", "--output.name", name]


def tiny_grid(root: Path, argv: list[str]) -> list[str]:
    """Tiny settings for every cell; one cell unless the command picks its own."""
    settings = [f"data.root={root}", "data.download=false", "data.train_subset=600",
                "data.test_subset=200", "federation.rounds=1", "federation.final_rounds=1", "train.local_steps=2",
                "wandb.mode=disabled", "axes.seed=[0]"]
    cells = [] if "--cells" in argv else ["--cells", "pixel_pattern-fedavg*"]
    return [part for s in settings for part in ("--set", s)] + cells + ["--jobs", "1", "--isolate", "false"]


def call(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = main(argv)
        except SystemExit as exit_:  # --help
            code = exit_.code or 0
    return code, out.getvalue()


def example_files() -> dict[str, str]:
    """The README's python blocks that start with ``# <file>.py``: the own-X examples."""
    blocks = code_blocks("python")
    return {block.splitlines()[0][2:].strip(): block for block in blocks if re.match(r"# \w+\.py\n", block)}


def test_the_readme_has_the_commands_this_test_runs():
    commands = fedbench_commands()
    assert {c.split()[1] for c in commands} == {"run", "grid", "report"}
    assert set(example_files()) == {"my_defenses.py", "my_attacks.py", "my_data.py"}
    for module in ("my_defenses.", "my_attacks.CornerSquare", "my_attacks.NegatedMean", "my_data."):
        assert any(module in c for c in commands), f"the example {module} has its command in a bash block"


def test_every_readme_command_runs_as_written(tiny_root, tmp_path, monkeypatch):
    shutil.copytree(REPO / "benchmarks", tmp_path / "benchmarks")
    for name, text in example_files().items():
        (tmp_path / name).write_text(text)
        monkeypatch.delitem(sys.modules, name[: -len(".py")], raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() adds the working folder
    for index, line in enumerate(fedbench_commands()):
        command, _, redirect = line.partition(" > ")
        argv = shlex.split(command)[1:]
        if argv[0] == "run" and "--help" not in argv:
            argv += tiny_run(tiny_root, f"readme{index}")
        elif argv[0] == "grid":  # a dry run too: it compares the cells run before with the same settings
            argv += tiny_grid(tiny_root, argv)
        code, printed = call(argv)
        assert code == 0, f"README command failed: {line}"
        if redirect:
            (tmp_path / redirect.strip()).write_text(printed)
        if argv[0] == "run" and "--help" not in argv and "--print_config" not in argv:
            for name in RUN_FILES:
                assert (tmp_path / "runs" / f"readme{index}" / name).exists(), (line, name)
        if argv[0] == "grid" and "--dry-run" not in argv:
            out = Path(argv[argv.index("--out") + 1]) if "--out" in argv else \
                Path("runs") / yaml.safe_load(Path(argv[1]).read_text())["name"]
            assert list((tmp_path / out).glob("cells/*/summary.json")), (line, "a finished cell")
        if argv[0] == "report":
            out = Path(argv[argv.index("--out") + 1])
            assert (out / "results.md").exists() and (out / "results.csv").exists(), line
    printed_config = [c.partition(" > ")[2].strip() for c in fedbench_commands() if " > " in c]
    for path in printed_config:  # "complete, re-runnable"
        assert call(["run", "--config", path, "--output.name", "rerun"])[0] == 0
        assert (tmp_path / "runs" / "rerun" / "summary.json").exists()


def test_the_console_script_finds_a_defense_saved_in_the_working_folder(tiny_root, tmp_path):
    (tmp_path / "my_defenses.py").write_text(example_files()["my_defenses.py"])
    script = Path(sys.executable).with_name("fedbench")
    if not script.exists():
        pytest.skip(f"no fedbench console script next to {sys.executable}: install the package (make install)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if "PYTHONPATH" in os.environ:  # a test of a checkout other than the installed one keeps its path
        env["PYTHONPATH"] = str(REPO)
    line = next(c for c in fedbench_commands() if "my_defenses." in c)
    result = subprocess.run([str(script), *shlex.split(line)[1:], *tiny_run(tiny_root, "own")], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "runs" / "own" / "summary.json").exists()


def test_a_class_path_that_does_not_import_gets_one_line_with_the_hint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "broken_defense.py").write_text("import not_a_real_package\n")
    code = main(["run", "--defense", "broken_defense.Anything"])
    message = capsys.readouterr().err.strip()
    assert code == 2 and len(message.splitlines()) == 1, message
    assert "defense='broken_defense.Anything'" in message
    assert "No module named 'not_a_real_package'" in message and "PYTHONPATH" in message


def test_every_bench_target_passes_grid_flags_to_each_of_its_grids():
    """``make bench GRID_FLAGS="..."`` (the README's way to pack a GPU) reaches every grid."""
    if shutil.which("make") is None:
        pytest.skip("NO make: the Makefile's bench targets are untested here")
    makefile = (REPO / "Makefile").read_text()
    targets = re.findall(r"^(bench[\w-]*):", makefile, flags=re.M)
    assert "bench" in targets and "bench-quick" in targets
    for target in targets:
        dry = subprocess.run(["make", "-n", "-C", str(REPO), target, "GRID_FLAGS=--jobs 3 --cells-per-process 2"],
                             capture_output=True, text=True, timeout=60)
        grids = [line for line in dry.stdout.splitlines() if " grid benchmarks/" in line]
        assert grids and all(line.endswith(" --jobs 3 --cells-per-process 2") for line in grids), (target, dry.stdout)


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped but
    hyphens, spaces made hyphens ("## Speed and scale" -> "speed-and-scale")."""
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("document", ["README.md", "benchmarks/perf/README.md"])
def test_every_relative_link_reaches_a_file_and_heading(document):
    """A link into the repository (the README's results and measurement log, the log's way
    back) names a file that exists and, after ``#``, one of that file's headings."""
    path = REPO / document
    links = [target for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text())
             if not re.match(r"[a-z]+://", target)]
    assert links, f"{document} links nowhere: the pattern no longer finds its links"
    for link in links:
        file_part, _, anchor = link.partition("#")
        target = (path.parent / file_part).resolve() if file_part else path
        assert target.is_file() and REPO in target.parents, f"{document}: {link} names no file of the repository"
        if anchor:
            assert anchor in heading_anchors(target.read_text()), f"{document}: {link} names no heading of {target.name}"
