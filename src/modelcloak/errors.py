"""The root of every error modelcloak raises on purpose.

Each room (model, bundle, keys, runtime, ...) defines one error type that derives from
`ModelcloakError`, so callers can catch one room's failures or all of them, and the CLI can turn
any of them into a single line for the user.
"""


class ModelcloakError(Exception):
    """Something a user can act on went wrong; the message says what."""
