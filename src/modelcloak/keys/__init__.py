"""The keys room: where a bundle's 256-bit model key comes from.

Every provider answers two questions: "give me a fresh key to seal with" (`new_key`, owner side)
and "give me the key this bundle was sealed with" (`key_for`, device side). What a provider needs
to find the key again (a passphrase's salt and cost, say) goes into the manifest's public key spec;
the key itself never does. Later providers (TPM, owner backend) implement the same interface.
"""

from modelcloak.keys.errors import KeyProviderError
from modelcloak.keys.providers import (
    KEY_SIZE,
    EnvKey,
    KeyFile,
    KeyProvider,
    Passphrase,
    generate_key_file,
    parse_key_text,
)

__all__ = [
    "KEY_SIZE",
    "EnvKey",
    "KeyFile",
    "KeyProvider",
    "KeyProviderError",
    "Passphrase",
    "generate_key_file",
    "parse_key_text",
]
