# Copyright: clinic.backup contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Stdout callback for the test bed: one line per task result, JSON document in a file.

ansible-core ships no JSON stdout callback (ansible.posix.json lives in a separate
collection), so the test bed brings this one. It writes every task's per-host
result, in order, to the file named by ``CLINIC_TESTBED_RESULTS`` and prints a
short human-readable line per result so failing tests show what happened.
"""

from __future__ import annotations

DOCUMENTATION = """
name: clinic_testbed_json
type: stdout
short_description: per-task results as JSON in a file, for clinic.backup's test bed
description:
  - Records every task result in order and writes them as JSON to $CLINIC_TESTBED_RESULTS.
"""

import json
import os

from ansible.plugins.callback import CallbackBase


def _native(result):
    """The result dict of a task result on ansible-core 2.17-2.19."""
    data = getattr(result, "result", None)  # 2.19+
    if data is None:
        data = result._result
    return dict(data)


def _host(result):
    host = getattr(result, "host", None) or result._host
    return host.get_name()


def _task(result):
    return getattr(result, "task", None) or result._task


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "clinic_testbed_json"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._out = os.environ.get("CLINIC_TESTBED_RESULTS")
        self._doc = {"plays": [], "results": [], "stats": {}}

    # -- helpers ---------------------------------------------------------------
    def _record(self, status, result):
        task = _task(result)
        data = _native(result)
        data["_host"] = _host(result)
        data["_task"] = task.get_name()
        data["_action"] = task.action
        data["_status"] = status
        # 2.19 leaves the outcome flags out of result dicts handed to callbacks.
        data.setdefault("failed", status in ("failed", "ignored"))
        data.setdefault("changed", status == "changed")
        if status in ("skipped", "unreachable"):
            data.setdefault(status, True)
        self._doc["results"].append(data)
        line = "%s: [%s] %s" % (status.upper(), data["_host"], data["_task"])
        if status in ("failed", "unreachable") and data.get("msg"):
            line += " => %s" % data["msg"]
        self._display.display(line)
        self._flush()

    def _flush(self):
        # Rewritten after every result so a killed run still leaves what it did.
        if not self._out:
            return
        tmp = self._out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(self._doc, fh, default=str)
        os.replace(tmp, self._out)

    # -- events ----------------------------------------------------------------
    def v2_playbook_on_play_start(self, play):
        self._doc["plays"].append(play.get_name())

    def v2_runner_on_ok(self, result):
        self._record("changed" if _native(result).get("changed") else "ok", result)

    def v2_runner_on_failed(self, result, ignore_errors=False):
        self._record("ignored" if ignore_errors else "failed", result)

    def v2_runner_on_skipped(self, result):
        self._record("skipped", result)

    def v2_runner_on_unreachable(self, result):
        self._record("unreachable", result)

    def v2_runner_on_async_failed(self, result):
        self._record("failed", result)

    def v2_playbook_on_stats(self, stats):
        self._doc["stats"] = {host: stats.summarize(host) for host in sorted(stats.processed)}
        self._flush()
