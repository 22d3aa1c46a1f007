"""Reward functions for RL with verifiable rewards: the type, the registry, and resolving a spec.

A reward function is ``fn(completion: str, row: dict) -> float`` with a score in ``[0, 1]``:
``completion`` is the model's generated text, ``row`` the dataset row it answers (``{"id",
"messages", ...}``, see :mod:`tunegraph.chat_data`, plus any extra field such as ``answer``,
``tests``, ``schema`` or ``pattern``).

A recipe names rewards by *spec* (the keys of a GRPO stage's ``rewards`` mapping)::

    numeric_match                              # a built-in, by name
    numeric_match(rel_tol=0.01)                # a built-in with settings
    regex_match(pattern=r"-?\\d+", flags="s")   # settings are Python literals, keywords only
    my_pkg.rewards:length_penalty              # a user function, 'package.module:function'
    my_pkg.rewards:length_penalty(limit=200)   # ... with settings

Settings are bound like :func:`functools.partial`: the function receives them as keyword
arguments after ``(completion, row)``; unknown names are an error when the recipe is resolved,
not in the middle of training. They are part of the spec string, so they enter the stage's
fingerprint.

:func:`resolve_reward` returns a :class:`Reward`, itself a ``RewardFn``, that never raises for
anything a completion can cause: an exception scores ``0.0`` and is counted in
:attr:`Reward.stats` (as is a score that is not a finite number, also ``0.0``; a score outside
``[0, 1]`` is clipped and counted). The one exception that passes through is a
:class:`~tunegraph.errors.TunegraphError` (e.g. a ``DataError`` for a row without the reference
the reward needs): that is the user's data or recipe, not the completion, and it should stop
the run with its one-line message.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
import threading
from dataclasses import dataclass
from typing import Any, Callable

from tunegraph.errors import DataError, StageError, TunegraphError
from tunegraph.pyparse import parse
from tunegraph.suggest import did_you_mean

RewardFn = Callable[[str, dict], float]

_BUILTINS: dict[str, RewardFn] = {}


def builtin_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Register ``fn`` as the built-in reward ``name`` (settings: keyword-only parameters)."""
    def register(fn: RewardFn) -> RewardFn:
        if name in _BUILTINS and _BUILTINS[name] is not fn:
            raise ValueError(f"built-in reward {name!r} registered twice")
        _BUILTINS[name] = fn
        return fn

    return register


def builtin_rewards() -> dict[str, RewardFn]:
    """Every built-in reward by name."""
    import tunegraph.rewards.builtin  # noqa: F401  (registers the built-ins)

    return dict(_BUILTINS)


