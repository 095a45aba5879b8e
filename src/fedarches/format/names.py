"""The one name policy for condition and site names.

Why one policy, applied twice: a site refuses a bad condition name before it
spends any time training (``client.plan``), and the coordinator applies the
same rules again at intake, because a bundle comes from outside and its
site may run other code. Site names pass the same rules at enrolment.

Names end up in tensor keys (``"<table>/<name>"``), reports, terminals and
``atlas log``; two names that print the same are two studies no one can tell
apart. So a name must be already NFKC-normalised, printable, free of path
separators and dot names and of surrounding whitespace, and must not be the
same as, or look like, a name already taken (case-insensitively and by
confusable skeleton) or a reserved name.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

from fedarches.errors import InvalidNameError

#: Longest name accepted (the bundle header size bound assumes it: ``format.bundle.MAX_NAME_CHARS``).
MAX_NAME_CHARS = 200

#: What each kind of name is, for messages, and how to fix it.
_ADVICE = {
    "condition": "rename it in the condition column (--condition-key) of the data and map again",
    "site": "choose another site name (--site)",
    "label": "rename the label in the --share-labels column of the data and map again",
}

#: Reserved per kind, compared by skeleton. "coordinator" is the site the reference
#: conditions are recorded under. Condition names "nan", "none", "null" and "na" are
#: what missing values become when a column is cast to text: a study called that is
#: almost surely missing data, not a study.
RESERVED: dict[str, frozenset[str]] = {
    "condition": frozenset({"nan", "none", "null", "na"}),
    "site": frozenset({"coordinator"}),
    "label": frozenset({"unknown", "nan", "none", "null", "na"}),  # "Unknown" is what label transfer calls novel
}

# Unicode categories a name may never hold: controls (C0, C1, DEL), format characters
# (bidi overrides and isolates, zero-width space/joiners, BOM, soft hyphen), surrogates,
# private use, unassigned code points, line and paragraph separators.
_REFUSED_CATEGORIES = {"Cc": "a control character", "Cf": "an invisible format character (bidi or zero-width)",
                       "Cs": "a surrogate", "Co": "a private-use character", "Cn": "an unassigned code point",
                       "Zl": "a line separator", "Zp": "a paragraph separator"}

# Latin look-alikes from Cyrillic and Greek: a small subset of the Unicode TR39
# confusables table (confusables.txt), enough for the letters that pass for Latin
# in common fonts. Not the full skeleton algorithm: no digit/letter confusions
# (0/O, 1/l) and no other scripts.
_LOOKALIKES = str.maketrans({
    # Cyrillic capitals
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C", "Т": "T",
    "Х": "X", "У": "Y", "І": "I", "Ј": "J", "Ѕ": "S", "Ү": "Y",
    # Cyrillic small
    "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "х": "x", "у": "y", "і": "i", "ј": "j", "ѕ": "s",
    "һ": "h", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ӏ": "l", "ү": "y",
    # Greek capitals
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O",
    "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
    # Greek small
    "ο": "o", "ι": "i", "ν": "v", "α": "a", "ρ": "p", "υ": "u", "κ": "k",
})


def skeleton(name: str) -> str:
    """What ``name`` looks like: NFKC, look-alikes mapped to Latin, casefolded.

    Two names with the same skeleton print alike; the mapping is a subset of
    the Unicode TR39 confusables (Cyrillic and Greek letters that pass for
    Latin), applied before and after casefolding so both cases are caught.
    """
    text = unicodedata.normalize("NFKC", name).translate(_LOOKALIKES)
    return text.casefold().translate(_LOOKALIKES)


def _refuse(name: object, kind: str, rule: str, advice: str | None = None) -> InvalidNameError:
    fix = advice or _ADVICE.get(kind, f"choose another {kind} name")
    return InvalidNameError(f"name check failed: {kind} name {name!r} {rule}; {fix}")


def _static_problem(name: str) -> tuple[str, str | None] | None:
    """The first rule ``name`` breaks on its own (rule, advice), or None."""
    if not name:
        return "is empty", None
    if len(name) > MAX_NAME_CHARS:
        return f"is {len(name)} characters long, above the {MAX_NAME_CHARS} character limit", None
    for ch in name:
        cat = unicodedata.category(ch)
        if cat in _REFUSED_CATEGORIES:
            return f"holds {_REFUSED_CATEGORIES[cat]} (U+{ord(ch):04X}); names must be printable", None
        if cat == "Zs" and ch != " ":
            return f"holds a space character other than a plain space (U+{ord(ch):04X})", None
    normal = unicodedata.normalize("NFKC", name)
    if normal != name:
        return "is not in Unicode NFKC form", f"use {normal!r} instead"
    if name != name.strip():
        return "starts or ends with whitespace", f"use {name.strip()!r} instead"
    if "/" in name or "\\" in name:
        return "holds a path separator ('/' or '\\')", None
    if name.startswith("."):
        return "starts with '.' (dot names such as '.' and '..' are refused)", None
    return None


def check_name(name: str, *, kind: str, existing: Iterable[str] = (), reserved: Iterable[str] = ()) -> str:
    """Return ``name`` if it may be used as a new ``kind`` name, else raise ``InvalidNameError``.

    ``existing`` are the names already taken (the atlas version's conditions,
    the enrolled sites): ``name`` must differ from each of them in more than
    case and confusable look-alikes. ``reserved`` adds to the kind's
    ``RESERVED`` names; both are compared by skeleton.
    """
    if not isinstance(name, str):
        raise _refuse(name, kind, f"is a {type(name).__name__}, not text")
    problem = _static_problem(name)
    if problem is not None:
        raise _refuse(name, kind, *problem)
    mine = skeleton(name)
    for word in (*RESERVED.get(kind, ()), *reserved):
        if skeleton(word) == mine:
            raise _refuse(name, kind, f"is reserved (it reads as {word!r})")
    for other in existing:
        if other == name:
            raise _refuse(name, kind, "is already taken")
        if other.casefold() == name.casefold():
            raise _refuse(name, kind, f"differs only in case from existing name {other!r}")
        if skeleton(other) == mine:
            raise _refuse(name, kind, f"looks like existing name {other!r} (look-alike characters)")
    return name


def check_new_names(
    names: Iterable[str], *, kind: str, existing: Iterable[str] = (), reserved: Iterable[str] = ()
) -> list[str]:
    """Check each of ``names`` against ``existing`` and against the ones before it; return them.

    Why also against each other: two new names of one site ("Study", "study")
    would otherwise both pass and land together.
    """
    new = list(names)
    taken = list(existing)
    for name in new:
        check_name(name, kind=kind, existing=taken, reserved=reserved)
        taken.append(name)
    return new


__all__ = ["MAX_NAME_CHARS", "RESERVED", "check_name", "check_new_names", "skeleton"]
