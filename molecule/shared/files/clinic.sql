-- The clinic's database as the molecule scenarios load it (synthetic rows, no real
-- patient): tables with serial keys and foreign keys, a view, a sequence of its own,
-- a read-only role with grants, default privileges. Run as postgres in clinic_db.
CREATE ROLE clinic_readonly NOLOGIN;
GRANT clinic_readonly TO clinic_user;
SET ROLE clinic_user;
CREATE TABLE patients (
    id serial PRIMARY KEY,
    name text NOT NULL,
    born date NOT NULL,
    notes text
);
CREATE TABLE appointments (
    id bigserial PRIMARY KEY,
    patient_id integer NOT NULL REFERENCES patients (id),
    starts_at timestamptz NOT NULL,
    room text
);
CREATE TABLE medical_records (
    id serial PRIMARY KEY,
    patient_id integer NOT NULL REFERENCES patients (id),
    recorded_at timestamptz NOT NULL DEFAULT '2026-01-01 00:00:00+00',
    body jsonb NOT NULL
);
CREATE SEQUENCE invoice_numbers START 1000 INCREMENT 7;
CREATE VIEW upcoming AS
    SELECT p.name, a.starts_at FROM appointments a JOIN patients p ON p.id = a.patient_id;
INSERT INTO patients (name, born, notes)
    SELECT 'patient ' || g, date '1950-01-01' + g, CASE WHEN g % 3 = 0 THEN NULL ELSE repeat('n', g % 50) END
    FROM generate_series(1, 2000) g;
INSERT INTO appointments (patient_id, starts_at, room)
    SELECT 1 + g % 2000, timestamptz '2026-01-01 08:00+00' + g * interval '17 minutes', 'room ' || g % 7
    FROM generate_series(1, 5000) g;
INSERT INTO medical_records (patient_id, body)
    SELECT 1 + g % 2000, jsonb_build_object('visit', g, 'bp', 100 + g % 40, 'text', md5(g::text))
    FROM generate_series(1, 3000) g;
-- Gaps and advanced sequences: a restore must bring back last_value, not just rows.
DELETE FROM patients WHERE id > 1990 AND id NOT IN (SELECT patient_id FROM appointments UNION SELECT patient_id FROM medical_records);
SELECT nextval('invoice_numbers') FROM generate_series(1, 13);
GRANT SELECT ON patients, appointments, upcoming TO clinic_readonly;
ALTER DEFAULT PRIVILEGES FOR ROLE clinic_user IN SCHEMA public GRANT SELECT ON TABLES TO clinic_readonly;
RESET ROLE;
REVOKE CONNECT ON DATABASE clinic_db FROM PUBLIC;
GRANT CONNECT ON DATABASE clinic_db TO clinic_user, clinic_readonly;
