"""Domain cards: what "normal" means in a domain, and the traits that decide which tools apply.

A VLM asked directly judges by world knowledge; the card states the task's own definition of
normal, and its traits (aligned, bi-temporal, texture, ...) drive every tool's applicability.
Cards come from a manifest item (field ``domain_card``), else from the built-in table below by
``domain_code`` or ``domain``, else a generic card.
"""
from __future__ import annotations

from dataclasses import dataclass, field, asdict
from typing import Any, Mapping

#: Every trait a card may carry. Tools state their applicability in these words.
TRAITS = {
    "aligned": "query and references share pose and framing, so pixels can be compared directly",
    "bi_temporal": "the reference is an earlier capture of the same place",
    "rotating": "a rigid object that appears at arbitrary in-plane rotations",
    "texture": "a homogeneous or periodic surface with no fixed layout",
    "counting": "normal is a fixed set of parts in a fixed count and arrangement",
    "medical": "a medical image; anatomy varies between patients",
    "aerial": "an overhead (satellite or aerial) view",
    "road": "a driving scene seen from a vehicle",
    "object": "a single manufactured object or product",
}


@dataclass(frozen=True)
class DomainCard:
    """The task's definition of normal for one domain, and the traits tools key on.

    ``category_traits`` adds traits for some categories of a mixed domain (in MVTec-AD, the
    texture categories are ``texture`` and the screw is ``rotating``).
    """

    code: str
    name: str
    modality: str = "RGB"
    normal: str = "an image that matches the reference images in content, layout and appearance"
    anomaly: str = "any local or global deviation that no reference image shows"
    reference_type: str = "few_shot"  # or "bi_temporal"
    traits: frozenset[str] = frozenset()
    category_traits: Mapping[str, frozenset[str]] = field(default_factory=dict)
    knowledge: str = ""
    """Free text on the domain's normal look and defect kinds (MMAD's ``domain_knowledge.json``
    for a class, when given); the prompt shows it after the card."""

    def traits_for(self, category: str | None) -> frozenset[str]:
        extra = self.category_traits.get(category or "", frozenset())
        return frozenset(self.traits) | frozenset(extra)

    def describe(self, category: str | None = None) -> str:
        """The card as the prompt shows it."""
        traits = ", ".join(sorted(self.traits_for(category))) or "none"
        what = f"{self.name} ({self.modality})" + (f", category '{category}'" if category else "")
        text = (f"Domain: {what}.\nNormal: {self.normal}.\nAnomalous: {self.anomaly}.\n"
                f"References: {self.reference_type.replace('_', '-')}. Traits: {traits}.")
        if self.knowledge.strip():
            text += f"\nDomain knowledge (defect kinds and the normal look):\n{self.knowledge.strip()}"
        return text

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["traits"] = sorted(self.traits)
        d["category_traits"] = {k: sorted(v) for k, v in self.category_traits.items()}
        return d

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "DomainCard":
        """A card from a manifest's ``domain_card`` object. A text field that is null takes its
        default (``name`` takes the code): a card with ``"name": null`` describes its domain by
        code instead of failing every item that carries it. Card text is data: it is shown in
        prompts as written, never read as a template."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a domain_card must be an object, got {type(data).__name__}")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown domain_card keys {sorted(unknown)}")
        code = data.get("code")
        if not isinstance(code, str) or not code.strip():
            raise ValueError(f"a domain_card needs a 'code' (a non-empty string), got {code!r}")
        values: dict[str, Any] = {"code": code}
        for key in ("name", "modality", "normal", "anomaly", "reference_type"):
            value = data.get(key)
            if value is None:
                if key == "name":
                    values["name"] = code
                continue
            if not isinstance(value, str):
                raise ValueError(f"domain_card '{key}' must be a string or null, got {type(value).__name__}")
            values[key] = value
        raw_traits = data.get("traits") or ()
        if isinstance(raw_traits, str) or not isinstance(raw_traits, (list, tuple, set, frozenset)):
            raise ValueError(f"domain_card 'traits' must be a list of trait names, got {raw_traits!r}")
        traits = frozenset(raw_traits)
        bad = traits - set(TRAITS)
        if bad:
            raise ValueError(f"unknown traits {sorted(map(str, bad))}; known: {sorted(TRAITS)}")
        raw_cats = data.get("category_traits") or {}
        if not isinstance(raw_cats, Mapping):
            raise ValueError(f"domain_card 'category_traits' must map categories to trait lists, got {raw_cats!r}")
        cats = {}
        for cat, names in raw_cats.items():
            if isinstance(names, str) or not isinstance(names, (list, tuple, set, frozenset)):
                raise ValueError(f"domain_card 'category_traits' of {cat!r} must be a list of trait names")
            cats[str(cat)] = frozenset(names)
            bad = cats[str(cat)] - set(TRAITS)
            if bad:
                raise ValueError(f"unknown traits {sorted(map(str, bad))} for category {cat!r}; known: {sorted(TRAITS)}")
        return cls(**values, traits=traits, category_traits=cats)


_MVTEC_TEXTURES = ("carpet", "grid", "leather", "tile", "wood")

#: CrossDomainVAD-12, keyed by domain code. Wording is ours; see the paper for the sources.
BUILTIN_CARDS: dict[str, DomainCard] = {c.code: c for c in [
    DomainCard("D1", "industrial manufacturing (MVTec-AD)", "RGB",
               "a defect-free part or surface like the references, same colour, shape and markings",
               "scratches, dents, cracks, holes, contamination, missing or misplaced components, "
               "colour or texture deviations",
               traits=frozenset({"object", "aligned"}),
               category_traits={**{t: frozenset({"texture"}) for t in _MVTEC_TEXTURES},
                                "screw": frozenset({"rotating"}), "metal_nut": frozenset({"rotating"}),
                                "hazelnut": frozenset({"rotating"})}),
    DomainCard("D2", "complex industrial (VisA)", "RGB",
               "a defect-free product, possibly several instances, matching the references",
               "scratches, chips, cracks, burns, missing parts, contamination, misplacement",
               traits=frozenset({"object", "aligned"})),
    DomainCard("D3", "logical constraints (MVTec-LOCO)", "RGB",
               "every expected component present in the right number, place, size and colour",
               "a missing, extra, misplaced, wrong-sized or wrong-coloured component, or a "
               "structural defect", traits=frozenset({"object", "aligned", "counting"})),
    DomainCard("D4", "3D products rendered from point clouds (Real3D-AD)", "rendered point cloud",
               "the object's shape as in the template renders",
               "bulges, sinks or foreign material on the surface",
               traits=frozenset({"object"})),
    DomainCard("D5", "retail products (GoodsAD)", "RGB",
               "an intact package matching the reference product in shape, label and colour",
               "torn, crushed, dented, stained, open or mislabelled packaging",
               traits=frozenset({"object", "counting"})),
    DomainCard("D6", "concrete infrastructure (SDNET2018)", "RGB",
               "an intact concrete surface; weathering, stains, joints and texture are normal",
               "cracks of any width or length", traits=frozenset({"texture"})),
    DomainCard("D7", "remote-sensing change (LEVIR-CD+)", "satellite RGB",
               "the same place as in the earlier image, up to season, light and registration",
               "a building that appeared, disappeared or changed", reference_type="bi_temporal",
               traits=frozenset({"aerial", "bi_temporal", "aligned"})),
    DomainCard("D8", "dermoscopy (DermaMNIST)", "dermoscopy RGB",
               "a benign melanocytic nevus: symmetric, regular border, uniform colour",
               "melanoma: asymmetry, irregular border, several colours, large or changing lesion",
               traits=frozenset({"medical"})),
    DomainCard("D9", "brain MRI (BraTS2021 slices)", "MRI slice",
               "a brain slice with symmetric structure and normal tissue intensities",
               "a tumour, oedema or mass effect: abnormal intensity or asymmetry",
               traits=frozenset({"medical"})),
    DomainCard("D10", "liver CT (BMAD)", "CT slice",
               "liver parenchyma of uniform density without focal lesions",
               "a focal lesion: tumour, metastasis, cyst or abscess", traits=frozenset({"medical"})),
    DomainCard("D11", "GI endoscopy (HyperKvasir)", "endoscopy RGB",
               "clean pink or red mucosa with normal folds and vessels",
               "polyps, ulcers, bleeding, inflammation or other lesions",
               traits=frozenset({"medical"})),
    DomainCard("D12", "road safety (BDD100K, RoadAnomaly21)", "dashcam RGB",
               "an ordinary road scene: road surface, vehicles, pedestrians, signs, buildings",
               "an unexpected obstacle on or near the road: animals, fallen objects, debris",
               traits=frozenset({"road"})),
]}

GENERIC_CARD = DomainCard("generic", "generic visual inspection")


def find_card(domain_code: str | None, domain: str | None = None) -> DomainCard:
    """The built-in card for a domain code or name, else the generic card (named after it)."""
    if domain_code and domain_code in BUILTIN_CARDS:
        return BUILTIN_CARDS[domain_code]
    for card in BUILTIN_CARDS.values():
        if domain and domain == card.name:
            return card
    code = domain_code or domain or GENERIC_CARD.code
    return DomainCard(code, domain or code)
