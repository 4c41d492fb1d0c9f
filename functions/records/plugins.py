"""The SalesRender PBX plugin's registrations: pk=PLUGIN#<company id> sk=REGISTRATION.

One item per company: SalesRender registers a plugin again when it is reinstalled, and the newest
registration replaces the one before (a replay of an older registration token cannot: the write is
conditional on its `iat` not being older than the stored one). The item holds the company id, the plugin's
id and alias, the cluster URI, and the HPT secret *encrypted* (Fernet: AES-128-CBC + HMAC-SHA256) with a
key derived (HKDF-SHA256) from the secret PLUGIN_ENCRYPTION_KEY (SSM SecureString in AWS, env locally).
The table's own encryption covers the disk; this keeps the HPT unreadable to anyone who can read the table
(a backup, a console user, an export) without the key. Callers get and give the HPT in plain text; the
ciphertext never leaves this module. Registrations are configuration, not personal data: no `ttl`.
"""

from __future__ import annotations

import base64
import functools
import time

from functions.core import resources, secrets, store, times

KEY_SECRET = "PLUGIN_ENCRYPTION_KEY"  # noqa: S105 - the name of the secret, not its value


class UnreadableSecret(RuntimeError):
    """The stored HPT does not decrypt with today's key (the key was changed): register the plugin again."""


def _key(cid: str) -> dict:
    return {"pk": f"PLUGIN#{cid}", "sk": "REGISTRATION"}


@functools.lru_cache(maxsize=4)
def _fernet(secret: str):
    # Deferred: the recorder and the write-back ask only whether a registration exists, never for its secret.
    from cryptography.fernet import Fernet
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"callbridge plugin hpt").derive(
        secret.encode())
    return Fernet(base64.urlsafe_b64encode(derived))


def _cipher():
    return _fernet(secrets.get(KEY_SECRET))  # a secret rotated in SSM is picked up with its cache


def save(cid: str, *, plugin_id: str, plugin_alias: str, cluster_uri: str, hpt: str, issued_at: int) -> bool:
    """Store the company's registration unless a newer one (a later `iat`) is stored; True when written."""
    token = _cipher().encrypt(hpt.encode()).decode()
    return store.update(_key(cid), {"cid": cid, "plugin_id": plugin_id, "plugin_alias": plugin_alias,
                                    "cluster_uri": cluster_uri, "hpt_encrypted": token, "issued_at": int(issued_at),
                                    "registered_at": times.now_iso()},
                        condition="attribute_not_exists(issued_at) OR issued_at <= :iat",
                        values={":iat": int(issued_at)})


def get(cid: str) -> dict | None:
    """The company's registration without its secret (None when the plugin is not registered)."""
    if not cid:
        return None
    item = store.get(_key(cid))
    if item is None:
        return None
    item.pop("hpt_encrypted", None)
    return item


# Every write-back job asks `registered`; a registration is only ever replaced, never deleted here, so a yes
# stays true and is kept a while per container. A no is never kept: the registration arrives in another
# container (the API's), and the next finished call of a company that has just installed the plugin must get
# its CDR. The entry belongs to the table client it was read with (resources.reset() starts afresh). An item
# deleted by hand is noticed within REGISTERED_SECONDS: meanwhile CDRs are still queued (the CDR worker drops
# them, "no_plugin") and an "auto" call-log write-back (postcall/write_back.py) still stays off.
REGISTERED_SECONDS = 60.0
_registered: dict[str, tuple[object, float]] = {}


def registered(cid: str | None) -> bool:
    if not cid:
        return False
    table, until = _registered.get(cid, (None, 0.0))
    if table is resources.table() and time.monotonic() < until:
        return True
    if get(cid) is None:
        return False
    _registered[cid] = (resources.table(), time.monotonic() + REGISTERED_SECONDS)
    return True


def secret(cid: str) -> str:
    """The registration's HPT in plain text (KeyError when not registered, UnreadableSecret when it
    cannot be decrypted)."""
    item = store.get(_key(cid))
    if item is None:
        raise KeyError(cid)
    from cryptography.fernet import InvalidToken

    try:
        return _cipher().decrypt(str(item["hpt_encrypted"]).encode()).decode()
    except (InvalidToken, KeyError):
        raise UnreadableSecret(f"the plugin secret of company {cid} cannot be decrypted") from None
