"""API keys: what a key may do, how its secret is checked, and the first admin key.

A secret reads `iak_<id>_<token>`. The id is public and names the stored key; only a
SHA-256 of the token is stored (tokens are 256 random bits, so a slow hash adds nothing),
and it is compared in constant time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import hmac
import logging
import os
import secrets
import time
from datetime import datetime, timedelta
from pathlib import Path
from stat import S_ISREG

from . import deadline
from .config import MIN_SECRET_LENGTH, ConfigError
from .errors import BackendUnavailable, Conflict, Forbidden, Unauthorized

log = logging.getLogger(__name__)


class Scope(enum.StrEnum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


#: What each scope grants: `write` includes `read`, `admin` includes both.
GRANTS = {
    Scope.READ: {Scope.READ},
    Scope.WRITE: {Scope.READ, Scope.WRITE},
    Scope.ADMIN: {Scope.READ, Scope.WRITE, Scope.ADMIN},
}

#: The owner of the first admin key, and of images stored before owners existed.
ADMIN_OWNER = "admin"
#: `last_used_at` is written at most this often per key, not on every request.
TOUCH_EVERY = timedelta(minutes=1)
#: The longest noting a key's use may hold up a request.
TOUCH_WAIT = 0.25


@dataclasses.dataclass(frozen=True)
class ApiKey:
    """A stored key: never its secret, only a hash of it."""

    id: str
    name: str
    owner: str
    scopes: tuple[Scope, ...]
    secret_hash: str
    created_at: datetime
    last_used_at: datetime | None = None
    revoked_at: datetime | None = None

    def grants(self, scope: Scope) -> bool:
        return any(scope in GRANTS[held] for held in self.scopes)

    def matches(self, token: str) -> bool:
        return hmac.compare_digest(_hash(token), self.secret_hash)


@dataclasses.dataclass(frozen=True)
class Caller:
    """Whose images a request may see: its key's owner's, or everyone's with `admin`."""

    owner: str
    admin: bool = False

    @classmethod
    def of(cls, key: ApiKey | None) -> Caller:
        """The caller a key makes; with no key (AUTH=off), one who sees everything."""
        if key is None:
            return EVERYONE
        return cls(key.owner, admin=key.grants(Scope.ADMIN))

    def sees(self, owner: str) -> bool:
        return self.admin or owner == self.owner

    def owner_filter(self, asked: str | None) -> str | None:
        """The owner a list covers: an admin's choice (None: all), else the caller's own;
        `Forbidden` for anyone else asking for another owner's."""
        if self.admin:
            return asked
        if asked is not None and asked != self.owner:
            raise Forbidden("Only an admin key may list another owner's images")
        return self.owner


#: A caller who sees every image and owns what it stores as the admin key's owner.
EVERYONE = Caller(ADMIN_OWNER, admin=True)


def new_key(name: str, owner: str, scopes, now: datetime) -> tuple[ApiKey, str]:
    """A new key and its secret (shown once, never stored)."""
    key_id, token = secrets.token_hex(6), secrets.token_urlsafe(32)
    return key_from_secret(f"iak_{key_id}_{token}", name, owner, scopes, now), (
        f"iak_{key_id}_{token}"
    )


def key_from_secret(secret: str, name: str, owner: str, scopes, now: datetime) -> ApiKey:
    """The stored form of a key whose secret is already known (the bootstrap's file)."""
    key_id, token = parse_secret(secret)
    return ApiKey(
        id=key_id,
        name=name,
        owner=owner,
        scopes=tuple(Scope(scope) for scope in scopes),
        secret_hash=_hash(token),
        created_at=now,
    )


