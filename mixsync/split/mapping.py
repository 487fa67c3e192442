"""The Mixpanel → Split mapping: the mapping file, validated with line numbers, and the SQL that applies it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The strictest of Split's three published rules (docs prose, docs regex, SDK regex): it passes all of them.
EVENT_TYPE_ID = re.compile(r"^[A-Za-z0-9][-_.A-Za-z0-9]{0,62}$")
EVENT_TYPE_ID_SQL = "^[A-Za-z0-9][-_.A-Za-z0-9]{0,62}$"
TRAFFIC_TYPE = re.compile(r"^[a-z0-9][-_a-z0-9]*$")
MAX_KEY_CHARS = 250
MAX_PROPERTIES = 300
MAX_PROPERTIES_BYTES = 32 * 1024
# Objects nested deeper than this are sent as JSON strings: Mixpanel itself ingests at most 3 levels.
MAX_FLATTEN_DEPTH = 8
# A properties text this short cannot exceed Split's 32 KB by the SDK's estimate (at most 8 bytes per character).
VERBATIM_MAX_CHARS = MAX_PROPERTIES_BYTES // 8

REJECT_UNUSABLE_NAME = "event name has no character Split accepts: add a rename to the mapping file"
REJECT_MISSING_KEY = "missing key"
REJECT_LONG_KEY = f"key longer than {MAX_KEY_CHARS} characters"
REJECT_FUTURE = "timestamp in the future"
REJECT_TOO_OLD = "older than timestamps.max_age_days"


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


# ---------------------------------------------------------------- the file

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


# ---------------------------------------------------------------- the SQL

def sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _json_pointer(path: str) -> str:
    return "/" + "/".join(part.replace("~", "~0").replace("/", "~1") for part in path.split("."))


def _property_text(column: str, name: str) -> str:
    """A property's text: the literal top-level key first, else the dotted path through nested objects."""
    literal = f"{column}->>{sql_string('/' + name.replace('~', '~0').replace('/', '~1'))}"
    if "." not in name:
        return literal
    return f"coalesce({literal}, {column}->>{sql_string(_json_pointer(name))})"


def _matches_any(column: str, patterns: tuple[str, ...]) -> str:
    if not patterns:
        return "false"
    if "*" in patterns:
        return "true"
    return "(" + " OR ".join(f"{column} GLOB {sql_string(p)}" for p in patterns) + ")"


def _normalized_name(column: str) -> str:
    # Accents dropped, runs of anything else become one `_`, a leading `$`/`_`/`-`/`.` goes (so `$identify`
    # becomes `identify`), and a name past 63 characters keeps 54 of them plus a hash of the original.
    base = (f"rtrim(regexp_replace(regexp_replace(strip_accents({column}), '[^-_.A-Za-z0-9]+', '_', 'g'), "
            "'^[-_.]+', ''), '_')")
    return (f"CASE WHEN {base} = '' THEN NULL WHEN length({base}) > 63 "
            f"THEN left({base}, 54) || '_' || left(md5({column}), 8) ELSE {base} END")


def names_sql(mapping: Mapping, distinct_events_sql: str) -> str:
    """Per (traffic type, Mixpanel event name): whether it goes, its eventTypeId and why it was renamed.

    Runs over distinct names only, so it costs nothing per event."""
    traffic = ", ".join(
        f"({sql_string(t.name)}, {_matches_any('n.event', t.include)} AND NOT {_matches_any('n.event', t.exclude)})"
        for t in mapping.traffic_types)
    renames = ("SELECT * FROM (VALUES " + ", ".join(f"({sql_string(a)}, {sql_string(b)})" for a, b in mapping.renames.items())
               + ") r(event, renamed)") if mapping.renames else "SELECT NULL::VARCHAR AS event, NULL::VARCHAR AS renamed WHERE false"
    selected = f"{_matches_any('n.event', mapping.include)} AND NOT {_matches_any('n.event', mapping.exclude)}"
    return f"""
        SELECT t.traffic_type, n.event, ({selected}) AND t.selected AS selected,
               CASE WHEN r.renamed IS NOT NULL THEN r.renamed
                    WHEN regexp_full_match(n.event, '{EVENT_TYPE_ID_SQL}') THEN n.event
                    ELSE {_normalized_name('n.event')} END AS event_type_id,
               CASE WHEN r.renamed IS NOT NULL THEN 'mapping file'
                    WHEN NOT regexp_full_match(n.event, '{EVENT_TYPE_ID_SQL}') THEN 'normalized' END AS rename_rule
        FROM ({distinct_events_sql}) n
        CROSS JOIN (VALUES {traffic}) t(traffic_type, selected)
        LEFT JOIN ({renames}) r ON r.event = n.event"""


