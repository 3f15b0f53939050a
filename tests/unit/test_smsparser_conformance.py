"""CHT's SMS parser and createByForm against the conformance corpus (smsparser spec §0).

Every case runs through the implementation its `function` names (RUNNERS). The corpus is
`tests/data/smsparser-cases.json` (a copy of `shared/conformance/smsparser-cases.json`); set
`SMSPARSER_CASES=<path>` to run another file of the same format, such as the full corpus.

Comparison is on what CouchDB would store (`expected_json`, or `expected` with JS `undefined`
members dropped), and strict on types: `True` is not `1`, `2011` is not `2011.0`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from cht_rapidpro.cht import records, smsparser
from cht_rapidpro.cht.jsvalues import UNDEFINED, JsError
from cht_rapidpro.cht.records import RecordError, to_json
from cht_rapidpro.cht.smsparser import ParseContext
from cht_rapidpro.cht.translations import Translate, Translator

CASES_PATH = Path(
    os.environ.get("SMSPARSER_CASES")
    or Path(__file__).parent.parent / "data" / "smsparser-cases.json"
)
#: A fixed clock: no case freezes time, and none asserts a "now" reported_date.
NOW_MS = 1_767_225_600_000

#: Cases we knowingly do not pass: {case id: reason}. Each is an xfail(strict=True).
DEVIATIONS: dict[str, str] = {}

Case = Mapping[str, Any]
_MISSING = object()  # a path that resolves to nothing (JS undefined once serialised)


def _decode(value: Any) -> Any:
    """Corpus JSON to our values: `{"$undefined": true}` becomes UNDEFINED (dropped in dicts)."""
    if value == {"$undefined": True}:
        return UNDEFINED
    if isinstance(value, dict):
        return {k: d for k, v in value.items() if (d := _decode(v)) is not UNDEFINED}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _json_view(value: Any) -> Any:
    """What survives JSON.stringify (our UNDEFINED and NaN, the corpus's `$undefined`)."""
    decoded = _decode(value) if not isinstance(value, float) else value
    return None if decoded is UNDEFINED else to_json(decoded)


def _same(a: Any, b: Any) -> bool:
    """Deep equality without Python's `True == 1` and `1 == 1.0`."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


_PATH_TOKEN = re.compile(r"\[(\d+)\]|\.?([^.\[\]]+)")


def _resolve(value: Any, path: str) -> Any:
    """Follow an assertion path such as `errors[0].code`, `[0]` or `errors.length`."""
    for index, name in _PATH_TOKEN.findall(path):
        if index:
            value = (
                value[int(index)]
                if isinstance(value, list) and int(index) < len(value)
                else _MISSING
            )
        elif name == "length" and isinstance(value, list | str):
            value = len(value)
        else:
            value = value.get(name, _MISSING) if isinstance(value, dict) else _MISSING
    return value


@dataclass
class RecordingTranslate:
    """The corpus's translate stub (a fixed `returns`) or spy (calls through); records calls."""

    delegate: Translate
    returns: Any = _MISSING
    calls: list[tuple[Any, Any]] = field(default_factory=list)

    def __call__(self, key: Any, locale: Any = None, ctx: Mapping[str, Any] | None = None) -> Any:
        self.calls.append((key, locale))
        return self.delegate(key, locale, ctx) if self.returns is _MISSING else self.returns


@dataclass
class Run:
    """One case's inputs, prepared: settings, translate, the form definition."""

    case: Case
    settings: dict[str, Any]
    translate: Translate
    input: dict[str, Any]

    @property
    def context(self) -> ParseContext:
        return ParseContext(self.settings, self.translate)

    @property
    def form_def(self) -> Any:
        code = self.case.get("def_code")
        return None if code is None else self.case["forms"].get(code)


def _prepare(case: Case) -> Run:
    settings = dict(case.get("settings") or {})
    if case["function"] in ("createByForm", "createRecordByJSON") and case["forms"]:
        settings["forms"] = case["forms"]
    translate: Translate = Translator(settings, case.get("translations") or {})
    stub = case.get("translate_stub")
    if stub or case.get("asserts_stub_calls"):
        translate = RecordingTranslate(translate, (stub or {}).get("returns", _MISSING))
    return Run(case, settings, translate, _decode(case["input"]))


def _create_by_form(run: Run) -> Any:
    options = run.case.get("options") or {}
    return records.create_by_form(
        run.input["body"],
        settings=run.settings,
        now_ms=NOW_MS,
        locale=options.get("locale"),
        translate=run.translate,
    )


def _is_compact(run: Run) -> Any:
    msg, locale = run.input["msg"], run.input.get("locale", UNDEFINED)
    return smsparser.is_compact(run.form_def, msg, locale, context=run.context)


def _parse_field(run: Run) -> Any:
    args = run.input
    raw = args.get("raw", UNDEFINED)
    return smsparser.parse_field(args["field"], raw, args["key"], context=run.context)


#: The corpus's function names and how to call our implementation of each.
RUNNERS: dict[str, Callable[[Run], Any]] = {
    "isMuvukuFormat": lambda run: smsparser.is_muvuku_format(run.input["msg"]),
    "getFormCode": lambda run: smsparser.get_form_code(run.input["msg"]),
    "parse": lambda run: smsparser.parse(run.form_def, run.input["doc"], context=run.context),
    "parseArray": lambda run: smsparser.parse_array(
        run.form_def, run.input["doc"], context=run.context
    ),
    "parseField": _parse_field,
    "isCompact": _is_compact,
    "validate": lambda run: records.validate(run.form_def, run.input["formData"]),
    "createByForm": _create_by_form,
    "createRecordByJSON": lambda run: records.create_record_by_json(
        run.input["body"], settings=run.settings, now_ms=NOW_MS, translate=run.translate
    ),
}


def _check_result(case: Case, got: Any) -> None:
    actual = _json_view(got)
    if case.get("partial"):
        for assertion in case.get("assertions", []):
            value = _resolve(actual, assertion["path"])
            want = assertion["equals"]
            if want == {"$undefined": True}:
                assert value is _MISSING, f"{assertion['path']}: {value!r} is not undefined"
            else:
                assert _same(value, _json_view(want)), f"{assertion['path']}: {value!r} != {want!r}"
        return
    want = case["expected_json"] if "expected_json" in case else _json_view(case["expected"])
    assert actual == want
    assert _same(actual, want), "equal values of different types (bool/int/float)"


def _check_side_effects(case: Case, run: Run, original_input: Any) -> None:
    for assertion in case.get("assertions_extra", []):
        path = assertion["path"].removeprefix("$input")
        assert _same(_resolve(run.input, path), assertion["equals"])
        assert _same(_resolve(_decode(original_input), path), assertion["equals"])
    if case.get("asserts_stub_calls"):
        assert isinstance(run.translate, RecordingTranslate)
        calls = run.translate.calls
        assert len(calls) == case["expected_translate_call_count"], calls
        for expected, (key, locale) in zip(case["expected_translate_calls"], calls, strict=False):
            assert (key, locale) == (expected["key"], expected["locale"])


def run_case(case: Case) -> None:
    """Run one corpus case and assert its expectations."""
    run = _prepare(case)
    runner = RUNNERS[case["function"]]
    if case.get("throws"):
        with pytest.raises((RecordError, JsError)) as raised:
            runner(run)
        public = (case.get("expected") or {}).get("error", {}).get("publicMessage")
        if public is not None:
            assert isinstance(raised.value, RecordError)
            assert raised.value.public_message == public
    else:
        _check_result(case, runner(run))
    _check_side_effects(case, run, case["input"])


def _case_id(case: Case, seen: dict[str, int]) -> str:
    base = str(case.get("id") or case["name"])
    seen[base] = seen.get(base, 0) + 1
    return base if seen[base] == 1 else f"{base} #{seen[base]}"


def _params() -> list[Any]:
    cases = json.loads(CASES_PATH.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    params = []
    for case in cases:
        case_id = _case_id(case, seen)
        marks = (
            [pytest.mark.xfail(strict=True, reason=DEVIATIONS[case_id])]
            if case_id in DEVIATIONS
            else []
        )
        params.append(pytest.param(case, id=case_id, marks=marks))
    return params


@pytest.mark.parametrize("case", _params())
def test_case(case: Case) -> None:
    run_case(case)


def test_corpus_functions_all_have_runners() -> None:
    cases = json.loads(CASES_PATH.read_text(encoding="utf-8"))
    assert {case["function"] for case in cases} <= RUNNERS.keys()
