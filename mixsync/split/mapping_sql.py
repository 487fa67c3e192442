"""The SQL a Split mapping compiles to: which events go, under which eventTypeId, and each event's payload.

Everything here is SQL text over mixpanel.events rows; DuckDB maps the events, in bulk. The mapping's own values
(names, patterns, property paths) go in through `mixsync.warehouse.sql.literal`.
"""

from __future__ import annotations

import json

from mixsync.split.mapping import (
    EVENT_TYPE_ID,
    MAX_KEY_CHARS,
    MAX_PROPERTIES,
    MAX_PROPERTIES_BYTES,
    Mapping,
    TrafficTypeRule,
)
from mixsync.warehouse.sql import literal

# Objects nested deeper than this are sent as JSON strings: Mixpanel itself ingests at most 3 levels.
MAX_FLATTEN_DEPTH = 8
# A properties text this short cannot exceed Split's 32 KB by the SDK's estimate (at most 8 bytes per character).
VERBATIM_MAX_CHARS = MAX_PROPERTIES_BYTES // 8
# Why an event is not sent: split.events_rejected.reason.
REJECT_UNUSABLE_NAME = "event name has no character Split accepts: add a rename to the mapping file"
REJECT_MISSING_KEY = "missing key"
REJECT_LONG_KEY = f"key longer than {MAX_KEY_CHARS} characters"
REJECT_FUTURE = "timestamp in the future"
REJECT_TOO_OLD = "older than timestamps.max_age_days"


def _json_pointer(path: str) -> str:
    return "/" + "/".join(part.replace("~", "~0").replace("/", "~1") for part in path.split("."))


def _property_text(column: str, name: str) -> str:
    """A property's text: the literal top-level key first, else the dotted path through nested objects."""
    top_level = f"{column}->>{literal('/' + name.replace('~', '~0').replace('/', '~1'))}"
    if "." not in name:
        return top_level
    return f"coalesce({top_level}, {column}->>{literal(_json_pointer(name))})"


def _matches_any(column: str, patterns: tuple[str, ...]) -> str:
    if not patterns:
        return "false"
    if "*" in patterns:
        return "true"
    return "(" + " OR ".join(f"{column} GLOB {literal(p)}" for p in patterns) + ")"


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
        f"({literal(t.name)}, {_matches_any('n.event', t.include)} AND NOT {_matches_any('n.event', t.exclude)})"
        for t in mapping.traffic_types)
    renames = ("SELECT * FROM (VALUES " + ", ".join(f"({literal(a)}, {literal(b)})" for a, b in mapping.renames.items())
               + ") r(event, renamed)") if mapping.renames else "SELECT NULL::VARCHAR AS event, NULL::VARCHAR AS renamed WHERE false"
    selected = f"{_matches_any('n.event', mapping.include)} AND NOT {_matches_any('n.event', mapping.exclude)}"
    return f"""
        SELECT t.traffic_type, n.event, ({selected}) AND t.selected AS selected,
               CASE WHEN r.renamed IS NOT NULL THEN r.renamed
                    WHEN regexp_full_match(n.event, {literal(EVENT_TYPE_ID.pattern)}) THEN n.event
                    ELSE {_normalized_name('n.event')} END AS event_type_id,
               CASE WHEN r.renamed IS NOT NULL THEN 'mapping file'
                    WHEN NOT regexp_full_match(n.event, {literal(EVENT_TYPE_ID.pattern)}) THEN 'normalized' END AS rename_rule
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
            alternatives += [f"e.key GLOB {literal(p)}", f"e.key GLOB {literal(p + '.*')}"]
        clauses.append("(" + " OR ".join(alternatives) + ")")
    if mapping.property_exclude:
        alternatives = []
        for p in mapping.property_exclude:
            alternatives += [f"e.key GLOB {literal(p)}", f"e.key GLOB {literal(p + '.*')}"]
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
    keys = " ".join(f"WHEN {literal(t.name)} THEN {_key_expr(t)}" for t in mapping.traffic_types)
    default_value = _value_expr(mapping.value_properties)
    if mapping.value_by_event:
        branches = " ".join(f"WHEN {literal(name)} THEN {_value_expr(c)}" for name, c in mapping.value_by_event.items())
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
    max_age = (f"WHEN time < $now - INTERVAL {int(mapping.max_age_days)} DAY THEN {literal(REJECT_TOO_OLD)}"
               if mapping.max_age_days else "")
    key_names = " ".join(f"WHEN {literal(t.name)} THEN {literal(t.key)}" for t in mapping.traffic_types)
    levels = [f"""l0 AS (
        SELECT n.traffic_type || ':' || md5(json_array(s.event, s.distinct_id, epoch_ms(s.time), s.insert_id)::VARCHAR) AS id,
               s.day, n.traffic_type, s.event, n.event_type_id, s.time, epoch_ms(s.time) AS timestamp_ms,
               CASE n.traffic_type {keys} END AS key,
               {value} AS value,
               s.properties
        FROM ({source_sql}) s JOIN {names_table} n ON n.event = s.event AND n.selected)""",
              f"""l1 AS (
        SELECT * EXCLUDE (time),
               CASE WHEN event_type_id IS NULL THEN {literal(REJECT_UNUSABLE_NAME)}
                    WHEN key IS NULL OR key = '' THEN {literal(REJECT_MISSING_KEY + ' (')} || CASE traffic_type {key_names} END || ')'
                    WHEN length(key) > {MAX_KEY_CHARS} THEN {literal(REJECT_LONG_KEY)}
                    WHEN time > $now THEN {literal(REJECT_FUTURE)}
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
    environment_field = f"',\"environmentName\":' || {literal(json.dumps(environment, ensure_ascii=False))} || " if environment else ""
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

