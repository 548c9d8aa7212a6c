# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""S3 access: typed helpers that take a boto3 client, error translation as a
decorator, and a streaming multipart sink with bounded memory.

Throttling (503 SlowDown) and dropped connections are retried by botocore's
"standard" retry mode with exponential backoff; when the retries run out the
error surfaces as a StoreError. A failure is never turned into success: an
upload is complete only when CompleteMultipartUpload (or PutObject) returned
and the stored size matches what was sent.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import base64
import functools
import hashlib
import importlib.util
import threading
from concurrent.futures import ThreadPoolExecutor

from .errors import ConfigError, StoreError, UnreachableError

# boto3 costs ~0.3 s and ~14 MB to import: load it only when S3 is used, so
# local-only backups (the default) do not pay for it.
HAS_BOTO3 = importlib.util.find_spec("boto3") is not None
BOTO3_IMPORT_ERROR = None if HAS_BOTO3 else ImportError("No module named 'boto3'")


def _botocore():
    """botocore's config and exceptions modules, imported on first use."""
    import botocore.config
    import botocore.exceptions

    return botocore


MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB  # S3's floor for every part but the last
MAX_PARTS = 10000
DEFAULT_PART_SIZE = 8 * MiB
DEFAULT_CONCURRENCY = 4
SSE_CHOICES = ("none", "AES256", "aws:kms")
OBJECT_LOCK_MODES = ("GOVERNANCE", "COMPLIANCE")
# S3 accepts up to 100 years; a longer one is a typo (days for hours, an extra zero).
MAX_LOCK_DAYS = 36500

_HINTS = {
    "NoSuchBucket": "create the bucket or fix the bucket name and region",
    "AccessDenied": "grant this identity s3:PutObject/GetObject/ListBucket/AbortMultipartUpload on the bucket",
    "InvalidAccessKeyId": "check the AWS access key (environment, profile or instance role)",
    "SignatureDoesNotMatch": "check the AWS secret key",
    "ExpiredToken": "the temporary credentials expired: refresh them (aws sso login, new STS token)",
    "RequestTimeTooSkewed": "fix this host's clock (NTP)",
    "SlowDown": "S3 kept throttling after every retry: run later or raise retries",
    "NoSuchKey": "the object is missing: the backup set may be incomplete or deleted",
    "InvalidStorageClass": "choose a storage class this endpoint supports",
    "InvalidRequest": "an Object Lock bucket needs Content-MD5 and a versioned bucket; "
    "check the bucket's Object Lock configuration",
    "InvalidObjectState": "the object is in archive storage (GLACIER / DEEP_ARCHIVE): restore it "
    "first (aws s3api restore-object) and run again once it is available",
}
# Storage classes whose objects cannot be read before a restore request completes.
ARCHIVE_CLASSES = ("GLACIER", "DEEP_ARCHIVE")


def archived(info):
    """Whether a head_object result describes an object that cannot be read now."""
    if not info or info.get("StorageClass") not in ARCHIVE_CLASSES:
        return False
    # 'ongoing-request="false", expiry-date=...' once a restored copy is readable.
    return 'ongoing-request="false"' not in (info.get("Restore") or "")


# Answers that mean "S3 is not available right now", as opposed to "this request is wrong".
_OUTAGE_CODES = ("SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "503", "500")


def s3_url(bucket, prefix=""):
    return "s3://%s/%s" % (bucket, prefix.strip("/")) if prefix.strip("/") else "s3://%s" % bucket


def join_key(*parts):
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def describe_error(exc, action):
    """StoreError for a botocore exception: what failed, why, and how to fix it."""
    if not HAS_BOTO3:
        return None
    botocore = _botocore()
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "Unknown")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NotFound") and "bucket" in action:
            code = "NoSuchBucket"
        if code in ("403", "Forbidden"):
            code = "AccessDenied"
        message = "S3 %s failed: %s%s" % (action, code, (" (HTTP %s)" % status) if status else "")
        if error.get("Message"):
            message += ": %s" % error["Message"]
        outage = code in _OUTAGE_CODES or (isinstance(status, int) and status >= 500)
        return (UnreachableError if outage else StoreError)(message, _HINTS.get(code))
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return StoreError(
            "S3 %s failed: no AWS credentials found" % action,
            "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, or an instance role",
        )
    if isinstance(exc, (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)):
        return UnreachableError(
            "S3 %s failed: cannot reach the endpoint: %s" % (action, exc),
            "check endpoint_url, DNS and the network path to S3",
        )
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return StoreError("S3 %s failed: %s" % (action, exc))
    return None


