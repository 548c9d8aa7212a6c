"""A synthetic clinic database and files, deterministic for a given seed.

Rows are generated server-side with ``generate_series``. Every "random" choice
is ``hashint8extended(row, seed)`` based, so the data is identical whatever
plan PostgreSQL picks, and text is drawn from medical vocabularies so it
compresses like real notes (zstd ~3-8x), not like filler or random hex.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .pg import quote_ident, quote_literal

if TYPE_CHECKING:
    from .pg import PostgresCluster

# Rows at scale=1.0; every table grows linearly with scale.
BASE_ROWS = {
    "patients": 5_000,
    "appointments": 20_000,
    "medical_records": 30_000,
    "prescriptions": 10_000,
}

AWKWARD_TABLES = ("Patient Notes; DROP TABLE x", "it's")

VOCAB: dict[str, Sequence[str]] = {
    "first": (
        "Olivia Liam Emma Noah Amelia Oliver Sophia Elijah Charlotte James Ava William Mia "
        "Benjamin Isabella Lucas Evelyn Henry Harper Theodore Luna Jack Camila Levi Gianna "
        "Alexander Elizabeth Jackson Eleanor Mateo Ella Daniel Abigail Michael Sofia Mason "
        "Avery Sebastian Scarlett Ethan Emily Logan Aria Owen Penelope Samuel Chloe Jacob Layla "
        "Asher Mila Aiden Nora John Hazel Joseph Madison Wyatt Ellie David Lily Leo Nova Luke "
        "Isla Julian Grace Hudson Violet Grayson Aurora Matthew Riley Ezra Zoey Gabriel Willow "
        "Carter Emilia Isaac Stella Jayden Zoe Luca Victoria Anthony Hannah Dylan Addison "
        "Lincoln Leah Thomas Lucy Maverick Eliana Elias Ivy Josiah Everly"
    ).split(),
    "last": (
        "Smith Johnson Williams Brown Jones Garcia Miller Davis Rodriguez Martinez Hernandez "
        "Lopez Gonzalez Wilson Anderson Thomas Taylor Moore Jackson Martin Lee Perez Thompson "
        "White Harris Sanchez Clark Ramirez Lewis Robinson Walker Young Allen King Wright Scott "
        "Torres Nguyen Hill Flores Green Adams Nelson Baker Hall Rivera Campbell Mitchell "
        "Carter Roberts Gomez Phillips Evans Turner Diaz Parker Cruz Edwards Collins Reyes "
        "Stewart Morris Morales Murphy Cook Rogers Gutierrez Ortiz Morgan Cooper Peterson "
        "Bailey Reed Kelly Howard Ramos Kim Cox Ward Richardson Watson Brooks Chavez Wood James "
        "Bennett Gray Mendoza Ruiz Hughes Price Alvarez Castillo Sanders Patel Myers Long Ross "
        "Foster O'Brien D'Angelo Kowalski Nowak Schmidt Müller Søren"
    ).split(),
    "street": (
        "Maple Oak Pine Cedar Elm Washington Lake Hill Park Main Sunset Ridge Willow Meadow "
        "Forest River Spring Highland Church Mill Chestnut Walnut Franklin Lincoln Jefferson"
    ).split(),
    "street_kind": ("Street", "Avenue", "Road", "Boulevard", "Lane", "Drive", "Court"),
    "city": (
        "Springfield Riverside Franklin Greenville Bristol Clinton Fairview Salem Madison "
        "Georgetown Arlington Ashland Burlington Manchester Milford Oxford Dayton Dover"
    ).split(),
    "domain": ("example.com", "example.org", "example.net", "mail.example.com"),
    "sex": ("F", "M", "F", "M", "X"),
    "patient_status": ("active",) * 8 + ("inactive", "deceased"),
    "language": ("English",) * 6 + ("Spanish", "Spanish", "Polish", "Vietnamese", "Arabic"),
    "insurer": (
        "Blue Harbor Health",
        "Cedar Mutual",
        "Northwind Care",
        "Medicare",
        "Medicaid",
        "Summit Assurance",
        "Self-pay",
    ),
    "allergy": (
        "penicillin",
        "sulfa drugs",
        "latex",
        "peanuts",
        "shellfish",
        "aspirin",
        "ibuprofen",
        "codeine",
        "bee stings",
        "iodine contrast",
    ),
    "provider": (
        "Dr. Alice Moreau",
        "Dr. Rahul Mehta",
        "Dr. Grace Okafor",
        "Dr. Tomasz Zielinski",
        "Dr. Hannah Becker",
        "Dr. Luis Ortega",
        "Dr. Mei Chen",
        "Dr. Samuel Adeyemi",
        "Dr. Ingrid Larsen",
        "Dr. Yusuf Demir",
        "NP Carla Ruiz",
        "PA Jordan Blake",
    ),
    "department": (
        "Family Medicine",
        "Cardiology",
        "Dermatology",
        "Pediatrics",
        "Orthopedics",
        "Neurology",
        "Endocrinology",
        "Gastroenterology",
        "Pulmonology",
        "Psychiatry",
    ),
    "appt_status": ("completed",) * 6 + ("scheduled", "scheduled", "cancelled", "no_show"),
    "reason": (
        "annual physical",
        "follow-up visit",
        "medication review",
        "new patient intake",
        "chest pain evaluation",
        "diabetes management",
        "hypertension check",
        "skin rash",
        "knee pain",
        "persistent cough",
        "headache",
        "vaccination",
        "lab results review",
        "pre-operative assessment",
        "anxiety follow-up",
        "back pain",
    ),
    "record_type": (
        "progress_note",
        "progress_note",
        "progress_note",
        "lab_result",
        "imaging",
        "referral",
        "discharge_summary",
        "telephone_encounter",
    ),
    "symptom": (
        "intermittent chest pain",
        "shortness of breath",
        "persistent dry cough",
        "fatigue",
        "dizziness on standing",
        "lower back pain",
        "joint stiffness",
        "frequent headaches",
        "nausea after meals",
        "burning on urination",
        "itchy rash",
        "palpitations",
        "numbness and tingling",
        "swelling of the ankles",
        "difficulty sleeping",
        "increased thirst",
        "blurred vision",
        "abdominal discomfort",
        "low mood",
        "wheezing",
    ),
    "body_part": (
        "left knee",
        "right shoulder",
        "lower back",
        "chest",
        "abdomen",
        "neck",
        "left hip",
        "right wrist",
        "both feet",
        "upper back",
        "right ankle",
        "forearm",
    ),
    "duration_unit": ("days", "weeks", "months"),
    "finding": (
        "lungs clear to auscultation bilaterally",
        "regular rate and rhythm without murmurs",
        "mild tenderness to palpation",
        "no focal neurological deficits",
        "erythematous maculopapular rash",
        "decreased range of motion",
        "abdomen soft and non-tender",
        "mild pitting edema",
        "scattered expiratory wheezes",
        "tympanic membranes intact",
        "no lymphadenopathy",
        "capillary refill under two seconds",
    ),
    "diagnosis": (
        "essential hypertension",
        "type 2 diabetes mellitus",
        "acute bronchitis",
        "seasonal allergic rhinitis",
        "osteoarthritis",
        "generalized anxiety disorder",
        "major depressive disorder",
        "hyperlipidemia",
        "gastroesophageal reflux disease",
        "migraine without aura",
        "contact dermatitis",
        "urinary tract infection",
        "iron deficiency anemia",
        "hypothyroidism",
        "asthma, mild persistent",
        "lumbar strain",
    ),
    "icd10": (
        "I10",
        "E11.9",
        "J20.9",
        "J30.2",
        "M19.90",
        "F41.1",
        "F32.9",
        "E78.5",
        "K21.9",
        "G43.009",
        "L25.9",
        "N39.0",
        "D50.9",
        "E03.9",
        "J45.30",
        "S39.012A",
    ),
    "medication": (
        "lisinopril",
        "metformin",
        "atorvastatin",
        "amlodipine",
        "levothyroxine",
        "omeprazole",
        "sertraline",
        "albuterol inhaler",
        "amoxicillin",
        "ibuprofen",
        "gabapentin",
        "hydrochlorothiazide",
        "losartan",
        "escitalopram",
        "montelukast",
        "prednisone",
    ),
    "dose": ("2.5", "5", "10", "20", "25", "40", "50", "100", "250", "500", "850", "1000"),
    "frequency": (
        "once daily",
        "twice daily",
        "three times daily",
        "at bedtime",
        "every 6 hours as needed",
        "once weekly",
    ),
    "history": (
        "has a history of smoking, quit five years ago",
        "denies alcohol or drug use",
        "reports good adherence to current medications",
        "lives alone and is independent in ADLs",
        "has a family history of coronary artery disease",
        "works night shifts",
        "recently returned from travel abroad",
        "exercises three times per week",
    ),
    "counseling": (
        "Discussed diet and exercise at length.",
        "Reviewed warning signs and when to seek care.",
        "Patient verbalized understanding of the plan.",
        "Provided written instructions.",
        "Encouraged smoking cessation.",
        "Advised to keep a symptom diary.",
        "Medication side effects were reviewed.",
        "Questions were answered to satisfaction.",
    ),
    "followup": (
        "",
        " with fasting labs",
        " if symptoms persist",
        " for review of results",
        " or sooner if worse",
    ),
    "instructions": (
        "Take with food.",
        "Take on an empty stomach.",
        "Avoid alcohol.",
        "Do not drive if drowsy.",
        "Finish the full course.",
        "Use as directed.",
    ),
}


def _arr(key: str) -> str:
    """VOCAB[key] as an SQL text[] constant."""
    return "ARRAY[" + ",".join(quote_literal(w) for w in VOCAB[key]) + "]::text[]"


def _helpers_sql(seed: int) -> str:
    # pg_temp functions vanish with the session, so they never show up in a dump.
    salt_base = int(seed) * 1_000_003
    return f"""