def reference_answer(row: dict) -> str:
    """The reference a reward compares with: the row's ``answer`` field if present, else the
    content of its last assistant message. A :class:`DataError` when there is neither."""
    if row.get("answer") is not None:
        return str(row["answer"])
    for message in reversed(row.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "assistant":
            return str(message.get("content", ""))
    raise DataError(f"row {row.get('id')!r}: no reference answer: add an 'answer' field "
                    "or end the conversation with the assistant's reference message")


# --------------------------------------------------------------------------- resolved rewards


@dataclass
class RewardStats:
    """What a :class:`Reward` saw: ``calls``; ``errors`` (the function raised or returned a
    non-number, scored 0); ``clipped`` (a score outside [0, 1], clipped); ``last_error``."""

    calls: int = 0
    errors: int = 0
    clipped: int = 0
    last_error: str = ""

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_errors": float(self.errors), f"{prefix}_clipped": float(self.clipped)}


class Reward:
    """A resolved reward: call it as ``reward(completion, row) -> float`` in [0, 1].

    Never raises for anything the completion causes (see the module docstring); ``stats``
    counts calls, errors and clipped scores. Thread-safe.
    """

    def __init__(self, spec: str, fn: Callable[..., Any], settings: dict[str, Any] | None = None) -> None:
        self.spec = spec
        self.fn = fn
        self.settings = dict(settings or {})
        self.stats = RewardStats()
        self._lock = threading.Lock()

    def __call__(self, completion: str, row: dict) -> float:
        try:
            value = self.fn(completion, row, **self.settings)
            score = float(value)
            if isinstance(value, (str, bytes)) or not math.isfinite(score):
                raise TypeError(f"returned {value!r}, not a finite number")
        except TunegraphError:
            raise
        except Exception as error:  # noqa: BLE001 - a completion must never stop training
            with self._lock:
                self.stats.calls += 1
                self.stats.errors += 1
                self.stats.last_error = " ".join(f"{type(error).__name__}: {error}".split())[:300]
            return 0.0
        clipped = min(1.0, max(0.0, score))
        with self._lock:
            self.stats.calls += 1
            self.stats.clipped += clipped != score
        return clipped

    def __repr__(self) -> str:
        return f"Reward({self.spec!r})"


# --------------------------------------------------------------------------- specs


def parse_reward_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name(a=1, b='x')"`` -> ``("name", {"a": 1, "b": "x"})``; settings must be literals."""
    text = spec.strip()
    if not text:
        raise StageError("reward '': empty spec; name a built-in reward or 'package.module:function'")
    if "(" not in text:
        return text, {}
    target, _, rest = text.partition("(")
    if not text.endswith(")"):
        raise StageError(f"reward {spec!r}: settings must end with ')', like numeric_match(rel_tol=0.01)")
    try:
        call = parse(f"f({rest}", mode="eval").body
    except SyntaxError as error:
        raise StageError(f"reward {spec!r}: cannot parse the settings: {error.msg}") from None
    if not isinstance(call, ast.Call) or call.args or any(k.arg is None for k in call.keywords):
        raise StageError(f"reward {spec!r}: settings must be keyword=value pairs, like numeric_match(rel_tol=0.01)")
    settings = {}
    for keyword in call.keywords:
        try:
            settings[keyword.arg] = ast.literal_eval(keyword.value)
        except (ValueError, SyntaxError):
            raise StageError(f"reward {spec!r}: setting {keyword.arg!r} must be a literal "
                             f"(number, string, list, dict, True/False/None), not "
                             f"{ast.unparse(keyword.value)!r}") from None
    return target.strip(), settings


def _import_target(spec: str, target: str) -> Callable[..., Any]:
    module_name, _, attr_path = target.partition(":")
    module_name, attr_path = module_name.strip(), attr_path.strip()
    if not module_name or not attr_path:
        raise StageError(f"reward {spec!r}: a user reward is named 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise StageError(f"reward {spec!r}: module {module_name!r} not found "
                             "(install it, or put its folder on PYTHONPATH)") from None
        raise StageError(f"reward {spec!r}: importing module {module_name!r} failed: "
                         f"{' '.join(str(error).split())}") from None
    except Exception as error:  # noqa: BLE001 - any import-time failure is the user's module
        raise StageError(f"reward {spec!r}: importing module {module_name!r} failed: "
                         f"{type(error).__name__}: {' '.join(str(error).split())}") from None
    value: Any = module
    for part in attr_path.split("."):
        if not hasattr(value, part):
            names = [n for n in dir(value) if not n.startswith("_")]
            raise StageError(f"reward {spec!r}: {module_name!r} has no attribute "
                             f"{attr_path!r}{did_you_mean(part, names)}")
        value = getattr(value, part)
    if not callable(value):
        raise StageError(f"reward {spec!r}: {attr_path!r} is a {type(value).__name__}, not a function "
                         "fn(completion, row) -> float")
    return value


def _check_signature(spec: str, fn: Callable[..., Any], settings: dict[str, Any]) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # some builtins have no signature: trust them
    try:
        signature.bind("", {}, **settings)
    except TypeError as error:
        known = [name for name, p in list(signature.parameters.items())[2:]
                 if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        unknown = [name for name in settings if name not in signature.parameters]
        if unknown:
            hint = f"; known settings: {', '.join(known)}" if known else "; it takes no settings"
            raise StageError(f"reward {spec!r}: unknown setting {unknown[0]!r}"
                             f"{did_you_mean(unknown[0], known)}{hint}") from None
        raise StageError(f"reward {spec!r}: cannot be called as fn(completion, row"
                         f"{', **settings' if settings else ''}): {error}") from None


def resolve_reward(spec: str) -> Reward:
    """The reward a recipe names: a built-in name or ``package.module:function``, optionally
    with settings ``(key=literal, ...)``. A one-line :class:`StageError` if it cannot be used."""
    target, settings = parse_reward_spec(spec)
    builtins = builtin_rewards()
    if ":" in target:
        fn = _import_target(spec, target)
    elif target in builtins:
        fn = builtins[target]
    else:
        raise StageError(f"reward {spec!r}: unknown built-in reward{did_you_mean(target, builtins)}; "
                         f"built-ins: {', '.join(sorted(builtins))}; a user reward is named "
                         "'package.module:function'")
    _check_signature(spec, fn, settings)
    return Reward(spec.strip(), fn, settings)