def parse_secret(secret: str) -> tuple[str, str]:
    """`(id, token)` of a secret; `Unauthorized` if it is not shaped like one of ours."""
    prefix, _, rest = secret.partition("_")
    key_id, _, token = rest.partition("_")
    if prefix != "iak" or len(key_id) != 12 or not token or not secret.isascii():
        raise Unauthorized("The API key is malformed")
    return key_id, token


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Keys:
    """Checks presented secrets against the repository's keys.

    A key read from the repository is trusted for `REREAD_AFTER` seconds in this process
    (a metadata GET would otherwise spend a third of its time reading its key): a key
    revoked here is refused at once, one revoked by another process (another worker,
    `flask keys revoke`) within that second.
    """

    REREAD_AFTER = 1.0
    #: Known keys remembered at most; unknown ids are never remembered.
    _REMEMBERED = 10_000

    def __init__(self, repository, clock, monotonic=time.monotonic):
        self.repository = repository
        self.clock = clock
        self.monotonic = monotonic
        self._read: dict[str, tuple[float, ApiKey]] = {}

    def authenticate(self, secret: str | None, scope: Scope) -> ApiKey:
        """The key `secret` names, if it is valid and grants `scope`."""
        if not secret:
            raise Unauthorized()
        key_id, token = parse_secret(secret)
        key = self._get(key_id)
        if key is None or key.revoked_at is not None or not key.matches(token):
            raise Unauthorized("The API key is not valid (unknown, revoked or mistyped)")
        if not key.grants(scope):
            raise Forbidden(f"This API key lacks the '{scope}' scope")
        now = self.clock()
        if key.last_used_at is None or now - key.last_used_at >= TOUCH_EVERY:
            self._touch(key, now)
            key = dataclasses.replace(key, last_used_at=now)
            self._remember(key)
        return key

    def _touch(self, key: ApiKey, now: datetime) -> None:
        """Note a use, by the way: a metadata store that cannot take the write now (locked,
        read-only, full) neither fails nor holds up the request, whose key was read. The
        use is noted again when this process reads the key anew."""
        try:
            with deadline.at_most(TOUCH_WAIT):
                self.repository.touch_api_key(key.id, now)
        except BackendUnavailable:
            log.warning("could not note the use of API key %r now; a later use will", key.name)

    def revoke(self, name: str) -> ApiKey:
        """Revoke the key `name` (`NotFound` if there is no active one)."""
        revoked = self.repository.revoke_api_key(name, self.clock())
        self._read.pop(revoked.id, None)
        return revoked

    def _get(self, key_id: str) -> ApiKey | None:
        read = self._read.get(key_id)
        if read is not None and self.monotonic() - read[0] < self.REREAD_AFTER:
            return read[1]
        key = self.repository.get_api_key(key_id)
        if key is not None:
            self._remember(key)
        return key

    def _remember(self, key: ApiKey) -> None:
        if len(self._read) >= self._REMEMBERED:
            self._read.clear()
        self._read[key.id] = (self.monotonic(), key)

    def create(self, name: str, owner: str, scopes) -> tuple[ApiKey, str]:
        key, secret = new_key(name, owner, scopes, self.clock())
        self.repository.insert_api_key(key)
        return key, secret


def ensure_admin_key(repository, path: Path, clock) -> Path | None:
    """On a first start with no key at all, create an admin key and write its secret to
    `path` (mode 0600); return that path when it exists.

    Every gunicorn worker and `flask` command builds the app, so several processes may get
    here at once: all store the secret `read_or_create` gives them. Storing the key is
    idempotent (its id comes from the secret), so a process that died between the two steps
    is finished by the next start.
    """
    if repository.list_api_keys():
        return path if path.exists() else None
    secret = read_or_create(path, lambda: new_key("admin", ADMIN_OWNER, [Scope.ADMIN], clock())[1])
    try:
        repository.insert_api_key(key_from_secret(secret, "admin", ADMIN_OWNER, ["admin"], clock()))
    except Conflict:
        return path  # another process stored it first
    log.info("Created the first admin API key; its secret is in %s", path)
    return path


def ensure_secret_key(path: Path) -> str:
    """The secret signed URLs use on the embedded default: made at the first start into
    `path` (mode 0600), read by every later start and every worker."""
    secret = read_or_create(path, lambda: secrets.token_urlsafe(48))
    if len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(f"{path} must hold at least {MIN_SECRET_LENGTH} characters")
    return secret


def read_or_create(path: Path, make) -> str:
    """The secret in `path`, written first (mode 0600) by whichever process gets there first.

    Several processes may start at once: each makes its secret in a private file and links
    it into place, which only one can do (the file appears whole, fsynced); all then read
    the winner's.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        private = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        descriptor = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "w") as file:
                file.write(make() + "\n")
                file.flush()
                os.fsync(file.fileno())
            with contextlib.suppress(FileExistsError):  # another process linked first
                os.link(private, path)
        finally:
            private.unlink(missing_ok=True)
    return read_secret(path)


def another_could_write(status: os.stat_result, directory: Path) -> bool:
    """Whether a file (or directory) in `directory` with `status` could have been written
    by a user other than its rightful ones: this process's user, root and the directory's
    owner, who alone may own it and write it."""
    owners = {os.geteuid(), 0, directory.stat().st_uid}
    return status.st_uid not in owners or bool(status.st_mode & 0o022)


def read_secret(path: Path) -> str:
    """The secret in `path` (the URL-signing secret, the first admin key), checked.

    A file anyone but its rightful owners could have written is refused: whoever replaces
    the URL-signing secret forges signed URLs (a DATA_DIR made under umask 000 let every
    local user do it). Its owner must be this process's user, root, or DATA_DIR's owner, no
    one else may write it, and it is no symlink (to a world-readable file, say). One others
    may read is made its owner's alone, with a warning."""
    status = os.lstat(path)
    if not S_ISREG(status.st_mode):
        raise ConfigError(f"{path} must be a file (not a directory or a symlink)")
    if another_could_write(status, path.parent):
        raise ConfigError(
            f"{path} could have been written by another user (owner uid {status.st_uid}, "
            f"mode {status.st_mode & 0o777:04o}): make it yours with mode 0600, or remove it"
        )
    if status.st_mode & 0o077:
        try:
            os.chmod(path, 0o600)
        except OSError as error:
            raise ConfigError(f"{path} is readable by other users: {error}") from None
        log.warning("%s was readable by other users; now by its owner only", path)
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path} cannot be read: {error}") from None
