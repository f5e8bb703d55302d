"""Where finished files go, as configured: ``HAUL_STORAGE_URL`` (or ``HAUL_STORAGE_DIR``), the
object key template, and an S3 service's credentials and endpoint.

Read once with the rest of the settings, so a bad URL, a template without the task id or key,
or an S3 URL without credentials stops a process at start, with the variable's name, instead
of failing a task after its download. Credentials come the standard AWS way (``AWS_*``, and
``*_FILE`` for secrets) and are resolved here, whatever the client library would read itself.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from actors.envvars import SettingsError, directory, flag, number, secret
from actors.errors import InvalidTask

#: The object key template unless HAUL_STORAGE_KEY says otherwise.
DEFAULT_KEY_TEMPLATE = "{task_id}/{path}"
#: Fields a key template may use; it must hold one that names the task.
KEY_FIELDS = frozenset({"task_id", "key", "path"})
NAMING_FIELDS = frozenset({"task_id", "key"})
#: S3 bucket names: 3-63 lower-case letters, digits, dots and hyphens.
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
#: Longest object key S3 takes, in UTF-8 bytes, prefix included.
MAX_S3_KEY_BYTES = 1024
#: Longest a presigned link may live (SigV4's own limit), in seconds.
MAX_LINK_SECONDS = 7 * 24 * 3600


@dataclass(frozen=True)
class S3Access:
    """How to reach an S3-compatible service; secrets never in ``repr``."""

    region: str | None = None
    endpoint_url: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    profile: str | None = None
    #: Virtual-hosted addressing (``bucket.host``) for a custom endpoint; path-style otherwise.
    virtual_hosted: bool = False

    def secrets(self) -> list[str]:
        return [v for v in (self.secret_access_key, self.session_token) if v]


@dataclass(frozen=True)
class StorageTarget:
    """A local folder (``file``), an S3 bucket and key prefix (``s3``), or an rclone remote and
    path (``rclone``)."""

    kind: str
    folder: Path | None = None
    bucket: str = ""
    prefix: str = ""
    remote: str = ""

    def location(self, key: str) -> str:
        """Where an object with full ``key`` (prefix included) lives, as task.completed says it."""
        if self.kind == "s3":
            return f"s3://{self.bucket}/{key}"
        if self.kind == "rclone":
            return f"rclone:{self.remote}:{key}"
        assert self.folder is not None
        return str(self.folder / key)

    def object_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def key_for(self, template: str, task_id: str, task_key: str | None, path: str) -> str:
        """A file's full key: the prefix, then ``template`` filled in (checked at submit)."""
        problem = key_problem(template, task_key)
        if problem is not None:
            raise InvalidTask(f"task {task_id}: {problem}")
        return self.object_key(template.format(task_id=task_id, key=task_key or "", path=path))

    def describe(self) -> str:
        if self.kind == "s3":
            return f"s3://{self.bucket}/{self.prefix}"
        if self.kind == "rclone":
            return f"rclone:{self.remote}:{self.prefix}"
        return str(self.folder)


def storage_target(env: Mapping[str, str], default_folder: Path) -> StorageTarget:
    """HAUL_STORAGE_URL, else HAUL_STORAGE_DIR, else ``default_folder``; both set is an error."""
    url = env.get("HAUL_STORAGE_URL", "").strip()
    folder = env.get("HAUL_STORAGE_DIR", "").strip()
    if url and folder:
        raise SettingsError(
            "both HAUL_STORAGE_URL and HAUL_STORAGE_DIR are set; keep one "
            "(HAUL_STORAGE_URL=file:///path is the same as HAUL_STORAGE_DIR=/path)"
        )
    if not url:
        return StorageTarget("file", folder=directory(env, "HAUL_STORAGE_DIR", default_folder) or default_folder)
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise SettingsError(
                "HAUL_STORAGE_URL: a file URL names an absolute path on this machine, as file:///srv/media"
            )
        path = Path(unquote(parts.path))
        if path.exists() and not path.is_dir():
            raise SettingsError(f"HAUL_STORAGE_URL names {path}, which is not a directory")
        return StorageTarget("file", folder=path)
    if parts.scheme == "s3":
        return _s3_target(url)
    if url.startswith("rclone:"):
        return _rclone_target(url)
    raise SettingsError(
        f"HAUL_STORAGE_URL has scheme {parts.scheme!r}; it takes file:///ABSOLUTE/PATH, s3://BUCKET/PREFIX "
        "or rclone:REMOTE:PATH"
    )


#: An rclone remote's name as rclone's config allows it (no connection string).
REMOTE_NAME = re.compile(r"^[\w.][\w.\- ]*$")