def _key_expr(rule: TrafficTypeRule) -> str:
    if rule.key == "distinct_id":
        return "s.distinct_id"
    return _property_text("s.properties", rule.key.removeprefix("properties."))


def _value_expr(candidates: tuple[str, ...]) -> str:
    if not candidates:
        return "NULL::DOUBLE"
    # Numbers and numeric strings count; booleans, objects and NaN/infinity do not (Split wants a number or null).
    parts = [f"TRY_CAST({_property_text('s.properties', c)} AS DOUBLE)" for c in candidates]
    parts = [f"CASE WHEN isfinite({p}) THEN {p} END" for p in parts]
    return parts[0] if len(parts) == 1 else f"coalesce({', '.join(parts)})"


def _entry_size(entry: str) -> str:
    # Split's SDKs estimate 2 bytes per character of keys and strings, 8 per number, 4 per boolean, 0 for null.
    return (f"2 * length({entry}.key) + CASE json_type({entry}.value) WHEN 'VARCHAR' THEN 2 * length({entry}.value->>'$') "
            f"WHEN 'BOOLEAN' THEN 4 WHEN 'NULL' THEN 0 WHEN 'ARRAY' THEN 2 * length({entry}.value::VARCHAR) "
            f"WHEN 'OBJECT' THEN 2 * length({entry}.value::VARCHAR) WHEN NULL THEN 0 ELSE 8 END")


def _entries_of(json_expr: str) -> str:
    # One parse per object; TRY_CAST is NULL for an object with duplicate keys, which then goes key by key.
    return (f"coalesce(map_entries(TRY_CAST({json_expr} AS MAP(VARCHAR, JSON))), "
            f"list_transform(json_keys({json_expr}), lambda k: {{'key': k, 'value': json_extract({json_expr}, "
            f"'/' || replace(replace(k, '~', '~0'), '/', '~1'))}}))")


def _expand_once(column: str) -> str:
    return f"""CASE WHEN list_bool_or(list_transform({column}, lambda e: json_type(e.value) = 'OBJECT')) THEN
        flatten(list_transform({column}, lambda e: CASE WHEN json_type(e.value) = 'OBJECT'
            THEN list_transform({_entries_of('e.value')}, lambda c: {{'key': e.key || '.' || c.key, 'value': c.value}})
            ELSE [e] END))
        ELSE {column} END"""


def _key_filter(mapping: Mapping) -> str | None:
    clauses = []
    if mapping.property_include != ("*",):
        alternatives = []
        for p in mapping.property_include:
            alternatives += [f"e.key GLOB {sql_string(p)}", f"e.key GLOB {sql_string(p + '.*')}"]
        clauses.append("(" + " OR ".join(alternatives) + ")")
    if mapping.property_exclude:
        alternatives = []
        for p in mapping.property_exclude:
            alternatives += [f"e.key GLOB {sql_string(p)}", f"e.key GLOB {sql_string(p + '.*')}"]
        clauses.append("NOT (" + " OR ".join(alternatives) + ")")
    return " AND ".join(clauses) if clauses else None


