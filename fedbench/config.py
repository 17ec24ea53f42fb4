"""The run configuration parser (jsonargparse), LightningCLI style.

Every option is a ``--section.field`` flag and a key of ``--config file.yaml``;
``--print_config`` prints a complete, re-runnable YAML. Attacks and defenses are chosen
by registry name (``--defense krum``), by class name or by class path
(``--defense my_pkg.MyDefense``), with their own arguments (``--defense.f 3``) or as
``class_path``/``init_args`` in YAML.
"""

from __future__ import annotations

import importlib
import json
import typing
from typing import Any, Sequence

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_loader

import attacks  # noqa: F401  (registers the attacks)
import defenses  # noqa: F401  (registers the defenses)
from attacks.base import ATTACKS, Attack
from defenses.base import DEFENSES, Defense
from fedbench.client import LocalTrainConfig
from fedbench.data import DataConfig
from fedbench.experiment import Experiment, FabricConfig, FederationConfig, OutputConfig
from fedbench.errors import ConfigError, config_error
from fedbench.models import MODELS, ModelConfig
from fedbench.partition import PartitionConfig
from fedbench.registry import Registry
from fedbench.tracking import LoggerName, WandbConfig

PARSER_MODE = "fedbench_yaml"
SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "partition": PartitionConfig,
    "model": ModelConfig,
    "train": LocalTrainConfig,
    "federation": FederationConfig,
    "fabric": FabricConfig,
    "output": OutputConfig,
    "wandb": WandbConfig,
}
CHOICES: dict[str, Registry] = {"attack": ATTACKS, "defense": DEFENSES}


def _check_known(registry: Registry, value: str) -> None:
    """A bare word must be a registered name or class name, and a class path must import;
    jsonargparse's own message for either lists union subtypes, not what a user can type."""
    known_classes = {registry.get(name).__name__ for name in registry.names()}
    if "." not in value and value not in known_classes and value not in registry:
        raise config_error(registry.kind, value,
                           f"one of: {', '.join(registry.names())}; or a class path such as my_module.MyClass")
    if "." in value:
        import_class(registry.kind, value)


def import_class(field: str, class_path: str) -> type:
    """The class a class path names, or one clear message naming ``field``, the import
    error and where the module must be."""
    module, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name, None)
    except Exception as err:  # a user's module may fail in any way while importing
        problem = f"{type(err).__name__}: {err}"
    else:
        if found is not None:
            return found
        problem = f"module {module!r} has no attribute {name!r}"
    raise config_error(field, class_path, f"an importable class ({problem}); put {module.split('.')[0]}.py in the "
                       "folder you run fedbench from or on PYTHONPATH")


def choice_class(choice: str) -> type:
    """The attack/defense class a registry name, class name or class path names."""
    for registry in CHOICES.values():
        if choice in registry:
            return registry.get(choice)
    if "." not in choice:
        for registry in CHOICES.values():
            for name in registry.names():
                if registry.get(name).__name__ == choice:
                    return registry.get(name)
    return import_class("class_path", choice)


def accepted_arguments(choice: str) -> set[str]:
    """Init arguments of an attack/defense given by registry name, class name or class
    path, inherited ones included (as jsonargparse sees them)."""
    parser = ArgumentParser()
    parser.add_class_arguments(choice_class(choice))
    return set(parser.get_defaults().keys())


def _name_and_arguments(value: Any) -> tuple[str | None, dict]:
    """``(class, init_args)`` of an attack/defense value: a name or a class_path mapping."""
    if isinstance(value, str) and value.startswith("{"):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            return None, {}
    if isinstance(value, str):
        return value, {}
    if isinstance(value, dict):
        arguments = value.get("init_args") if isinstance(value.get("init_args"), dict) else {}
        return value.get("class_path"), arguments
    return None, {}


