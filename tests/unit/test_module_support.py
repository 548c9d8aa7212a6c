"""Module glue without Ansible: which library a run lacks, and where it worked."""

from __future__ import annotations

import pytest

from ansible_collections.clinic.backup.plugins.module_utils import module_support


@pytest.mark.parametrize(
    "params, psycopg2, has_boto3, has_psycopg2, expected",
    [
        ({"repository": "/r"}, False, False, False, None),
        ({"bucket": "b"}, False, False, True, "boto3"),
        ({"s3_targets": [{"bucket": "b"}]}, True, False, True, "boto3"),
        ({"repository": "/r"}, True, True, False, "psycopg2"),
        ({"bucket": "b"}, True, True, True, None),
    ],
)
def test_missing_library_names_only_what_this_run_needs(
    monkeypatch, params, psycopg2, has_boto3, has_psycopg2, expected
):
    # A host without the library cannot be had here: the import flags are what varies.
    monkeypatch.setattr(module_support.s3util, "HAS_BOTO3", has_boto3)
    monkeypatch.setattr(module_support, "HAS_PSYCOPG2", has_psycopg2)
    missing = module_support.missing_library(params, psycopg2=psycopg2)
    assert (missing[0] if missing else None) == expected


def test_repository_names_never_carry_credentials():
    params = {
        "repository": "/var/backups/clinic/db",
        "s3_targets": [{"bucket": "offsite", "prefix": "db/main", "aws_secret_key": "s3cr3t"}],
        "aws_secret_key": "s3cr3t",
    }
    names = module_support.repository_names(params)
    assert names == ["/var/backups/clinic/db", "s3://offsite/db/main"]
    assert "s3cr3t" not in repr(names)
