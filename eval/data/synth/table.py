"""The domain table: the seven synthetic domains by code, each with its card and renderer."""
from __future__ import annotations

from typing import Sequence

from anomalyclaw.domains import DomainCard
from anomalyclaw.errors import ConfigError

from .aerial import _aerial_sample
from .base import SynthDomain
from .coins import _coin_sample
from .medical import _ct_sample, _histology_sample, _retina_sample
from .nut import _nut_sample
from .textures import _texture_sample

#: The synthetic domains, keyed by code. Cards say what normal is; traits drive the tools.
DOMAINS: dict[str, SynthDomain] = {d.code: d for d in [
    SynthDomain(
        "S1", "texture_surface", "gravel", ("gravel", "grass"),
        ("crack", "stain", "texture_change", "deformation"),
        DomainCard("S1", "synthetic texture surface (gravel aggregate)", "RGB photograph",
                   "a uniform gravel-aggregate surface like the references: the same stone size, colour and "
                   "grain; gentle uneven lighting and a different patch of the surface are normal",
                   "cracks, stains or spills, a patch of different material or grain, a local bulge or dent",
                   traits=frozenset({"texture"})),
        _texture_sample),
    SynthDomain(
        "S2", "coin_count", "coin_tray", ("coins",),
        ("missing_part", "extra_part", "misplaced_part", "size_change"),
        DomainCard("S2", "synthetic coin tray (counting)", "greyscale photograph",
                   "exactly 12 coins in 3 rows of 4, each coin in its own slot, the same coin in the same slot "
                   "as in the references; small shifts, turned coin faces and lighting are normal",
                   "a missing coin, an extra coin, a coin out of its slot, a coin of the wrong size",
                   traits=frozenset({"object", "aligned", "counting"})),
        _coin_sample),
    SynthDomain(
        "S3", "ct_phantom", "head_phantom", ("shepp_logan_phantom",),
        ("lesion", "mass_effect"),
        DomainCard("S3", "synthetic head CT (Shepp-Logan phantom)", "CT slice",
                   "a head slice with the references' structures and densities; head size, pose, shape and "
                   "noise differ between patients",
                   "a focal lesion darker or brighter than the tissue around it, or structures pushed aside "
                   "by a mass (mass effect)", traits=frozenset({"medical"})),
        _ct_sample),
    SynthDomain(
        "S4", "retina_fundus", "fundus", ("retina",),
        ("haemorrhage", "exudate", "cotton_wool_spot"),
        DomainCard("S4", "synthetic retinal fundus photograph", "fundus RGB",
                   "a healthy retina: optic disc, vessels and macula; left or right eye, rotation, "
                   "pigmentation, camera colour and illumination differ between patients",
                   "haemorrhages (dark red blots), hard exudates (yellow-white specks), cotton-wool spots "
                   "(pale fluffy patches)", traits=frozenset({"medical"})),
        _retina_sample),
    SynthDomain(
        "S5", "histology_ihc", "immunohistochemistry", ("immunohistochemistry",),
        ("atypical_nuclei", "abnormal_stain", "tissue_tear"),
        DomainCard("S5", "synthetic histology (immunohistochemistry, DAB + haematoxylin)", "microscopy RGB",
                   "tissue like the references: brown-stained glands, blue nuclei of normal size, pale stroma "
                   "and lumen; field of view, orientation and stain strength vary",
                   "enlarged dark (atypical) nuclei, a patch of over- or under-staining, a tear in the tissue",
                   traits=frozenset({"medical", "texture"})),
        _histology_sample),
    SynthDomain(
        "S6", "aerial_change", "farmland", ("grass", "gravel", "brick"),
        ("new_building", "demolished_building"),
        DomainCard("S6", "synthetic aerial change (bi-temporal)", "aerial RGB",
                   "the same place as in the earlier image: crops grown or harvested, different light, "
                   "shadows and a registration error of a few pixels are normal",
                   "a building that appeared or disappeared (the mask covers its roof and shadow)",
                   reference_type="bi_temporal", traits=frozenset({"aerial", "bi_temporal", "aligned"})),
        _aerial_sample),
    SynthDomain(
        "S7", "rotating_nut", "hex_nut", ("gravel", "grass"),
        ("scratch", "missing_part", "stain", "deformation"),
        DomainCard("S7", "synthetic machined hex nut", "RGB photograph",
                   "an intact brushed-steel hex nut with a stamped 'M8' mark, at any in-plane rotation and "
                   "small offset, lit from the top left",
                   "scratches, a chipped-off piece, rust stains, dents", traits=frozenset({"object", "rotating"})),
        _nut_sample),
]}


def _choose_domains(domains: Sequence[str] | None) -> list[SynthDomain]:
    if domains is None:
        return list(DOMAINS.values())
    if isinstance(domains, str):
        domains = domains.split(",")
    by_name = {d.name: d for d in DOMAINS.values()}
    chosen = []
    for key in domains:
        key = key.strip()
        dom = DOMAINS.get(key.upper()) or by_name.get(key)
        if dom is None:
            known = ", ".join(f"{d.code} ({d.name})" for d in DOMAINS.values())
            raise ConfigError(f"unknown synthetic domain {key!r}; choose codes or names from: {known}")
        if dom not in chosen:
            chosen.append(dom)
    if not chosen:
        raise ConfigError("domains is empty: pass None for all synthetic domains or name at least one")
    return chosen
