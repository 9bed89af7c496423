"""``jsarag config show`` and ``jsarag plugins --options``: a resolved recipe as YAML with every default and its
comment, and a component's options with types, defaults and docs, read from the option schemas themselves (pydantic
models whose attribute docstrings are the fields' descriptions)."""
from __future__ import annotations

import json
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from jsarag.errors import PluginError
from jsarag.plugins import Plugins
from jsarag.recipe import ComponentSpec, Recipe, Section

WIDTH = 118  # characters of a comment line
SECTIONS = {  # what the component sections of a recipe are (their fields carry no docstring of their own)
    "retriever": "the prior p(h|x)",
    "posterior": "the posterior q(h|x,y), built only for estimators that need one; 'copy' (the default) is the "
                 "retriever section again, 'prior' the prior's own instance reading x [SEP] y",
    "index": "how the retrievers' passage vectors are searched",
    "generator": "p(y|x,h)",
    "estimator": "turns the generator's scores into the loss",
}


# -- jsarag config show ---------------------------------------------------------------------------------------------

def recipe_data(recipe: Recipe) -> dict[str, Any]:
    """The recipe as YAML data in the shape recipes are written, every default filled in (``posterior: prior`` when
    the prior reads x [SEP] y itself)."""
    data = recipe.resolved()
    for section in ("retriever", "posterior", "index", "generator", "estimator"):
        data[section] = _flat(data[section])
    data["observers"] = [_flat(spec) for spec in data["observers"]]
    if recipe.posterior.shares_prior:
        data["posterior"] = "prior"
    return data


def _flat(spec: dict[str, Any]) -> dict[str, Any]:
    """A dumped ComponentSpec as a recipe section: its name, then its options."""
    return {"name": spec["name"], **spec["options"]}


def show(recipe: Recipe, plugins: Plugins | None = None) -> str:
    """The resolved recipe as YAML, each key under its comment (the field's docstring); it loads back as the same
    recipe."""
    plugins = plugins or Plugins()
    data = recipe_data(recipe)
    lines: list[str] = []
    for name, info in Recipe.model_fields.items():
        if name == "source":
            continue
        value = getattr(recipe, name)
        if isinstance(value, ComponentSpec):
            note = _component_note(plugins, "retriever" if name == "posterior" else name, value.name, SECTIONS[name])
            if name == "posterior" and data[name] == "prior":
                lines += _comment(note, 0) + ["posterior: prior"]
            else:
                lines += _comment(note, 0) + [f"{name}:"] + _component(value, data[name], 2)
        elif name == "observers":
            lines += _comment(info.description, 0) + ["observers:" + (" []" if not value else "")]
            for spec, written in zip(value, data[name]):
                lines += _comment(_component_note(plugins, "observer", spec.name, ""), 2)
                lines += ["  -" + line[3:] if i == 0 else line for i, line in enumerate(_component(spec, written, 4))]
        else:
            lines += _field(name, info, value, data[name], 0)
        lines.append("")
    return "\n".join(lines)


def _component_note(plugins: Plugins, kind: str, name: str, what: str) -> str:
    """``what`` and the chosen plugin class's one-line summary."""
    summary = _summary(plugins.component(kind, name).cls)
    return "; ".join(part for part in (what, f"{kind} '{name}': {summary}" if summary else "") if part)


def _summary(cls: type) -> str:
    """The first line of a class's docstring ('' without one)."""
    return (cls.__doc__ or "").strip().splitlines()[0] if (cls.__doc__ or "").strip() else ""


def _component(spec: ComponentSpec, data: dict[str, Any], indent: int) -> list[str]:
    """A component section's lines: its name, then every option under its comment."""
    lines = [" " * indent + f"name: {_scalar(data['name'])}"]
    for name, info in type(spec.options).model_fields.items():
        lines += _field(name, info, getattr(spec.options, name), data[name], indent)
    return lines


def _field(name: str, info: FieldInfo, value: Any, data: Any, indent: int) -> list[str]:
    """One key under its comment: a nested section key by key, anything else on one line."""
    pad = " " * indent
    lines = _comment(info.description, indent)
    if isinstance(value, BaseModel):
        lines.append(f"{pad}{name}:")
        for child, child_info in type(value).model_fields.items():
            lines += _field(child, child_info, getattr(value, child), data[child], indent + 2)
    elif isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
        lines.append(f"{pad}{name}:")  # a mapping of sections (data.splits)
        for key, section in value.items():
            lines += _field(key, FieldInfo(description=None), section, data[key], indent + 2)
    else:
        lines.append(f"{pad}{name}: {_scalar(data)}")
    return lines


