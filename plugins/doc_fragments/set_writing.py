# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    # Modules that write a new set (pg_dump, pg_basebackup, files_backup): the options of
    # module_support.SET_WRITING_ARGS that read the same for every kind of set.
    DOCUMENTATION = r"""
options:
  compression:
    description: Compression of the stream, done once by the pipeline (a tool's own compression is turned off).
    type: str
    choices: [zstd, gzip, none]
    default: zstd
  compression_level:
    description: Compression level (zstd 1-19, default 3; gzip 1-9, default 6).
    type: int
  encrypt:
    description:
      - Encrypt every artifact with gpg (symmetric, AES256). Decryptable with stock C(gpg --decrypt).
      - Turning this off stores patient data in clear; it exists for test systems only.
    type: bool
    default: true
  passphrase_file:
    description:
      - File holding the encryption passphrase on one line. Must be a regular file owned by the
        backup user or root with mode V(0600) or stricter; anything looser is refused.
      - The manifest is sealed with a key derived from it.
      - The passphrase reaches gpg through an inherited pipe, never the command line.
    type: path
  stale_seconds:
    description: Leftovers of killed runs older than this are removed before the backup starts.
    type: int
    default: 3600
"""
