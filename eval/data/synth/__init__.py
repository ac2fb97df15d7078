"""The bundled synthetic benchmark: seven domains built from images scikit-image ships, with
seeded defects, pixel masks and normal variation, written as a movable manifest folder.

Every domain renders a *scene* (what is there), then an *acquisition* (light, colour, focus,
sensor noise). Normal images vary the way normal images do in that field: crops and shifts,
rotation where the object rotates, anatomy between "patients", season and registration between
two satellite passes. An anomalous image is the same scene and acquisition with one seeded
defect; its mask marks every pixel the defect changed (255 = anomalous). Output is
deterministic in ``seed``: same seed, same bytes.

    >>> from anomalyclaw.eval.data.synth import generate_benchmark
    >>> manifest_path = generate_benchmark("synth", seed=0)   # doctest: +SKIP

One module per domain family (``textures``, ``coins``, ``medical``, ``aerial``, ``nut``) renders
samples with the shared ``raster`` helpers; ``table`` lists the domains and ``writer`` writes them.
"""
import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, submod_attrs={
    "base": ["DEFECT_FAMILIES", "N_REFERENCES", "REFERENCE_POOL_SIZE", "SOURCE_DATASET", "Sample", "SynthDomain"],
    "table": ["DOMAINS"],
    "writer": ["generate_benchmark"],
    "mmad": ["write_mmad_questions"],
})