def stage_sql(mapping: Mapping, source_sql: str, names_table: str, environment: str | None) -> str:
    """One row per (selected event, traffic type): its outbox id, payload, or reject reason.

    `source_sql` yields mixpanel.events rows; `$now` is the instant future timestamps are judged against.
    Properties are flattened to dotted keys with list functions on each event's parsed object, level by level
    (arrays become JSON strings), filtered, de-duplicated by key, sorted, and trimmed to Split's limits. An
    event without nesting whose properties are short enough is passed through as it is, when no property
    rule applies: that is most events, and it skips all the list work.
    """
    keys = " ".join(f"WHEN {sql_string(t.name)} THEN {_key_expr(t)}" for t in mapping.traffic_types)
    default_value = _value_expr(mapping.value_properties)
    if mapping.value_by_event:
        branches = " ".join(f"WHEN {sql_string(name)} THEN {_value_expr(c)}" for name, c in mapping.value_by_event.items())
        value = f"CASE s.event {branches} ELSE {default_value} END"
    else:
        value = default_value
    verbatim = ("false" if mapping.filters_properties else
                f"(length(s.properties::VARCHAR) <= {VERBATIM_MAX_CHARS} "
                "AND NOT contains(substr(s.properties::VARCHAR, 2), '{') "
                "AND NOT contains(substr(s.properties::VARCHAR, 2), '[') "
                f"AND json_array_length(json_keys(s.properties)::JSON) <= {MAX_PROPERTIES})")
    level0 = _entries_of("s.properties")
    if mapping.drop_dollar_properties:
        level0 = f"list_filter({level0}, lambda e: NOT starts_with(e.key, '$'))"
    max_age = (f"WHEN time < $now - INTERVAL {int(mapping.max_age_days)} DAY THEN '{REJECT_TOO_OLD}'"
               if mapping.max_age_days else "")
    key_names = " ".join(f"WHEN {sql_string(t.name)} THEN {sql_string(t.key)}" for t in mapping.traffic_types)
    levels = [f"""l0 AS (
        SELECT n.traffic_type || ':' || md5(json_array(s.event, s.distinct_id, epoch_ms(s.time), s.insert_id)::VARCHAR) AS id,
               s.day, n.traffic_type, s.event, n.event_type_id, s.time, epoch_ms(s.time) AS timestamp_ms,
               CASE n.traffic_type {keys} END AS key,
               {value} AS value,
               s.properties
        FROM ({source_sql}) s JOIN {names_table} n ON n.event = s.event AND n.selected)""",
              f"""l1 AS (
        SELECT * EXCLUDE (time),
               CASE WHEN event_type_id IS NULL THEN '{REJECT_UNUSABLE_NAME}'
                    WHEN key IS NULL OR key = '' THEN '{REJECT_MISSING_KEY} (' || CASE traffic_type {key_names} END || ')'
                    WHEN length(key) > {MAX_KEY_CHARS} THEN '{REJECT_LONG_KEY}'
                    WHEN time > $now THEN '{REJECT_FUTURE}'
                    {max_age}
               END AS reject_reason
        FROM l0 s)""",
              f"""e0 AS (
        SELECT * EXCLUDE (properties),
               CASE WHEN reject_reason IS NULL AND {verbatim} THEN s.properties::VARCHAR END AS verbatim_text,
               CASE WHEN reject_reason IS NULL AND NOT {verbatim} THEN {level0} END AS entries
        FROM l1 s)"""]
    for depth in range(1, MAX_FLATTEN_DEPTH + 1):
        levels.append(f"e{depth} AS (SELECT * REPLACE ({_expand_once('entries')} AS entries) FROM e{depth - 1})")
    last = f"e{MAX_FLATTEN_DEPTH}"
    key_filter = _key_filter(mapping)
    filtered = f"list_filter(entries, lambda e: {key_filter})" if key_filter else "entries"
    levels.append(f"""f0 AS (SELECT * REPLACE (list_transform(list_sort({filtered}), lambda e: {{
                    'key': e.key,
                    'text': CASE WHEN json_type(e.value) IN ('ARRAY', 'OBJECT') THEN to_json(e.value::VARCHAR)::VARCHAR
                                 ELSE coalesce(e.value::VARCHAR, 'null') END,
                    'size': {_entry_size('e')}}}) AS entries) FROM {last})""")
    # A flattened `a.b` may collide with a literal key "a.b": the first in sorted order wins.
    levels.append("""f1 AS (SELECT * REPLACE (list_filter(entries, lambda e, i: i = 1 OR entries[i - 1].key <> e.key) AS entries),
                         len(entries) AS entries_before FROM f0)""")
    levels.append(f"""f2 AS (SELECT * REPLACE (CASE WHEN len(entries) > {MAX_PROPERTIES} THEN entries[1:{MAX_PROPERTIES}] ELSE entries END AS entries) FROM f1)""")
    levels.append(f"""f3 AS (SELECT * REPLACE (CASE WHEN list_sum(list_transform(entries, lambda e: e.size)) > {MAX_PROPERTIES_BYTES}
                         THEN list_filter(entries, lambda e, i: list_sum(list_transform(entries[1:i], lambda x: x.size)) <= {MAX_PROPERTIES_BYTES})
                         ELSE entries END AS entries) FROM f2)""")
    environment_field = f"',\"environmentName\":' || {sql_string_json(environment)} || " if environment else ""
    return "WITH " + ",\n".join(levels) + f"""
        SELECT id, day, traffic_type, event, event_type_id, key, timestamp_ms, reject_reason,
               entries IS NOT NULL AND len(entries) < entries_before AS properties_trimmed,
               CASE WHEN reject_reason IS NULL THEN
                   '{{"eventTypeId":' || to_json(event_type_id)::VARCHAR
                   || ',"trafficTypeName":' || to_json(traffic_type)::VARCHAR
                   || ',"key":' || to_json(key)::VARCHAR
                   || ',"timestamp":' || timestamp_ms::VARCHAR
                   || ',"value":' || coalesce(to_json(value)::VARCHAR, 'null')
                   || {environment_field}',"properties":'
                   || coalesce(verbatim_text, '{{' || array_to_string(list_transform(entries, lambda e: to_json(e.key)::VARCHAR || ':' || e.text), ',') || '}}')
                   || '}}' END AS payload
        FROM f3"""


def sql_string_json(value: str) -> str:
    """A SQL literal holding `value` as a JSON string."""
    return sql_string(json.dumps(value, ensure_ascii=False))
