"""What "the password is never printed" means to a test, and passwords built to test it.

Every password from PASSWORDS starts with the marker `Zq9`, which nothing else a test prints
holds: a leak of the whole password, of any encoding of it, or of its first characters shows as
`Zq9`. SHORT_PASSWORDS are the other direction: common enough to turn up inside unrelated text.
"""

from __future__ import annotations

import re
import string
from urllib.parse import quote

from hypothesis import strategies as st

MARKER = "Zq9"

# The characters that mean something to a URL, a keyword string, JSON, repr or a log line, drawn
# far more often than the rest of Unicode (minus NUL and lone surrogates, which libpq cannot take).
SPECIAL = "@/?&=%:#+ '\"\\,;[]!$*()~`^|<>{}\n\r\t-_."
ANY_CHAR = st.characters(blacklist_characters="\x00", blacklist_categories=["Cs"])
PASSWORDS = st.text(
    st.one_of(st.sampled_from(SPECIAL), ANY_CHAR, st.sampled_from("äé€😀")), min_size=0, max_size=12
).map(lambda tail: f"{MARKER}{tail}")

# Short and common passwords: the ones that over-masking would mangle logs with (and give away).
SHORT_PASSWORDS = st.one_of(
    st.text(string.digits, min_size=1, max_size=3),
    st.text(string.ascii_letters + string.digits, min_size=1, max_size=3),
    st.sampled_from(
        ["postgres", "postgresql", "psycopg", "app", "admin", "password", "secret", "test"]
    ),
)


def shows(text: str, secret: str) -> bool:
    """True when `secret` stands in `text` as a token of its own, so a reader can see it there.

    Written apart from the code under test: an occurrence counts unless a letter, digit or '_'
    runs on past one of its own letter/digit edges (`7` in `7214607257041625889` is not the
    password 7 shown; `7` in `key=7,` is).
    """
    before = r"(?<!\w)" if re.match(r"\w", secret[0]) else ""
    after = r"(?!\w)" if re.match(r"\w", secret[-1]) else ""
    return re.search(before + re.escape(secret) + after, text) is not None


def encodings(password: str) -> list[str]:
    """The forms a reader would recognise: as is, percent-encoded (ours and SQLAlchemy's)."""
    return [password, quote(password, safe=""), quote(password), quote(password, safe=" +")]
