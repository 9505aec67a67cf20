"""The experiment grid of a workflow profile: which runs exist and where every file of the workflow lives.

A *setting* is a (model, memory budget, trace, task set) combination.  A *run* is one system serving one setting's
workload at one offered load.  The load is a factor of the FP16 capacity measured by the calibration step
(``calibration.load_factor`` is the base load; ``rate_sweep.load_factors`` add loads for a few systems and traces,
for Fig. 6).  Loads are written in paths with ``%g`` (``1.3``, ``2``), which is also how :func:`load_label` spells
them.

Every name that appears in a path (model, budget, trace, task set, system) is checked here: a model, budget, trace or
system name may not contain ``_`` or ``/`` (figure file names join them with ``_``); a task set name may not contain
``/``.  :func:`validate` raises :class:`ConfigError` naming the bad key and value; the Snakefile calls it before
building the DAG, so a bad config fails at once rather than half-way through the runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

NAME = r"[A-Za-z0-9.\-]+"  # model, budget, trace and system names
TASKSET = r"[A-Za-z0-9.\-_]+"
LOAD = r"[0-9]+(?:\.[0-9]+)?"
KNOWN_TRACES = ("azure-conv", "azure-code", "burstgpt")


class ConfigError(ValueError):
    """A workflow configuration that cannot be run; the message names the bad key and value."""


@dataclass(frozen=True, order=True)
class Setting:
    model: str
    budget: str
    trace: str
    taskset: str

    @property
    def parts(self) -> tuple[str, str, str, str]:
        return (self.model, self.budget, self.trace, self.taskset)

    @property
    def slug(self) -> str:
        """``model_budget_trace_taskset``: the figure file name stem of this setting."""
        return "_".join(self.parts)


@dataclass(frozen=True, order=True)
class RunKey:
    model: str
    budget: str
    trace: str
    taskset: str
    load: str
    system: str

    @property
    def setting(self) -> Setting:
        return Setting(self.model, self.budget, self.trace, self.taskset)

    def run_dir(self, results: str) -> str:
        return (f"{results}/runs/{self.model}/{self.budget}/{self.trace}/{self.taskset}/load{self.load}/"
                f"{self.system}")

    def workload(self, results: str) -> str:
        return workload_path(results, self.setting, self.load)


def load_label(factor: float) -> str:
    """How a load factor is written in paths and tables (``1.3``, ``2``, ``0.6``)."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise ConfigError(f"a load factor must be a positive number, got {factor!r}")
    return f"{factor:g}"


def workload_path(results: str, setting: Setting, load: str) -> str:
    return f"{results}/workloads/{setting.model}/{setting.budget}/{setting.trace}/{setting.taskset}/load{load}.jsonl"


def calibration_path(results: str, model: str, budget: str) -> str:
    return f"{results}/calibration/{model}/{budget}.json"


def importance_path(results: str, model: str) -> str:
    return f"{results}/importance/{model}.json"


# ---- validation --------------------------------------------------------------------------------------------------

