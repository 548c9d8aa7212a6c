# -*- coding: utf-8 -*-
# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""The compliance report: the backup guide's HIPAA checklist, each line proven from
data (the status of every database and file group of every host, their cron
schedules, their audit logs, the runbook documents), with charts of backup size,
duration, verification and restore-test RTO/RPO over time against the objectives.

``evaluate`` turns the evidence into a report (plain data, the JSON beside the page);
``render_html`` turns a report into one self-contained page: inline SVG, no script,
and a Content-Security-Policy that forbids loading anything, so it opens offline and
leaks nothing when mailed to an auditor.
"""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import datetime
import html
import re

from .errors import ConfigError
from .units import human_duration, human_size

PASS, WARN, FAIL = "pass", "warn", "fail"
_RANK = {PASS: 0, WARN: 1, FAIL: 2}

# The backup guide's compliance checklist, in its order and words.
CHECKLIST = (
    ("daily_backups", "Daily automated backups configured"),
    ("encrypted", "Backups encrypted at rest"),
    ("offsite", "Backups stored off-site (cloud)"),
    ("procedures", "Restore procedures documented"),
    ("restore_testing", "Monthly restore testing scheduled"),
    ("access_logged", "Backup access logged and audited"),
    ("dr_plan", "Disaster recovery plan documented"),
)

# What the backup_agent role's cron lines run (see roles/backup_agent/tasks/cron.yml).
_CRON_BACKUP = re.compile(r"\s(backup|files-backup)\s+--config\s+(\S+)")
_CRON_RESTORE_TEST = re.compile(r"\s(restore-test|files-restore-test)\s+--config\s+(\S+)")

_UTC = datetime.timezone.utc


class Objectives(object):
    """What the clinic promises. Defaults: the runbook's RTO/RPO table (database
    corruption: 1 hour, 24 hours), daily backups, weekly verification, monthly tests."""

    def __init__(
        self,
        rto_hours=1.0,
        rpo_hours=24.0,
        backup_max_age_hours=25.0,
        verify_max_age_days=8.0,
        restore_test_max_age_days=32.0,
        window_days=30,
    ):
        for name, value in (
            ("rto_hours", rto_hours),
            ("rpo_hours", rpo_hours),
            ("backup_max_age_hours", backup_max_age_hours),
            ("verify_max_age_days", verify_max_age_days),
            ("restore_test_max_age_days", restore_test_max_age_days),
            ("window_days", window_days),
        ):
            if value is None or float(value) <= 0:
                raise ConfigError(
                    "objective %s must be a positive number, not %r" % (name, value),
                    "omit it for the runbook's default",
                )
        self.rto_seconds = float(rto_hours) * 3600.0
        self.rpo_seconds = float(rpo_hours) * 3600.0
        self.backup_max_age_seconds = float(backup_max_age_hours) * 3600.0
        self.verify_max_age_seconds = float(verify_max_age_days) * 86400.0
        self.restore_test_max_age_seconds = float(restore_test_max_age_days) * 86400.0
        self.window_days = int(window_days)

    def as_dict(self):
        return {
            "rto_seconds": self.rto_seconds,
            "rpo_seconds": self.rpo_seconds,
            "backup_max_age_seconds": self.backup_max_age_seconds,
            "verify_max_age_seconds": self.verify_max_age_seconds,
            "restore_test_max_age_seconds": self.restore_test_max_age_seconds,
            "window_days": self.window_days,
        }


def parse_time(text):
    """An ISO 8601 UTC time from a status record, or None."""
    if not isinstance(text, str) or not text:
        return None
    text = text.replace("+00:00", "Z")
    for layout in ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return datetime.datetime.strptime(text, layout).replace(tzinfo=_UTC)
        except ValueError:
            continue
    return None


def _worst(states):
    return max(states, key=lambda s: _RANK[s]) if states else FAIL


def _line(state, text):
    return {"state": state, "text": text}


def _complete_sets(group):
    return [row for row in group.get("sets") or [] if row.get("finished_at")]


def _scheduled(schedule, pattern, config_name):
    """Whether the host's cron text runs ``pattern`` for a config named like the group."""
    if not schedule:
        return False
    for match in pattern.finditer(schedule):
        base = match.group(2).rsplit("/", 1)[-1]
        if base in (config_name + ".json", "files-%s.json" % config_name):
            return True
    return False