def _rclone_target(url: str) -> StorageTarget:
    """``rclone:REMOTE:PATH`` with REMOTE a remote configured the way rclone users do
    (RCLONE_CONFIG's file or RCLONE_CONFIG_<NAME>_* variables); a connection string
    (``:s3,secret_access_key=...:``) would put credentials on a command line: refused."""
    remote, colon, path = url.removeprefix("rclone:").partition(":")
    if not colon or not remote:
        raise SettingsError(
            "HAUL_STORAGE_URL: give rclone:REMOTE:PATH, REMOTE a remote of your rclone config (connection "
            "strings such as rclone::s3,...: are refused: they carry credentials on a command line)"
        )
    if not REMOTE_NAME.match(remote):
        raise SettingsError(
            "HAUL_STORAGE_URL does not name a configured rclone remote (the value is not shown: it may hold "
            "credentials); connection strings and parameters are refused, since they carry credentials on a "
            "command line: configure the remote in RCLONE_CONFIG's file or with RCLONE_CONFIG_<NAME>_* variables"
        )
    prefix = path.rstrip("/")  # a leading '/' stays: rclone:sftp:/srv is not rclone:sftp:srv
    if prefix.strip("/") and any(part in ("", ".", "..") for part in prefix.strip("/").split("/")):
        raise SettingsError(
            "HAUL_STORAGE_URL: the remote's path has an empty, '.' or '..' part (not shown: it may hold credentials)"
        )
    return StorageTarget("rclone", remote=remote, prefix=prefix if prefix.strip("/") else prefix.rstrip("/"))


def _s3_target(url: str) -> StorageTarget:
    parts = urlsplit(url)
    if "@" in parts.netloc or parts.password or parts.query:
        raise SettingsError(
            "HAUL_STORAGE_URL holds credentials or a query; give s3://BUCKET/PREFIX and the credentials in "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_SECRET_ACCESS_KEY_FILE)"
        )
    bucket = parts.netloc
    if not BUCKET_NAME.match(bucket) or ".." in bucket:
        raise SettingsError(
            "HAUL_STORAGE_URL: the bucket is not a bucket name (3-63 lower-case letters, digits, dots, hyphens; "
            "not shown: it may hold credentials)"
        )
    prefix = unquote(parts.path).strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise SettingsError(f"HAUL_STORAGE_URL: the prefix {prefix!r} has an empty, '.' or '..' part")
    return StorageTarget("s3", bucket=bucket, prefix=prefix)


def part_bytes(env: Mapping[str, str], default: int) -> int:
    """HAUL_S3_PART_BYTES: S3 takes parts of 5 MiB to 5 GiB."""
    value = int(number(env, "HAUL_S3_PART_BYTES", default, minimum=5 * 1024 * 1024, integer=True))
    if value > 5 * 1024**3:
        raise SettingsError(f"HAUL_S3_PART_BYTES={value} is above S3's largest part (5 GiB); memory holds "
                            "HAUL_S3_CONCURRENCY parts per file, so keep it to tens of MiB")  # fmt: skip
    return value


def link_seconds(env: Mapping[str, str], in_bucket: bool) -> float:
    """HAUL_STORAGE_LINK_SECONDS: at most SigV4's week, and only where links can be made."""
    seconds = number(env, "HAUL_STORAGE_LINK_SECONDS", 0, minimum=0, integer=True)
    if seconds > MAX_LINK_SECONDS:
        raise SettingsError(
            f"HAUL_STORAGE_LINK_SECONDS={seconds:g} is longer than a presigned link may live ({MAX_LINK_SECONDS} s, "
            "a week); set it lower"
        )
    if seconds and (env.get("AWS_SESSION_TOKEN", "").strip() or env.get("AWS_SESSION_TOKEN_FILE")):
        raise SettingsError(
            "HAUL_STORAGE_LINK_SECONDS with AWS_SESSION_TOKEN: links would carry the session token and stop working "
            "when it expires; sign links with a user's long-term keys, or unset HAUL_STORAGE_LINK_SECONDS"
        )
    if seconds and not in_bucket:
        raise SettingsError(
            "HAUL_STORAGE_LINK_SECONDS needs HAUL_STORAGE_URL=s3://... or rclone:...: a local folder has no links"
        )
    return seconds


