"""CHT's `config.translate(key, locale, ctx)`: label objects, the translation cache, templates."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any, Final, Protocol

from .jsvalues import UNDEFINED, JsError, get_property, js_string, js_truthy

#: English texts of the error codes `createByForm` can add (messages-en.properties). CHT loads
#: its full translation documents into the cache; these are the ones a report can carry.
DEFAULT_TRANSLATIONS: Final[Mapping[str, Mapping[str, str]]] = {
    "en": {
        "sys.missing_fields": "Missing or invalid fields: {{fields}}.",
        "sys.incorrect_type": "Incorrect type of field {{key}}, expected {{expectedType}}.",
        "extra_fields": "Extra fields.",
        "sys.empty": "Message appears empty.",
        "sys.form_not_found": "Form '{{form}}' not found.",
        "sys.facility_not_found": "Facility not found.",
    }
}

# lodash `_.template` as CHT configures it: `{{ }}` interpolates, `<%- %>` escapes, `<% %>`
# evaluates. Only property paths are supported inside the delimiters.
_TEMPLATE_TAG = re.compile(r"<%-([\s\S]+?)%>|\{\{([\s\S]+?)\}\}|<%([\s\S]+?)%>")
_PATH = re.compile(r"\s*([A-Za-z_$][\w$]*(?:\s*\.\s*[A-Za-z_$][\w$]*)*)\s*")


class Translate(Protocol):
    """The signature of `config.translate`; stubs in tests implement it too."""

    def __call__(self, key: Any, locale: Any = None, ctx: Mapping[str, Any] | None = None) -> Any:
        """Translate `key` (a string key or a `{locale: text}` object) into `locale`."""
        ...


class _TemplateError(Exception):
    """The template cannot be rendered (JS would throw, and CHT returns the raw text)."""


def _evaluate(expression: str, ctx: Mapping[str, Any]) -> Any:
    match = _PATH.fullmatch(expression)
    if match is None:
        raise _TemplateError(expression)
    head, *rest = (part.strip() for part in match.group(1).split("."))
    if head not in ctx:
        raise _TemplateError(head)  # a ReferenceError inside lodash's `with (obj)`
    value = ctx[head]
    try:
        for name in rest:
            value = get_property(value, name)
    except JsError as err:
        raise _TemplateError(expression) from err
    return value


def _escape_html(text: str) -> str:
    """lodash `_.escape`."""
    for char, entity in (
        ("&", "&amp;"),
        ("<", "&lt;"),
        (">", "&gt;"),
        ('"', "&quot;"),
        ("'", "&#39;"),
    ):
        text = text.replace(char, entity)
    return text


def render_template(text: str, ctx: Mapping[str, Any] | None) -> str:
    """Render a lodash template; on any error return `text` unchanged, as CHT does."""
    values = ctx or {}

    def substitute(match: re.Match[str]) -> str:
        escaped, interpolated, evaluated = match.groups()
        if evaluated is not None:
            raise _TemplateError(evaluated)  # arbitrary JS is not supported
        value = _evaluate(escaped if escaped is not None else interpolated, values)
        rendered = "" if value is None or value is UNDEFINED else js_string(value)
        return _escape_html(rendered) if escaped is not None else rendered

    try:
        return _TEMPLATE_TAG.sub(substitute, text)
    except _TemplateError:
        return text


def _find_translation(value: dict[str, Any], locale: str) -> Any:
    translations = value.get("translations")
    if js_truthy(translations):
        if not isinstance(translations, list):
            return None
        found = next(
            (t for t in translations if isinstance(t, dict) and t.get("locale") == locale), None
        )
        return found.get("content") if found else None
    return value.get(locale)  # the older `{locale: text}` shape


def _candidates(value: dict[str, Any] | list[Any], locale: str) -> Iterator[Any]:
    if isinstance(value, list):
        yield value[0] if value else None  # `value[first key]`
        return
    yield _find_translation(value, locale)
    yield value.get("default")
    yield _find_translation(value, "en")
    translations = value.get("translations")
    if isinstance(translations, list) and translations and isinstance(translations[0], dict):
        yield translations[0].get("content")
    yield next(iter(value.values()), None)


def message_from_object(value: dict[str, Any] | list[Any], locale: str) -> Any:
    """CHT's `getMessage`: the first truthy of the locale's text, `default`, English, the first
    translation and the first value. None when all are falsy."""
    test = locale == "test"
    result = next((c for c in _candidates(value, "en" if test else locale) if js_truthy(c)), None)
    if test:
        return "-" + js_string(UNDEFINED if result is None else result) + "-"
    return result


class Translator:
    """`config.translate` over app settings and a translation cache `{locale: {key: text}}`.

    Args:
        settings: app settings; `locale` is the default language.
        translations: the cache. An empty cache makes every string key translate to itself.
    """

    def __init__(
        self,
        settings: Mapping[str, Any],
        translations: Mapping[str, Mapping[str, str]] = DEFAULT_TRANSLATIONS,
    ) -> None:
        self._settings = settings
        self._cache = translations

    def default_locale(self) -> Any:
        """`app_settings.locale || 'en'`."""
        configured = self._settings.get("locale")
        return configured if js_truthy(configured) else "en"

    def __call__(self, key: Any, locale: Any = None, ctx: Mapping[str, Any] | None = None) -> Any:
        if isinstance(locale, dict | list):  # CHT's `translate(key, ctx)` form
            ctx, locale = locale if isinstance(locale, dict) else {}, None
        chosen = js_string(locale) if js_truthy(locale) else js_string(self.default_locale())
        if isinstance(key, dict | list):
            message = message_from_object(key, chosen)
            return message if js_truthy(message) else key
        if key is None or key is UNDEFINED:
            return ""
        text_key = js_string(key)
        value = (
            self._cache.get(chosen, {}).get(text_key)
            or self._cache.get("en", {}).get(text_key)
            or text_key
        )
        return render_template(value, ctx)