def _comment(text: str | None, indent: int) -> list[str]:
    """``text`` as YAML comment lines at ``indent``."""
    if not text:
        return []
    prefix = " " * indent + "# "
    return textwrap.wrap(" ".join(text.split()), WIDTH - len(prefix), initial_indent=prefix, subsequent_indent=prefix)


def _scalar(value: Any) -> str:
    """A value as one line of YAML (flow style for lists and mappings; a string with line breaks double-quoted)."""
    if isinstance(value, str) and "\n" in value:
        return json.dumps(value, ensure_ascii=False)  # JSON strings are YAML
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, allow_unicode=True).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


# -- jsarag plugins --options NAME ----------------------------------------------------------------------------------

def describe_component(plugins: Plugins, name: str) -> str:
    """Every registered component called ``name`` (of any kind) with its options: type, default, constraints, doc."""
    found = [entry for kind in plugins.registry().values() for entry in kind.values() if entry.name == name]
    if not found:
        known = sorted({n for kind in plugins.registry().values() for n in kind})
        raise PluginError(f"no component named '{name}'; registered: {', '.join(known)}")
    parts = []
    for entry in found:
        summary = _summary(entry.cls)
        head = f"{entry.kind} '{entry.name}': {entry.cls.__module__}.{entry.cls.__name__} (plugin {entry.plugin}, " \
               f"package {entry.package})"
        body = option_lines(entry.cls.Options) or ["  (no options)"]
        parts.append("\n".join([head, *([f"  {summary}"] if summary else []), *body]))
    return "\n\n".join(parts)


def option_lines(options: type[BaseModel], prefix: str = "", indent: int = 2) -> list[str]:
    """The options of a schema, one entry each (``key: type [constraints] = default``, then its doc), nested
    option sections expanded as ``section.key``."""
    lines = []
    for name, info in options.model_fields.items():
        default = info.get_default(call_default_factory=True)
        shown = "required" if default is PydanticUndefined else _scalar(_plain(default))
        bounds = ", ".join(_bound(m) for m in info.metadata if _bound(m))
        lines.append(" " * indent + f"{prefix}{name}: {type_name(info.annotation)}{f' ({bounds})' if bounds else ''}"
                                    f" = {shown}")
        lines += [" " * (indent + 4) + line for line in textwrap.wrap(" ".join((info.description or "").split()),
                                                                      WIDTH - indent - 4)]
        for nested in _sections_in(info.annotation):
            lines += option_lines(nested, f"{prefix}{name}.", indent)
    return lines


def _plain(value: Any) -> Any:
    """A default as plain YAML data."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    return list(value) if isinstance(value, tuple) else value


def _bound(meta: Any) -> str:
    """A numeric constraint of a field (pydantic's Field(gt=...) and the like) as text, else ''."""
    for cls, sign, attribute in ((annotated_types.Gt, ">", "gt"), (annotated_types.Ge, ">=", "ge"),
                                 (annotated_types.Lt, "<", "lt"), (annotated_types.Le, "<=", "le")):
        if isinstance(meta, cls):
            return f"{sign} {getattr(meta, attribute)}"
    return ""


def _sections_in(annotation: Any) -> list[type[BaseModel]]:
    """The option schemas an annotation holds (``LoraOptions | None`` -> [LoraOptions])."""
    args = typing.get_args(annotation) if _is_union(annotation) else (annotation,)
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel) and not issubclass(a, Section)]


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def type_name(annotation: Any) -> str:
    """A field's type as a reader writes it: ``int``, ``str | None``, ``'sum' | 'mean'``, ``list[str]``, ``path``."""
    if annotation is type(None):
        return "null"
    if typing.get_origin(annotation) is typing.Annotated:
        inner = typing.get_args(annotation)[0]
        return "path" if inner is Path else type_name(inner)
    if annotation is Path:
        return "path"
    if _is_union(annotation):
        return " | ".join(type_name(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    args = typing.get_args(annotation)
    if args:
        origin = typing.get_origin(annotation)
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))
