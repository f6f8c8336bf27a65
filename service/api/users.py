"""Who a call is for: the user it names, and which users its bearer token may name.

A call names its user in metadata ``x-nextword-user`` (1 to 64 of ``A-Za-z0-9._:@-``); a call
without it reads and learns no personal history. With bearer tokens (``--auth-token-file``), a
token line may bind the token to users:

    TOKEN                  may name no user (no personal history)
    TOKEN alice,bob        may name alice or bob
    TOKEN *                may name any user (a trusted backend serving many)

A call naming a user its token is not bound to gets PERMISSION_DENIED. Without tokens, the
user id is taken as given. User ids, like typed text, never reach a log line.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass

USER_KEY = "x-nextword-user"
SANE_USER = re.compile(r"[A-Za-z0-9._:@-]{1,64}")
ANY_USER = "*"


class BadUser(ValueError):
    """The user metadata is malformed: INVALID_ARGUMENT."""


@dataclass(frozen=True)
class Grant:
    """A bearer token and the users it may name (None: none; ``ANY_USER`` in ``users``: any)."""

    token: str
    users: frozenset[str] | None = None

    def allows(self, user: str) -> bool:
        return self.users is not None and (ANY_USER in self.users or user in self.users)

    @classmethod
    def parse(cls, line: str) -> Grant:
        """``TOKEN [USERS]``: USERS is ``*`` or user ids separated by commas."""
        token, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if not rest:
            return cls(token)
        users = frozenset(u.strip() for u in rest.split(","))
        for user in users:
            if user != ANY_USER and not SANE_USER.fullmatch(user):
                raise ValueError(
                    f"a token line binds {user!r}, which is not a user id (1 to 64 of A-Za-z0-9._:@-, or *)"
                )
        return cls(token, users)


def granted(grants: Sequence[Grant], authorization: str) -> Grant | None:
    """The grant of an ``Authorization: Bearer TOKEN`` value, or None when it holds no valid token. Every token
    is compared, always, in constant time: timing says nothing about which one nearly matched."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    given = token.strip().encode()
    matches = [hmac.compare_digest(given, grant.token.encode()) for grant in grants]
    return next((grant for grant, match in zip(grants, matches) if match), None)


def user_of(metadata: dict[str, str]) -> str | None:
    """The user a call names, or None; BadUser when the value is not a user id."""
    user = metadata.get(USER_KEY)
    if user is None:
        return None
    if not SANE_USER.fullmatch(user):
        raise BadUser(f"metadata {USER_KEY} must be 1 to 64 of A-Za-z0-9._:@- (got {len(user)} characters)")
    return user
