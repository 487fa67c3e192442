"""The Mixpanel → Split mapping file: read and validated with line numbers. `mapping_sql.py` compiles it to SQL."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The strictest of Split's three published rules (docs prose, docs regex, SDK regex): it passes all of them.
EVENT_TYPE_ID = re.compile(r"^[A-Za-z0-9][-_.A-Za-z0-9]{0,62}$")
TRAFFIC_TYPE = re.compile(r"^[a-z0-9][-_a-z0-9]*$")
# Split's limits on an event, which the compiled SQL enforces (mapping_sql.py).
MAX_KEY_CHARS = 250
MAX_PROPERTIES = 300
MAX_PROPERTIES_BYTES = 32 * 1024


class MappingError(ValueError):
    """The mapping file is invalid; the message names the file and the line."""


@dataclass(frozen=True)
class TrafficTypeRule:
    """Events sent with one traffic type, and which field is their key."""

    name: str
    key: str = "distinct_id"  # "distinct_id" or "properties.<name>"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class Mapping:
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    renames: dict[str, str] = field(default_factory=dict)
    traffic_types: tuple[TrafficTypeRule, ...] = (TrafficTypeRule("user"),)
    value_properties: tuple[str, ...] = ()
    value_by_event: dict[str, tuple[str, ...]] = field(default_factory=dict)
    property_include: tuple[str, ...] = ("*",)
    property_exclude: tuple[str, ...] = ()
    drop_dollar_properties: bool = False
    max_age_days: int | None = None
    source: str = "defaults"

    @property
    def filters_properties(self) -> bool:
        return self.drop_dollar_properties or self.property_exclude != () or self.property_include != ("*",)


_TOP_KEYS = {"events", "traffic_types", "value", "properties", "timestamps"}


class _Reader:
    """Walks a YAML node tree; every error names the file and the line of the node at fault."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, node: yaml.Node | None, message: str) -> MappingError:
        where = f"{self.source}, line {node.start_mark.line + 1}" if node is not None else self.source
        return MappingError(f"{where}: {message}")

    def mapping(self, node: yaml.Node, what: str, allowed: set[str]) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return {}
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping (key: value lines)")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.string(key_node, f"a key of {what}")
            if allowed and key not in allowed:
                raise self.fail(key_node, f"unknown setting {what}.{key}; expected one of {', '.join(sorted(allowed))}")
            if key in out:
                raise self.fail(key_node, f"{what}.{key} is given twice")
            out[key] = (key_node, value_node)
        return out

    def string(self, node: yaml.Node, what: str) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.tag == "tag:yaml.org,2002:null":
            raise self.fail(node, f"{what} must be a string")
        if node.value == "":
            raise self.fail(node, f"{what} must not be empty")
        return node.value

    def strings(self, node: yaml.Node, what: str) -> tuple[str, ...]:
        if isinstance(node, yaml.ScalarNode):
            return (self.string(node, what),)
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, f"{what} must be a list of strings")
        return tuple(self.string(item, f"an entry of {what}") for item in node.value)

    def boolean(self, node: yaml.Node, what: str) -> bool:
        if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:bool":
            raise self.fail(node, f"{what} must be true or false")
        return node.value.lower() in ("true", "yes", "on")

    def whole_number(self, node: yaml.Node, what: str, allow_null: bool = False) -> int | None:
        if allow_null and isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return None
        if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:int" or int(node.value) < 1:
            raise self.fail(node, f"{what} must be a whole number of at least 1" + (" or null" if allow_null else ""))
        return int(node.value)


def _key_field(reader: _Reader, node: yaml.Node, what: str) -> str:
    key = reader.string(node, what)
    if key == "distinct_id" or (key.startswith("properties.") and len(key) > len("properties.")):
        return key
    raise reader.fail(node, f"{what}={key!r}: use distinct_id or properties.<name>")


def _patterns(reader: _Reader, node: yaml.Node, what: str) -> tuple[str, ...]:
    values = reader.strings(node, what)
    for value in values:
        if value.count("[") != value.count("]"):
            raise reader.fail(node, f"{what}: {value!r} has an unbalanced [ ] in its pattern")
    return values


