"""haul's data plane: the domain (task, store, fetch, storage, webhook), the client a backend
uses (:mod:`actors.client`) and the Dramatiq actors (:mod:`actors.handlers`).

Importing any module here only defines names. A worker is ``dramatiq actors.worker`` (or
``haul worker``): that entry module alone builds the broker from the environment.
"""