-- The generator queries have huge cost estimates; JIT would spend seconds compiling them.
SET jit = off;
CREATE FUNCTION pg_temp.h(i bigint, salt int) RETURNS bigint LANGUAGE sql IMMUTABLE AS
  $$ SELECT hashint8extended(i, {salt_base}::bigint + salt) $$;
CREATE FUNCTION pg_temp.ri(i bigint, salt int, lo int, hi int) RETURNS int LANGUAGE sql
  IMMUTABLE AS $$ SELECT lo + (((pg_temp.h(i, salt) % (hi - lo + 1)) + (hi - lo + 1))
                               % (hi - lo + 1))::int $$;
CREATE FUNCTION pg_temp.pick(arr text[], i bigint, salt int) RETURNS text LANGUAGE sql
  IMMUTABLE AS $$ SELECT arr[pg_temp.ri(i, salt, 1, array_length(arr, 1))] $$;
"""


def _sentence_sql(key: str) -> str:
    """One clinical sentence for sentence key ``key`` (a bigint SQL expression)."""
    p = f"pg_temp.pick(%s, {key}, %d)"
    r = f"pg_temp.ri({key}, %d, %d, %d)"
    return f"""CASE pg_temp.ri({key}, 100, 0, 7)
  WHEN 0 THEN 'Patient reports ' || {p % (_arr("symptom"), 101)} || ' in the '
       || {p % (_arr("body_part"), 102)} || ' for ' || {r % (103, 1, 14)} || ' '
       || {p % (_arr("duration_unit"), 104)} || '.'
  WHEN 1 THEN 'On examination, ' || {p % (_arr("finding"), 105)} || '.'
  WHEN 2 THEN 'Assessment: ' || {p % (_arr("diagnosis"), 106)} || ' ('
       || {p % (_arr("icd10"), 107)} || ').'
  WHEN 3 THEN 'Plan: start ' || {p % (_arr("medication"), 108)} || ' '
       || {p % (_arr("dose"), 109)} || ' mg ' || {p % (_arr("frequency"), 110)} || '.'
  WHEN 4 THEN 'Blood pressure ' || {r % (111, 100, 165)} || '/' || {r % (112, 60, 100)}
       || ' mmHg, heart rate ' || {r % (113, 52, 118)} || ' bpm, temperature '
       || (36.0 + {r % (114, 0, 25)} / 10.0)::numeric(4,1) || ' C.'
  WHEN 5 THEN 'Follow-up in ' || {r % (115, 1, 12)} || ' weeks'
       || {p % (_arr("followup"), 116)} || '.'
  WHEN 6 THEN 'Patient ' || {p % (_arr("history"), 117)} || '.'
  ELSE {p % (_arr("counseling"), 118)}
