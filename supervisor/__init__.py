"""haul's control plane: the operator CLI, the local stack, and (soon) the supervisor daemon.

It imports ``actors``; ``actors`` never imports it.
"""
