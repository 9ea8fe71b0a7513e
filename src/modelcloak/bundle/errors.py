"""The bundle room's error types: one root, with subclasses so callers can tell failures apart."""

from modelcloak.errors import ModelcloakError


class BundleError(ModelcloakError):
    """A bundle could not be written, parsed, authenticated or decrypted."""


class NotABundleError(BundleError):
    """The file does not start with the modelcloak magic bytes."""


class UnsupportedVersionError(BundleError):
    """The bundle's format version is not one this build reads."""


class ManifestError(BundleError):
    """The manifest is malformed or describes an impossible layout."""


class WrongKeyError(BundleError):
    """The key offered is not the key the bundle was sealed with."""


class TamperedError(BundleError):
    """Authentication failed: bytes were modified, truncated, reordered or spliced."""


class SignatureError(BundleError):
    """The owner signature is missing, untrusted or invalid."""
