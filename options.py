"""Command-line options defined once: a dataclass field carries its default, its help and, for
training, whether a resumed run must match it. The flags, their help, `--config` files and the
resume check are all derived from the fields, so adding an option is one line in one place.

    @dataclass
    class Config:
        lr: float = option(2e-6, "peak learning rate", resume=True)

    cfg = parse_config(Config, argv, __doc__)  # --lr 1e-5, validated with Config.validate()
"""

import argparse
import dataclasses
import types
import typing

from common import UserError, read_json_file


def option(default=dataclasses.MISSING, help: str = "", *, resume: bool = False, **flag) -> dataclasses.Field:
    """A config field that is also the flag --field-name. `flag` holds further argparse settings
    (choices, metavar, required; hidden_aliases: former flag names still accepted); a list default
    becomes a fresh list per instance."""
    metadata = {"help": help, "resume": resume, "flag": flag}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def resume_fields(cls) -> tuple[str, ...]:
    """The fields declared with resume=True: a resumed run must use the values it was written with."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("resume"))


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _shown(value) -> str:
    if isinstance(value, list):
        return " ".join(map(str, value)) if value else "none"
    if value is None or isinstance(value, bool):
        return {True: "on", False: "off", None: "unset"}[value]
    return str(value)


def flag_help(f: dataclasses.Field) -> str:
    """The field's help and its default, once (a required flag has none)."""
    if f.metadata["flag"].get("required"):
        return f.metadata["help"]
    return f"{f.metadata['help']} (default: {_shown(_default(f))})"


def _base_type(annotation) -> tuple[type, bool]:
    """(element type, is_list) of an annotation such as int, int | None, list[str] | None."""
    if typing.get_origin(annotation) in (types.UnionType, typing.Union):  # X | None
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per field of `cls` declared with option(). Every flag defaults to None, so that
    config_from_args can tell a flag given on the command line from the field's default."""
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        kind, is_list = _base_type(f.type)
        kwargs = dict(f.metadata["flag"], help=flag_help(f).replace("%", "%%"))  # argparse formats help with %
        hidden = kwargs.pop("hidden_aliases", [])  # former spellings, still accepted, not shown
        if kind is bool:  # real on/off flags (--x / --no-x), never type=bool
            parser.add_argument(flag_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if is_list:
            kwargs["nargs"] = "+"
        parser.add_argument(flag_name(f.name), dest=f.name, type=kind, **kwargs)
        for alias in hidden:
            parser.add_argument(alias, dest=f.name, type=kind, help=argparse.SUPPRESS)
    parser.set_defaults(**{f.name: None for f in dataclasses.fields(cls) if "help" in f.metadata})


def config_from_args(cls, args: argparse.Namespace, config_file: str | None = None):
    """cls from its fields' defaults, then a JSON `config_file` with the same keys, then the flags
    given on the command line; validated with cls.validate()."""
    values = {}
    if config_file:
        values = read_json_file(config_file, "--config")
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise UserError(f"{config_file}: unknown keys {sorted(unknown)}")
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if v is not None and k in names})
    cfg = cls(**values)
    cfg.validate()
    return cfg


def parse_config(cls, argv=None, description: str | None = None, config_file: bool = False):
    """Parse argv into a validated cls. With config_file, --config FILE (JSON) sets fields too and the
    command line wins. The DeepSpeed launcher's --local_rank is accepted and ignored (ranks read the
    LOCAL_RANK environment variable)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if config_file:
        parser.add_argument("--config", help=f"JSON file with {cls.__name__} keys; flags given on the command line win")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    add_options(parser, cls)
    args = parser.parse_args(argv)
    return config_from_args(cls, args, getattr(args, "config", None))
