"""Requests to an S3-compatible service: the boto3 client haul builds from its own resolved
settings, and each call's refusal turned into one of haul's errors with the service's code and
what to do about it. boto3 is imported only here, and only by a process that stores into S3."""

from __future__ import annotations

import re
from typing import Any

from actors.errors import StorageUnavailable
from actors.storagetarget import S3Access


class UploadGone(StorageUnavailable):
    """The service no longer knows a recorded multipart upload (aborted, or expired); the
    upload starts over (and, should that happen twice, the finalize tries again later)."""


class NotFound(Exception):
    """head_object found no object at the key."""


def call(client: Any, operation: str, where: str, **params: Any) -> Any:
    """One request; the service's refusals as haul's errors, with its error code."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return getattr(client, operation)(**params)
    except ClientError as exc:
        code, message = _error_of(exc)
        if code == "NoSuchUpload":
            raise UploadGone(f"{where}: the service no longer has the upload") from exc
        if code in ("404", "NoSuchKey", "NotFound") and operation == "head_object":
            raise NotFound from exc
        if code.isdigit() and operation == "head_object":
            code, message = _why_head_was_refused(client, params) or (code, message)
        said = f" ({message})" if message else ""
        raise StorageUnavailable(
            f"{where}: {operation} was refused by the service: {code}{said}{_advice(code)}",
            code="s3_" + re.sub(r"[^a-z0-9]+", "_", code.lower()).strip("_"),
        ) from exc
    except BotoCoreError as exc:
        raise StorageUnavailable(f"{where}: {operation} failed ({exc})") from exc


def _error_of(exc: Any) -> tuple[str, str]:
    """The service's error code (else the HTTP status) and message from a ClientError."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code", "")) or str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
    return code, str(error.get("Message", ""))


def _why_head_was_refused(client: Any, params: dict[str, Any]) -> tuple[str, str] | None:
    """A refused HEAD has no body, so only its status (403) is known. Asking for the object's
    first byte is refused the same way, with a body that names the reason (a wrong secret, an
    unknown key id, a missing permission): that is what the operator needs to read."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.get_object(Range="bytes=0-0", **params)
    except ClientError as exc:
        code, message = _error_of(exc)
        return None if code.isdigit() else (code, message)
    except BotoCoreError:
        return None
    return None


def _advice(code: str) -> str:
    if code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"):
        return "; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the key's permissions on the bucket"
    if code == "NoSuchBucket":
        return "; create the bucket, or fix the bucket in HAUL_STORAGE_URL"
    return ""


def s3_client(access: S3Access, connect_timeout: float, read_timeout: float, pool_size: int) -> Any:
    """A boto3 S3 client from what :func:`actors.storagetarget.s3_access` resolved (boto3 is
    imported here: only a process that stores into S3 pays for it)."""
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(profile_name=access.profile) if access.profile else boto3.session.Session()
    addressing = "virtual" if access.virtual_hosted or access.endpoint_url is None else "path"
    config = Config(
        region_name=access.region or "us-east-1",
        signature_version="s3v4",
        s3={"addressing_style": addressing},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"mode": "standard", "max_attempts": 3},
        max_pool_connections=pool_size,
        # Every body haul sends carries its Content-MD5 (the ETag check needs the MD5s anyway):
        # a CRC32 on top would cost a pass over every byte, and some S3-compatible services
        # refuse the newer checksum headers. Measured in ops/bench (client CPU per GiB).
        request_checksum_calculation="when_required",
    )
    return session.client(
        "s3",
        endpoint_url=access.endpoint_url,
        aws_access_key_id=access.access_key_id,
        aws_secret_access_key=access.secret_access_key,
        aws_session_token=access.session_token,
        config=config,
    )
