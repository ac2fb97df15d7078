"""Where items come from: validated manifests, MVTec-style folders, MMAD question files, the synthetic
benchmark."""
import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, submodules=["synth"], submod_attrs={
    "manifests": ["ManifestContents", "load_manifest", "read_manifest", "write_manifest"],
    "folders": ["FolderLayoutError", "import_mvtec_folder"],
    "mmad": ["MCQuestion", "MMADContents", "MMADImage", "MMAD_TYPES", "read_mmad"],
    "parts": ["write_parts_folder"],
})
