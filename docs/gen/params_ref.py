"""The params reference: every key of params.yaml from the pydantic schema (stages/params.py), walking nested
sections, with its type and bounds, its value in params.yaml (else the schema's default) and its field docstring.
The section intros are params.yaml's own comments on the section lines."""

import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[2]
BOUNDS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤", "min_length": "length ≥", "max_length": "length ≤"}


def schema() -> type[BaseModel]:
    from stages.params import Params

    return Params


def params_yaml(root: Path = ROOT):
    """params.yaml as a round-trip mapping (its values, and the comment on each key's line)."""
    return YAML().load((root / "params.yaml").read_text())


def _models(annotation) -> list[type[BaseModel]]:
    args = typing.get_args(annotation) or (annotation,)
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]


def type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" if not isinstance(a, str) else f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(a) for a in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    if typing.get_origin(annotation) is typing.Annotated:
        return type_name(args[0])
    return getattr(annotation, "__name__", str(annotation))


def bounds(field: FieldInfo) -> str:
    found = []
    for item in field.metadata:
        for attribute, sign in BOUNDS.items():
            value = getattr(item, attribute, None)
            if value is not None:
                found.append(f"{sign} {value}")
    return ", ".join(found)


def _value(value) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list | tuple):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    text = str(value).replace("\n", "\\n")
    return f"`{text}`" if text else '`""`'


def _default(field: FieldInfo):
    if field.default is not PydanticUndefined:
        return field.default
    if field.default_factory is not None:
        return field.default_factory()
    return PydanticUndefined


def _comment(mapping, key: str) -> str:
    """The comment params.yaml writes after `key:` (a section's one-line description)."""
    token = getattr(mapping, "ca", None) and mapping.ca.items.get(key)
    if not token:
        return ""
    comments = [t for t in token if t is not None]
    text = " ".join(getattr(c, "value", "") for c in comments if not isinstance(c, list))
    return " ".join(line.strip().lstrip("#").strip() for line in text.splitlines() if line.strip())


def _cell(text: str) -> str:
    """One table cell of prose: one line, pipes escaped, and `<...>` outside code shown, not read as HTML."""
    text = " ".join(text.split()).replace("|", "\\|")
    parts = text.split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;").replace(">", "&gt;") for i, p in enumerate(parts))


def rows(model: type[BaseModel], values, prefix: str) -> tuple[list[str], list[tuple[str, type, object]]]:
    """The table rows of one section's plain keys, and its nested sections (key, model, their values)."""
    lines, nested = [], []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        in_file = values is not None and name in values
        value = values[name] if in_file else _default(field)
        sub = _models(field.annotation)
        if sub and (isinstance(value, dict) or value is PydanticUndefined or isinstance(value, BaseModel)):
            if isinstance(value, BaseModel):
                value = value.model_dump()
            nested.append((key, sub[0], value if isinstance(value, dict) else None, field))
            continue
        shown = "(required)" if value is PydanticUndefined else _value(value)
        if not in_file and value is not PydanticUndefined:
            shown += " (default)"
        kind = type_name(field.annotation)
        if limits := bounds(field):
            kind += f", {limits}"
        lines.append(f"| `{key}` | {kind} | {shown} | {_cell(field.description or '')} |")
    return lines, nested


def section(name: str, model: type[BaseModel] | None = None, values=None, level: int = 2, intro: str = "") -> str:
    """One section of params.yaml (and its subsections) as markdown: a heading per section, a table of its keys."""
    if model is None:
        params, top = schema(), params_yaml()
        field = params.model_fields[name]
        model = _models(field.annotation)[0]
        values = top.get(name)
        intro = _comment(top, name) or field.description or ""
        intro = intro[:1].upper() + intro[1:]
    parts = [f"{'#' * level} `{name}`", ""]
    if intro:
        parts += [_cell(intro), ""]
    lines, nested = rows(model, values, f"{name}.")
    if lines:
        parts += ["| key | type | params.yaml | what it does |", "|---|---|---|---|", *lines, ""]
    for key, sub, sub_values, field in nested:
        text = field.description or (_comment(values, key.rsplit(".", 1)[1]) if values is not None else "")
        parts.append(section(key, sub, sub_values, min(level + 1, 4), text))
    return "\n".join(parts)


def page() -> str:
    params, top = schema(), params_yaml()
    shared, sections = [], []
    for name, field in params.model_fields.items():
        (sections if _models(field.annotation) else shared).append(name)
    lines, _ = rows(_Shared(params, shared), top, "")
    parts = [
        "# Params reference",
        "",
        "Generated from the schema in `stages/params.py` (each key's docstring) and the values in `params.yaml`; "
        "a key missing from the file shows the schema's default. Every key is checked before a stage does any "
        "work: an unknown key, a wrong type or a value outside its bounds stops the stage with exit code 2 and a "
        "message naming the key.",
        "",
        "## Shared keys",
        "",
        "| key | type | params.yaml | what it does |",
        "|---|---|---|---|",
        *lines,
        "",
    ]
    parts += [section(name) for name in sections]
    return "\n".join(parts)


class _Shared:
    """The top-level keys that are not sections, as a model-like view for `rows`."""

    def __init__(self, params: type[BaseModel], names: list[str]):
        self.model_fields = {n: params.model_fields[n] for n in names}
