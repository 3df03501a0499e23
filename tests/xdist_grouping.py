"""pytest-xdist scheduling for this suite: whole files per worker (loadfile), with the files of each group in
tests/conftest.py's WORKER_GROUPS as one work unit, and a crashed worker's work finished by its replacement.

xdist 3.8's loadfile / loadscope scheduler hangs when a worker dies inside a test (pytest-xdist #1323, #1327:
the replacement worker gets only the finished part of the file back, or one test with no shutdown after it, and
waits forever for more) and, where it does not hang, re-runs the test that killed the worker until the restart
budget is spent (#1371). A suite that dies of SIGILL on a CPU without an instruction set then never ends in CI.
Here the test that crashed is reported failed once (xdist names it: "worker 'gwN' crashed while running ..."),
the rest of its file runs on the replacement worker, and the run ends. Imports only xdist (no torch), so a
subprocess test of the crash path starts quickly."""
from __future__ import annotations

from xdist.scheduler import LoadFileScheduling


class GroupedFileScheduling(LoadFileScheduling):
    """loadfile scheduling whose work units are `groups` (file path -> group name) or else single files."""

    def __init__(self, config, log=None, groups: dict[str, str] | None = None):
        super().__init__(config, log)
        self.groups = dict(groups or {})

    def _split_scope(self, nodeid: str) -> str:
        path = super()._split_scope(nodeid)
        return self.groups.get(path, path)

    def remove_node(self, node):
        """The node is gone (finished or crashed): return the test it crashed in, or None; the unfinished tests of
        its work units go back to the queue, the crashed one marked done (its failure is already reported)."""
        workload = self.assigned_work.pop(node)
        pending = [(unit, nodeid) for unit in workload.values() for nodeid, done in unit.items() if not done]
        if not pending:
            return None
        crashed_unit, crashitem = pending[0]
        crashed_unit[crashitem] = True
        for scope, unit in workload.items():
            if not all(unit.values()):
                self.workqueue[scope] = unit
        for other in self.assigned_work:
            self._reschedule(other)
        return crashitem

    def _assign_work_unit(self, node) -> None:
        super()._assign_work_unit(node)
        # The last unit is out: tell the node no more work comes (a worker runs a test only once it has the next
        # one or knows there is none; a crashed worker's replacement given a unit of one test waited forever).
        if not self.workqueue and not node.shutting_down:
            node.shutdown()
