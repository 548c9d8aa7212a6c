"""clinic.backup's test bed: real PostgreSQL, moto S3 and ansible-playbook on 127.0.0.1.

Import from the submodules (``testbed.pg``, ``testbed.s3``, ``testbed.dataset``,
``testbed.ansible``, ``testbed.netutil``); tests/conftest.py puts ``tests/`` on
sys.path so ``import testbed`` works from any test directory. Scripts that put the
repository root on sys.path may import ``tests.testbed`` instead.
"""

from __future__ import annotations

from .ansible import PlaybookResult, ansible_env, make_collection_path, run_module, run_playbook
from .dataset import load_clinic_dataset, make_config_files, make_uploads, table_fingerprints
from .netutil import free_port
from .pg import PostgresCluster, PostgresError
from .s3 import MotoS3Server

__all__ = [
    "MotoS3Server",
    "PlaybookResult",
    "PostgresCluster",
    "PostgresError",
    "ansible_env",
    "free_port",
    "load_clinic_dataset",
    "make_collection_path",
    "make_config_files",
    "make_uploads",
    "run_module",
    "run_playbook",
    "table_fingerprints",
]