def parse_mapping(text: str, source: str = "mapping file", default_traffic_type: str = "user") -> Mapping:
    """Parse and validate a mapping file's text. Raises MappingError naming the line."""
    reader = _Reader(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f", line {mark.line + 1}" if mark else ""
        raise MappingError(f"{source}{line}: not valid YAML: {exc.problem or exc}") from None
    if root is None:
        return Mapping(traffic_types=(TrafficTypeRule(default_traffic_type),), source=source)
    top = reader.mapping(root, "the mapping file", _TOP_KEYS)
    options: dict = {"source": source}

    if "events" in top:
        events = reader.mapping(top["events"][1], "events", {"include", "exclude", "rename"})
        if "include" in events:
            options["include"] = _patterns(reader, events["include"][1], "events.include")
        if "exclude" in events:
            options["exclude"] = _patterns(reader, events["exclude"][1], "events.exclude")
        if "rename" in events:
            renames = {}
            for name, (_name_node, target_node) in reader.mapping(events["rename"][1], "events.rename", set()).items():
                target = reader.string(target_node, f"events.rename.{name}")
                if not EVENT_TYPE_ID.match(target):
                    raise reader.fail(target_node, f"events.rename: {target!r} is not a valid Split eventTypeId "
                                                   "(a letter or digit, then up to 62 of A-Z a-z 0-9 - _ .)")
                renames[name] = target
            options["renames"] = renames

    if "traffic_types" in top:
        node = top["traffic_types"][1]
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise reader.fail(node, "traffic_types must be a non-empty list of {name, key} entries")
        rules, seen = [], set()
        for item in node.value:
            entry = reader.mapping(item, "traffic_types[]", {"name", "key", "events"})
            if "name" not in entry:
                raise reader.fail(item, "a traffic_types entry needs a name")
            name_node = entry["name"][1]
            name = reader.string(name_node, "traffic_types[].name")
            if not TRAFFIC_TYPE.match(name):
                raise reader.fail(name_node, f"traffic type {name!r} must be lowercase letters, digits, - or _ "
                                             "(Split's traffic type names are lowercase)")
            if name in seen:
                raise reader.fail(name_node, f"traffic type {name!r} is listed twice")
            seen.add(name)
            rule: dict[str, Any] = {"name": name}
            if "key" in entry:
                rule["key"] = _key_field(reader, entry["key"][1], f"traffic_types[{name}].key")
            if "events" in entry:
                ev = reader.mapping(entry["events"][1], f"traffic_types[{name}].events", {"include", "exclude"})
                if "include" in ev:
                    rule["include"] = _patterns(reader, ev["include"][1], f"traffic_types[{name}].events.include")
                if "exclude" in ev:
                    rule["exclude"] = _patterns(reader, ev["exclude"][1], f"traffic_types[{name}].events.exclude")
            rules.append(TrafficTypeRule(**rule))
        options["traffic_types"] = tuple(rules)
    else:
        options["traffic_types"] = (TrafficTypeRule(default_traffic_type),)

    if "value" in top:
        value = reader.mapping(top["value"][1], "value", {"properties", "by_event"})
        if "properties" in value:
            options["value_properties"] = reader.strings(value["properties"][1], "value.properties")
        if "by_event" in value:
            options["value_by_event"] = {
                name: reader.strings(v, f"value.by_event.{name}")
                for name, (_, v) in reader.mapping(value["by_event"][1], "value.by_event", set()).items()}

    if "properties" in top:
        props = reader.mapping(top["properties"][1], "properties", {"include", "exclude", "drop_dollar"})
        if "include" in props:
            options["property_include"] = _patterns(reader, props["include"][1], "properties.include")
        if "exclude" in props:
            options["property_exclude"] = _patterns(reader, props["exclude"][1], "properties.exclude")
        if "drop_dollar" in props:
            options["drop_dollar_properties"] = reader.boolean(props["drop_dollar"][1], "properties.drop_dollar")

    if "timestamps" in top:
        stamps = reader.mapping(top["timestamps"][1], "timestamps", {"max_age_days"})
        if "max_age_days" in stamps:
            options["max_age_days"] = reader.whole_number(stamps["max_age_days"][1], "timestamps.max_age_days",
                                                          allow_null=True)
    return Mapping(**options)


def load_mapping(path: Path | None, default_traffic_type: str = "user") -> Mapping:
    """The mapping in `path`, or the defaults when no file is configured."""
    if path is None:
        return Mapping(traffic_types=(TrafficTypeRule(default_traffic_type),))
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MappingError(f"SPLIT_MAPPING_FILE={path}: no such file") from None
    except UnicodeDecodeError:
        raise MappingError(f"SPLIT_MAPPING_FILE={path}: not UTF-8 text") from None
    return parse_mapping(text, str(path), default_traffic_type)
