"""BFCL's multi-turn environment without `eval`: the package's own classes, driven by method name.

BFCL's executor (`multi_turn_utils.execute_multi_turn_func_call`) runs every call string through `eval`; this
module never does, and never imports it. Instead:

- fresh instances of the entry's `involved_classes` (only the eight multi-turn classes, which need the standard
  library and mpmath) are loaded with the entry's `initial_config` through their `_load_scenario`, once for the
  model and once for the ground truth, and live for the whole episode (BFCL keeps them across turns too);
- a call is dispatched by name to a public bound method of those instances (BFCL's mapping: later classes win a
  shared name), with literal keyword arguments only; names BFCL refuses (`kill`, `exit`, ...) are refused;
- results are turned into text as BFCL does (str kept, dict as JSON, else `str`), errors become the observation
  "Error during execution: ..." (BFCL's wording), never an exception;
- `end_turn` runs the turn's ground truth on the ground-truth instances, then applies the package's pure checkers:
  `state_checker` (public attributes equal) and `response_checker` (the ground truth's results among all the
  model's results so far, unordered). A turn whose ground truth is empty is not checked (BFCL's rule), and a
  turn with ground truth but no call from the model fails ("empty_turn_model_response").
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
from typing import Any

from collapse_probe.tasks.base import Call, TurnCheck

# The classes of the multi-turn categories (memory_* and web_search import faiss/serpapi: not supported).
MULTI_TURN_CLASSES = ("GorillaFileSystem", "MathAPI", "MessageAPI", "TwitterAPI", "TicketAPI", "TradingBot",
                      "TravelAPI", "VehicleControlAPI")
REFUSED = ("kill", "exit", "quit", "remove", "unlink", "popen", "Popen", "run")  # BFCL's own refusals
ERROR = "Error during execution: {}"


def _backend() -> tuple[dict, list, Any, Any]:
    """BFCL's class paths, stateless classes and its two pure checkers (imports: stdlib and BFCL constants)."""
    from bfcl_eval.constants.executable_backend_config import CLASS_FILE_PATH_MAPPING, STATELESS_CLASSES
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import response_checker, state_checker

    return CLASS_FILE_PATH_MAPPING, STATELESS_CLASSES, state_checker, response_checker


def make_instances(involved: list[str], initial_config: dict) -> dict[str, Any]:
    """Fresh instances of the involved classes, each loaded with its part of `initial_config`."""
    paths, stateless, _, _ = _backend()
    out = {}
    for name in involved:
        if name not in MULTI_TURN_CLASSES:
            raise ValueError(f"BFCL class {name} is not a multi-turn class this executor supports")
        cls = getattr(importlib.import_module(paths[name]), name)
        inst = cls()
        if name not in stateless:
            inst._load_scenario(copy.deepcopy(initial_config.get(name, {})), long_context=False)
        out[name] = inst
    return out


def method_table(instances: dict[str, Any]) -> dict[str, Any]:
    """Public method name -> bound method: the allow-list calls are dispatched on."""
    table = {}
    for inst in instances.values():
        for name, method in inspect.getmembers(inst, predicate=inspect.ismethod):
            if not name.startswith("_"):
                table[name] = method
    return table


def result_text(value: object) -> str:
    """BFCL's rendering of a call's return value."""
    if type(value) is str:
        return value
    if type(value) is dict:
        try:
            return json.dumps(value)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def run_call(table: dict[str, Any], name: str, arguments: dict) -> str:
    """One call by name with keyword arguments; every failure is an observation string."""
    if name in REFUSED:
        return ERROR.format(f"Function call {name} is not allowed.")
    method = table.get(name)
    if method is None:
        return ERROR.format(f"name '{name}' is not defined")
    if not isinstance(arguments, dict) or not all(isinstance(k, str) for k in arguments):
        return ERROR.format(f"{name}: arguments must be a mapping of names to values")
    try:
        return result_text(method(**copy.deepcopy(arguments)))
    except Exception as exc:  # noqa: BLE001 - the environment's error is the model's observation
        return ERROR.format(str(exc))


def param_names(table: dict[str, Any]) -> dict[str, list[str]]:
    """Method name -> its parameter names in signature order (binds positional ground-truth arguments)."""
    out = {}
    for name, method in table.items():
        try:
            out[name] = [p.name for p in inspect.signature(method).parameters.values()
                         if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        except (TypeError, ValueError):
            out[name] = []
    return out


class BfclEnvironment:
    """One BFCL episode: the model's instances, the ground truth's instances, per-turn checks (see module doc)."""

    def __init__(self, involved: list[str], initial_config: dict, gold: list[list[Call]]):
        _, _, self._state_checker, self._response_checker = _backend()
        self.model = make_instances(involved, initial_config)
        self.truth = make_instances(involved, initial_config)
        self._model_table, self._truth_table = method_table(self.model), method_table(self.truth)
        self.gold, self.turn = gold, 0
        self.all_results: list[str] = []  # every model result, all turns (BFCL's response check reads them all)
        self.turn_calls = 0

    def call(self, name: str, arguments: dict) -> str:
        out = run_call(self._model_table, name, arguments)
        self.all_results.append(out)
        self.turn_calls += 1
        return out

    def end_turn(self) -> TurnCheck:
        gold = self.gold[self.turn] if self.turn < len(self.gold) else []
        made, self.turn_calls = self.turn_calls, 0
        turn, self.turn = self.turn, self.turn + 1
        truth = [run_call(self._truth_table, c["name"], c["arguments"]) for c in gold]
        if not gold:
            return TurnCheck(True)
        if made == 0:
            return TurnCheck(False, "multi_turn:empty_turn_model_response")
        state = self._state_checker(self.model, self.truth)
        if not state["valid"]:
            return TurnCheck(False, state.get("error_type", "multi_turn:instance_state_mismatch"))
        resp = self._response_checker(self.all_results, truth, turn)
        if not resp["valid"]:
            return TurnCheck(False, resp.get("error_type", "multi_turn:execution_response_mismatch"))
        return TurnCheck(True)