END"""


def _load_sql(owner: str, scale: float, awkward_names: bool) -> str:
    n = {table: max(1, round(rows * scale)) for table, rows in BASE_ROWS.items()}
    notes = (
        "(SELECT string_agg(" + _sentence_sql("g.i * 64 + s") + ", ' ' ORDER BY s) "
        "FROM generate_series(1, pg_temp.ri(g.i, 30, 3, 12)) AS s)"
    )
    own = quote_ident(owner)
    sql = f"""
BEGIN;
CREATE TABLE patients (
    patient_id      bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    mrn             text NOT NULL UNIQUE,
    first_name      text NOT NULL,
    last_name       text NOT NULL,
    date_of_birth   date NOT NULL,
    sex             char(1) NOT NULL,
    phone           text,
    email           text,
    address_line    text,
    city            text,
    postal_code     text,
    status          text NOT NULL CHECK (status IN ('active', 'inactive', 'deceased')),
    insurance       jsonb NOT NULL DEFAULT '{{}}',
    photo_thumbnail bytea,
    created_at      timestamptz NOT NULL,
    updated_at      timestamptz NOT NULL
);
COMMENT ON TABLE patients IS 'Demographics (PHI): synthetic test data only';
INSERT INTO patients (patient_id, mrn, first_name, last_name, date_of_birth, sex, phone, email,
                      address_line, city, postal_code, status, insurance, photo_thumbnail,
                      created_at, updated_at)