# ---------------------------------------------------------------------- the checks
def check_daily(host, group, objectives, now):
    rows = _complete_sets(group)
    name = "%s on %s" % (group["name"], host["host"])
    if not rows:
        return _line(FAIL, "%s: no complete backup set" % name)
    times = [parse_time(row["finished_at"]) for row in rows]
    times = [t for t in times if t is not None]
    first = min(times)
    window_start = now - datetime.timedelta(days=objectives.window_days)
    start = max(first, window_start).date()
    days = [start + datetime.timedelta(days=n) for n in range((now.date() - start).days + 1)]
    covered = {t.date() for t in times}
    missing = [d for d in days if d not in covered]
    newest_age = (now - max(times)).total_seconds()
    scheduled = _scheduled(host.get("schedule"), _CRON_BACKUP, group["name"])
    text = "%s: a set on %d of %d days; newest %s ago; %s" % (
        name,
        len(days) - len(missing),
        len(days),
        human_duration(newest_age),
        "scheduled by cron" if scheduled else "NO cron schedule found",
    )
    if newest_age > objectives.backup_max_age_seconds:
        return _line(FAIL, text + " (newest older than the objective)")
    if missing:
        return _line(WARN, text + "; missing: %s" % ", ".join(d.isoformat() for d in missing[:7]))
    return _line(PASS if scheduled else WARN, text)


def check_encrypted(host, group, objectives, now):
    rows = _complete_sets(group)
    name = "%s on %s" % (group["name"], host["host"])
    plain = [row["id"] for row in rows if not row.get("encrypted")]
    if not rows:
        return _line(FAIL, "%s: no complete backup set" % name)
    if plain:
        return _line(FAIL, "%s: NOT encrypted: %s" % (name, ", ".join(plain[:5])))
    return _line(PASS, "%s: all %d sets gpg AES256" % (name, len(rows)))


def check_offsite(host, group, objectives, now):
    rows = _complete_sets(group)
    name = "%s on %s" % (group["name"], host["host"])
    if not any(url.startswith("s3://") for url in group.get("repositories") or []):
        return _line(FAIL, "%s: no off-site (S3) repository configured" % name)
    if not rows:
        return _line(FAIL, "%s: no complete backup set" % name)
    newest = rows[0]
    copies = [c for c in newest.get("copies") or [] if c.get("where") == "s3"]
    verified = [
        c
        for c in copies
        if c.get("verification") == "ok"
        and parse_time(c.get("verified_at")) is not None
        and (now - parse_time(c["verified_at"])).total_seconds()
        <= objectives.verify_max_age_seconds
    ]
    if verified:
        return _line(
            PASS,
            "%s: newest set %s verified in %s"
            % (name, newest["id"], ", ".join(c["repository"] for c in verified)),
        )
    if any(c.get("present") for c in copies):
        return _line(WARN, "%s: newest set %s is off-site but not verified" % (name, newest["id"]))
    return _line(FAIL, "%s: newest set %s has no off-site copy" % (name, newest["id"]))


def check_restore_testing(host, group, objectives, now):
    name = "%s on %s" % (group["name"], host["host"])
    test = group.get("last_successful_restore_test")
    scheduled = _scheduled(host.get("schedule"), _CRON_RESTORE_TEST, group["name"])
    when = parse_time((test or {}).get("at"))
    if when is None:
        return _line(
            FAIL,
            "%s: no successful restore test on record%s"
            % (name, "" if scheduled else ", none scheduled"),
        )
    age = (now - when).total_seconds()
    rto = test.get("rto_seconds")
    text = "%s: last successful restore test %s ago (RTO %s); %s" % (
        name,
        human_duration(age),
        human_duration(rto),
        "scheduled by cron" if scheduled else "not scheduled by cron (playbook only)",
    )
    if age > objectives.restore_test_max_age_seconds:
        return _line(FAIL, text + " (older than the objective)")
    if rto is not None and rto > objectives.rto_seconds:
        return _line(WARN, text + " (RTO above the objective)")
    return _line(PASS, text)


def check_access_logged(host, objectives):
    audit = host.get("audit")
    if not audit or not audit.get("present"):
        return _line(FAIL, "%s: no audit log" % host["host"])
    if not audit.get("intact"):
        return _line(
            FAIL,
            "%s: audit log %s NOT intact from line %s"
            % (host["host"], audit.get("path"), audit.get("first_bad_line")),
        )
    actions = audit.get("actions") or {}
    text = "%s: audit log %s intact, %d records since %s (%s)" % (
        host["host"],
        audit.get("path"),
        audit.get("records", 0),
        audit.get("first_at"),
        ", ".join("%s %d" % (k, v) for k, v in sorted(actions.items())),
    )
    return _line(PASS if actions.get("read") else WARN, text)


