# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import absolute_import, division, print_function

__metaclass__ = type


class ModuleDocFragment(object):
    # How to reach a PostgreSQL server: shared by the modules that dump or restore.
    DOCUMENTATION = r"""
options:
  database_url:
    description:
      - A libpq URL such as V(postgresql://clinic_user@db.example:5432/clinic_db), as in C(DATABASE_URL).
      - A password inside the URL is moved to the child's environment, never to its command line.
      - Explicit O(login_host), O(login_port), O(login_user) and O(login_password) override its parts.
    type: str
  login_host:
    description: Host name or Unix socket directory of the server.
    type: str
    aliases: [host]
  login_port:
    description: Port of the server.
    type: int
    aliases: [port]
  login_user:
    description: Role to connect as.
    type: str
    aliases: [login, user]
  login_password:
    description:
      - Password of O(login_user). It reaches the PostgreSQL tools this module runs (C(pg_dump), C(pg_restore),
        C(psql)) through their environment only, never their command line.
      - Prefer O(passfile) or a C(~/.pgpass) file.
    type: str
  passfile:
    description: A libpq password file (C(.pgpass) format) to use instead of O(login_password).
    type: path
  ssl_mode:
    description: libpq C(sslmode).
    type: str
    choices: [disable, allow, prefer, require, verify-ca, verify-full]
  connect_timeout:
    description: Seconds to wait for a connection before failing.
    type: int
    default: 15
  pg_bin_dir:
    description:
      - Directory holding C(pg_dump), C(pg_dumpall) and C(pg_restore).
      - By default the newest installed version under C(/usr/lib/postgresql/*/bin) that can read the server.
    type: path
"""