SELECT g.i,
       'MRN-' || lpad(g.i::text, 8, '0'),
       pg_temp.pick({_arr("first")}, g.i, 1),
       pg_temp.pick({_arr("last")}, g.i, 2),
       DATE '1932-01-01' + pg_temp.ri(g.i, 3, 0, 33000),
       pg_temp.pick({_arr("sex")}, g.i, 4),
       '+1-555-' || lpad(pg_temp.ri(g.i, 5, 0, 999)::text, 3, '0') || '-'
           || lpad(pg_temp.ri(g.i, 6, 0, 9999)::text, 4, '0'),
       lower(pg_temp.pick({_arr("first")}, g.i, 1)) || '.'
           || lower(replace(pg_temp.pick({_arr("last")}, g.i, 2), '''', '')) || g.i
           || '@' || pg_temp.pick({_arr("domain")}, g.i, 7),
       pg_temp.ri(g.i, 8, 1, 9999) || ' ' || pg_temp.pick({_arr("street")}, g.i, 9) || ' '
           || pg_temp.pick({_arr("street_kind")}, g.i, 10),
       pg_temp.pick({_arr("city")}, g.i, 11),
       lpad(pg_temp.ri(g.i, 12, 1000, 99999)::text, 5, '0'),
       pg_temp.pick({_arr("patient_status")}, g.i, 13),
       jsonb_build_object(
           'provider', pg_temp.pick({_arr("insurer")}, g.i, 14),
           'member_id', upper(substr(md5('member' || g.i), 1, 10)),
           'allergies', to_jsonb(ARRAY(
               SELECT pg_temp.pick({_arr("allergy")}, g.i * 8 + k, 15)
               FROM generate_series(1, pg_temp.ri(g.i, 16, 0, 2)) AS k)),
           'preferred_language', pg_temp.pick({_arr("language")}, g.i, 17),
           'consent_to_sms', pg_temp.ri(g.i, 18, 0, 1) = 1),
       CASE WHEN pg_temp.ri(g.i, 19, 0, 2) = 0 THEN NULL
            ELSE decode(md5('thumb' || g.i || ':' || pg_temp.h(g.i, 20)), 'hex') END,
       TIMESTAMPTZ '2018-01-01 08:00:00+00'
           + make_interval(secs => pg_temp.ri(g.i, 21, 0, 157680000)),
       TIMESTAMPTZ '2023-01-01 08:00:00+00'
           + make_interval(secs => pg_temp.ri(g.i, 22, 0, 31536000))
FROM generate_series(1, {n["patients"]}) AS g(i);
CREATE INDEX patients_last_name_idx ON patients (last_name, first_name);
CREATE INDEX patients_dob_idx ON patients (date_of_birth);

CREATE TABLE appointments (
    appointment_id   bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    patient_id       bigint NOT NULL REFERENCES patients (patient_id),
    provider_name    text NOT NULL,
    department       text NOT NULL,
    scheduled_at     timestamptz NOT NULL,
    duration_minutes integer NOT NULL CHECK (duration_minutes > 0),
    status           text NOT NULL
                     CHECK (status IN ('scheduled', 'completed', 'cancelled', 'no_show')),
    reason           text NOT NULL,
    created_at       timestamptz NOT NULL
);
INSERT INTO appointments (appointment_id, patient_id, provider_name, department, scheduled_at,
                          duration_minutes, status, reason, created_at)
SELECT g.i,
       pg_temp.ri(g.i, 31, 1, {n["patients"]}),
       pg_temp.pick({_arr("provider")}, g.i, 32),
       pg_temp.pick({_arr("department")}, g.i, 33),
       TIMESTAMPTZ '2022-01-03 08:00:00+00' + make_interval(days => pg_temp.ri(g.i, 34, 0, 1460),
           mins => 15 * pg_temp.ri(g.i, 35, 0, 36)),
       (ARRAY[15, 20, 30, 30, 45, 60])[pg_temp.ri(g.i, 36, 1, 6)],
       pg_temp.pick({_arr("appt_status")}, g.i, 37),
       pg_temp.pick({_arr("reason")}, g.i, 38),
       TIMESTAMPTZ '2021-12-01 08:00:00+00'
           + make_interval(secs => pg_temp.ri(g.i, 39, 0, 126144000))
FROM generate_series(1, {n["appointments"]}) AS g(i);
CREATE INDEX appointments_patient_idx ON appointments (patient_id);
CREATE INDEX appointments_scheduled_idx ON appointments (scheduled_at);
ANALYZE appointments;

CREATE TABLE medical_records (
    record_id      bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    patient_id     bigint NOT NULL REFERENCES patients (patient_id),
    appointment_id bigint REFERENCES appointments (appointment_id),
    record_type    text NOT NULL,
    diagnosis_code text,
    clinical_notes text NOT NULL,
    vitals         jsonb,
    attachment     bytea,
    author         text NOT NULL,
    recorded_at    timestamptz NOT NULL
);
COMMENT ON COLUMN medical_records.clinical_notes IS 'Free-text clinical notes (PHI)';
INSERT INTO medical_records (record_id, patient_id, appointment_id, record_type, diagnosis_code,
                             clinical_notes, vitals, attachment, author, recorded_at)
SELECT g.i,
       a.patient_id,
       CASE WHEN pg_temp.ri(g.i, 41, 0, 4) = 0 THEN NULL ELSE a.appointment_id END,
       pg_temp.pick({_arr("record_type")}, g.i, 42),
       pg_temp.pick({_arr("icd10")}, g.i, 43),
       {notes},
       CASE WHEN pg_temp.ri(g.i, 44, 0, 3) = 0 THEN NULL ELSE jsonb_build_object(
           'bp_systolic', pg_temp.ri(g.i, 45, 95, 170),
           'bp_diastolic', pg_temp.ri(g.i, 46, 55, 105),
           'heart_rate', pg_temp.ri(g.i, 47, 50, 120),
           'temp_c', (36.0 + pg_temp.ri(g.i, 48, 0, 25) / 10.0)::numeric(4,1),
           'weight_kg', (45 + pg_temp.ri(g.i, 49, 0, 900) / 10.0)::numeric(5,1)) END,
       CASE WHEN pg_temp.ri(g.i, 50, 0, 9) = 0
            THEN sha256(('attachment:' || g.i || ':' || pg_temp.h(g.i, 51))::bytea) END,
       pg_temp.pick({_arr("provider")}, g.i, 52),
       a.scheduled_at + make_interval(mins => pg_temp.ri(g.i, 53, 5, 240))
FROM (SELECT i, pg_temp.ri(i, 40, 1, {n["appointments"]}) AS appointment_id
      FROM generate_series(1, {n["medical_records"]}) AS i OFFSET 0) AS g
JOIN appointments a ON a.appointment_id = g.appointment_id;
CREATE INDEX medical_records_patient_idx ON medical_records (patient_id, recorded_at);
CREATE INDEX medical_records_diagnosis_idx ON medical_records (diagnosis_code);
ANALYZE medical_records;

CREATE TABLE prescriptions (
    prescription_id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    record_id       bigint NOT NULL REFERENCES medical_records (record_id) ON DELETE CASCADE,
    patient_id      bigint NOT NULL REFERENCES patients (patient_id),
    medication      text NOT NULL,
    dose_mg         numeric(8,2) NOT NULL,
    frequency       text NOT NULL,
    refills         smallint NOT NULL DEFAULT 0,
    prescribed_on   date NOT NULL,
    instructions    text
);
INSERT INTO prescriptions (prescription_id, record_id, patient_id, medication, dose_mg,
                           frequency, refills, prescribed_on, instructions)
SELECT g.i, m.record_id, m.patient_id,
       pg_temp.pick({_arr("medication")}, g.i, 61),
       pg_temp.pick({_arr("dose")}, g.i, 62)::numeric,
       pg_temp.pick({_arr("frequency")}, g.i, 63),
       pg_temp.ri(g.i, 64, 0, 5),
       (m.recorded_at AT TIME ZONE 'UTC')::date,
       pg_temp.pick({_arr("instructions")}, g.i, 65)
FROM (SELECT i, pg_temp.ri(i, 60, 1, {n["medical_records"]}) AS record_id
      FROM generate_series(1, {n["prescriptions"]}) AS i OFFSET 0) AS g
JOIN medical_records m ON m.record_id = g.record_id;
CREATE INDEX prescriptions_patient_idx ON prescriptions (patient_id);

SELECT setval(pg_get_serial_sequence('patients', 'patient_id'), {n["patients"]});
SELECT setval(pg_get_serial_sequence('appointments', 'appointment_id'), {n["appointments"]});
SELECT setval(pg_get_serial_sequence('medical_records', 'record_id'), {n["medical_records"]});
SELECT setval(pg_get_serial_sequence('prescriptions', 'prescription_id'),
              {n["prescriptions"]});

CREATE SEQUENCE invoice_number_seq START WITH 100000;
SELECT setval('invoice_number_seq', 100000 + {n["appointments"]});

CREATE VIEW patient_summary AS
SELECT p.patient_id, p.mrn, p.last_name, p.first_name,
       count(a.appointment_id) AS appointments,
       max(a.scheduled_at) AS last_visit
FROM patients p LEFT JOIN appointments a ON a.patient_id = p.patient_id
GROUP BY p.patient_id;

ALTER TABLE patients OWNER TO {own};
ALTER TABLE appointments OWNER TO {own};
ALTER TABLE medical_records OWNER TO {own};
ALTER TABLE prescriptions OWNER TO {own};
ALTER SEQUENCE invoice_number_seq OWNER TO {own};
ALTER VIEW patient_summary OWNER TO {own};
"""
    if awkward_names:
        notes_t, quote_t = (quote_ident(t) for t in AWKWARD_TABLES)
        sql += f"""
CREATE TABLE {notes_t} (id integer PRIMARY KEY, "note; text" text NOT NULL);
INSERT INTO {notes_t} SELECT i, 'Note ' || i || ': patient''s "quoted" text; -- not SQL'
FROM generate_series(1, 25) AS i;
CREATE TABLE {quote_t} (id integer PRIMARY KEY, "it's value" text);
INSERT INTO {quote_t} SELECT i, 'O''Brien #' || i FROM generate_series(1, 7) AS i;
ALTER TABLE {notes_t} OWNER TO {own};
ALTER TABLE {quote_t} OWNER TO {own};
"""
    return sql + "COMMIT;\nANALYZE;\n"


def load_clinic_dataset(
    cluster: PostgresCluster,
    dbname: str,
    owner: str,
    scale: float = 1.0,
    seed: int = 0,
    awkward_names: bool = False,
) -> dict[str, int]:
    """Create and fill the clinic schema in ``dbname``; return the row count per table.

    scale=1.0 gives 5,000 patients, 20,000 appointments, 30,000 medical_records and
    10,000 prescriptions (about 20 MB on disk). The same ``seed`` gives the same rows.
    """
    if scale <= 0:
        raise ValueError("scale must be positive")
    cluster.psql(_helpers_sql(seed) + _load_sql(owner, scale, awkward_names), dbname=dbname)
    counts = {table: max(1, round(rows * scale)) for table, rows in BASE_ROWS.items()}
    if awkward_names:
        counts.update({AWKWARD_TABLES[0]: 25, AWKWARD_TABLES[1]: 7})
    return counts


_FINGERPRINT_SETTINGS = """
SET jit = off;
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'postgres';
SET bytea_output = 'hex';
SET extra_float_digits = 1;
"""


def list_user_tables(cluster: PostgresCluster, dbname: str) -> list[tuple[str, str]]:
    """(schema, table) of every ordinary user table, sorted."""
    out = cluster.psql(
        """SELECT coalesce(json_agg(json_build_array(n.nspname, c.relname)
                                ORDER BY n.nspname, c.relname), '[]')
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE c.relkind = 'r'
             AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\\_%';""",
        dbname=dbname,
    )
    return [tuple(pair) for pair in json.loads(out)]


def table_fingerprints(cluster: PostgresCluster, dbname: str) -> dict[str, dict[str, object]]:
    """``{table: {"rows": int, "md5": str}}`` for every user table in ``dbname``.

    Keys are bare table names in ``public`` and ``schema.table`` elsewhere. Rows are
    ordered by their text form under the "C" collation, so the digest does not depend
    on the database's collation, and output settings are pinned for the same reason.
    """
    tables = list_user_tables(cluster, dbname)
    if not tables:
        return {}
    queries = []
    for schema, table in tables:
        key = table if schema == "public" else f"{schema}.{table}"
        rel = f"{quote_ident(schema)}.{quote_ident(table)}"
        queries.append(
            f"SELECT json_build_object('table', {quote_literal(key)}, 'rows', count(*), "
            f"'md5', md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text COLLATE \"C\"), "
            f"''))) FROM {rel} AS t;"
        )
    out = cluster.psql(_FINGERPRINT_SETTINGS + "\n".join(queries), dbname=dbname)
    result: dict[str, dict[str, object]] = {}
    for line in out.splitlines():
        if line.strip():
            row = json.loads(line)
            result[row["table"]] = {"rows": int(row["rows"]), "md5": row["md5"]}
    return result


# ---------------------------------------------------------------------- files
FAKE_SECRETS = {
    "DATABASE_PASSWORD": "fake-db-pass-9f3c1e7a",
    "SECRET_KEY": "fake-django-secret-5b2d8e0c4a7f4419a3d6",
    "SMTP_PASSWORD": "fake-smtp-pass-71c4",
    "AWS_SECRET_ACCESS_KEY": "fakeAwsSecretKeyTESTBED0000000000000000000",
}
"""Values planted in make_config_files(): tests grep logs and manifests for them."""

_UPLOAD_TEXT = (
    b"Consent form for treatment. The patient agrees to the procedure described above and "
    b"acknowledges the risks, benefits and alternatives explained by the clinician. "
)


def make_uploads(directory: str | os.PathLike[str], count: int = 50, seed: int = 0) -> list[Path]:
    """Write ``count`` upload-like files in nested directories; return their paths.

    A mix of compressible (PDF-ish, CSV) and incompressible (JPEG-ish) content,
    plus one empty file and names with spaces, as a clinic's upload folder has.
    Same seed, same bytes and mtimes.
    """
    rng = random.Random(seed)
    root = Path(directory)
    paths: list[Path] = []
    for n in range(count):
        patient = rng.randint(1, 5000)
        kind = n % 4
        if kind == 0:
            rel = Path("scans", str(2020 + n % 5), f"patient_{patient:05d}", f"xray_{n:03d}.dcm")
            # DICOM preamble, then a noisy gradient: compresses, but not to nothing.
            body = (
                bytes(128)
                + b"DICM"
                + bytes(
                    (i // 7 + rng.randint(0, 12)) % 256 for i in range(rng.randint(4_000, 60_000))
                )
            )
        elif kind == 1:
            rel = Path("consents", f"patient_{patient:05d}", f"consent form {n:03d}.pdf")
            body = b"%PDF-1.4\n" + _UPLOAD_TEXT * rng.randint(10, 120) + b"\n%%EOF\n"
        elif kind == 2:
            rel = Path("photos", f"patient_{patient:05d}", f"wound_{n:03d}.jpg")
            body = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + rng.randbytes(rng.randint(2_000, 80_000))
        else:
            rel = Path("lab", f"2024-{1 + n % 12:02d}", f"result_{n:03d}.csv")
            rows = [
                f"{patient},{rng.choice(['HbA1c', 'LDL', 'TSH', 'CRP'])},"
                f"{rng.uniform(0.1, 200):.2f},{rng.choice(['normal', 'high', 'low'])}"
                for _row in range(rng.randint(5, 400))
            ]
            body = ("patient_id,test,value,flag\n" + "\n".join(rows) + "\n").encode()
        if n == count - 1 and count > 1:
            body = b""  # an empty upload happens, and trips naive tools
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        mtime = 1_700_000_000 + n * 3_600
        os.utime(path, (mtime, mtime))
        paths.append(path)
    return paths


def make_config_files(directory: str | os.PathLike[str]) -> dict[str, Path]:
    """Write an app .env (0600, fake secrets), an nginx site and a systemd unit.

    Returns ``{"env": ..., "nginx": ..., "systemd": ...}``.
    """
    root = Path(directory)
    env_path = root / "app" / ".env"
    nginx_path = root / "nginx" / "sites-available" / "clinic.conf"
    unit_path = root / "systemd" / "clinic-app.service"
    for path in (env_path, nginx_path, unit_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    s = FAKE_SECRETS
    env_text = (
        "# Clinic web app settings (synthetic test data)\n"
        "DJANGO_SETTINGS_MODULE=clinic.settings.production\n"
        f"SECRET_KEY={s['SECRET_KEY']}\n"
        "DATABASE_HOST=127.0.0.1\nDATABASE_NAME=clinic_db\nDATABASE_USER=clinic_user\n"
        f"DATABASE_PASSWORD={s['DATABASE_PASSWORD']}\n"
        "SMTP_HOST=smtp.example.com\nSMTP_USER=noreply@example.com\n"
        f"SMTP_PASSWORD={s['SMTP_PASSWORD']}\n"
        "AWS_ACCESS_KEY_ID=AKIAFAKETESTBED00000\n"
        f"AWS_SECRET_ACCESS_KEY={s['AWS_SECRET_ACCESS_KEY']}\n"
    )
    fd = os.open(env_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(env_text)
    os.chmod(env_path, 0o600)
    nginx_path.write_text(
        "server {\n"
        "    listen 443 ssl http2;\n"
        "    server_name clinic.example.com;\n"
        "    ssl_certificate /etc/ssl/certs/clinic.pem;\n"
        "    ssl_certificate_key /etc/ssl/private/clinic.key;\n"
        "    client_max_body_size 50m;\n"
        "    location /static/ { alias /srv/clinic/static/; }\n"
        "    location /uploads/ { internal; alias /srv/clinic/uploads/; }\n"
        "    location / {\n"
        "        proxy_pass http://127.0.0.1:8000;\n"
        "        proxy_set_header Host $host;\n"
        "        proxy_set_header X-Forwarded-Proto https;\n"
        "    }\n"
        "}\n"
    )
    unit_path.write_text(
        "[Unit]\nDescription=Clinic web application\nAfter=network.target postgresql.service\n\n"
        "[Service]\nUser=clinic\nGroup=clinic\nWorkingDirectory=/srv/clinic\n"
        "EnvironmentFile=/srv/clinic/.env\n"
        "ExecStart=/srv/clinic/venv/bin/gunicorn clinic.wsgi --bind 127.0.0.1:8000 --workers 3\n"
        "Restart=on-failure\nNoNewPrivileges=true\nProtectSystem=strict\n"
        "ReadWritePaths=/srv/clinic/uploads\n\n[Install]\nWantedBy=multi-user.target\n"
    )
    return {"env": env_path, "nginx": nginx_path, "systemd": unit_path}