def check_documents(documents, kind, what):
    present = [d for d in documents if d.get("kind") == kind and d.get("bytes")]
    if not present:
        return [_line(FAIL, "no %s found" % what)]
    return [
        _line(PASS, "%s (%s, sha256 %s)" % (d["title"], human_size(d["bytes"]), d["sha256"][:12]))
        for d in present
    ]


# ---------------------------------------------------------------------- the report
def _series(group):
    """The chart data of one group, oldest first."""
    rows = sorted(_complete_sets(group), key=lambda r: r["finished_at"])
    tests = sorted(
        (t for t in group.get("restore_tests") or [] if t.get("ok") and t.get("at")),
        key=lambda t: t["at"],
    )
    return {
        "size": [(r["finished_at"], r.get("size")) for r in rows if r.get("size") is not None],
        "duration": [
            (r["finished_at"], r.get("duration_seconds"))
            for r in rows
            if r.get("duration_seconds") is not None
        ],
        "verification": [
            (r["finished_at"], c.get("repository"), c.get("verification") or c.get("text"))
            for r in rows
            for c in r.get("copies") or []
        ],
        "rto": [(t["at"], t.get("rto_seconds")) for t in tests if t.get("rto_seconds") is not None],
        "rpo": [(t["at"], t.get("rpo_seconds")) for t in tests if t.get("rpo_seconds") is not None],
    }


