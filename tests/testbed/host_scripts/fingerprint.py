"""Fingerprint of a clinic database, printed as JSON (run on the host as postgres).

    python3 fingerprint.py DATABASE

What a restore onto a replacement server must bring back: the schema (pg_dump
--schema-only: tables, constraints, views, owners, grants, default privileges), every
table's rows (count and a digest of the sorted rows), every sequence's state, the
cluster's roles (attributes, memberships) and the database's own privileges. Nothing
here depends on the server it runs on (no OIDs, no paths, no times).
"""

import hashlib
import json
import subprocess
import sys

import psycopg2

database = sys.argv[1]
schema = subprocess.run(
    ["pg_dump", "--schema-only", "--dbname", database], capture_output=True, text=True, check=True
).stdout
# pg_dump >= 15.14 writes a random \restrict key, and names its own version.
schema_lines = [
    line
    for line in schema.splitlines()
    if not line.startswith(("\\restrict", "\\unrestrict", "-- Dumped from", "-- Dumped by"))
]
conn = psycopg2.connect(dbname=database)
conn.set_session(readonly=True)
cur = conn.cursor()
cur.execute(
    "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables"
    " WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"
)
tables = {}
for (name,) in cur.fetchall():
    cur.execute(
        "SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), ''))"
        " FROM " + name + " t"
    )
    count, digest = cur.fetchone()
    tables[name] = {"rows": count, "md5": digest}
cur.execute(
    "SELECT format('%I.%I', schemaname, sequencename), last_value, start_value, increment_by"
    " FROM pg_sequences ORDER BY 1"
)
sequences = {name: [last, start, step] for name, last, start, step in cur.fetchall()}
cur.execute(
    "SELECT rolname, rolsuper, rolinherit, rolcreaterole, rolcreatedb, rolcanlogin,"
    " rolreplication, rolbypassrls, rolconnlimit FROM pg_roles"
    " WHERE rolname !~ '^pg_' ORDER BY 1"
)
roles = [list(row) for row in cur.fetchall()]
cur.execute(
    "SELECT r.rolname, m.rolname, am.admin_option FROM pg_auth_members am"
    " JOIN pg_roles r ON r.oid = am.roleid JOIN pg_roles m ON m.oid = am.member"
    " WHERE r.rolname !~ '^pg_' ORDER BY 1, 2"
)
memberships = [list(row) for row in cur.fetchall()]
cur.execute(
    # The ACL's items sorted: their order in datacl depends on the order the GRANTs ran.
    "SELECT pg_get_userbyid(datdba),"
    " coalesce((SELECT string_agg(item::text, ',' ORDER BY item::text)"
    " FROM unnest(datacl) item), '')"
    " FROM pg_database WHERE datname = %s",
    (database,),
)
owner, acl = cur.fetchone()
doc = {
    "schema_sha256": hashlib.sha256("\n".join(schema_lines).encode()).hexdigest(),
    "tables": tables,
    "sequences": sequences,
    "roles": roles,
    "memberships": memberships,
    "database": {"owner": owner, "acl": acl},
}
doc["sha256"] = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
print(json.dumps(doc, sort_keys=True))