def _chosen_and_options(argv: Sequence[str]) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """The attack/defense a command line chooses (config files first, then flags) and the
    options it gives each: ``--attack.K V``, ``--attack.K=V`` and init_args in files."""
    chosen = {"attack": "none", "defense": "fedavg"}
    options: dict[str, dict[str, Any]] = {key: {} for key in CHOICES}
    for config in _config_files(argv):
        for key in CHOICES:
            name, arguments = _name_and_arguments(config.get(key))
            chosen[key] = name or chosen[key]
            options[key].update(arguments)
    for index, arg in enumerate(argv):
        flag, eq, value = arg.partition("=")
        section, _, option = flag[2:].partition(".") if flag.startswith("--") else ("", "", "")
        if section not in CHOICES:
            continue
        given = value if eq else (argv[index + 1] if index + 1 < len(argv) else None)
        if not option:
            name, arguments = _name_and_arguments(given)
            chosen[section] = name or chosen[section]
            options[section].update(arguments)
        elif option not in ("help", "init_args", "class_path"):
            options[section][option.removeprefix("init_args.")] = given
    return chosen, options


def check_choice_options(argv: Sequence[str]) -> None:
    """Every ``attack.K``/``defense.K`` is an argument of the chosen class: one message
    naming the field and the options that class takes (jsonargparse would list its union
    types instead)."""
    chosen, options = _chosen_and_options(argv)
    problems = []
    for key, given in options.items():
        if not given:
            continue
        try:
            accepted = accepted_arguments(chosen[key])
        except ConfigError:
            continue  # an unknown class is reported on its own
        for option, value in given.items():
            if option not in accepted:
                takes = ", ".join(sorted(accepted)) or "no options"
                problems.append((f"{key}.{option}", value, f"an option of {key} {chosen[key]!r}, which takes: {takes}"))
                continue
            allowed = literal_choices(choice_class(chosen[key]), option)
            if allowed is not None and value not in allowed:
                problems.append((f"{key}.{option}", value, f"one of: {', '.join(allowed)}"))
    if problems:
        raise ConfigError(problems)