def _need(config: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in config:
        raise ConfigError(f"config key {key!r} is missing")
    value = config[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ConfigError(f"config key {key!r} must be {getattr(kind, '__name__', kind)}, got {value!r}")
    return value


def _check_name(kind: str, name: Any, pattern: str = NAME) -> None:
    if not isinstance(name, str) or not re.fullmatch(pattern, name):
        raise ConfigError(f"{kind} name {name!r} may only contain letters, digits, '.', '-'"
                          + (" and '_'" if pattern == TASKSET else "") + " (it is part of file names)")


def known_system(name: str, plugins: dict[str, str]) -> bool:
    """Whether ``name`` is a system of :mod:`morphserve.systems` or one registered in ``system_plugins``."""
    if name in plugins:
        return True
    from morphserve.systems import system_spec

    try:
        system_spec(name)
    except ValueError:
        return False
    return True


def validate(config: dict[str, Any]) -> None:
    """Check the keys the grid is built from (see config/config.yaml for their meaning)."""
    _need(config, "profile", str)
    _check_name("profile", config["profile"])
    _need(config, "artifacts", str)
    models = _need(config, "models", dict)
    budgets = _need(config, "budgets", dict)
    if not models:
        raise ConfigError("config key 'models' lists no model")
    for name, m in models.items():
        _check_name("model", name)
        if not isinstance(m, dict) or not isinstance(m.get("budgets"), list) or not m["budgets"]:
            raise ConfigError(f"models.{name}.budgets must be a non-empty list of budget names, got "
                              f"{(m or {}).get('budgets')!r}")
        for b in m["budgets"]:
            if b not in budgets:
                raise ConfigError(f"models.{name}.budgets names {b!r}, which is not a key of 'budgets' "
                                  f"({', '.join(budgets)})")
    for name, b in budgets.items():
        _check_name("budget", name)
        v = (b or {}).get("memory_budget_bytes")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ConfigError(f"budgets.{name}.memory_budget_bytes must be a positive number of bytes, got {v!r}")
    traces = _need(config, "traces", dict)
    for name in traces:
        if name not in KNOWN_TRACES:
            raise ConfigError(f"trace {name!r} is not one of {', '.join(KNOWN_TRACES)}")
    tasksets = _need(config, "task_sets", dict)
    from morphserve.workloads.tasks import TASKS

    for name, tasks in tasksets.items():
        _check_name("task set", name, TASKSET)
        if not isinstance(tasks, list) or not tasks or any(t not in TASKS for t in tasks):
            raise ConfigError(f"task_sets.{name} must be a non-empty list of tasks from {', '.join(TASKS)}, "
                              f"got {tasks!r}")
    plugins = config.get("system_plugins") or {}
    if not isinstance(plugins, dict):
        raise ConfigError(f"system_plugins must be a mapping of system name to 'module:function', got {plugins!r}")
    for name, target in plugins.items():
        if not isinstance(target, str) or not re.fullmatch(r"[\w.]+:\w+", target):
            raise ConfigError(f"system_plugins.{name} must be 'module:function', got {target!r}")
    systems = _need(config, "systems", list)
    if "fp16" not in systems:
        raise ConfigError("systems must include 'fp16': every comparison is relative to it")
    if len(set(systems)) != len(systems):
        raise ConfigError(f"systems lists a system twice: {systems}")
    for s in systems:
        _check_name("system", s)
        if not known_system(s, plugins):
            raise ConfigError(f"system {s!r} is neither a morphserve system (fp16, w4, selective-K, "
                              f"morphserve-accuracy/default/performance) nor registered in system_plugins")
    headline = config.get("morphserve_headline_mode")
    if headline not in systems:
        raise ConfigError(f"morphserve_headline_mode {headline!r} must be one of the configured systems")
    cal = _need(config, "calibration", dict)
    load_label(cal.get("load_factor"))
    sweep = config.get("rate_sweep") or {}
    for t in sweep.get("traces", []):
        if t not in traces:
            raise ConfigError(f"rate_sweep.traces names {t!r}, which is not a configured trace")
    for t in sweep.get("task_sets") or []:
        if t not in tasksets:
            raise ConfigError(f"rate_sweep.task_sets names {t!r}, which is not a configured task set")
    for s in sweep.get("systems", []):
        if s not in systems:
            raise ConfigError(f"rate_sweep.systems names {s!r}, which is not a configured system")
    for f in sweep.get("load_factors", []):
        load_label(f)
    wl = _need(config, "workload", dict)
    if not isinstance(wl.get("replay_s"), (int, float)) or wl["replay_s"] <= 0:
        raise ConfigError(f"workload.replay_s must be a positive number of seconds, got {wl.get('replay_s')!r}")


# ---- the grid ----------------------------------------------------------------------------------------------------

def settings(config: dict[str, Any]) -> list[Setting]:
    return sorted(Setting(m, b, t, ts) for m, mc in config["models"].items() for b in mc["budgets"]
                  for t in config["traces"] for ts in config["task_sets"])


def base_load(config: dict[str, Any]) -> str:
    return load_label(config["calibration"]["load_factor"])


def main_runs(config: dict[str, Any]) -> list[RunKey]:
    """Every configured system on every setting at the base load."""
    load = base_load(config)
    return [RunKey(*s.parts, load, system) for s in settings(config) for system in config["systems"]]


def sweep_loads(config: dict[str, Any]) -> list[str]:
    """The loads of the rate sweep, the base load included, in increasing order."""
    sweep = config.get("rate_sweep") or {}
    factors = {float(f) for f in sweep.get("load_factors", [])} | {float(config["calibration"]["load_factor"])}
    return [load_label(f) for f in sorted(factors)]


def sweep_settings(config: dict[str, Any]) -> list[Setting]:
    """The settings of the rate sweep: its traces, and its task sets (every task set when it names none)."""
    sweep = config.get("rate_sweep") or {}
    traces = set(sweep.get("traces", []))
    tasksets = set(sweep.get("task_sets") or config["task_sets"])
    return [s for s in settings(config) if s.trace in traces and s.taskset in tasksets]


def sweep_runs(config: dict[str, Any]) -> list[RunKey]:
    systems = (config.get("rate_sweep") or {}).get("systems", [])
    return [RunKey(*s.parts, load, system) for s in sweep_settings(config) for load in sweep_loads(config)
            for system in systems]


def all_runs(config: dict[str, Any]) -> list[RunKey]:
    return sorted(set(main_runs(config)) | set(sweep_runs(config)))


def runs_of(runs: Iterable[RunKey], setting: Setting, load: str | None = None) -> list[RunKey]:
    return [r for r in runs if r.setting == setting and (load is None or r.load == load)]


def workloads(config: dict[str, Any]) -> list[tuple[Setting, str]]:
    return sorted({(r.setting, r.load) for r in all_runs(config)})