def s3_errors(action):
    """Decorator: translate botocore exceptions raised by ``func`` into StoreError."""

    def decorator(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except Exception as exc:
                translated = describe_error(exc, action)
                if translated is None:
                    raise
                raise translated from exc

        return wrapper

    return decorator


def make_client(
    region=None,
    endpoint_url=None,
    profile=None,
    access_key=None,
    secret_key=None,
    session_token=None,
    retries=8,
    connect_timeout=10,
    read_timeout=120,
):
    """boto3 S3 client; credentials come from the usual chain unless given."""
    if not HAS_BOTO3:
        raise ConfigError(
            "the boto3 Python library is required for S3 targets", "pip install boto3"
        )
    if bool(access_key) != bool(secret_key):
        raise ConfigError("access_key and secret_key must be given together")
    import boto3.session

    botocore = _botocore()
    try:
        session = boto3.session.Session(
            profile_name=profile or None,
            aws_access_key_id=access_key or None,
            aws_secret_access_key=secret_key or None,
            aws_session_token=session_token or None,
            region_name=region or None,
        )
    except botocore.exceptions.ProfileNotFound as exc:
        raise ConfigError(str(exc), "check the profile name in ~/.aws/config") from exc
    config = botocore.config.Config(
        retries={"mode": "standard", "total_max_attempts": max(1, int(retries))},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        # S3-compatible endpoints (MinIO, Ceph, moto) expect path-style URLs.
        s3={"addressing_style": "path" if endpoint_url else "auto"},
    )
    return session.client("s3", endpoint_url=endpoint_url or None, config=config)


@s3_errors("bucket check")
def check_bucket(client, bucket):
    """Fail clearly if the bucket is missing or unreachable (before writing anything).

    Error answers to HEAD have no body, so a 400/403 does not say why (revoked key,
    wrong secret, expired token, missing permission): ask again with a GET
    (ListObjectsV2), whose error document names the cause.
    """
    try:
        client.head_bucket(Bucket=bucket)
    except _botocore().exceptions.ClientError as exc:
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (400, 403):
            client.list_objects_v2(Bucket=bucket, MaxKeys=1)
        raise


@s3_errors("list")
def list_keys(client, bucket, prefix):
    """Every key (and size) under ``prefix``."""
    found = {}
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            found[item["Key"]] = item
    return found


@s3_errors("list")
def list_common_prefixes(client, bucket, prefix):
    names = []
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/", Delimiter="/"):
        for item in page.get("CommonPrefixes", []):
            names.append(item["Prefix"][len(prefix.rstrip("/")) + 1 :].rstrip("/"))
    return names


def _version(version_id):
    """The VersionId keyword argument, when a version is asked for."""
    return {"VersionId": version_id} if version_id else {}


@s3_errors("download")
def get_bytes(client, bucket, key, version_id=None):
    return client.get_object(Bucket=bucket, Key=key, **_version(version_id))["Body"].read()


@s3_errors("download")
def get_bytes_if_exists(client, bucket, key):
    """The object's bytes, or None when there is no such key (one request, not two)."""
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except _botocore().exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


@s3_errors("download")
def open_stream(client, bucket, key, version_id=None):
    return client.get_object(Bucket=bucket, Key=key, **_version(version_id))["Body"]


@s3_errors("head")
def object_info(client, bucket, key, version_id=None):
    """head_object result, or None when the key (or that version of it) does not exist."""
    try:
        return client.head_object(Bucket=bucket, Key=key, **_version(version_id))
    except _botocore().exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in (
            "404",
            "NoSuchKey",
            "NotFound",
            "NoSuchVersion",
            "405",  # HEAD of a delete marker
        ):
            return None
        raise


@s3_errors("list versions")
def list_versions(client, bucket, prefix):
    """Every version and delete marker under ``prefix``: dicts with Key, VersionId,
    LastModified and DeleteMarker (bool)."""
    found = []
    paginator = client.get_paginator("list_object_versions")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Versions", []):
            found.append(dict(item, DeleteMarker=False))
        for item in page.get("DeleteMarkers", []):
            found.append(dict(item, DeleteMarker=True))
    return found


def first_versions(versions):
    """{key: VersionId of its oldest stored version} (delete markers are not versions):
    the object as it was first written, whatever was put or deleted over it since."""
    oldest = {}
    # ListObjectVersions returns each key's versions newest first: the last one seen is
    # the oldest (LastModified has one-second resolution on some stores: not a tie-break).
    for item in versions:
        if not item["DeleteMarker"] and item.get("VersionId"):
            oldest[item["Key"]] = item["VersionId"]
    return oldest


@s3_errors("object lock check")
def bucket_object_lock(client, bucket):
    """The bucket's ObjectLockConfiguration, or None when Object Lock is not enabled."""
    try:
        response = client.get_object_lock_configuration(Bucket=bucket)
    except _botocore().exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in (
            "ObjectLockConfigurationNotFoundError",
            "ObjectLockConfigurationNotFound",
            "NoSuchObjectLockConfiguration",
        ):
            return None
        raise
    config = response.get("ObjectLockConfiguration") or {}
    return config if config.get("ObjectLockEnabled") == "Enabled" else None


def require_object_lock(client, bucket):
    """Preflight of a target that asks for Object Lock: refuse (ConfigError) a bucket
    where it is not enabled; the retention requested would silently not exist."""
    if bucket_object_lock(client, bucket) is None:
        raise ConfigError(
            "bucket %s does not have S3 Object Lock enabled, but its target asks for "
            "object_lock: the backups would not be immutable" % bucket,
            "Object Lock can only be turned on for a bucket created with it (or, on AWS, "
            "enabled later with put-object-lock-configuration on a versioned bucket): e.g. "
            "aws s3api create-bucket --bucket NAME --object-lock-enabled-for-bucket; or "
            "remove object_lock from this target. Nothing was written",
        )


def check_object_lock(object_lock):
    """Validate a target's ``object_lock`` ({mode, days}); returns (mode, days) or None."""
    if not object_lock:
        return None
    if not isinstance(object_lock, dict):
        raise ConfigError(
            "object_lock must be a mapping {mode, days}, got %r" % (object_lock,),
            "e.g. object_lock: {mode: COMPLIANCE, days: 30}",
        )
    unknown = sorted(set(object_lock) - {"mode", "days"})
    if unknown:
        raise ConfigError(
            "object_lock has unknown key(s): %s" % ", ".join(map(str, unknown)),
            "give only mode and days, e.g. {mode: COMPLIANCE, days: 30}",
        )
    mode = object_lock.get("mode")
    days = object_lock.get("days")
    if mode not in OBJECT_LOCK_MODES:
        raise ConfigError(
            "object_lock.mode must be GOVERNANCE or COMPLIANCE, got %r" % (mode,),
            "COMPLIANCE: nobody can shorten or remove the lock, not even the account root; "
            "GOVERNANCE: identities with s3:BypassGovernanceRetention can",
        )
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_LOCK_DAYS:
        raise ConfigError(
            "object_lock.days must be a whole number of days from 1 to %d, got %r"
            % (MAX_LOCK_DAYS, days),
            "lock each set at least as long as retention keeps its youngest sets, e.g. 30",
        )
    return mode, days


def lock_args(mode, retain_until):
    """PutObject / CreateMultipartUpload arguments that lock the object until ``retain_until``."""
    return {"ObjectLockMode": mode, "ObjectLockRetainUntilDate": retain_until}


def object_lock_state(info, now):
    """(mode, retain_until, legal_hold) of a head_object result, each None when absent;
    a retention that already expired is reported as None."""
    if not info:
        return None, None, None
    until = info.get("ObjectLockRetainUntilDate")
    mode = info.get("ObjectLockMode") if until is not None and until > now else None
    hold = info.get("ObjectLockLegalHoldStatus") == "ON" or None
    return mode, (until if mode else None), hold


@s3_errors("upload")
def put_bytes(client, bucket, key, data, extra_args=None):
    client.put_object(
        Bucket=bucket, Key=key, Body=data, ContentMD5=_md5_b64(data), **(extra_args or {})
    )


@s3_errors("delete")
def delete_keys(client, bucket, keys):
    _delete_batches(client, bucket, [{"Key": k} for k in keys])


@s3_errors("delete")
def delete_versions(client, bucket, versions):
    """Delete these (key, version id) pairs for good: a versioned bucket otherwise keeps
    every deleted object as a noncurrent version."""
    _delete_batches(client, bucket, [{"Key": k, "VersionId": v} for k, v in versions])


def _delete_batches(client, bucket, objects):
    # DeleteObjects answers 200 even when some keys were refused (a locked version, a
    # missing permission): those come back under Errors and must not pass as deleted.
    for start in range(0, len(objects), 1000):
        batch = objects[start : start + 1000]
        response = client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
        errors = response.get("Errors") or []
        if errors:
            first = errors[0]
            raise StoreError(
                "S3 delete refused for %d object(s), e.g. s3://%s/%s: %s: %s"
                % (
                    len(errors),
                    bucket,
                    first.get("Key"),
                    first.get("Code"),
                    first.get("Message", ""),
                ),
                _HINTS.get(first.get("Code"))
                or "an object under S3 Object Lock cannot be deleted before its retain-until date",
            )


@s3_errors("multipart cleanup")
def abort_stale_uploads(client, bucket, prefix, older_than=None, select=None):
    """Abort unfinished multipart uploads under ``prefix`` (left by a killed run).

    ``older_than``: only uploads initiated before this aware datetime; ``select``: only
    keys for which it returns true. Returns the keys whose uploads were aborted.
    """
    aborted = []
    paginator = client.get_paginator("list_multipart_uploads")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for upload in page.get("Uploads", []):
            if older_than is not None and upload["Initiated"] >= older_than:
                continue
            if select is not None and not select(upload["Key"]):
                continue
            client.abort_multipart_upload(
                Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"]
            )
            aborted.append(upload["Key"])
    return aborted


def upload_extra_args(sse="none", kms_key_id=None, storage_class=None):
    """ExtraArgs shared by PutObject and CreateMultipartUpload."""
    if sse not in SSE_CHOICES:
        raise ConfigError(
            "unknown server-side encryption %r" % sse, "choose one of %s" % ", ".join(SSE_CHOICES)
        )
    extra = {}
    if sse != "none":
        extra["ServerSideEncryption"] = sse
    if sse == "aws:kms" and kms_key_id:
        extra["SSEKMSKeyId"] = kms_key_id
    if kms_key_id and sse != "aws:kms":
        raise ConfigError("kms_key_id is only used with sse=aws:kms")
    if storage_class:
        extra["StorageClass"] = storage_class
    return extra


def _md5_b64(data):
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


def check_part_size(part_size):
    part_size = int(part_size)
    if part_size < MIN_PART_SIZE:
        raise ConfigError(
            "S3 part size %d bytes is below the 5 MiB minimum" % part_size, "use part_size_mb >= 5"
        )
    return part_size


class MultipartSink(object):
    """Upload a stream of unknown length to one S3 key.

    Parts of ``part_size`` bytes go up on ``concurrency`` threads; at most
    ``concurrency`` parts are buffered, so memory stays flat whatever the
    backup size.  Each part carries its MD5 so S3 rejects a corrupted body.
    Streams smaller than one part become a single PutObject.
    """

    def __init__(
        self,
        client,
        bucket,
        key,
        part_size=DEFAULT_PART_SIZE,
        concurrency=DEFAULT_CONCURRENCY,
        extra_args=None,
    ):
        self.client = client
        self.bucket = bucket
        self.key = key
        self.part_size = check_part_size(part_size)
        self.concurrency = max(1, int(concurrency))
        self.extra_args = dict(extra_args or {})
        self.upload_id = None
        self.size = 0
        self._buffer = bytearray()
        self._next_part = 1
        self._futures = []
        self._slots = threading.BoundedSemaphore(self.concurrency)
        self._executor = None
        self._done = False

    @property
    def location(self):
        return "s3://%s/%s" % (self.bucket, self.key)

    def write(self, chunk):
        # One growing buffer and one copy per part: memory is about
        # (concurrency + 1) x part_size per target whatever the backup size.
        self._buffer += chunk
        self.size += len(chunk)
        while len(self._buffer) >= self.part_size:
            part = bytes(memoryview(self._buffer)[: self.part_size])
            del self._buffer[: self.part_size]
            self._submit(part)

    @s3_errors("multipart upload")
    def _start(self):
        response = self.client.create_multipart_upload(
            Bucket=self.bucket, Key=self.key, **self.extra_args
        )
        self.upload_id = response["UploadId"]
        self._executor = ThreadPoolExecutor(max_workers=self.concurrency)

    def _submit(self, data):
        if self.upload_id is None:
            self._start()
        if self._next_part > MAX_PARTS:
            raise StoreError(
                "upload to %s needs more than %d parts" % (self.location, MAX_PARTS),
                "raise part_size_mb",
            )
        self._raise_failed()
        self._slots.acquire()
        number = self._next_part
        self._next_part += 1
        future = self._executor.submit(self._upload_part, number, data)
        future.add_done_callback(lambda _f: self._slots.release())
        self._futures.append(future)

    @s3_errors("multipart upload part")
    def _upload_part(self, number, data):
        response = self.client.upload_part(
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            PartNumber=number,
            Body=data,
            ContentMD5=_md5_b64(data),
        )
        return {"PartNumber": number, "ETag": response["ETag"]}

    def _raise_failed(self):
        for future in self._futures:
            if future.done() and future.exception() is not None:
                raise future.exception()

    def close(self):
        """Finish the upload; return its location. Raises on any failed part."""
        data = bytes(self._buffer)
        self._buffer = bytearray()
        if self.upload_id is None:
            put_bytes(self.client, self.bucket, self.key, data, self.extra_args)
        else:
            if data:
                self._submit(data)
            parts = [future.result() for future in self._futures]
            self._complete(parts)
            self._executor.shutdown(wait=True)
        self._done = True
        info = object_info(self.client, self.bucket, self.key)
        if info is None or info.get("ContentLength") != self.size:
            raise StoreError(
                "S3 object %s has size %s after upload, expected %d"
                % (self.location, None if info is None else info.get("ContentLength"), self.size)
            )
        return self.location

    @s3_errors("multipart complete")
    def _complete(self, parts):
        self.client.complete_multipart_upload(
            Bucket=self.bucket,
            Key=self.key,
            UploadId=self.upload_id,
            MultipartUpload={"Parts": parts},
        )

    def abort(self):
        """Best effort: abort the multipart upload or delete the finished object."""
        if self._executor is not None:
            for future in self._futures:
                future.cancel()
            self._executor.shutdown(wait=True)
        try:
            if self.upload_id is not None and not self._done:
                self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=self.key, UploadId=self.upload_id
                )
            elif self._done:
                self.client.delete_object(Bucket=self.bucket, Key=self.key)
        except Exception:  # the next run's abort_stale_uploads cleans what is left
            pass