def key_template(env: Mapping[str, str]) -> str:
    """HAUL_STORAGE_KEY: fields from :data:`KEY_FIELDS`, at least one naming the task, and
    ``{path}`` last (a file's own path, which may hold folders)."""
    template = env.get("HAUL_STORAGE_KEY", "").strip() or DEFAULT_KEY_TEMPLATE
    try:
        items = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise SettingsError(f"HAUL_STORAGE_KEY={template!r} is not a template ({exc})") from None
    fields = {name for _, name, _, _ in items if name is not None}
    unknown = fields - KEY_FIELDS
    if unknown or "" in fields or any(spec or conversion for _, name, spec, conversion in items if name is not None):
        raise SettingsError(
            f"HAUL_STORAGE_KEY={template!r}: it takes {{task_id}}, {{key}} and {{path}}, plain (no format specs or "
            "conversions)"
        )
    after = [items[i + 1][0] if i + 1 < len(items) else "" for i in range(len(items))]
    apart = all(after[i].startswith("/") for i, (_, name, _, _) in enumerate(items) if name in NAMING_FIELDS)
    if not fields & NAMING_FIELDS or not template.endswith("{path}") or not apart:
        raise SettingsError(
            f"HAUL_STORAGE_KEY={template!r} must name the task ({{task_id}} or {{key}}, each followed by '/') and end "
            "with {path}, as {task_id}/{path} or orders/{key}/{path}: two tasks must never share a key"
        )
    if template.startswith("/") or any(p in ("", ".", "..") for p in template.split("/")[:-1]):
        raise SettingsError(f"HAUL_STORAGE_KEY={template!r} has an empty, '.' or '..' folder, or starts with '/'")
    return template


def s3_access(env: Mapping[str, str]) -> S3Access:
    """The AWS variables haul honours, resolved here (AWS_REGION before AWS_DEFAULT_REGION, the
    S3 endpoint before the general one, secrets also from ``*_FILE``)."""
    key_id = env.get("AWS_ACCESS_KEY_ID", "").strip() or None
    secret_key = secret(env, "AWS_SECRET_ACCESS_KEY") or None
    if bool(key_id) != bool(secret_key):
        raise SettingsError(
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_SECRET_ACCESS_KEY_FILE) go together; set both, "
            "or neither to use AWS_PROFILE or the machine's role"
        )
    endpoint = env.get("AWS_ENDPOINT_URL_S3", "").strip() or env.get("AWS_ENDPOINT_URL", "").strip() or None
    if endpoint is not None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc or parts.query:
            raise SettingsError(
                "AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL must be an http(s) URL with a host and no credentials or "
                "query (not shown: it may hold credentials)"
            )
    return S3Access(
        region=env.get("AWS_REGION", "").strip() or env.get("AWS_DEFAULT_REGION", "").strip() or None,
        endpoint_url=endpoint,
        access_key_id=key_id,
        secret_access_key=secret_key,
        session_token=secret(env, "AWS_SESSION_TOKEN") or None,
        profile=env.get("AWS_PROFILE", "").strip() or None,
        virtual_hosted=flag(env, "HAUL_S3_VIRTUAL_HOSTED", False),
    )


def key_problem(template: str, task_key: str | None) -> str | None:
    """Why a task's key cannot go into object keys under ``template`` (None: it can)."""
    if "{key}" not in template:
        return None
    if not task_key:
        return f"HAUL_STORAGE_KEY={template!r} files tasks under their key, and this task has none; give it a key"
    if (
        "/" in task_key
        or task_key in (".", "..")
        or task_key.startswith(".haul-")
        or any(ord(c) < 32 for c in task_key)
    ):
        return (
            f"the key {task_key!r} goes into object keys (HAUL_STORAGE_KEY), so it may not hold '/' or control "
            "characters, be '.' or '..', or start with '.haul-' (haul's own probes live there)"
        )
    return None


def check_keys(target: StorageTarget | None, template: str, task_key: str | None, paths: list[str]) -> str | None:
    """What is wrong with the object keys a task would get (None: nothing), known at submit: a
    template that needs the task's key when it has none, a key that is not a plain path segment,
    an S3 key longer than S3 takes."""
    if target is None:
        return None
    problem = key_problem(template, task_key)
    if problem is not None:
        return problem
    if target.kind != "s3":
        return None
    longest = max(paths, key=lambda p: len(p.encode()), default="")
    key = target.object_key(template.format(task_id="0" * 32, key=task_key or "", path=longest))
    if len(key.encode()) > MAX_S3_KEY_BYTES:
        return (
            f"the file {longest!r} would be stored at a key of {len(key.encode())} bytes (prefix and HAUL_STORAGE_KEY "
            f"included); S3 takes at most {MAX_S3_KEY_BYTES}: give it a shorter path"
        )
    return None