def evaluate(hosts, documents, objectives, now):
    """The report (plain data) from ``hosts``: ``[{"host", "groups": [backup_status
    groups], "schedule": cron text or None, "audit": audit.log_evidence or None}]``
    and ``documents``: ``[{"kind": "procedures"|"dr_plan", "title", "bytes", "sha256"}]``."""
    if not hosts:
        raise ConfigError("the compliance report needs at least one host's status")
    lines = {key: [] for key, _words in CHECKLIST}
    sections = []
    for host in hosts:
        groups = host.get("groups") or []
        for group in groups:
            if group.get("error"):
                for key in ("daily_backups", "encrypted", "offsite"):
                    lines[key].append(
                        _line(FAIL, "%s on %s: %s" % (group["name"], host["host"], group["error"]))
                    )
                continue
            lines["daily_backups"].append(check_daily(host, group, objectives, now))
            lines["encrypted"].append(check_encrypted(host, group, objectives, now))
            lines["offsite"].append(check_offsite(host, group, objectives, now))
            lines["restore_testing"].append(check_restore_testing(host, group, objectives, now))
        lines["access_logged"].append(check_access_logged(host, objectives))
        sections.append(
            {
                "host": host["host"],
                "groups": [
                    {
                        "name": g["name"],
                        "kind": g.get("kind"),
                        "problems": g.get("problems") or [],
                        "overdue": [o.get("message") for o in g.get("overdue") or []],
                        "restore_test": g.get("restore_test_text"),
                        "series": _series(g),
                    }
                    for g in groups
                ],
            }
        )
    lines["procedures"] = check_documents(documents, "procedures", "restore procedures")
    lines["dr_plan"] = check_documents(documents, "dr_plan", "disaster recovery playbooks")
    checklist = [
        {
            "key": key,
            "requirement": words,
            "state": _worst([line["state"] for line in lines[key]]),
            "evidence": lines[key],
        }
        for key, words in CHECKLIST
    ]
    return {
        "generated_at": now.astimezone(_UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "objectives": objectives.as_dict(),
        "state": _worst([item["state"] for item in checklist]),
        "checklist": checklist,
        "hosts": sections,
    }


# ---------------------------------------------------------------------- rendering
_COLORS = {"size": "#2b6cb0", "duration": "#805ad5", "rto": "#c05621", "rpo": "#2f855a"}
_STATE_COLORS = {PASS: "#2f855a", WARN: "#b7791f", FAIL: "#c53030"}
_VERIFY_COLORS = {"ok": "#2f855a", "unverified": "#b7791f"}
_W, _H, _L, _R, _T, _B = 640, 200, 70, 16, 28, 34


def _e(text):
    return html.escape(str(text), quote=True)


def _x_scale(moments):
    low, high = min(moments), max(moments)
    span = (high - low).total_seconds() or 1.0

    def x(moment):
        if high == low:
            return _L + (_W - _L - _R) / 2.0
        return _L + (moment - low).total_seconds() / span * (_W - _L - _R)

    return x, low, high


def _frame(title, body, x_low, x_high, legend=""):
    ticks = ""
    if x_low is not None:
        for moment, anchor, x in (
            (x_low, "start", _L),
            (x_high, "end", _W - _R),
        ):
            ticks += '<text x="%.1f" y="%d" text-anchor="%s" class="tick">%s</text>' % (
                x,
                _H - 10,
                anchor,
                _e(moment.strftime("%Y-%m-%d %H:%M")),
            )
    return (
        '<svg class="chart" role="img" viewBox="0 0 %d %d" width="%d" height="%d" '
        'xmlns="http://www.w3.org/2000/svg"><title>%s</title>'
        '<text x="%d" y="18" class="title">%s</text>%s'
        '<line x1="%d" y1="%d" x2="%d" y2="%d" class="axis"/>%s%s</svg>'
        % (
            _W,
            _H,
            _W,
            _H,
            _e(title),
            _L,
            _e(title),
            legend,
            _L,
            _H - _B,
            _W - _R,
            _H - _B,
            ticks,
            body,
        )
    )


def line_chart(title, series, fmt, objectives=()):
    """An SVG line chart: ``series`` ``[(label, color, [(iso time, value)])]``,
    ``fmt`` formats a y value, ``objectives`` ``[(value, label)]`` drawn as dashed lines."""
    points = [
        (parse_time(t), float(v), label, color)
        for label, color, values in series
        for t, v in values
        if parse_time(t) is not None and v is not None
    ]
    if not points:
        return _frame(
            title,
            '<text x="%d" y="%d" class="empty">no data yet</text>' % (_W // 2, _H // 2),
            None,
            None,
        )
    x, x_low, x_high = _x_scale([p[0] for p in points])
    top = max([p[1] for p in points] + [value for value, _label in objectives]) * 1.15 or 1.0

    def y(value):
        return _T + (1.0 - value / top) * (_H - _T - _B)

    body = ""
    for fraction in (0.0, 0.5, 1.0):
        value = top * fraction
        body += '<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" class="grid"/>' % (
            _L,
            y(value),
            _W - _R,
            y(value),
        )
        body += '<text x="%d" y="%.1f" text-anchor="end" class="tick">%s</text>' % (
            _L - 6,
            y(value) + 4,
            _e(fmt(value)),
        )
    for value, label in objectives:
        body += (
            '<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" class="objective"/>'
            '<text x="%d" y="%.1f" text-anchor="end" class="objective-label">%s</text>'
            % (_L, y(value), _W - _R, y(value), _W - _R, y(value) - 4, _e(label))
        )
    legend = ""
    for index, (label, color, _values) in enumerate(series):
        mine = sorted((p for p in points if p[2] == label), key=lambda p: p[0])
        if len(mine) > 1:
            body += '<polyline class="series" stroke="%s" points="%s"/>' % (
                color,
                " ".join("%.1f,%.1f" % (x(p[0]), y(p[1])) for p in mine),
            )
        for p in mine:
            body += (
                '<circle cx="%.1f" cy="%.1f" r="3.5" fill="%s"><title>%s: %s</title></circle>'
                % (x(p[0]), y(p[1]), color, _e(p[0].strftime("%Y-%m-%d %H:%M UTC")), _e(fmt(p[1])))
            )
        legend += '<rect x="%d" y="8" width="10" height="10" fill="%s"/>' % (
            _W - 200 + index * 90,
            color,
        )
        legend += '<text x="%d" y="17" class="tick">%s</text>' % (_W - 186 + index * 90, _e(label))
    return _frame(title, body, x_low, x_high, legend)


def verification_chart(title, cells):
    """One row of marks per repository: a mark per set, coloured by its verification."""
    cells = [(parse_time(t), repo, state) for t, repo, state in cells if parse_time(t)]
    if not cells:
        return _frame(
            title,
            '<text x="%d" y="%d" class="empty">no data yet</text>' % (_W // 2, _H // 2),
            None,
            None,
        )
    x, x_low, x_high = _x_scale([c[0] for c in cells])
    repos = sorted({c[1] for c in cells})
    step = (_H - _T - _B) / float(len(repos) + 1)
    body = ""
    for index, repo in enumerate(repos):
        row_y = _T + step * (index + 1)
        body += '<text x="%d" y="%.1f" text-anchor="end" class="tick">%s</text>' % (
            _L - 6,
            row_y + 4,
            _e("S3" if repo.startswith("s3://") else "local"),
        )
        for moment, where, state in cells:
            if where != repo:
                continue
            color = _VERIFY_COLORS.get(state, "#c53030")
            body += (
                '<rect x="%.1f" y="%.1f" width="8" height="14" fill="%s">'
                "<title>%s %s: %s</title></rect>"
                % (
                    x(moment) - 4,
                    row_y - 7,
                    color,
                    _e(repo),
                    _e(moment.strftime("%Y-%m-%d %H:%M UTC")),
                    _e(state),
                )
            )
    return _frame(title, body, x_low, x_high)


def _hours(seconds):
    return human_duration(seconds)


def _group_charts(group, objectives):
    series = group["series"]
    return "".join(
        (
            line_chart("Backup size", [("stored", _COLORS["size"], series["size"])], human_size),
            line_chart(
                "Backup duration",
                [("duration", _COLORS["duration"], series["duration"])],
                _hours,
            ),
            verification_chart("Verification of each copy", series["verification"]),
            line_chart(
                "Restore tests: RTO and RPO",
                [
                    ("RTO", _COLORS["rto"], series["rto"]),
                    ("RPO", _COLORS["rpo"], series["rpo"]),
                ],
                _hours,
                objectives=[
                    (objectives["rto_seconds"], "RTO objective"),
                    (objectives["rpo_seconds"], "RPO objective"),
                ],
            ),
        )
    )


_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em auto;padding:0 1.5em;max-width:1340px;color:#1a202c}
h1{margin-bottom:.2em}.meta{color:#4a5568}
table{border-collapse:collapse;width:100%;margin:1em 0}
td,th{border-bottom:1px solid #e2e8f0;padding:.4em .6em;text-align:left;vertical-align:top}
.badge{display:inline-block;min-width:4em;text-align:center;color:#fff;border-radius:4px;
padding:.1em .4em;font-weight:600}
.pass{background:#2f855a}.warn{background:#b7791f}.fail{background:#c53030}
ul{margin:0;padding-left:1.1em}.charts{display:flex;flex-wrap:wrap;gap:12px}
svg.chart{background:#f7fafc;border:1px solid #e2e8f0;border-radius:6px}
.title{font-size:13px;font-weight:600;fill:#2d3748}.tick{font-size:10px;fill:#4a5568}
.axis{stroke:#a0aec0}.grid{stroke:#e2e8f0}.series{fill:none;stroke-width:2}
.objective{stroke:#c53030;stroke-dasharray:5 4}.objective-label{font-size:10px;fill:#c53030}
.empty{font-size:12px;fill:#a0aec0;text-anchor:middle}
"""


def render_html(report, title="Backup compliance report"):
    """One self-contained HTML page (no script, nothing loaded from anywhere)."""
    rows = ""
    for item in report["checklist"]:
        rows += (
            '<tr><td><span class="badge %s">%s</span></td><td>%s</td><td><ul>%s</ul></td></tr>'
            % (
                item["state"],
                _e(item["state"].upper()),
                _e(item["requirement"]),
                "".join(
                    '<li class="%s-text">%s</li>' % (line["state"], _e(line["text"]))
                    for line in item["evidence"]
                ),
            )
        )
    sections = ""
    for host in report["hosts"]:
        sections += "<h2>%s</h2>" % _e(host["host"])
        for group in host["groups"]:
            notes = group["problems"] + group["overdue"]
            sections += "<h3>%s <small>(%s)</small></h3><p>Last restore test: %s</p>%s" % (
                _e(group["name"]),
                _e(group.get("kind") or "unreadable"),
                _e(group.get("restore_test") or "never"),
                "<ul>%s</ul>" % "".join("<li>%s</li>" % _e(n) for n in notes) if notes else "",
            )
            sections += '<div class="charts">%s</div>' % _group_charts(group, report["objectives"])
    objectives = report["objectives"]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'\">"
        "<title>%s</title><style>%s</style></head><body>"
        '<h1>%s</h1><p class="meta">Generated %s by clinic.backup. Overall: '
        '<span class="badge %s">%s</span>. Objectives: RTO %s, RPO %s, a backup every %s, '
        "each copy verified within %s, a restore test within %s.</p>"
        "<h2>HIPAA compliance checklist</h2>"
        "<table><tr><th>State</th><th>Requirement</th><th>Evidence</th></tr>%s</table>"
        "%s</body></html>\n"
        % (
            _e(title),
            _STYLE,
            _e(title),
            _e(report["generated_at"]),
            report["state"],
            _e(report["state"].upper()),
            _e(human_duration(objectives["rto_seconds"])),
            _e(human_duration(objectives["rpo_seconds"])),
            _e(human_duration(objectives["backup_max_age_seconds"])),
            _e(human_duration(objectives["verify_max_age_seconds"])),
            _e(human_duration(objectives["restore_test_max_age_seconds"])),
            rows,
            sections,
        )
    )
