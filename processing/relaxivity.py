"""Longitudinal relaxivity r1 of gadolinium contrast agents, from the agent and field strength.

The DCE signal-to-concentration conversion needs the r1 of the agent that was injected, at the
field strength of the scanner: r1 differs by up to ~2x between agents (gadoterate ~3.5, gadoxetate
~6.9 /mM/s) and falls with the field. :func:`resolve_relaxivity` recognises the agent from the
Contrast/Bolus Agent (0018,0010) text or the code meaning of the Contrast/Bolus Agent Sequence
(0018,0012) - generic or brand name, case-insensitive - takes the nearest tabulated field strength
(1.5 or 3 T; any other field is flagged with a warning) and returns the value together with its
source, so that every DCE map can say which r1 it used and why.

Table
-----
Every number is r1 in L/mmol/s (= /mM/s) in **plasma at 37 °C**, from Rohrer M, Bauer H,
Mintorovitch J, Requardt M, Weinmann HJ. Comparison of magnetic properties of MRI contrast media
solutions at different magnetic field strengths. Invest Radiol 2005;40:715-724, Table 3 (bovine
plasma, 37 °C; values at 1.5 T and 3 T):

============================================  =======  =====
agent (brand)                                   1.5 T   3 T
============================================  =======  =====
gadoterate meglumine (Dotarem, Clariscan)          3.6   3.5
gadobutrol (Gadovist, Gadavist)                    5.2   5.0
gadoteridol (ProHance)                             4.1   3.7
gadobenate dimeglumine (MultiHance)                6.3   5.5
gadopentetate dimeglumine (Magnevist)              4.1   3.7
gadodiamide (Omniscan)                             4.3   4.0
gadoxetate disodium (Primovist, Eovist)            6.9   6.2
============================================  =======  =====

Shen Y et al. (Invest Radiol 2015;50:330-338) measured the same agents in human whole blood; their
values are not tabulated here (the Tofts model relates plasma/extravascular concentrations, and
whole-blood values differ by up to ~15 %). Gadopiclenol (Elucirem, Vueway) is not in either table
and is left out: a site using it sets its r1 in the configuration. Site values always win
(``[analysis] relaxivity_per_mM_s``); an unrecognised agent gets the configured default with a
warning that reaches the map provenance, ``summary.json`` and the SR.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from processing.errors import InputError

logger = logging.getLogger(__name__)

__all__ = [
    "AGENTS",
    "DEFAULT_RELAXIVITY_PER_MM_S",
    "R1_PLASMA_ROHRER_2005",
    "Relaxivity",
    "RelaxivityError",
    "identify_agent",
    "normalise_overrides",
    "resolve_relaxivity",
]

#: r1 used when the agent is unknown and the site set no default: gadoterate in plasma at 3 T
#: (Rohrer 2005), the phantom's historical value.
DEFAULT_RELAXIVITY_PER_MM_S = 3.5

#: field strengths (T) of the table
TABLE_FIELDS_T = (1.5, 3.0)

#: Rohrer 2005, Table 3, plasma 37 °C: generic name -> {field (T): r1 (/mM/s)}
R1_PLASMA_ROHRER_2005: dict[str, dict[float, float]] = {
    "gadoterate": {1.5: 3.6, 3.0: 3.5},
    "gadobutrol": {1.5: 5.2, 3.0: 5.0},
    "gadoteridol": {1.5: 4.1, 3.0: 3.7},
    "gadobenate": {1.5: 6.3, 3.0: 5.5},
    "gadopentetate": {1.5: 4.1, 3.0: 3.7},
    "gadodiamide": {1.5: 4.3, 3.0: 4.0},
    "gadoxetate": {1.5: 6.9, 3.0: 6.2},
}

#: generic name -> names that identify it in a Contrast/Bolus Agent text (lower case; matched as
#: whole words, so "gadoterate meglumine 0.5 mmol/mL" and "DOTAREM" both match)
AGENTS: dict[str, tuple[str, ...]] = {
    "gadoterate": ("gadoterate", "gadoteric acid", "gd-dota", "dotarem", "clariscan", "artirem"),
    "gadobutrol": ("gadobutrol", "gd-bt-do3a", "gadovist", "gadavist"),
    "gadoteridol": ("gadoteridol", "gd-hp-do3a", "prohance"),
    "gadobenate": ("gadobenate", "gd-bopta", "multihance"),
    "gadopentetate": ("gadopentetate", "gadopentetic acid", "gd-dtpa", "magnevist", "magnograf"),
    "gadodiamide": ("gadodiamide", "gd-dtpa-bma", "omniscan"),
    "gadoxetate": ("gadoxetate", "gadoxetic acid", "gd-eob-dtpa", "primovist", "eovist"),
    # recognised, but no r1 in the table: the configured value (or the default) applies
    "gadopiclenol": ("gadopiclenol", "elucirem", "vueway"),
}

#: relative distance to the nearest tabulated field beyond which a warning is recorded
FIELD_TOLERANCE = 0.1


class RelaxivityError(InputError):
    """Invalid relaxivity configuration (non-positive value, unknown agent name in an override)."""


@dataclass(frozen=True)
class Relaxivity:
    """The r1 used for one DCE series, and why.

    Attributes
    ----------
    value : float
        r1 in /mM/s.
    source : {"table", "config", "default"}
        ``table``: Rohrer 2005 plasma table; ``config``: the site's per-agent value; ``default``:
        the configured default for an unknown or undeclared agent.
    agent : str or None
        Generic name of the recognised agent (None when not recognised).
    declared_agent : str or None
        The Contrast/Bolus Agent text as recorded in the images.
    field_strength_t : float or None
        Magnetic Field Strength of the series (T).
    table_field_t : float or None
        Tabulated field whose value was used (``table`` source only).
    reference : str
        Citation of the value (or of the configuration).
    warnings : tuple of str
    """

    value: float
    source: str
    agent: str | None
    declared_agent: str | None
    field_strength_t: float | None
    table_field_t: float | None = None
    reference: str = ""
    warnings: tuple[str, ...] = field(default=())

    def provenance(self) -> dict[str, Any]:
        """Flat JSON-able record for the map provenance."""
        out: dict[str, Any] = {
            "relaxivity_per_mM_s": self.value,
            "relaxivity_source": self.source,
            "relaxivity_reference": self.reference,
            "contrast_agent": self.agent,
            "contrast_agent_declared": self.declared_agent,
            "field_strength_T": self.field_strength_t,
        }
        if self.table_field_t is not None:
            out["relaxivity_table_field_T"] = self.table_field_t
        if self.warnings:
            out["relaxivity_warnings"] = list(self.warnings)
        return out


def _pattern(name: str) -> re.Pattern[str]:
    return re.compile(r"(?<![a-z0-9])" + re.escape(name) + r"(?![a-z0-9])")


_PATTERNS = [(generic, _pattern(name)) for generic, names in AGENTS.items() for name in names]


def identify_agent(*texts: str | None) -> str | None:
    """Generic name of the gadolinium agent named in any of ``texts`` (case-insensitive).

    Parameters
    ----------
    *texts : str or None
        Contrast/Bolus Agent, agent code meanings, ingredient... in order of preference.

    Returns
    -------
    str or None
        A key of :data:`AGENTS`; None when no text names a known agent.
    """
    for text in texts:
        if not text:
            continue
        low = str(text).lower()
        # longest names first so that "gd-dtpa-bma" (gadodiamide) wins over "gd-dtpa"
        hits = sorted(((len(p.pattern), g) for g, p in _PATTERNS if p.search(low)), reverse=True)
        if hits:
            return hits[0][1]
    return None


def normalise_overrides(overrides: Mapping[str, float] | None) -> dict[str, float]:
    """Site r1 values keyed by generic agent name.

    A name that is not a known agent (generic or brand) is kept lower-cased and matched as a
    whole word against the declared agent text (a local or new agent).

    Raises
    ------
    RelaxivityError
        A value is not a positive number, or a name is empty.
    """
    out: dict[str, float] = {}
    for name, value in (overrides or {}).items():
        key = identify_agent(str(name)) or str(name).strip().lower()
        if not key:
            raise RelaxivityError("relaxivity override with an empty agent name")
        try:
            r1 = float(value)
        except (TypeError, ValueError):
            raise RelaxivityError(
                f"relaxivity for {name!r} must be a number, got {value!r}"
            ) from None
        if not r1 > 0:
            raise RelaxivityError(f"relaxivity for {name!r} must be positive, got {value}")
        out[key] = r1
    return out


def resolve_relaxivity(
    agent_text: str | None,
    field_strength_t: float | None,
    *,
    overrides: Mapping[str, float] | None = None,
    default: float = DEFAULT_RELAXIVITY_PER_MM_S,
) -> Relaxivity:
    """The r1 to use for a series that declares ``agent_text`` at ``field_strength_t``.

    Parameters
    ----------
    agent_text : str or None
        Contrast/Bolus Agent (0018,0010) or the agent code meaning.
    field_strength_t : float or None
        Magnetic Field Strength (0018,0087) in T.
    overrides : mapping, optional
        Site values, agent (generic or brand name) -> r1 (/mM/s); they win over the table.
    default : float
        r1 for an unknown or undeclared agent (recorded with a warning).

    Returns
    -------
    Relaxivity

    Raises
    ------
    RelaxivityError
        ``default`` or an override is not positive.
    """
    if not default > 0:
        raise RelaxivityError(f"default relaxivity must be positive, got {default}")
    sites = normalise_overrides(overrides)
    generic = identify_agent(agent_text)
    declared = str(agent_text) if agent_text else None
    fs = float(field_strength_t) if field_strength_t else None
    site_key = generic if generic in sites else None
    if site_key is None and declared:
        site_key = next(
            (k for k in sites if k not in AGENTS and _pattern(k).search(declared.lower())), None
        )
    if site_key is not None:
        return Relaxivity(
            sites[site_key],
            "config",
            generic or site_key,
            declared,
            fs,
            reference="site configuration [analysis] relaxivity_per_mM_s",
        )
    if generic is None or generic not in R1_PLASMA_ROHRER_2005:
        why = (
            "no contrast agent recorded in the DCE series"
            if not declared
            else f"contrast agent {declared!r} not recognised"
            if generic is None
            else f"contrast agent {generic} has no r1 in the published table"
        )
        warning = (
            f"{why}: default r1 {default} /mM/s used; Ktrans, ve, vp and IAUC60 scale with 1/r1"
        )
        logger.warning("%s", warning)
        return Relaxivity(
            float(default),
            "default",
            generic,
            declared,
            fs,
            reference="configured default_relaxivity_per_mM_s",
            warnings=(warning,),
        )
    warnings: list[str] = []
    if fs is None:
        table_field = 3.0
        warnings.append("Magnetic Field Strength not recorded: r1 at 3 T used")
    else:
        table_field = min(TABLE_FIELDS_T, key=lambda f: abs(f - fs))
        if abs(table_field - fs) > FIELD_TOLERANCE * table_field:
            warnings.append(
                f"field strength {fs} T is not tabulated: r1 at the nearest "
                f"tabulated field ({table_field} T) used"
            )
    for w in warnings:
        logger.warning("%s", w)
    return Relaxivity(
        R1_PLASMA_ROHRER_2005[generic][table_field],
        "table",
        generic,
        declared,
        fs,
        table_field_t=table_field,
        reference="Rohrer et al. Invest Radiol 2005;40:715-724, plasma 37 °C",
        warnings=tuple(warnings),
    )
