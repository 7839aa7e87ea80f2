"""Tool definitions in the harmony developer message, as the official gpt-oss template renders
them: JSON-schema function parameters as a TypeScript-like `namespace functions { ... }`, and the
texts of the built-in browser and python tools (kept as data in ossgguf/data/)."""

from __future__ import annotations

import json
import re
from importlib.resources import files
from typing import Any

from ossgguf.errors import OssggufError


def tojson(value: Any) -> str:
    # transformers replaces jinja's HTML-escaping tojson with plain json.dumps(ensure_ascii=False).
    return json.dumps(value, ensure_ascii=False)


# -- the template's render_typescript_type / render_tool_namespace, on JSON data --------------------
_UNDEF = object()


def _get(obj: Any, key: str) -> Any:
    """Jinja's `obj.key` on JSON data: anything absent is undefined."""
    return obj[key] if isinstance(obj, dict) and key in obj else _UNDEF


def _truthy(value: Any) -> bool:
    return value is not _UNDEF and bool(value)


def _ts_type(spec: Any) -> str:
    """The template's render_typescript_type, quirks included (they are what the model was trained on)."""
    kind = _get(spec, "type")
    nullable = " | null" if _truthy(_get(spec, "nullable")) else ""
    if kind == "array":
        items = _get(spec, "items")
        if not _truthy(items):
            return "any[]" + nullable
        item_kind = _get(items, "type")
        if item_kind in ("string", "number", "integer", "boolean"):
            return ("number" if item_kind == "integer" else item_kind) + "[]" + nullable
        inner = _ts_type(items)
        return ("any[]" if inner == "object | object" or len(inner) > 50 else inner + "[]") + nullable
    if isinstance(kind, list) and kind:
        return " | ".join(map(str, kind)) if len(kind) > 1 else str(kind[0])
    one_of = _get(spec, "oneOf")
    if _truthy(one_of):
        # The template's object-variant check sets a variable inside a loop, which Jinja scopes to
        # the loop: it never fires, so every variant is listed.
        out = []
        for k, variant in enumerate(one_of):
            out.append(_ts_type(variant))
            if _truthy(_get(variant, "description")):
                out.append("// " + str(variant["description"]))
            if _get(variant, "default") is not _UNDEF:
                out.append("                    // default: " + tojson(variant["default"]))
            if k < len(one_of) - 1:
                out.append(" | \n")
        return "".join(out)
    if kind == "string":
        enum = _get(spec, "enum")
        if _truthy(enum):
            return '"' + '" | "'.join(map(str, enum)) + '"'
        return "string" + nullable
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "object":
        props = _get(spec, "properties")
        if not _truthy(props):
            return "object"
        required = _get(spec, "required")
        required = required if _truthy(required) else []
        fields = [name + ("" if name in required else "?") + ": \n                " + _ts_type(prop)
                  for name, prop in props.items()]
        return "{\n" + ", ".join(fields) + "}"
    return "any"


def _default_text(spec: dict) -> str:
    default = spec["default"]
    if _truthy(_get(spec, "enum")) or _truthy(_get(spec, "oneOf")):
        # The template concatenates these raw, which fails for non-strings: JSON-encode those instead.
        text = default if isinstance(default, str) else tojson(default)
        return (", // default: " if _truthy(_get(spec, "enum")) else "// default: ") + text
    return ", // default: " + tojson(default)


def tool_namespace(tools: list[dict]) -> str:
    out = ["## functions\n\n", "namespace functions {\n\n"]
    for tool in tools:
        fn = tool["function"]
        if fn.get("description"):  # the template fails without one; the comment line is just left out
            out.append("// " + str(fn["description"]) + "\n")
        out.append("type " + fn["name"] + " = ")
        params = fn.get("parameters")
        if _truthy(_get(params, "properties")):
            required = params.get("required") or []
            out.append("(_: {\n")
            for name, spec in params["properties"].items():
                if _truthy(_get(spec, "description")):
                    out.append("// " + str(spec["description"]) + "\n")
                out.append(name + ("" if name in required else "?") + ": " + _ts_type(spec))
                if _get(spec, "default") is not _UNDEF:
                    out.append(_default_text(spec))
                out.append(",\n")
            out.append("}) => any;\n\n")
        else:
            out.append("() => any;\n\n")
    out.append("} // namespace functions")
    return "".join(out)


def builtin_tool_text(name: str) -> str:
    """The system message's section for gpt-oss's own `browser` or `python` tool, as the template writes it
    (ossgguf/data/harmony_NAME.txt)."""
    return (files("ossgguf") / "data" / f"harmony_{name}.txt").read_text(encoding="utf-8")


# -- checks: what the renderer reads must have the right JSON types ---------------------------------
# OpenAI's rule for function names; it also keeps the harmony recipient `functions.NAME` one word.
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ToolSchemaError(OssggufError):
    """A tool definition that cannot be rendered; `param` names the field, as OpenAI's errors do."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _check_schema(schema: Any, where: str) -> None:
    if not isinstance(schema, dict):
        raise ToolSchemaError(f"Invalid schema at {where}: expected a JSON object, got {type(schema).__name__}.",
                              where)
    kind = schema.get("type")
    if kind is not None and not (isinstance(kind, str) or (isinstance(kind, list) and
                                                            all(isinstance(k, str) for k in kind))):
        raise ToolSchemaError(f"Invalid schema at {where}: 'type' must be a string or a list of strings.", where)
    props = schema.get("properties")
    if props is not None:
        if not isinstance(props, dict):
            raise ToolSchemaError(f"Invalid schema at {where}: 'properties' must be an object.", where)
        for name, sub in props.items():
            _check_schema(sub, f"{where}.properties.{name}")
    required = schema.get("required")
    if required is not None and not (isinstance(required, list) and all(isinstance(r, str) for r in required)):
        raise ToolSchemaError(f"Invalid schema at {where}: 'required' must be a list of strings.", where)
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            _check_schema(schema[key], f"{where}.{key}")
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            if not isinstance(schema[key], list):
                raise ToolSchemaError(f"Invalid schema at {where}: '{key}' must be a list of schemas.", where)
            for k, sub in enumerate(schema[key]):
                _check_schema(sub, f"{where}.{key}[{k}]")


def check_tools(out: list[dict], param: str = "tools") -> None:
    """Function tools (in the chat form) with usable names, no duplicates and readable schemas."""
    seen: set[str] = set()
    for k, tool in enumerate(out):
        fn = tool["function"]
        where = f"{param}[{k}].function"
        if not _TOOL_NAME.fullmatch(fn["name"]):
            raise ToolSchemaError(f"Invalid '{where}.name': {fn['name']!r}. Use letters, digits, underscores and "
                                  "dashes (at most 64).", f"{where}.name")
        if fn["name"] in seen:
            raise ToolSchemaError(f"Duplicate tool name {fn['name']!r} in '{param}'.", f"{where}.name")
        seen.add(fn["name"])
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise ToolSchemaError(f"'{where}.description' must be a string.", f"{where}.description")
        params = fn.get("parameters")
        if params is not None:
            _check_schema(params, f"{where}.parameters")
            if params.get("type", "object") != "object":
                raise ToolSchemaError(f"Invalid schema for function {fn['name']!r}: schema must be a JSON Schema "
                                      f"of 'type: \"object\"', got 'type: {params.get('type')!r}'.", f"{where}.parameters")
