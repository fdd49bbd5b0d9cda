"""The live set of keypairs: replaced as a whole when the keypairs file changes.

A ``Mapping`` from access key to ``Keypair``, so everything that looks keys up (request
signing, sessions) sees a reload at once. ``replace`` says which access keys lost or
changed their credentials, so the streams they opened can be closed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from .signing import Keypair


class KeyStore(Mapping[str, Keypair]):
    def __init__(self, keypairs: Mapping[str, Keypair]) -> None:
        self._keys = dict(keypairs)

    def __getitem__(self, access_key: str) -> Keypair:
        return self._keys[access_key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def replace(self, keypairs: Mapping[str, Keypair]) -> set[str]:
        """Swap in a new set; return the access keys revoked or changed by it."""
        old, self._keys = self._keys, dict(keypairs)
        return {key for key, kp in old.items() if self._keys.get(key) != kp}
