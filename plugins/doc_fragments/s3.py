# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    # Credentials and transfer tuning for S3 (or any S3-compatible endpoint).
    DOCUMENTATION = r"""
options:
  aws_profile:
    description: Named profile from C(~/.aws/config). By default boto3's usual credential chain is used.
    type: str
    aliases: [profile]
  aws_access_key:
    description: Access key id. Prefer the environment, a profile or an instance role.
    type: str
    aliases: [access_key]
  aws_secret_key:
    description: Secret access key, together with O(aws_access_key).
    type: str
    aliases: [secret_key]
  aws_session_token:
    description: Session token for temporary credentials.
    type: str
    aliases: [session_token]
  s3_part_size_mb:
    description:
      - Size of each multipart upload part in MiB (at least 5). Only modules that upload use it.
      - Memory used per S3 target is about O(s3_part_size_mb) times (O(s3_concurrency) + 1).
      - An object can have at most 10,000 parts, so 8 MiB parts allow backups up to about 80 GB.
    type: int
    default: 8
  s3_concurrency:
    description: Parts uploaded in parallel (modules that upload).
    type: int
    default: 4
  s3_retries:
    description:
      - Attempts per S3 request (botocore standard retry mode, exponential backoff).
      - Throttling (503 SlowDown) and dropped connections are retried; when attempts run out the task fails.
    type: int
    default: 8
requirements:
  - boto3 >= 1.28 (for S3)
"""

    # One S3 location as top-level options (backup_verify, s3_transfer).
    LOCATION = r"""
options:
  bucket:
    description: S3 bucket holding the repository.
    type: str
  prefix:
    description: Key prefix of the repository inside O(bucket), for example V(db/clinic-main).
    type: str
    default: ""
  region:
    description: Region of O(bucket).
    type: str
  endpoint_url:
    description: URL of an S3-compatible endpoint (MinIO, Ceph, Wasabi...). Path-style addressing is used with it.
    type: str
  sse:
    description:
      - Server-side encryption of uploaded objects (in addition to the gpg encryption of the artifacts).
      - Only used when this module uploads (M(clinic.backup.s3_transfer) V(upload), a verification record); modules
        that only read accept it so that one set of S3 variables serves every module.
    type: str
    choices: [none, AES256, aws:kms]
    default: none
  kms_key_id:
    description: KMS key for O(sse=aws:kms).
    type: str
  storage_class:
    description:
      - Storage class of uploaded objects, for example V(STANDARD_IA) or V(GLACIER_IR).
      - Only used when this module uploads; modules that only read accept it and ignore it.
    type: str
  object_lock:
    description:
      - S3 Object Lock for the objects of every set this module writes (its artifacts and manifest), so that
        nobody holding these credentials, or any others, can delete or overwrite them before the date.
      - The bucket must have Object Lock enabled (created with it); otherwise the module refuses before
        writing anything.
      - Modules that only read accept it and ignore it; in a bucket with Object Lock enabled they read each
        set as first written (whatever was put over it or hidden behind a delete marker since) and report
        its lock. See the README section "Immutable backups (S3 Object Lock)".
    type: dict
    suboptions:
      mode:
        description:
          - V(COMPLIANCE) nobody can shorten or remove the lock, not even the account's root user.
          - V(GOVERNANCE) identities granted C(s3:BypassGovernanceRetention) can.
        type: str
        required: true
        choices: [GOVERNANCE, COMPLIANCE]
      days:
        description:
          - Days each set stays locked from the moment it is written (1 to 36500). Retention keeps a set
            it would delete until then, and reports it as locked with the date.
        type: int
        required: true
"""

    # Where a new set goes in S3 (pg_dump, files_backup): any number of locations at once.
    TARGETS = r"""
options:
  s3_targets:
    description:
      - S3 locations receiving the same set, uploaded from the stream (multipart, no temporary copy).
      - A second bucket in another region gives the offsite copy of the 3-2-1 rule.
    type: list
    elements: dict
    default: []
    suboptions:
      bucket:
        description: Bucket name.
        type: str
        required: true
      prefix:
        description: Key prefix of the repository in the bucket.
        type: str
        default: ""
      region:
        description: Region of the bucket.
        type: str
      endpoint_url:
        description: URL of an S3-compatible endpoint.
        type: str
      sse:
        description: Server-side encryption.
        type: str
        choices: [none, AES256, aws:kms]
        default: none
      kms_key_id:
        description: KMS key for O(s3_targets[].sse=aws:kms).
        type: str
      storage_class:
        description: Storage class of the objects.
        type: str
      object_lock:
        description:
          - S3 Object Lock for every object of the set (its artifacts and manifest), so that nobody, with
            these credentials or any others, can delete or overwrite them before the date. Verification records
            and the C(latest) pointer are rewritten by design and are not locked (they are sealed, so a forged
            one is refused).
          - The bucket must have Object Lock enabled (created with it); otherwise the module refuses before
            writing anything. See the README section "Immutable backups (S3 Object Lock)".
        type: dict
        suboptions:
          mode:
            description:
              - V(COMPLIANCE) nobody can shorten or remove the lock, not even the account's root user.
              - V(GOVERNANCE) identities granted C(s3:BypassGovernanceRetention) can.
            type: str
            required: true
            choices: [GOVERNANCE, COMPLIANCE]
          days:
            description: Days each set stays locked from the moment it is written (1 to 36500).
            type: int
            required: true
"""
