"""The experiments file (MIXSYNC_EXPERIMENTS_FILE): which splits to analyse and how, validated with line numbers."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mixsync.settings import _env

METRIC_TYPES = ("conversion", "count", "sum")
METRIC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
DEFAULT_WINDOW_DAYS = 7
MAX_WINDOW_DAYS = 366


class ExperimentsFileError(ValueError):
    """The experiments file is invalid; the message names the file and the line."""


@dataclass(frozen=True)
class Metric:
    name: str
    event: str
    type: str                       # conversion | count | sum
    property: str | None = None     # the numeric property summed, for `sum`


@dataclass(frozen=True)
class Experiment:
    split: str
    control: str
    environment_id: str | None = None
    weights: dict[str, float] | None = None   # expected traffic shares, normalised to sum to 1; None: equal
    window_days: int = DEFAULT_WINDOW_DAYS
    metrics: tuple[Metric, ...] = ()
    line: int = 0                               # where the experiment starts in the file, for later errors


@dataclass(frozen=True)
class ExperimentsSettings:
    experiments: tuple[Experiment, ...] = ()
    source: str | None = None                   # the file, or None when MIXSYNC_EXPERIMENTS_FILE is not set
    chart_dir: Path | None = None               # MIXSYNC_EXPERIMENTS_CHART_DIR; None: beside the warehouse file
    by_split: dict[str, Experiment] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_split", {e.split: e for e in self.experiments})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ExperimentsSettings:
        environ = os.environ if environ is None else environ
        chart_dir = _env(environ, "MIXSYNC_EXPERIMENTS_CHART_DIR")
        chart = Path(chart_dir).expanduser().absolute() if chart_dir else None
        path = _env(environ, "MIXSYNC_EXPERIMENTS_FILE")
        if path is None:
            return cls(chart_dir=chart)
        return cls(load_experiments(Path(path).expanduser()), source=str(path), chart_dir=chart)


class _Reader:
    """Walks a YAML node tree; every error names the file and the line of the node at fault."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, node: yaml.Node | None, message: str) -> ExperimentsFileError:
        where = f"{self.source}, line {node.start_mark.line + 1}" if node is not None else self.source
        return ExperimentsFileError(f"{where}: {message}")

    @staticmethod
    def is_null(node: yaml.Node) -> bool:
        return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"

    def mapping(self, node: yaml.Node, what: str, allowed: set[str] | None) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping (key: value)")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.text(key_node, f"a key of {what}")
            if allowed is not None and key not in allowed:
                raise self.fail(key_node, f"unknown setting {key!r} in {what}; expected one of {', '.join(sorted(allowed))}")
            if key in out:
                raise self.fail(key_node, f"{key!r} is given twice in {what}")
            out[key] = (key_node, value_node)
        return out

    def sequence(self, node: yaml.Node, what: str) -> list[yaml.Node]:
        if self.is_null(node):
            return []
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(node, f"{what} must be a list")
        return list(node.value)

    def text(self, node: yaml.Node, what: str) -> str:
        # The scalar as written: an unquoted `off` is the treatment name "off", not YAML's boolean false.
        if not isinstance(node, yaml.ScalarNode) or self.is_null(node):
            raise self.fail(node, f"{what} must be a string")
        if node.value.strip() == "":
            raise self.fail(node, f"{what} must not be empty")
        return node.value

    def whole_number(self, node: yaml.Node, what: str, minimum: int, maximum: int) -> int:
        if not isinstance(node, yaml.ScalarNode) or node.tag != "tag:yaml.org,2002:int" \
                or not minimum <= int(node.value) <= maximum:
            raise self.fail(node, f"{what} must be a whole number between {minimum} and {maximum}")
        return int(node.value)

    def positive_number(self, node: yaml.Node, what: str) -> float:
        if isinstance(node, yaml.ScalarNode) and node.tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
            try:
                number = float(node.value.replace("_", ""))
            except ValueError:
                number = math.nan
            if math.isfinite(number) and number > 0:
                return number
        raise self.fail(node, f"{what} must be a number greater than 0")


_EXPERIMENT_KEYS = {"split", "environment_id", "control", "weights", "window_days", "metrics"}
_METRIC_KEYS = {"name", "event", "type", "property"}