def literal_choices(cls: type, option: str) -> list[str] | None:
    """The allowed strings of an ``__init__`` argument typed ``Literal[...]`` (or an
    Optional of one) anywhere in the class's MRO; None for any other type."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            hint = typing.get_type_hints(init).get(option)
        except Exception:  # an annotation that does not resolve: leave it to jsonargparse
            return None
        if hint is None:
            continue
        literals = [hint] if typing.get_origin(hint) is typing.Literal else [
            arg for arg in typing.get_args(hint) if typing.get_origin(arg) is typing.Literal]
        values = [v for literal in literals for v in typing.get_args(literal)]
        return [str(v) for v in values] if values and all(isinstance(v, str) for v in values) else None
    return None


def _check_choice(registry: Registry, value: Any) -> None:
    if isinstance(value, str) and value.startswith("{"):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            return
    if isinstance(value, str) and not value.startswith("["):
        _check_known(registry, value)
    elif isinstance(value, dict) and isinstance(value.get("class_path"), str):
        _check_known(registry, value["class_path"])


def _resolve(registry: Registry, value: Any) -> Any:
    if isinstance(value, str) and value.startswith("{"):  # inline class_path/init_args on the command line
        try:
            loaded = yaml.safe_load(value)
        except yaml.YAMLError:
            return value
        return json.dumps(_resolve(registry, loaded)) if isinstance(loaded, dict) else value
    if isinstance(value, str) and value in registry:
        return registry.class_path(value)
    if isinstance(value, dict) and isinstance(value.get("class_path"), str) and value["class_path"] in registry:
        return {**value, "class_path": registry.class_path(value["class_path"])}
    return value


def check_choices(config: dict) -> None:
    """The attack/defense of a config mapping are registered names or class paths."""
    for key, registry in CHOICES.items():
        if key in config:
            _check_choice(registry, config[key])


def _config_files(argv: Sequence[str]) -> list[dict]:
    """The readable ``--config`` files of a command line, in order (jsonargparse reports
    unreadable ones itself)."""
    paths = [b for a, b in zip(argv, argv[1:]) if a == "--config"]
    paths += [a.partition("=")[2] for a in argv if a.startswith("--config=")]
    configs = []
    for path in paths:
        try:
            config = yaml.safe_load(open(path))
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(config, dict):
            configs.append(config)
    return configs


def check_config_files(argv: Sequence[str]) -> None:
    """Unknown attack/defense names in ``--config`` files, reported before jsonargparse
    parses them (its loader cannot raise a message of ours)."""
    for config in _config_files(argv):
        check_choices(config)


def resolve_registry_names(config: Any) -> Any:
    """Registry names under ``attack``/``defense`` -> class paths, in a config mapping."""
    if isinstance(config, dict):
        return {key: _resolve(CHOICES[key], value) if key in CHOICES else value for key, value in config.items()}
    return config


def resolve_argv(argv: Sequence[str]) -> list[str]:
    """``--defense krum`` / ``--defense=krum`` -> the class path, on the command line."""
    out: list[str] = []
    pending: Registry | None = None
    for arg in argv:
        if pending is not None:
            _check_choice(pending, arg)
            out.append(_resolve(pending, arg))
            pending = None
            continue
        flag, eq, value = arg.partition("=")
        section = flag[2:] if flag.startswith("--") else None
        if section in CHOICES:
            if eq:
                _check_choice(CHOICES[section], value)
                out.append(f"{flag}={_resolve(CHOICES[section], value)}")
                continue
            pending = CHOICES[section]
        out.append(arg)
    return out


def _load_yaml(text: str) -> Any:
    return resolve_registry_names(yaml.safe_load(text))


set_loader(PARSER_MODE, _load_yaml, exceptions=(yaml.YAMLError,))


def registered_help() -> str:
    return (
        f"attacks (--attack NAME): {', '.join(ATTACKS.names())}\n"
        f"defenses (--defense NAME): {', '.join(DEFENSES.names())}\n"
        f"models (--model.name NAME): {', '.join(MODELS.names())}\n"
        "Your own attack or defense: --defense your_module.YourDefense (a subclass of "
        "defenses.base.Defense), or class_path/init_args in YAML."
    )


def build_parser(prog: str = "fedbench run") -> ArgumentParser:
    parser = ArgumentParser(
        prog=prog,
        description="Run one attack/defense pair of federated training and write its results.",
        epilog=registered_help(),
        parser_mode=PARSER_MODE,
        default_env=False,
        exit_on_error=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="a YAML file with any of the options below")
    parser.add_argument("--seed", type=int, default=0, help="the one seed every random stream derives from")
    parser.add_argument("--logger", type=list[LoggerName], default=["wandb"],
                        help="where per-round metrics go besides the run folder's files: any of wandb, "
                             "tensorboard (run/tensorboard), csv (run/csv/metrics.csv); e.g. --logger "
                             "'[tensorboard, csv]' or --logger+=csv; [] for none")
    for name, cls in SECTIONS.items():
        parser.add_class_arguments(cls, name, fail_untyped=True)
    parser.add_subclass_arguments(Attack, "attack", required=False)
    parser.add_subclass_arguments(Defense, "defense", required=False)
    parser.set_defaults({
        "attack": {"class_path": ATTACKS.class_path("none")},
        "defense": {"class_path": DEFENSES.class_path("fedavg")},
    })
    return parser


def parse_run_args(argv: Sequence[str], parser: ArgumentParser | None = None) -> Namespace:
    parser = parser or build_parser()
    check_config_files(argv)
    resolved = resolve_argv(argv)
    check_choice_options(argv)
    return parser.parse_args(resolved)


def parse_config_dict(config: dict, parser: ArgumentParser | None = None) -> Namespace:
    parser = parser or build_parser()
    check_choices(config)
    return parser.parse_object(resolve_registry_names(config))


def dump_config(namespace: Namespace, parser: ArgumentParser | None = None) -> dict:
    parser = parser or build_parser()
    clean = namespace.clone()
    clean.pop("config", None)
    return yaml.safe_load(parser.dump(clean, skip_unset=False))


def build_experiment(namespace: Namespace, parser: ArgumentParser | None = None) -> Experiment:
    parser = parser or build_parser()
    config = dump_config(namespace, parser)
    init = parser.instantiate(namespace)
    return Experiment(
        attack=init.attack,
        defense=init.defense,
        seed=init.seed,
        logger=list(init.logger),
        config=config,
        **{name: init[name] for name in SECTIONS},
    )
