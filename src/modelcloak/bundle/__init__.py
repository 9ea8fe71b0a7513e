"""The bundle room: the container format (manifest, signature, encrypted chunked sections)."""

from modelcloak.bundle.container import FORMAT_VERSION, MAGIC, Bundle, SectionSource, key_id, write_bundle
from modelcloak.bundle.errors import (
    BundleError,
    ManifestError,
    NotABundleError,
    SignatureError,
    TamperedError,
    UnsupportedVersionError,
    WrongKeyError,
)
from modelcloak.bundle.manifest import DEFAULT_CHUNK_SIZE, Manifest, SectionEntry

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_VERSION",
    "MAGIC",
    "Bundle",
    "BundleError",
    "Manifest",
    "ManifestError",
    "NotABundleError",
    "SectionEntry",
    "SectionSource",
    "SignatureError",
    "TamperedError",
    "UnsupportedVersionError",
    "WrongKeyError",
    "key_id",
    "write_bundle",
]