def _metric(reader: _Reader, node: yaml.Node, split: str) -> Metric:
    fields = reader.mapping(node, f"a metric of {split}", _METRIC_KEYS)
    for required in ("name", "event", "type"):
        if required not in fields:
            raise reader.fail(node, f"a metric of {split} needs {required!r}")
    name = reader.text(fields["name"][1], "metric name")
    if not METRIC_NAME.fullmatch(name):
        raise reader.fail(fields["name"][1], f"metric name {name!r} must be letters, digits and _ (at most 63), "
                                             "not starting with a digit")
    metric_type = reader.text(fields["type"][1], f"type of metric {name}")
    if metric_type not in METRIC_TYPES:
        raise reader.fail(fields["type"][1], f"type of metric {name} is {metric_type!r}; expected one of "
                                             f"{', '.join(METRIC_TYPES)}")
    prop = reader.text(fields["property"][1], f"property of metric {name}") if "property" in fields else None
    if metric_type == "sum" and prop is None:
        raise reader.fail(node, f"metric {name} is a sum: name the numeric event property to sum (property: ...)")
    if metric_type != "sum" and prop is not None:
        raise reader.fail(fields["property"][0], f"metric {name} is a {metric_type}: property applies only to sum")
    return Metric(name, reader.text(fields["event"][1], f"event of metric {name}"), metric_type, prop)


def _experiment(reader: _Reader, node: yaml.Node) -> Experiment:
    fields = reader.mapping(node, "an experiment", _EXPERIMENT_KEYS)
    for required in ("split", "control"):
        if required not in fields:
            raise reader.fail(node, f"an experiment needs {required!r}")
    split = reader.text(fields["split"][1], "split")
    control = reader.text(fields["control"][1], f"control of {split}")
    environment = reader.text(fields["environment_id"][1], f"environment_id of {split}") \
        if "environment_id" in fields else None
    weights = None
    if "weights" in fields:
        pairs = reader.mapping(fields["weights"][1], f"weights of {split}", None)
        raw = {treatment: reader.positive_number(value, f"the weight of {treatment!r} in {split}")
               for treatment, (_, value) in pairs.items()}
        if len(raw) < 2:
            raise reader.fail(fields["weights"][1], f"weights of {split} need at least two treatments")
        if control not in raw:
            raise reader.fail(fields["weights"][1], f"weights of {split} have no weight for the control {control!r}")
        total = sum(raw.values())
        weights = {treatment: weight / total for treatment, weight in raw.items()}
    window = reader.whole_number(fields["window_days"][1], f"window_days of {split}", 1, MAX_WINDOW_DAYS) \
        if "window_days" in fields else DEFAULT_WINDOW_DAYS
    metrics: list[Metric] = []
    for metric_node in reader.sequence(fields["metrics"][1], f"metrics of {split}") if "metrics" in fields else []:
        metric = _metric(reader, metric_node, split)
        if any(m.name == metric.name for m in metrics):
            raise reader.fail(metric_node, f"metric {metric.name} is defined twice for {split}")
        metrics.append(metric)
    return Experiment(split, control, environment, weights, window, tuple(metrics), node.start_mark.line + 1)


def parse_experiments(text: str, source: str = "experiments file") -> tuple[Experiment, ...]:
    """Parse and validate an experiments file's text. Raises ExperimentsFileError naming the line."""
    reader = _Reader(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f", line {mark.line + 1}" if mark is not None else ""
        raise ExperimentsFileError(f"{source}{line}: not valid YAML: {exc.problem or exc}") from None
    if root is None:
        return ()
    top = reader.mapping(root, "the file", {"experiments"})
    if "experiments" not in top:
        return ()
    experiments: list[Experiment] = []
    for node in reader.sequence(top["experiments"][1], "experiments"):
        experiment = _experiment(reader, node)
        if any(e.split == experiment.split for e in experiments):
            raise reader.fail(node, f"split {experiment.split} is configured twice")
        experiments.append(experiment)
    return tuple(experiments)


def load_experiments(path: Path) -> tuple[Experiment, ...]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ExperimentsFileError(f"MIXSYNC_EXPERIMENTS_FILE={path}: no such file") from None
    except IsADirectoryError:
        raise ExperimentsFileError(f"MIXSYNC_EXPERIMENTS_FILE={path}: a folder, not a file") from None
    except UnicodeDecodeError:
        raise ExperimentsFileError(f"MIXSYNC_EXPERIMENTS_FILE={path}: not UTF-8 text") from None
    return parse_experiments(text, str(path))
