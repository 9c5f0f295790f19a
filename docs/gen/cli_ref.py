"""The CLI reference: every option of the `latentlab` command and of the flows' commands, from their argparse
parsers (the flows build theirs inside `main()`: it is caught at `parse_args`, before anything runs)."""

import argparse
import importlib

COMMANDS = {  # the command as a user types it -> how to get its parser
    "latentlab": "latentlab.cli:build_parser",
    "python -m flows.pipeline": "flows.pipeline:main",
    "python -m flows.deploy": "flows.deploy:main",
    "python -m flows.sweep": "flows.sweep:main",
}


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def parser_of(command: str) -> argparse.ArgumentParser:
    """The parser of one of COMMANDS; a `main()` is stopped at its `parse_args` call, so nothing runs."""
    module, function = COMMANDS[command].split(":")
    target = getattr(importlib.import_module(module), function)
    if function != "main":
        return target()
    original = argparse.ArgumentParser.parse_args

    def caught(self, *args, **kwargs):
        raise _Parsed(self)

    argparse.ArgumentParser.parse_args = caught
    try:
        target()
    except _Parsed as parsed:
        parsed.parser.prog = command
        return parsed.parser
    finally:
        argparse.ArgumentParser.parse_args = original
    raise RuntimeError(f"{command}: main() returned without parsing arguments")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help(action: argparse.Action) -> str:
    text = " ".join((action.help or "").split())
    if action.choices and not isinstance(action, argparse._SubParsersAction):
        text += f" One of {', '.join(f'`{c}`' for c in action.choices)}."
    return text.replace("|", "\\|").replace("<", "&lt;")


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction | argparse._HelpAction):
        return "flag"
    if action.default in (None, argparse.SUPPRESS) or action.default == []:
        return "–"
    default = action.default
    return f"`{' '.join(map(str, default)) if isinstance(default, list) else default}`"


def options_table(parser: argparse.ArgumentParser) -> str:
    lines = ["| argument | default | what it does |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if action.option_strings:
            name = ", ".join(f"`{o}`" for o in action.option_strings)
            if action.nargs != 0:
                name += f" `{action.metavar or action.dest.upper()}`" + ("..." if action.nargs in ("+", "*") else "")
        else:
            name = f"`{action.metavar or action.dest}`"
        lines.append(f"| {name} | {_default(action)} | {_help(action)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _usage(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_usage().removeprefix("usage:").split())


def command_section(parser: argparse.ArgumentParser, level: int, summary: str = "") -> str:
    parts = [f"{'#' * level} `{parser.prog}`", "", summary or (parser.description or ""), ""]
    parts += ["```text", _usage(parser), "```", ""]
    if table := options_table(parser):
        parts += [table, ""]
    helps = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
    for name, sub in subcommands(parser).items():
        parts.append(command_section(sub, min(level + 1, 4), helps.get(name, "")))
    return "\n".join(parts)


def page() -> str:
    parts = [
        "# CLI reference",
        "",
        "Generated from the argparse parsers of each command (`latentlab/cli.py`, `flows/*.py`). "
        "Every command also answers `--help`.",
        "",
    ]
    parts += [command_section(parser_of(command), 2) for command in COMMANDS]
    return "\n".join(parts)
