"""Long messages in broadcasts RapidPro accepts.

CHT lets an SMS run to `multipart_sms_limit` parts (10 by default, about 1,500 characters),
and carriers join such a multipart SMS on the handset. RapidPro's API limits a broadcast's
text: 640 characters on community RapidPro 9 (`MSG_FIELD_SIZE`), 4,096 on current TextIt. A
message over the limit is answered `400 {"text": {"eng": ["Ensure this field has no more than
640 characters."]}}`, and CHT then marks it failed for good.

The daemon instead sends such a message as several broadcasts, in order, each within the
limit RapidPro named, split between words and numbered `(1/3) `, `(2/3) `, … so that the
recipient can read them in order whatever order the network delivers them in (each still
goes out as the channel's own multipart SMS). The split is a pure function of the text and
the limit, so any process that takes over an unfinished message cuts it the same way and can
look up the parts already sent.

At most `MAX_PARTS` parts: CHT's longest message (10 GSM segments, 1,530 characters) takes
three on RapidPro 9. A text that would need more is far beyond anything CHT generates (it
truncates at `multipart_sms_limit`), and tens of SMS to one health worker's phone are not
sent on a guess: the message fails with the reason.
"""

from __future__ import annotations

import re

_LIMIT = re.compile(r"no more than (\d+) characters")
#: Most broadcasts one message is sent as.
MAX_PARTS = 4


class TooManyParts(ValueError):
    """The text would need more than MAX_PARTS broadcasts."""


def text_limit(summary: str) -> int | None:
    """The text limit a RapidPro 400 names (`text.eng: Ensure this field has no more than
    640 characters.`), if that is the only thing it refused."""
    fields = [part.split(":", 1)[0].strip() for part in summary.split(";")]
    if not fields or not all(name == "text" or name.startswith("text.") for name in fields):
        return None
    found = _LIMIT.search(summary)
    return int(found.group(1)) if found else None


def split(text: str, limit: int, *, escaped_length: int = 1) -> list[str]:
    """`text` as numbered parts whose length (`@` counting `escaped_length`, as RapidPro sees
    the escaped `@@`) is at most `limit`, cut at whitespace where possible. One part (the text
    itself) if it fits."""
    if _length(text, escaped_length) <= limit:
        return [text]
    count = 2
    while True:
        width = len(f"({count}/{count}) ")
        parts = _cut(text.strip(), limit - width, escaped_length)
        if len(parts) <= count or len(str(len(parts))) == len(str(count)):
            total = len(parts)
            if total > MAX_PARTS:
                raise TooManyParts(
                    f"{len(text)} characters would take {total} broadcasts of at most {limit} "
                    f"(RapidPro's limit); more than {MAX_PARTS} are not sent"
                )
            return [f"({n}/{total}) {part}" for n, part in enumerate(parts, 1)]
        count = len(parts)


def _length(text: str, escaped_length: int) -> int:
    return len(text) + text.count("@") * (escaped_length - 1)


def _cut(text: str, room: int, escaped_length: int) -> list[str]:
    if room < 20:
        raise ValueError(f"a text limit of {room} characters leaves no room for a part")
    parts: list[str] = []
    rest = text
    while rest:
        if _length(rest, escaped_length) <= room:
            parts.append(rest)
            break
        # The longest head that fits, then back to the last whitespace in its last fifth.
        end = 0
        used = 0
        for index, char in enumerate(rest):
            used += escaped_length if char == "@" else 1
            if used > room:
                break
            end = index + 1
        space = max(rest.rfind(" ", 0, end + 1), rest.rfind("\n", 0, end + 1))
        if space > end * 4 // 5:
            end = space
        parts.append(rest[:end].rstrip())
        rest = rest[end:].lstrip()
    return parts
