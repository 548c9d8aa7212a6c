"""The streaming multipart sink against the S3 endpoint: parts, abort, size check."""

from __future__ import annotations

import hashlib
import os

import pytest

from ansible_collections.clinic.backup.plugins.module_utils import s3 as s3util
from ansible_collections.clinic.backup.plugins.module_utils.errors import StoreError
from tests.integration import helpers

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@pytest.fixture
def client(s3):
    env = s3.env()
    return s3util.make_client(
        region="us-east-1",
        endpoint_url=s3.endpoint_url,
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        retries=2,
    )


def test_stream_larger_than_a_part_is_uploaded_in_parts(client, s3, bucket):
    data = os.urandom(MiB) * 12  # 12 MiB: three 5 MiB parts, the last one short
    sink = s3util.MultipartSink(client, bucket, "x/big", part_size=5 * MiB, concurrency=2)
    for start in range(0, len(data), 700 * 1024):  # odd chunk sizes, as a pipe delivers them
        sink.write(data[start : start + 700 * 1024])
    assert sink.upload_id is not None
    assert sink.close() == "s3://%s/x/big" % bucket
    body = s3.client().get_object(Bucket=bucket, Key="x/big")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == hashlib.sha256(data).hexdigest()
    assert helpers.open_multipart_uploads(s3.client(), bucket) == []


def test_small_stream_is_a_single_put(client, s3, bucket):
    sink = s3util.MultipartSink(client, bucket, "x/small", part_size=5 * MiB)
    sink.write(b"tiny")
    sink.close()
    assert sink.upload_id is None
    assert s3.client().get_object(Bucket=bucket, Key="x/small")["Body"].read() == b"tiny"


def test_abort_mid_stream_leaves_no_upload_and_no_object(client, s3, bucket):
    sink = s3util.MultipartSink(client, bucket, "x/aborted", part_size=5 * MiB, concurrency=2)
    sink.write(os.urandom(11 * MiB))
    assert helpers.open_multipart_uploads(s3.client(), bucket) == ["x/aborted"]
    sink.abort()
    assert helpers.open_multipart_uploads(s3.client(), bucket) == []
    assert helpers.s3_keys(s3.client(), bucket) == []


def test_part_size_below_the_s3_minimum_is_refused(client, bucket):
    with pytest.raises(Exception, match="below the 5 MiB minimum"):
        s3util.MultipartSink(client, bucket, "x/y", part_size=MiB)


def test_missing_bucket_is_a_clear_store_error(client):
    with pytest.raises(StoreError, match="NoSuchBucket") as info:
        s3util.check_bucket(client, "no-such-bucket-here")
    assert "create the bucket" in str(info.value)


def test_stale_uploads_are_aborted(client, s3, bucket):
    s3.client().create_multipart_upload(Bucket=bucket, Key="p/sets/x/file")
    assert s3util.abort_stale_uploads(client, bucket, "p/sets/") == ["p/sets/x/file"]
    assert helpers.open_multipart_uploads(s3.client(), bucket) == []
