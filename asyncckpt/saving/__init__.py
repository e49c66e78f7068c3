"""The save side, one pass down: plan → stager → writer → storage.

``plan`` checks and flattens the state (``snapshot``) and picks the blobs that may be copied
while the trainer runs on (``overlap``); the ``stager`` copies it into a reused buffer set
(``staging``) and arms the optimizer-step guard; the ``writer`` encodes it, makes it durable,
verifies it, commits it and applies ``retention``. ``runner`` is the writer's lifecycle (a portal
thread, or the caller's task group); ``job``, ``pending``, ``errorbox``, ``handles`` and ``stats``
are what the trainer sees of a save in flight. Nothing here imports the checkpointer, which wires
these together, nor the load side.
"""
