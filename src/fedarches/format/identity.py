"""A condition's identity: the site that contributed it plus the name that site gave it.

Why qualified: condition names are chosen by each site for its own data, so
two sites' ``batch1`` are two studies, and one site must not be able to take
another's study name by publishing it first. Inside a model (the one-hot
index, ``conditions.safetensors`` keys) a site's condition is therefore stored
under its *id* ``"<site>/<name>"``; the coordinator's reference studies are
owned by the atlas itself and keep their bare name as id. Neither site nor
condition names may contain ``/`` (``format.names``), so the first ``/`` of an
id splits it.

Users never type ids: a site names its conditions as in its data, and
``ConditionIndex.resolve`` finds the site's own condition by its site name
(then the reference studies). Bundles carry the site's own names too; the
coordinator qualifies them with the signing site at intake.

Migration: versions published before ids were qualified hold every condition
under its bare name. Their version manifests still record each condition's
``{name, site}``, so an old id keeps its owner (``ConditionIndex`` is built from
those records) and is never renamed: old versions load and merge unchanged,
and only conditions added from now on get qualified ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from fedarches.errors import UnknownConditionError

REFERENCE_SITE = "coordinator"
ID_SEPARATOR = "/"


def condition_id(site: str | None, name: str) -> str:
    """The id a new condition of ``site`` is stored under (a reference study, or no site: its name)."""
    if site is None or site == REFERENCE_SITE:
        return name
    return f"{site}{ID_SEPARATOR}{name}"


@dataclass(frozen=True)
class Condition:
    """One condition of a model: its id, its owner (None: unknown, read as the reference) and its name."""

    id: str
    site: str | None
    name: str

    @property
    def shared(self) -> bool:
        """A reference study (or a condition of unknown owner): every site resolves its name."""
        return self.site is None or self.site == REFERENCE_SITE


def parse_id(cid: str) -> Condition:
    """What an id alone says (no version records): ``"site-a/b1"`` -> owner ``site-a``, name ``b1``."""
    site, sep, name = cid.partition(ID_SEPARATOR)
    return Condition(cid, site, name) if sep and site and name else Condition(cid, None, cid)


class ConditionIndex:
    """The conditions of one model, looked up by (site, name) or by id."""

    def __init__(self, conditions: Sequence[Condition]):
        self.conditions = list(conditions)
        self._ids = {c.id for c in self.conditions}

    @classmethod
    def from_ids(cls, ids: Iterable[str], owners: Mapping[str, tuple[str, str]] | None = None) -> ConditionIndex:
        """``owners`` ({id: (site, name)}, from version records) wins over what the id says."""
        owners = owners or {}
        return cls([Condition(i, *owners[i]) if i in owners else parse_id(i) for i in ids])

    def visible(self, site: str | None) -> list[Condition]:
        """The conditions whose names ``site`` may use: its own and the reference studies (None: all)."""
        if site is None:
            return list(self.conditions)
        return [c for c in self.conditions if c.site == site or c.shared]

    def visible_names(self, site: str | None) -> list[str]:
        return [c.name for c in self.visible(site)]

    def resolve(self, name: str, site: str | None) -> str | None:
        """The id ``site`` means by ``name`` (its own first, then a reference study), or None if none.

        Without a site: an exact id, else the one condition of that name;
        a name several sites use is refused (``UnknownConditionError``) so a
        caller never silently gets another site's study.
        """
        if site is not None:
            own = [c.id for c in self.conditions if c.site == site and c.name == name]
            shared = [c.id for c in self.conditions if c.shared and c.name == name]
            return (own or shared or [None])[0]
        if name in self._ids:
            return name
        hits = [c for c in self.conditions if c.name == name]
        if len(hits) > 1:
            owners = ", ".join(sorted(str(c.site) for c in hits))
            raise UnknownConditionError(
                f"known condition check failed: condition {name!r} is held by several sites ({owners}); "
                "say which site's data this is (site=..., --site)"
            )
        return hits[0].id if hits else None

    def owners(self) -> dict[str, tuple[str, str]]:
        return {c.id: (c.site, c.name) for c in self.conditions if c.site is not None}


__all__ = ["ID_SEPARATOR", "REFERENCE_SITE", "Condition", "ConditionIndex", "condition_id", "parse_id"]
