"""The one BCP 47 rule: a locale is a canonical tag in the catalog's shape.

`language[-Script][-REGION]` (`en`, `fr-CA`, `zh-Hant-TW`, `es-419`) whose subtags are registered
and which is already in canonical form (langcodes' standardisation leaves it unchanged: `en_us`,
`EN-us`, `iw` or `en-Latn` are refused). Configuration (MAIL_DEFAULT_LOCALE), the catalog's
locale directories and command validation all use `is_canonical`.
"""

from __future__ import annotations

import re
from functools import lru_cache

import langcodes

SHAPE = re.compile(r"[a-z]{2,3}(?:-[A-Z][a-z]{3})?(?:-(?:[A-Z]{2}|[0-9]{3}))?")
EXAMPLES = "e.g. en, fr-CA, pt-BR, zh-Hant-TW"


@lru_cache(maxsize=4096)
def is_canonical(tag: str) -> bool:
    if not SHAPE.fullmatch(tag):
        return False
    try:
        return bool(langcodes.tag_is_valid(tag)) and langcodes.standardize_tag(tag) == tag
    except (ValueError, LookupError):
        return False
