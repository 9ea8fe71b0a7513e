"""The device side of the owner backend: attested key release, licence revalidation, usage reports.

Light on purpose (`pip install 'modelcloak[licensing]'`: httpx and cbor2): a device that gets its
keys from the owner backend needs none of the server's packages. The wire formats both sides
share live here (`protocol`); the server (`modelcloak.owner`) imports them, never the reverse.
"""
