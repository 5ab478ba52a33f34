"""
twistd plugins for the taskmesh daemons: ``twistd -n taskmesh-master`` and
``twistd -n taskmesh-slave``.

Only the two ``ServiceMaker`` objects live here, so that listing plugins
imports nothing else. Each one names the module that defines its ``Options``
and ``makeService``.
"""

from twisted.application.service import ServiceMaker

taskmesh_master = ServiceMaker(
    "taskmesh master",
    "taskmesh.master.tap",
    "Dispatch tasks to taskmesh slaves over a STOMP broker and serve the HTTP API.",
    "taskmesh-master",
)

taskmesh_slave = ServiceMaker(
    "taskmesh slave",
    "taskmesh.slave.tap",
    "Run the tasks that a taskmesh master broadcasts over a STOMP broker.",
    "taskmesh-slave",
)
